//! The queues, exchanges and bindings one amqp consumer needs, derived from its config.
//!
//! For a consumer on queue `Q`:
//! - `Q`: durable, classic or quorum, bound as configured; `x-dead-letter-exchange` points at
//!   the dead-letter destination as a backstop for broker-side rejects; quorum queues also get
//!   `x-delivery-limit` above `max_attempts` (a crash-loop backstop, never the retry counter);
//! - `Q.retry.<tier>`: one queue per delay tier with `x-message-ttl` and dead-lettering back to
//!   `Q` through the default exchange; one queue per tier because a TTL only expires messages
//!   at the head of a queue. On quorum queues the hop back to `Q` is at-least-once
//!   (`x-dead-letter-strategy = at-least-once`, which needs `x-overflow = reject-publish`): a
//!   message whose TTL fires while `Q` is missing, full or leaderless stays in the tier until
//!   `Q` takes it. Classic queues only dead-letter at most once: such a message is dropped by
//!   the broker, which `bosun topology` says per tier;
//! - `Q.dlq` (unless dead letters go to an exchange): durable.
//!
//! Declaring is idempotent. With `declare = false` every item is only checked passively.

use std::fmt::Write as _;
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use super::{AmqpError, short, soft_error};
use crate::config::{AmqpConsumerConfig, AmqpDeadLetter, ConsumerConfig, ExchangeType, QueueType};
use crate::retry::{RetryPolicy, format_compact};

/// Quorum queues dead-letter a message redelivered this many times more than `max_attempts`.
pub const DELIVERY_LIMIT_MARGIN: u32 = 10;

/// A queue argument value.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(i64),
    Text(String),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    /// Arguments in declaration order (`x-queue-type`, `x-message-ttl`, ...).
    pub args: Vec<(&'static str, Arg)>,
    /// What the queue is for, in `bosun topology` output.
    pub role: &'static str,
    /// What the broker guarantees for the queue's own dead-lettering, in `bosun topology`
    /// output (retry tiers only).
    pub guarantee: Option<&'static str>,
}

/// A quorum tier's hop back to `Q`.
pub const AT_LEAST_ONCE_HOP: &str =
    "hop back to the queue at-least-once: kept in the tier until the queue accepts it";
/// A classic tier's hop back to `Q`.
pub const AT_MOST_ONCE_HOP: &str = "hop back to the queue at-most-once: dropped by the broker if the queue is missing or refuses it when the TTL fires (use queue_type = \"quorum\" for at-least-once)";

#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeType,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BindingSpec {
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
}

/// Where dead letters are published: an exchange ("" is the default one) and a routing key
/// (`None`: the message's original routing key).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterTarget {
    pub exchange: String,
    pub routing_key: Option<String>,
}

/// Everything one consumer declares.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The queue consumed.
    pub queue: String,
    pub exchanges: Vec<ExchangeSpec>,
    /// Dead-letter queue first, then the tiers, then `Q` (so `Q`'s backstop target exists).
    pub queues: Vec<QueueSpec>,
    pub bindings: Vec<BindingSpec>,
    /// Delay tiers, ascending, with their queue names.
    pub tiers: Vec<(Duration, String)>,
    /// The tiers' delays alone, in the form `RetryPolicy::tier_for` takes.
    pub tier_delays: Vec<Duration>,
    pub dead_letter: DeadLetterTarget,
    /// An exchange the dead letters go to that the consumer does not own: checked passively.
    pub external_exchanges: Vec<String>,
}

fn queue_type_arg(queue_type: QueueType) -> Option<(&'static str, Arg)> {
    match queue_type {
        // Classic is the broker default; not naming it keeps queues declared by older
        // tools (without the argument) equivalent.
        QueueType::Classic => None,
        QueueType::Quorum => Some(("x-queue-type", Arg::Text("quorum".into()))),
    }
}

/// The name of the delay queue for `tier` on `queue`.
pub fn tier_queue(queue: &str, tier: Duration) -> String {
    format!("{queue}.retry.{}", format_compact(tier))
}

