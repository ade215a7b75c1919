//! The one path from a consumer's configuration to a running consumer, per broker kind: used
//! for every `[consumers.*]` table and, with a synthesized configuration, by the dead-letter
//! processors, so both get the same consumer.

use std::sync::Arc;

use crate::amqp::consumer::{AmqpConsumer, AmqpConsumerSpec, handler_timeout};
use crate::config::{BrokerConfig, Config, ConsumerConfig, ConsumerKind};
use crate::flow_control::Gate;
use crate::handler::Handler;
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
    /// What the consumer asks before taking a delivery (breaker, rate limit, pauses).
    pub gate: Gate,
    /// Whether the handler answers within its configured `timeout`, so that an amqp delivery
    /// in hand far longer is a stuck one; `false` for a handler that may hold a message
    /// without bound by design (a dead-letter processor's, while its archive is down).
    pub bounded_handler: bool,
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
            spec.gate,
        )),
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
