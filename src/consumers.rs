//! The one path from a consumer's configuration to a running consumer, per broker kind: used
//! for every `[consumers.*]` table and, with a synthesized configuration, by the dead-letter
//! processors, so both get the same consumer.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::amqp::consumer::{AmqpConsumer, AmqpConsumerSpec, handler_timeout};
use crate::config::{BrokerConfig, Config, ConsumerConfig, ConsumerKind, InboxStore};
use crate::flow_control::Gate;
use crate::handler::Handler;
use crate::inbox::postgres::PostgresStore;
use crate::inbox::redis::RedisStore;
use crate::inbox::{Inbox, InboxError, Store};
use crate::publish::OutgoingMessage;
use crate::redis_streams::{RedisConsumer, RedisConsumerSpec};
use crate::supervisor::Component;

/// What a consumer is built from.
pub struct ConsumerSpec<'a> {
    /// The consumer's name: its metrics' `consumer` label, `bosun-consumer` on its copies.
    pub name: &'a str,
    /// The component name (`consumer:NAME`, `dead_letter:NAME`): names its amqp connection.
    pub component: &'a str,
    pub consumer: &'a ConsumerConfig,
    /// The whole configuration: the source broker and the service name come from it.
    pub config: &'a Config,
    pub handler: Arc<dyn Handler>,
    /// What the consumer asks before taking a delivery (breaker, rate limit, pauses).
    pub gate: Gate,
    /// Whether the handler answers within its configured `timeout`, so that an amqp delivery
    /// in hand far longer is a stuck one; `false` for a handler that may hold a message
    /// without bound by design (a dead-letter processor's, while its archive is down).
    pub bounded_handler: bool,
    /// The consumer's inbox ([`inbox_for`]), if it has one.
    pub inbox: Option<Arc<Inbox>>,
}

/// The store of `[inboxes.NAME]`: its table in its database (from `databases`), or its
/// keys on its redis broker.
pub fn inbox_store(
    name: &str,
    config: &Config,
    databases: &BTreeMap<String, PgPool>,
) -> anyhow::Result<Arc<dyn Store>> {
    let Some(inbox) = config.inboxes.get(name) else {
        anyhow::bail!("inbox `{name}` is not defined");
    };
    Ok(match &inbox.store {
        InboxStore::Postgres {
            database,
            table,
            migrate,
        } => {
            let Some(pool) = databases.get(database) else {
                anyhow::bail!("database `{database}` is not defined");
            };
            Arc::new(PostgresStore::new(
                pool.clone(),
                table,
                inbox.lease,
                *migrate,
            )?)
        }
        InboxStore::Redis { broker } => {
            let Some(BrokerConfig::Redis(broker)) = config.brokers.get(broker) else {
                anyhow::bail!("broker `{broker}` is not a defined redis broker");
            };
            let broker = broker.clone();
            Arc::new(RedisStore::new(
                Box::new(move || {
                    let broker = broker.clone();
                    Box::pin(async move {
                        crate::redis_streams::connection::connect(
                            &broker,
                            crate::redis_streams::Purpose::Ops {
                                response_timeout: crate::redis_streams::OPS_RESPONSE_TIMEOUT,
                            },
                        )
                        .await
                        .map_err(|e| crate::inbox::InboxError::Connect(e.to_string()))
                    })
                }),
                name,
                inbox.lease,
                inbox.window,
            ))
        }
    })
}

/// The inbox of consumer `name`, if its configuration gives it one.
pub fn inbox_for(
    name: &str,
    consumer: &ConsumerConfig,
    config: &Config,
    databases: &BTreeMap<String, PgPool>,
) -> anyhow::Result<Option<Arc<Inbox>>> {
    let Some(inbox) = &consumer.inbox else {
        return Ok(None);
    };
    let store = inbox_store(&inbox.store, config, databases)?;
    Ok(Some(Arc::new(Inbox::new(name, inbox.clone(), store))))
}

