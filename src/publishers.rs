//! Publishers made from `[brokers.*]` tables: the one place a broker's configuration becomes
//! a [`Publisher`], for outbox relays, dead-letter replays and forwards, and the CLI and admin
//! API that replay, and the one rule that names its connection.
//!
//! A publisher's connection is named after the component (or tool) that owns it, `owner`:
//! RabbitMQ shows `<connection_name or service.name>/<owner>` (e.g. `orders-svc/outbox:orders`)
//! in its management UI, Redis `bosun:<owner>:publish` (e.g. `bosun:outbox:orders:publish`)
//! in `CLIENT LIST`.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::amqp::AmqpPublisher;
use crate::config::{BrokerConfig, RedisBrokerConfig};
use crate::publish::{OutgoingMessage, PublishError, Publisher};
use crate::redis_streams::RedisPublisher;

/// A broker that cannot be published to now.
#[derive(Debug, thiserror::Error)]
#[error("broker `{broker}`: {message}")]
pub struct PublisherError {
    /// The `[brokers.*]` name.
    pub broker: String,
    pub message: String,
}

/// The publisher of one broker for one owner, made once and kept: both kinds re-open a lost
/// connection by themselves, so [`connect`](Self::connect), called again after a failure,
/// re-checks the connection instead of leaking a second one.
pub struct BrokerPublisher {
    /// The `[brokers.*]` name.
    broker: String,
    kind: Kind,
}

enum Kind {
    /// Connects lazily on the first publish and again after a failure.
    Amqp(Arc<AmqpPublisher>),
    Redis {
        config: Box<RedisBrokerConfig>,
        /// The owner, from which the name shown in `CLIENT LIST` is made.
        owner: String,
        /// Approximate cap on each target stream's length.
        maxlen: Option<usize>,
        /// Made on first use; its managed connection reconnects by itself afterwards.
        publisher: Mutex<Option<Arc<RedisPublisher>>>,
    },
}

impl BrokerPublisher {
    /// The publisher of `[brokers.<broker>]` (`config`) for `owner`, under the service named
    /// `service`. `maxlen` caps the streams a Redis publisher adds to.
    pub fn new(
        broker: &str,
        config: &BrokerConfig,
        service: &str,
        owner: &str,
        maxlen: Option<usize>,
    ) -> Self {
        let kind = match config {
            BrokerConfig::Amqp(amqp) => Kind::Amqp(Arc::new(AmqpPublisher::new(
                broker,
                amqp.clone(),
                crate::amqp::connection_name(amqp, service, owner),
            ))),
            BrokerConfig::Redis(redis) => Kind::Redis {
                config: Box::new(redis.clone()),
                owner: owner.to_owned(),
                maxlen,
                publisher: Mutex::new(None),
            },
        };
        Self {
            broker: broker.to_owned(),
            kind,
        }
    }

    /// The checks a publish of `message` makes before sending, without sending it (see
    /// [`AmqpPublisher::check`]); a Redis entry has no such limits.
    pub async fn check(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        match &self.kind {
            Kind::Amqp(publisher) => publisher.check(message).await,
            Kind::Redis { .. } => Ok(()),
        }
    }

    /// The publisher, its connection opened (or checked, and opened again if lost).
    pub async fn connect(&self) -> Result<Arc<dyn Publisher>, PublisherError> {
        let error = |message: String| PublisherError {
            broker: self.broker.clone(),
            message,
        };
        match &self.kind {
            Kind::Amqp(publisher) => {
                publisher
                    .connect()
                    .await
                    .map_err(|e| error(e.to_string()))?;
                Ok(publisher.clone())
            }
            Kind::Redis {
                config,
                owner,
                maxlen,
                publisher,
            } => {
                let mut slot = publisher.lock().await;
                if let Some(publisher) = slot.as_ref() {
                    return Ok(publisher.clone());
                }
                let made = RedisPublisher::connect(config, owner, *maxlen)
                    .await
                    .map_err(|e| error(e.to_string()))?;
                let made = Arc::new(made);
                *slot = Some(made.clone());
                Ok(made)
            }
        }
    }
}
