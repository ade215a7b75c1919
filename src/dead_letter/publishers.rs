//! Publishers for replays and forwards, one per broker, connected on first use and kept.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::DeadLetterError;
use super::copy::BrokerKind;
use crate::amqp::AmqpPublisher;
use crate::config::{BrokerConfig, Config};
use crate::publish::Publisher;
use crate::redis_streams::RedisPublisher;

/// Where replays and forwards get their publisher for a broker name.
#[async_trait]
pub trait PublisherSource: Send + Sync {
    async fn publisher(
        &self,
        broker: &str,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError>;
}

/// Publishers built from `[brokers.*]`, cached by broker name.
pub struct Publishers {
    config: Arc<Config>,
    /// Names the connections (RabbitMQ management UI, Redis CLIENT LIST).
    owner: String,
    cache: Mutex<BTreeMap<String, Arc<dyn Publisher>>>,
}

impl Publishers {
    pub fn new(config: Arc<Config>, owner: impl Into<String>) -> Self {
        Self {
            config,
            owner: owner.into(),
            cache: Mutex::new(BTreeMap::new()),
        }
    }
}

#[async_trait]
impl PublisherSource for Publishers {
    async fn publisher(
        &self,
        broker: &str,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError> {
        let Some(config) = self.config.brokers.get(broker) else {
            return Err(DeadLetterError::Invalid(format!(
                "broker `{broker}` is not defined in the configuration"
            )));
        };
        let kind = BrokerKind::of(config);
        let mut cache = self.cache.lock().await;
        if let Some(publisher) = cache.get(broker) {
            return Ok((kind, publisher.clone()));
        }
        let publisher = build(broker, config, &self.config.service.name, &self.owner).await?;
        cache.insert(broker.to_owned(), publisher.clone());
        Ok((kind, publisher))
    }
}

async fn build(
    broker: &str,
    config: &BrokerConfig,
    service: &str,
    owner: &str,
) -> Result<Arc<dyn Publisher>, DeadLetterError> {
    Ok(match config {
        // Connects lazily on the first publish and again after a failure.
        BrokerConfig::Amqp(amqp) => Arc::new(AmqpPublisher::new(
            broker,
            amqp.clone(),
            crate::amqp::connection_name(amqp, service, owner),
        )),
        BrokerConfig::Redis(redis) => {
            let name = crate::redis_streams::client_name(&format!("{service}/{owner}"), "publish");
            let publisher = RedisPublisher::connect(redis, &name, None)
                .await
                .map_err(|e| DeadLetterError::Broker {
                    broker: broker.to_owned(),
                    message: e.to_string(),
                })?;
            Arc::new(publisher)
        }
    })
}