/// Builds the consumer `spec` describes, of the kind its source broker is.
pub fn build(spec: ConsumerSpec<'_>) -> anyhow::Result<Arc<dyn Component>> {
    let source = &spec.consumer.source;
    let Some(broker) = spec.config.brokers.get(source) else {
        anyhow::bail!("broker `{source}` is not defined");
    };
    Ok(match (&spec.consumer.kind, broker) {
        (ConsumerKind::Amqp(amqp), BrokerConfig::Amqp(broker)) => {
            let consumer = AmqpConsumer::new(AmqpConsumerSpec {
                name: spec.name,
                consumer: spec.consumer,
                amqp,
                broker_name: source,
                broker,
                connection_name: crate::amqp::connection_name(
                    broker,
                    &spec.config.service.name,
                    spec.component,
                ),
                handler: spec.handler,
                gate: spec.gate,
                inbox: spec.inbox,
            });
            if spec.bounded_handler {
                let timeout = handler_timeout(spec.config, &spec.consumer.handler);
                Arc::new(consumer.with_handler_timeout(timeout))
            } else {
                Arc::new(consumer)
            }
        }
        (ConsumerKind::Redis(redis), BrokerConfig::Redis(broker)) => {
            Arc::new(RedisConsumer::new(RedisConsumerSpec {
                name: spec.name,
                consumer: spec.consumer,
                redis,
                broker_name: source,
                broker,
                handler: spec.handler,
                gate: spec.gate,
                inbox: spec.inbox,
            }))
        }
        (ConsumerKind::Amqp(_), other) => {
            anyhow::bail!("broker `{source}` is {}, not amqp", other.kind())
        }
        (ConsumerKind::Redis(_), other) => {
            anyhow::bail!("broker `{source}` is {}, not redis", other.kind())
        }
    })
}

/// Gives every handler with `rate_limit = { scope = "global", broker = B }` the shared budget
/// in redis broker `B` (validation made sure it is one), before any consumer calls it.
pub fn attach_budgets(resources: &crate::resources::Resources) {
    for (name, handler) in &resources.config.handlers {
        let settings = crate::flow_control::settings_of(handler);
        let Some(broker) = settings.rate_limit.as_ref().and_then(|r| r.global.as_ref()) else {
            continue;
        };
        if let Some(BrokerConfig::Redis(broker)) = resources.config.brokers.get(broker) {
            resources
                .flows
                .handler(name, &settings)
                .attach_budget(Arc::new(crate::redis_streams::budget::RedisBudget::new(
                    broker,
                )));
        }
    }
}

/// The inboxes of the consumers a dead-letter replay can reach, by their queue or stream: a
/// replay deletes the record of its key first, so the replayed message runs instead of being
/// settled as a duplicate of its own failed run.
#[derive(Clone, Default)]
pub struct ReplayInboxes(Arc<Vec<ReplayInbox>>);

struct ReplayInbox {
    /// The consumer's queue (amqp) or stream (redis).
    source: String,
    consumer: String,
    key: crate::config::InboxKey,
    store: Arc<dyn Store>,
}

impl ReplayInboxes {
    /// Every consumer with an inbox; one whose store cannot be built is left out (logged).
    pub fn new(config: &Config, databases: &BTreeMap<String, PgPool>) -> Self {
        let mut out = Vec::new();
        for (name, consumer) in &config.consumers {
            let Some(inbox) = &consumer.inbox else {
                continue;
            };
            let source = match &consumer.kind {
                ConsumerKind::Amqp(amqp) => amqp.queue.clone(),
                ConsumerKind::Redis(redis) => redis.stream.clone(),
            };
            match inbox_store(&inbox.store, config, databases) {
                Ok(store) => out.push(ReplayInbox {
                    source,
                    consumer: name.clone(),
                    key: inbox.key.clone(),
                    store,
                }),
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "cannot reach the inbox of this consumer; replays to it keep its records")
                }
            }
        }
        Self(Arc::new(out))
    }

    /// Deletes the records `copy` would be found done in, in every inbox of a consumer of its
    /// destination (amqp: the queue it is routed to; redis: its stream).
    pub async fn forget(&self, copy: &OutgoingMessage) -> Result<(), InboxError> {
        let destination = if copy.destination.is_empty() {
            &copy.routing_key
        } else {
            &copy.destination
        };
        let message = crate::handler::Message {
            message_id: Some(copy.message_id.clone()),
            correlation_id: copy.correlation_id.clone(),
            headers: copy.headers.clone(),
            content_type: copy.content_type.clone(),
            body: copy.body.clone(),
            attempt: 1,
            redelivered: false,
            source: Default::default(),
            inbox: None,
        };
        for inbox in self.0.iter().filter(|i| &i.source == destination) {
            if let Ok(key) = crate::inbox::key::of(&inbox.key, &message)
                && inbox.store.forget(&inbox.consumer, &key).await?
            {
                tracing::info!(consumer = %inbox.consumer, key = %key, "replay: inbox record forgotten");
            }
        }
        Ok(())
    }
}
