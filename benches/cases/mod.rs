//! The harness's cases. Each is an async function returning its printed report.

pub mod amqp;
pub mod amqp_memory;
pub mod confirm_floor;
pub mod flow_control;
pub mod http;
pub mod inbox;
pub mod outbox;
pub mod publish_api;
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
        Case {
            name: "amqp",
            run: || Box::pin(amqp::run()),
        },
        Case {
            name: "amqp-memory",
            run: || Box::pin(amqp_memory::run()),
        },
        Case {
            name: "redis",
            run: redis::case,
        },
        Case {
            name: "http",
            run: || Box::pin(http::run()),
        },
        Case {
            name: "outbox",
            run: || Box::pin(outbox::drain()),
        },
        Case {
            name: "outbox-latency",
            run: || Box::pin(outbox::latency()),
        },
        Case {
            name: "amqp-flow",
            run: || Box::pin(flow_control::amqp_flow()),
        },
        Case {
            name: "redis-flow",
            run: || Box::pin(flow_control::redis_flow()),
        },
        Case {
            name: "global-rate",
            run: || Box::pin(flow_control::global_rate()),
        },
        Case {
            name: "outbox-one-key",
            run: || Box::pin(outbox::one_key()),
        },
        Case {
            name: "publish-api",
            run: || Box::pin(publish_api::throughput()),
        },
        Case {
            name: "scheduled-burst",
            run: || Box::pin(publish_api::scheduled_burst()),
        },
        Case {
            name: "amqp-inbox",
            run: || Box::pin(inbox::amqp_inbox()),
        },
        Case {
            name: "redis-inbox",
            run: || Box::pin(inbox::redis_inbox()),
        },
        Case {
            name: "confirm-floor",
            run: || Box::pin(confirm_floor::run()),
        },
    ]
}
