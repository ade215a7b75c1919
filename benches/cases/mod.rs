//! The harness's cases. Each is an async function returning its printed report.

pub mod redis;
pub mod util;

use std::future::Future;
use std::pin::Pin;

pub type CaseFuture = Pin<Box<dyn Future<Output = anyhow::Result<String>>>>;

pub struct Case {
    pub name: &'static str,
    pub run: fn() -> CaseFuture,
}

/// Every case, in the order they run.
pub fn all() -> Vec<Case> {
    vec![
        Case { name: "redis", run: redis::case },
    ]
}
