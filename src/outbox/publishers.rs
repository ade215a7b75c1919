//! The publisher a relay sends through, made from its target broker's configuration by
//! [`BrokerPublisher`]: one per relay, kept, its connection named after `outbox:NAME`.

use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;

use super::PublisherSource;
use crate::config::{Config, OutboxConfig};
use crate::publish::Publisher;
use crate::publishers::BrokerPublisher;
use crate::resources::outbox_component_name;

/// The publisher source for `[outboxes.NAME]`.
pub fn publisher_source(
    name: &str,
    config: &Config,
    outbox: &OutboxConfig,
) -> anyhow::Result<Arc<dyn PublisherSource>> {
    let broker = config
        .brokers
        .get(&outbox.target)
        .with_context(|| format!("broker `{}` is not defined", outbox.target))?;
    Ok(Arc::new(BrokerPublisher::new(
        &outbox.target,
        broker,
        &config.service.name,
        &outbox_component_name(name),
        outbox.maxlen,
    )))
}

#[async_trait]
impl PublisherSource for BrokerPublisher {
    async fn connect(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(BrokerPublisher::connect(self).await?)
    }
}
