//! Publishers for replays and forwards, one per broker, made by
//! [`BrokerPublisher`] on first use and kept.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::DeadLetterError;
use super::copy::BrokerKind;
use crate::config::Config;
use crate::publish::Publisher;
use crate::publishers::BrokerPublisher;

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
    /// Names the connections (see [`crate::publishers`]).
    owner: String,
    cache: Mutex<BTreeMap<String, Arc<BrokerPublisher>>>,
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
        let publisher = self
            .cache
            .lock()
            .await
            .entry(broker.to_owned())
            .or_insert_with(|| {
                Arc::new(BrokerPublisher::new(
                    broker,
                    config,
                    &self.config.service.name,
                    &self.owner,
                    None,
                ))
            })
            .clone();
        let publisher = publisher
            .connect()
            .await
            .map_err(|e| DeadLetterError::Broker {
                broker: e.broker,
                message: e.message,
            })?;
        Ok((kind, publisher))
    }
}
