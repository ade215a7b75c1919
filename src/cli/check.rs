//! `bosun check`: validate the file and print what would run.

use std::fmt::Write as _;

use super::{CliError, ConfigArg, EXIT_OK};
use crate::Runtime;
use crate::config::{AmqpDeadLetter, BrokerConfig, Config, ConsumerKind, DeadLetterSource};
use crate::retry::format_compact;

pub fn check(runtime: &Runtime, config: &ConfigArg) -> Result<u8, CliError> {
    let config = config.load(runtime)?;
    // The summary shows URLs; the redactor has the last word on what they reveal.
    print!("{}", crate::redact::text(&describe(&config)));
    Ok(EXIT_OK)
}

/// A human summary of a validated config. Secrets are redacted.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: configuration is valid", config.origin);
    let _ = writeln!(
        out,
        "service {:?}: shutdown timeout {}, http on {}{}",
        config.service.name,
        format_compact(config.service.shutdown_timeout),
        config.http.listen,
        if config.http.admin_token.is_some() {
            ", admin API on"
        } else {
            ""
        }
    );
    for (name, broker) in &config.brokers {
        let (url, limit) = match broker {
            BrokerConfig::Amqp(b) => (
                &b.url,
                b.max_message_size
                    .map(|max| format!(" (max message {max} bytes)"))
                    .unwrap_or_default(),
            ),
            BrokerConfig::Redis(b) => (&b.url, String::new()),
        };
        let _ = writeln!(out, "broker {name}: {} {url}{limit}", broker.kind());
    }
    for (name, db) in &config.databases {
        let _ = writeln!(
            out,
            "database {name}: {} (pool {})",
            db.url, db.max_connections
        );
    }
    for (name, handler) in &config.handlers {
        let _ = writeln!(out, "handler {name}: {}", handler.kind);
    }
    for (name, c) in &config.consumers {
        let tiers: Vec<String> = c.retry.tiers().into_iter().map(format_compact).collect();
        match &c.kind {
            ConsumerKind::Amqp(a) => {
                let dl = match &a.dead_letter {
                    AmqpDeadLetter::Queue(q) => format!("queue {q}"),
                    AmqpDeadLetter::Exchange { exchange, .. } => format!("exchange {exchange}"),
                };
                let _ = writeln!(
                    out,
                    "consumer {name}: amqp queue {} on {} -> handler {} (prefetch {}, concurrency {}, {} attempts, retry tiers [{}], dead letters to {dl})",
                    a.queue,
                    c.source,
                    c.handler,
                    a.prefetch,
                    c.concurrency,
                    c.retry.max_attempts,
                    tiers.join(", ")
                );
            }
            ConsumerKind::Redis(r) => {
                let _ = writeln!(
                    out,
                    "consumer {name}: redis stream {} group {} as {} on {} -> handler {} (batch {}, concurrency {}, {} attempts, dead letters to {})",
                    r.stream,
                    r.group,
                    r.consumer,
                    c.source,
                    c.handler,
                    r.batch,
                    c.concurrency,
                    c.retry.max_attempts,
                    r.dead_letter_stream
                );
            }
        }
    }
    for (name, o) in &config.outboxes {
        let _ = writeln!(
            out,
            "outbox {name}: table {} in {} -> broker {} (batch {}, ordering {:?})",
            o.table, o.database, o.target, o.batch, o.ordering
        );
    }
    for (name, d) in &config.dead_letters {
        let from = match &d.from {
            DeadLetterSource::Queue(q) => format!("queue {q}"),
            DeadLetterSource::Stream { stream, .. } => format!("stream {stream}"),
        };
        let _ = writeln!(
            out,
            "dead letters {name}: {from} on {} ({} rules, archive {})",
            d.source,
            d.rules.len(),
            d.archive.as_deref().unwrap_or("none")
        );
    }
    out
}
