//! The one path from a consumer's configuration to a running consumer, per broker kind: used
//! for every `[consumers.*]` table and, with a synthesized configuration, by the dead-letter
//! processors, so both get the same consumer.

use std::collections::BTreeMap;
use std::sync::Arc;

use sqlx::PgPool;

use crate::amqp::consumer::{AmqpConsumer, AmqpConsumerSpec, handler_timeout};
use crate::config::{BrokerConfig, Config, ConsumerConfig, ConsumerKind, InboxStore};
use crate::handler::Handler;
use crate::inbox::postgres::PostgresStore;
use crate::inbox::redis::RedisStore;
use crate::inbox::{Inbox, Store};
use crate::redis_streams::RedisConsumer;
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
            Arc::new(RedisStore::new(
                crate::redis_streams::client(broker)?,
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
                inbox: spec.inbox,
            });
            if spec.bounded_handler {
                let timeout = handler_timeout(spec.config, &spec.consumer.handler);
                Arc::new(consumer.with_handler_timeout(timeout))
            } else {
                Arc::new(consumer)
            }
        }
        (ConsumerKind::Redis(redis), BrokerConfig::Redis(broker)) => Arc::new(RedisConsumer::new(
            spec.name,
            spec.consumer,
            redis,
            source,
            broker,
            spec.handler,
            spec.inbox,
        )),
        (ConsumerKind::Amqp(_), other) => {
            anyhow::bail!("broker `{source}` is {}, not amqp", other.kind())
        }
        (ConsumerKind::Redis(_), other) => {
            anyhow::bail!("broker `{source}` is {}, not redis", other.kind())
        }
    })
}
