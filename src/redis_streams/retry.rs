//! The retry mover: re-adds due entries from `<stream>:retry` to the stream.
//!
//! A failed entry is scheduled in the sorted set (score = due time in ms) by the settler,
//! atomically with its XACK. This loop moves every due entry back with one script call,
//! which re-adds and removes each in one step. Every consumer of the stream runs a mover;
//! the script makes concurrent movers safe.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Ops;
use super::consumer::{Inner, sleep_or_cancel};

/// How often due retries are looked for: the precision of retry delays.
pub const MOVE_INTERVAL: Duration = Duration::from_millis(200);
/// Most entries moved by one script call, so the server is never blocked for long.
const MOVE_BATCH: i64 = 500;

pub(crate) async fn run(inner: Arc<Inner>, ops: Ops, stop: CancellationToken) {
    loop {
        if sleep_or_cancel(MOVE_INTERVAL, &stop).await {
            return;
        }
        loop {
            let cmd = inner
                .scripts
                .move_due
                .call(&[&inner.retry_key, &inner.config.stream])
                .arg(MOVE_BATCH)
                .to_owned();
            match ops.query::<i64>(&cmd).await {
                Ok(moved) => {
                    if moved > 0 {
                        tracing::debug!(consumer = %inner.name, moved, "due retries re-added to the stream");
                    }
                    if moved < MOVE_BATCH || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    if let Err(e) = inner.scripts.load(&ops).await {
                        tracing::warn!(consumer = %inner.name, error = %e, "cannot load scripts");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(consumer = %inner.name, error = %e, "cannot move due retries");
                    break;
                }
            }
        }
    }
}