impl Topology {
    pub fn for_consumer(consumer: &ConsumerConfig, amqp: &AmqpConsumerConfig) -> Self {
        let q = amqp.queue.clone();
        let type_arg = queue_type_arg(amqp.queue_type);
        let mut queues = Vec::new();
        let mut external_exchanges = Vec::new();
        let dead_letter = match &amqp.dead_letter {
            AmqpDeadLetter::Queue(dlq) => {
                queues.push(QueueSpec {
                    name: dlq.clone(),
                    args: type_arg.clone().into_iter().collect(),
                    role: "dead letters",
                    guarantee: None,
                });
                DeadLetterTarget {
                    exchange: String::new(),
                    routing_key: Some(dlq.clone()),
                }
            }
            AmqpDeadLetter::Exchange {
                exchange,
                routing_key,
            } => {
                external_exchanges.push(exchange.clone());
                DeadLetterTarget {
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                }
            }
        };
        let tiers: Vec<(Duration, String)> = if consumer.retry.max_attempts > 1 {
            consumer
                .retry
                .tiers()
                .into_iter()
                .filter(|t| !t.is_zero())
                .map(|t| (t, tier_queue(&q, t)))
                .collect()
        } else {
            Vec::new()
        };
        for (delay, name) in &tiers {
            let mut args: Vec<(&'static str, Arg)> = type_arg.clone().into_iter().collect();
            args.push((
                "x-message-ttl",
                Arg::Int(delay.as_millis().min(i64::MAX as u128) as i64),
            ));
            args.push(("x-dead-letter-exchange", Arg::Text(String::new())));
            args.push(("x-dead-letter-routing-key", Arg::Text(q.clone())));
            let guarantee = if amqp.queue_type == QueueType::Quorum {
                // Without reject-publish the broker silently falls back to at-most-once.
                args.push(("x-overflow", Arg::Text("reject-publish".into())));
                args.push(("x-dead-letter-strategy", Arg::Text("at-least-once".into())));
                AT_LEAST_ONCE_HOP
            } else {
                AT_MOST_ONCE_HOP
            };
            queues.push(QueueSpec {
                name: name.clone(),
                args,
                role: "retry delay",
                guarantee: Some(guarantee),
            });
        }
        let mut args: Vec<(&'static str, Arg)> = type_arg.into_iter().collect();
        args.push((
            "x-dead-letter-exchange",
            Arg::Text(dead_letter.exchange.clone()),
        ));
        if let Some(key) = &dead_letter.routing_key {
            args.push(("x-dead-letter-routing-key", Arg::Text(key.clone())));
        }
        if amqp.queue_type == QueueType::Quorum {
            args.push((
                "x-delivery-limit",
                Arg::Int(i64::from(
                    consumer
                        .retry
                        .max_attempts
                        .saturating_add(DELIVERY_LIMIT_MARGIN),
                )),
            ));
        }
        if consumer.single_active {
            args.push(("x-single-active-consumer", Arg::Bool(true)));
        }
        queues.push(QueueSpec {
            name: q.clone(),
            args,
            role: "consumed",
            guarantee: None,
        });

        let mut exchanges: Vec<ExchangeSpec> = Vec::new();
        let mut bindings = Vec::new();
        for b in &amqp.bindings {
            if !exchanges.iter().any(|e| e.name == b.exchange) {
                exchanges.push(ExchangeSpec {
                    name: b.exchange.clone(),
                    kind: b.exchange_type,
                });
            }
            bindings.push(BindingSpec {
                queue: q.clone(),
                exchange: b.exchange.clone(),
                routing_key: b.routing_key.clone(),
            });
        }
        let tier_delays = tiers.iter().map(|(d, _)| *d).collect();
        Self {
            queue: q,
            exchanges,
            queues,
            bindings,
            tiers,
            tier_delays,
            dead_letter,
            external_exchanges,
        }
    }

    /// The delay queue a retry after `delay` goes to, as the policy picks the tier.
    pub fn tier_for(&self, policy: &RetryPolicy, delay: Duration) -> Option<&str> {
        let tier = policy.tier_for(delay, &self.tier_delays)?;
        self.tiers
            .iter()
            .find(|(d, _)| *d == tier)
            .map(|(_, name)| name.as_str())
    }

    /// Declares everything (or, with `declare = false`, checks that it exists).
    pub async fn apply(&self, channel: &Channel, declare: bool) -> Result<(), AmqpError> {
        for exchange in &self.exchanges {
            let options = ExchangeDeclareOptions {
                passive: !declare,
                durable: true,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    short("exchange", &exchange.name)?,
                    exchange_kind(exchange.kind),
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| classify(e, "exchange", &exchange.name, "declare"))?;
        }
        for name in &self.external_exchanges {
            let options = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            channel
                .exchange_declare(
                    short("exchange", name)?,
                    ExchangeKind::Direct,
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| classify(e, "dead-letter exchange", name, "check"))?;
        }
        for queue in &self.queues {
            let options = QueueDeclareOptions {
                passive: !declare,
                durable: true,
                ..Default::default()
            };
            let args = if declare {
                field_table(&queue.args)?
            } else {
                FieldTable::default()
            };
            channel
                .queue_declare(short("queue", &queue.name)?, options, args)
                .await
                .map_err(|e| classify(e, "queue", &queue.name, "declare"))?;
        }
        if declare {
            for b in &self.bindings {
                channel
                    .queue_bind(
                        short("queue", &b.queue)?,
                        short("exchange", &b.exchange)?,
                        short("routing key", &b.routing_key)?,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        classify(
                            e,
                            "binding of queue",
                            &format!("{} to {} ({})", b.queue, b.exchange, b.routing_key),
                            "bind",
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// A human listing, one item per line, for `bosun topology`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for e in &self.exchanges {
            let _ = writeln!(out, "exchange {} ({}, durable)", e.name, e.kind.as_str());
        }
        for e in &self.external_exchanges {
            let _ = writeln!(out, "exchange {e} (dead letters; must exist, checked only)");
        }
        for q in &self.queues {
            let args: Vec<String> = q
                .args
                .iter()
                .map(|(k, v)| match v {
                    Arg::Int(i) => format!("{k}={i}"),
                    Arg::Text(t) => format!("{k}={t:?}"),
                    Arg::Bool(b) => format!("{k}={b}"),
                })
                .collect();
            let _ = writeln!(
                out,
                "queue {} ({}, durable{}{})",
                q.name,
                q.role,
                if args.is_empty() { "" } else { ", " },
                args.join(", ")
            );
            if let Some(guarantee) = q.guarantee {
                let _ = writeln!(out, "  {guarantee}");
            }
        }
        for b in &self.bindings {
            let _ = writeln!(
                out,
                "binding {} -> {} routing key {:?}",
                b.exchange, b.queue, b.routing_key
            );
        }
        out
    }
}

fn exchange_kind(kind: ExchangeType) -> ExchangeKind {
    match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

fn field_table(args: &[(&'static str, Arg)]) -> Result<FieldTable, AmqpError> {
    let mut table = FieldTable::default();
    for (k, v) in args {
        let value = match v {
            Arg::Int(i) => AMQPValue::LongLongInt(*i),
            Arg::Text(t) => AMQPValue::LongString(LongString::from(t.as_bytes().to_vec())),
            Arg::Bool(b) => AMQPValue::Boolean(*b),
        };
        table.insert((*k).into(), value);
    }
    Ok(table)
}

/// Names the failing item: PRECONDITION_FAILED (the broker's text names the argument) and
/// NOT_FOUND (passive checks) get their own errors.
fn classify(e: lapin::Error, what: &'static str, name: &str, action: &str) -> AmqpError {
    match soft_error(&e) {
        Some((AMQPSoftError::PRECONDITIONFAILED, detail)) => AmqpError::PreconditionFailed {
            what,
            name: name.to_owned(),
            detail: if detail.contains("x-single-active-consumer") {
                format!(
                    "{detail} (`single_active` needs the queue declared with x-single-active-consumer, which an existing queue cannot gain or lose: delete the queue, or move to a new one, to change it)"
                )
            } else {
                detail
            },
        },
        Some((AMQPSoftError::NOTFOUND, detail)) => AmqpError::Missing {
            what,
            name: name.to_owned(),
            detail,
        },
        _ => AmqpError::channel(format!("cannot {action} {what} `{name}`"), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Binding, ConsumerKind};
    use crate::retry::Backoff;

    fn consumer(
        queue_type: QueueType,
        dead_letter: AmqpDeadLetter,
    ) -> (ConsumerConfig, AmqpConsumerConfig) {
        let amqp = AmqpConsumerConfig {
            queue: "orders".into(),
            queue_type,
            bindings: vec![Binding {
                exchange: "shop".into(),
                exchange_type: ExchangeType::Topic,
                routing_key: "order.*".into(),
            }],
            declare: true,
            prefetch: 10,
            dead_letter,
            limits: Default::default(),
            attempt_header: None,
            backlog_interval: Default::default(),
        };
        let retry = RetryPolicy {
            max_attempts: 4,
            backoff: Backoff::Tiers(vec![Duration::from_millis(500), Duration::from_secs(10)]),
            jitter: 0.0,
        };
        let config = ConsumerConfig {
            source: "rabbit".into(),
            handler: "h".into(),
            concurrency: 10,
            retry,
            trace: Default::default(),
            kind: ConsumerKind::Amqp(amqp.clone()),
            inbox: None,
            ordering: None,
            single_active: false,
        };
        (config, amqp)
    }

    #[test]
    fn derives_tiers_dlq_and_backstops() {
        let (c, a) = consumer(
            QueueType::Quorum,
            AmqpDeadLetter::Queue("orders.dlq".into()),
        );
        let t = Topology::for_consumer(&c, &a);
        let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "orders.dlq",
                "orders.retry.500ms",
                "orders.retry.10s",
                "orders"
            ]
        );
        let main = &t.queues[3];
        assert!(
            main.args
                .contains(&("x-dead-letter-routing-key", Arg::Text("orders.dlq".into())))
        );
        assert!(main.args.contains(&("x-delivery-limit", Arg::Int(14))));
        let tier = &t.queues[1];
        assert!(tier.args.contains(&("x-message-ttl", Arg::Int(500))));
        assert!(
            tier.args
                .contains(&("x-dead-letter-routing-key", Arg::Text("orders".into())))
        );
        assert_eq!(
            t.tier_for(&c.retry, Duration::from_secs(2)),
            Some("orders.retry.10s")
        );
        assert_eq!(
            t.tier_for(&c.retry, Duration::from_secs(99)),
            Some("orders.retry.10s")
        );
        assert_eq!(
            t.tier_for(&c.retry, Duration::from_millis(1)),
            Some("orders.retry.500ms")
        );
        assert!(
            t.describe()
                .contains("binding shop -> orders routing key \"order.*\"")
        );
    }

    #[test]
    fn quorum_retry_tiers_hop_back_at_least_once() {
        let (c, a) = consumer(
            QueueType::Quorum,
            AmqpDeadLetter::Queue("orders.dlq".into()),
        );
        let t = Topology::for_consumer(&c, &a);
        for tier in t.queues.iter().filter(|q| q.role == "retry delay") {
            assert!(
                tier.args
                    .contains(&("x-dead-letter-strategy", Arg::Text("at-least-once".into())))
            );
            assert!(
                tier.args
                    .contains(&("x-overflow", Arg::Text("reject-publish".into())))
            );
            assert_eq!(tier.guarantee, Some(AT_LEAST_ONCE_HOP));
        }
        // The consumed queue and the dead-letter queue keep their arguments: existing ones
        // are not redeclared differently.
        for q in t.queues.iter().filter(|q| q.role != "retry delay") {
            assert!(!q.args.iter().any(|(k, _)| *k == "x-dead-letter-strategy"));
            assert_eq!(q.guarantee, None);
        }
        let described = t.describe();
        assert!(
            described.contains("queue orders.retry.500ms") && described.contains(AT_LEAST_ONCE_HOP),
            "{described}"
        );
    }

    #[test]
    fn classic_retry_tiers_say_their_hop_is_at_most_once() {
        let (c, a) = consumer(
            QueueType::Classic,
            AmqpDeadLetter::Queue("orders.dlq".into()),
        );
        let t = Topology::for_consumer(&c, &a);
        let tiers: Vec<&QueueSpec> = t
            .queues
            .iter()
            .filter(|q| q.role == "retry delay")
            .collect();
        assert_eq!(tiers.len(), 2);
        for tier in tiers {
            assert!(
                !tier
                    .args
                    .iter()
                    .any(|(k, _)| *k == "x-dead-letter-strategy")
            );
            assert_eq!(tier.guarantee, Some(AT_MOST_ONCE_HOP));
        }
        assert!(t.describe().contains("at-most-once"));
    }

    #[test]
    fn dead_letters_to_an_exchange_need_no_dlq() {
        let (c, a) = consumer(
            QueueType::Classic,
            AmqpDeadLetter::Exchange {
                exchange: "dlx".into(),
                routing_key: None,
            },
        );
        let t = Topology::for_consumer(&c, &a);
        assert!(!t.queues.iter().any(|q| q.role == "dead letters"));
        assert_eq!(t.external_exchanges, ["dlx"]);
        let main = t.queues.last().expect("main queue");
        assert!(
            !main
                .args
                .iter()
                .any(|(k, _)| *k == "x-queue-type" || *k == "x-delivery-limit")
        );
        assert!(
            main.args
                .contains(&("x-dead-letter-exchange", Arg::Text("dlx".into())))
        );
    }
}
