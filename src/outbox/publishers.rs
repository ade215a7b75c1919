//! The publishers a relay sends through, made from its target broker's configuration.
//!
//! One publisher is made per relay and kept: both kinds re-open a lost connection by
//! themselves on the next batch. [`PublisherSource::connect`], which the relay calls again
//! after a broker failure, re-checks that connection instead of leaking a second one.

use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use tokio::sync::Mutex;

use super::PublisherSource;
use crate::config::{BrokerConfig, Config, OutboxConfig, RedisBrokerConfig};
use crate::publish::Publisher;
use crate::redis_streams::RedisPublisher;
use crate::resources::outbox_component_name;

/// The publisher source for `[outboxes.NAME]`, by the kind of its `target` broker.
pub fn publisher_source(
    name: &str,
    config: &Config,
    outbox: &OutboxConfig,
) -> anyhow::Result<Arc<dyn PublisherSource>> {
    let broker = config
        .brokers
        .get(&outbox.target)
        .with_context(|| format!("broker `{}` is not defined", outbox.target))?;
    let component = outbox_component_name(name);
    Ok(match broker {
        BrokerConfig::Redis(redis) => Arc::new(RedisSource {
            broker: redis.clone(),
            client_name: crate::redis_streams::client_name(name, "outbox"),
            maxlen: outbox.maxlen,
            publisher: Mutex::new(None),
        }),
        BrokerConfig::Amqp(amqp) => {
            let connection_name =
                crate::amqp::connection::connection_name(amqp, &config.service.name, &component);
            Arc::new(AmqpSource {
                publisher: Arc::new(crate::amqp::AmqpPublisher::new(
                    outbox.target.clone(),
                    amqp.clone(),
                    connection_name,
                )),
            })
        }
    })
}

struct AmqpSource {
    publisher: Arc<crate::amqp::AmqpPublisher>,
}

#[async_trait]
impl PublisherSource for AmqpSource {
    async fn connect(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        self.publisher.connect().await?;
        Ok(self.publisher.clone())
    }
}

struct RedisSource {
    broker: RedisBrokerConfig,
    /// Shown in `CLIENT LIST`, so operators can tell the relay's connection apart.
    client_name: String,
    maxlen: Option<usize>,
    /// Made on first use; its managed connection reconnects by itself afterwards.
    publisher: Mutex<Option<Arc<RedisPublisher>>>,
}

#[async_trait]
impl PublisherSource for RedisSource {
    async fn connect(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        let mut slot = self.publisher.lock().await;
        if let Some(publisher) = slot.as_ref() {
            return Ok(publisher.clone());
        }
        let publisher =
            Arc::new(RedisPublisher::connect(&self.broker, &self.client_name, self.maxlen).await?);
        *slot = Some(publisher.clone());
        Ok(publisher)
    }
}
