//! What components are built from: the validated configuration and the shared, already-built
//! resources it names (handlers, database pools), and the names components run under.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use sqlx::PgPool;

use crate::config::Config;
use crate::flow_control::{Flows, Gate};
use crate::handler::Handler;

/// Shared, already-built resources that components are constructed from.
#[derive(Clone)]
pub struct Resources {
    pub config: Arc<Config>,
    pub handlers: BTreeMap<String, Arc<dyn Handler>>,
    pub databases: BTreeMap<String, PgPool>,
    /// The process's breakers, rate limits and pauses: kept by the runtime across reloads.
    pub flows: Flows,
}

impl Resources {
    /// Resources with flow control of their own (for tests without a runtime).
    #[cfg(test)]
    pub fn new(config: Arc<Config>) -> anyhow::Result<Self> {
        Self::with_flows(config, Flows::default())
    }

    /// Resources whose handlers take their breakers, rate limits and pauses from `flows`.
    pub fn with_flows(config: Arc<Config>, flows: Flows) -> anyhow::Result<Self> {
        let handlers = crate::flow_control::build_handlers(&config.handlers, &flows)?;
        let databases = crate::database::pools(&config.databases)?;
        Ok(Self {
            config,
            handlers,
            databases,
            flows,
        })
    }

    /// The gate of consumer `name`, whose handler is `handler`.
    pub fn gate(&self, name: &str, handler: &str) -> Gate {
        self.flows.gate(name, handler)
    }

    pub fn handler(&self, name: &str) -> anyhow::Result<Arc<dyn Handler>> {
        self.handlers
            .get(name)
            .cloned()
            .with_context(|| format!("handler `{name}` is not defined"))
    }

    pub fn database(&self, name: &str) -> anyhow::Result<PgPool> {
        self.databases
            .get(name)
            .cloned()
            .with_context(|| format!("database `{name}` is not defined"))
    }
}

/// Name under which a consumer runs (and appears on `/readyz` and in metrics labels).
pub fn consumer_component_name(name: &str) -> String {
    format!("consumer:{name}")
}

/// Name under which an outbox relay runs.
pub fn outbox_component_name(name: &str) -> String {
    format!("outbox:{name}")
}

/// Name under which a postgres inbox's sweeper runs.
pub fn inbox_component_name(name: &str) -> String {
    format!("inbox:{name}")
}

/// Name under which a dead-letter processor runs.
pub fn dead_letter_component_name(name: &str) -> String {
    format!("dead_letter:{name}")
}
