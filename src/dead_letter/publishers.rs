//! Publishers for replays and forwards, one per broker (and per entry format a processor
//! writes its replays in), made by [`BrokerPublisher`] on first use and kept.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::DeadLetterError;
use super::copy::BrokerKind;
use crate::config::{BrokerConfig, Config, DeadLetterConfig, DeadLetterSource};
use crate::publish::Publisher;
use crate::publishers::BrokerPublisher;

/// Where replays and forwards get their publisher for a broker name.
#[async_trait]
pub trait PublisherSource: Send + Sync {
    async fn publisher(
        &self,
        broker: &str,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError>;

    /// The publisher that replays dead letters of `processor` to `broker`: on a redis
    /// source, it writes in the entry format the processor reads, whoever replays (the
    /// processor, `bosun dlq replay`, the admin API). By default, the broker's.
    async fn replay_publisher(
        &self,
        broker: &str,
        _processor: &str,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError> {
        self.publisher(broker).await
    }
}

/// `broker` (the configuration named `name`) as processor `dl` writes to it, when that
/// differs from the broker as configured: on a redis source, in the entry format `dl` reads,
/// so a replay of a dead-letter copy is the entry its producer wrote.
pub fn written_by(
    name: &str,
    broker: &BrokerConfig,
    dl: &DeadLetterConfig,
) -> Option<BrokerConfig> {
    let DeadLetterSource::Stream { format, .. } = &dl.from else {
        return None;
    };
    match broker {
        BrokerConfig::Redis(redis) if dl.source == name && &redis.format != format => {
            let mut redis = redis.clone();
            redis.format = format.clone();
            Some(BrokerConfig::Redis(redis))
        }
        _ => None,
    }
}

/// A broker name, and the processor whose entry format a publisher writes in, if any.
type CacheKey = (String, Option<String>);

/// Publishers built from `[brokers.*]`, cached.
pub struct Publishers {
    config: Arc<Config>,
    /// Names the connections (see [`crate::publishers`]).
    owner: String,
    /// By broker name and, for a broker a processor writes in its own entry format, that
    /// processor's name.
    cache: Mutex<BTreeMap<CacheKey, Arc<BrokerPublisher>>>,
}

impl Publishers {
    pub fn new(config: Arc<Config>, owner: impl Into<String>) -> Self {
        Self {
            config,
            owner: owner.into(),
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// The cached publisher under `key`, made from `config` (broker `name`) on first use.
    async fn connect(
        &self,
        key: CacheKey,
        name: &str,
        config: &BrokerConfig,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError> {
        let kind = BrokerKind::of(config);
        let publisher = self
            .cache
            .lock()
            .await
            .entry(key)
            .or_insert_with(|| {
                Arc::new(BrokerPublisher::new(
                    name,
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

    fn broker(&self, broker: &str) -> Result<&BrokerConfig, DeadLetterError> {
        self.config.brokers.get(broker).ok_or_else(|| {
            DeadLetterError::Invalid(format!(
                "broker `{broker}` is not defined in the configuration"
            ))
        })
    }
}

#[async_trait]
impl PublisherSource for Publishers {
    async fn publisher(
        &self,
        broker: &str,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError> {
        let config = self.broker(broker)?;
        self.connect((broker.to_owned(), None), broker, config)
            .await
    }

    async fn replay_publisher(
        &self,
        broker: &str,
        processor: &str,
    ) -> Result<(BrokerKind, Arc<dyn Publisher>), DeadLetterError> {
        let config = self.broker(broker)?;
        let written = self
            .config
            .dead_letters
            .get(processor)
            .and_then(|dl| written_by(broker, config, dl));
        match written {
            Some(written) => {
                let key = (broker.to_owned(), Some(processor.to_owned()));
                self.connect(key, broker, &written).await
            }
            None => self.publisher(broker).await,
        }
    }
}
