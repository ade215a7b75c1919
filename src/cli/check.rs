//! `bosun check`: validate the file and print what would run.

use std::fmt::Write as _;

use super::{CliError, ConfigArg, EXIT_OK};
use crate::Runtime;
use crate::config::{
    AmqpDeadLetter, BrokerConfig, Config, ConfigError, ConsumerKind, DeadLetterSource, EntryFormat,
    Env, RedisTopology, Secrets, Warning, WarningKind,
};
use crate::retry::format_compact;

/// Validates the file, prints what would run and every warning. With `strict`, a secret that
/// cannot be read is an error, as it is for `bosun run`.
pub fn check(runtime: &Runtime, config: &ConfigArg, strict: bool) -> Result<u8, CliError> {
    if !config.allow_insecure_config {
        crate::config::check_permissions(&config.config)?;
    }
    let secrets = if strict {
        Secrets::Required
    } else {
        Secrets::Optional
    };
    let loaded = crate::config::load_file_for_check(
        &config.config,
        runtime.handler_kinds(),
        &Env::from_process(),
        secrets,
    )?;
    let (warnings, errors) = ask_brokers(&loaded.config, loaded.warnings)?;
    if !errors.is_empty() {
        return Err(CliError::Config(ConfigError {
            origin: loaded.config.origin.clone(),
            problems: errors,
        }));
    }
    // The summary shows URLs; the redactor has the last word on what they reveal.
    print!("{}", crate::redact::text(&describe(&loaded.config)));
    for warning in &warnings {
        eprintln!(
            "warning: {}",
            warning.problem.display(&loaded.config.origin)
        );
    }
    Ok(EXIT_OK)
}

/// What `bosun check` says about a stream on a cluster: where its derived keys live, and
/// how a dead-letter stream in another slot is written.
fn cluster_keys(stream: &str, group: &str, dead_letter_stream: &str) -> String {
    use crate::config::redis_keys::{derived_key, hash_slot, hash_tag, needs_tag};
    let slot = hash_slot(stream.as_bytes());
    let retry = derived_key(stream, "retry", true);
    let locks = derived_key(stream, &format!("lock:{group}:"), true);
    let mut line = if needs_tag(stream) {
        format!(
            "cluster: stream {stream} has no hash tag; its retry set {retry} and name locks {locks}* are put in the tag {{{stream}}} (slot {slot})"
        )
    } else {
        let tag = hash_tag(stream.as_bytes())
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        format!(
            "cluster: stream {stream}, retry set {retry} and name locks {locks}* share the hash tag {{{tag}}} (slot {slot})"
        )
    };
    let dead_slot = hash_slot(dead_letter_stream.as_bytes());
    if dead_slot == slot {
        line.push_str(&format!(
            "; dead letters to {dead_letter_stream} in the same slot, atomically with the XACK"
        ));
    } else {
        line.push_str(&format!("; dead-letter stream {dead_letter_stream} is in slot {dead_slot}, so its copies are written by a command of their own before the XACK (a crash between them may copy an entry twice)"));
    }
    line
}

/// Asks each amqp broker whether the exchanges nothing declares exist: one that exists is no
/// longer a warning, one the broker does not have is an error, and a broker that cannot be
/// reached leaves the warning (saying so).
fn ask_brokers(
    config: &Config,
    warnings: Vec<Warning>,
) -> Result<(Vec<Warning>, Vec<crate::config::ConfigProblem>), CliError> {
    if !warnings
        .iter()
        .any(|w| matches!(w.kind, WarningKind::UndeclaredExchange { .. }))
    {
        return Ok((warnings, Vec::new()));
    }
    super::block_on(async move {
        let mut kept = Vec::new();
        let mut errors = Vec::new();
        for mut warning in warnings {
            let WarningKind::UndeclaredExchange { broker, exchange } = &warning.kind else {
                kept.push(warning);
                continue;
            };
            let Some(BrokerConfig::Amqp(amqp)) = config.brokers.get(broker) else {
                kept.push(warning);
                continue;
            };
            match super::topology::exchange_exists(amqp, &config.service.name, exchange).await {
                Ok(true) => {}
                Ok(false) => {
                    warning.problem.message = format!(
                        "{} (broker `{broker}` says it does not exist)",
                        warning.problem.message
                    );
                    errors.push(warning.problem);
                }
                Err(e) => {
                    warning.problem.message = format!(
                        "{} (broker `{broker}` could not be asked: {e})",
                        warning.problem.message
                    );
                    kept.push(warning);
                }
            }
        }
        (kept, errors)
    })
}

/// A human summary of a validated config. Secrets are redacted.
pub fn describe(config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: configuration is valid", config.origin);
    let _ = writeln!(
        out,
        "service {}: shutdown timeout {}, http on {}{}",
        config.service.name,
        format_compact(config.service.shutdown_timeout),
        config.http.listen,
        if config.http.admin_token.is_some() {
            format!(", admin API on {}/admin", config.http.listen)
        } else {
            String::new()
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
            BrokerConfig::Redis(b) => (
                &b.url,
                match &b.topology {
                    RedisTopology::Single => String::new(),
                    RedisTopology::Cluster { nodes } => {
                        format!(" (cluster, {} seed node(s))", nodes.len())
                    }
                    RedisTopology::Sentinel { master, nodes } => {
                        format!(" (primary `{master}` through {} sentinel(s))", nodes.len())
                    }
                },
            ),
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
                // The entry format is shown when it is not the default.
                let format = if *r.format == EntryFormat::default() {
                    String::new()
                } else {
                    format!(", {}", r.format)
                };
                let _ = writeln!(
                    out,
                    "consumer {name}: redis stream {} group {} as {} on {} -> handler {} (batch {}, concurrency {}, {} attempts, dead letters to {}{format})",
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
                if let Some(BrokerConfig::Redis(b)) = config.brokers.get(&c.source)
                    && b.is_cluster()
                {
                    let _ = writeln!(
                        out,
                        "  {}",
                        cluster_keys(&r.stream, &r.group, &r.dead_letter_stream)
                    );
                }
            }
        }
    }
    for (name, o) in &config.outboxes {
        let _ = writeln!(
            out,
            "outbox {name}: table {}{} in {} -> broker {}{} (batch {}, ordering {})",
            o.table,
            match &o.existing {
                Some(e) => format!(" (existing, status column {})", e.state),
                None => String::new(),
            },
            o.database,
            o.target,
            match (o.destination.as_deref(), config.brokers.get(&o.target)) {
                (None, _) => String::new(),
                (Some(""), _) => ", default exchange".to_owned(),
                (Some(d), Some(BrokerConfig::Redis(_))) => format!(", stream {d}"),
                (Some(d), _) => format!(", exchange {d}"),
            },
            o.batch,
            o.ordering
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
