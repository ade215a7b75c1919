//! Warnings about a valid configuration: what loads fine but will not do what it seems to.
//!
//! A handler nothing uses, and an amqp exchange an outbox or a dead-letter `forward` rule
//! publishes to that no consumer declares (it must exist on the broker already, or every
//! publish fails as unroutable). `bosun check` shows these, and asks the broker about the
//! exchanges.

use std::collections::BTreeSet;

use super::issue::{Issue, WarningKind};
use super::model::{Action, BrokerConfig, Config, ConsumerKind};

fn at(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// The warnings for `config`, each at the key it is about.
pub fn lint(config: &Config) -> Vec<(Issue, WarningKind)> {
    let mut warnings = Vec::new();
    unused_handlers(config, &mut warnings);
    undeclared_exchanges(config, &mut warnings);
    warnings
}

fn unused_handlers(config: &Config, warnings: &mut Vec<(Issue, WarningKind)>) {
    let mut used: BTreeSet<String> = config
        .consumers
        .values()
        .map(|c| c.handler.clone())
        .collect();
    for handler in config.handlers.values() {
        used.extend(handler.factory.dependencies());
    }
    for name in config.handlers.keys() {
        if !used.contains(name) {
            warnings.push((
                Issue {
                    path: at(&["handlers", name]),
                    message: format!(
                        "handler `{name}` is not used by any consumer or route; is a `handler = \"{name}\"` missing?"
                    ),
                },
                WarningKind::UnusedHandler,
            ));
        }
    }
}

/// Exchanges the amqp consumers on `broker` declare (the exchanges of their bindings).
fn declared_exchanges(config: &Config, broker: &str) -> BTreeSet<String> {
    config
        .consumers
        .values()
        .filter(|c| c.source == broker)
        .filter_map(|c| match &c.kind {
            ConsumerKind::Amqp(a) if a.declare => Some(a),
            _ => None,
        })
        .flat_map(|a| a.bindings.iter().map(|b| b.exchange.clone()))
        .collect()
}

fn undeclared_exchanges(config: &Config, warnings: &mut Vec<(Issue, WarningKind)>) {
    let is_amqp = |broker: &str| matches!(config.brokers.get(broker), Some(BrokerConfig::Amqp(_)));
    let mut check = |broker: &str, exchange: &str, path: Vec<String>, user: String| {
        // The default exchange always exists and routes by queue name.
        if exchange.is_empty() || !is_amqp(broker) {
            return;
        }
        let declared = declared_exchanges(config, broker);
        if declared.contains(exchange) {
            return;
        }
        let bound = if declared.is_empty() {
            "no consumer on it binds an exchange".to_owned()
        } else {
            let names: Vec<String> = declared.iter().map(|n| format!("`{n}`")).collect();
            format!("its consumers bind {}", names.join(", "))
        };
        warnings.push((
            Issue {
                path,
                message: format!(
                    "{user} publishes to exchange `{exchange}` on broker `{broker}`, which no consumer declares ({bound}); it must already exist on the broker, or every publish fails as unroutable"
                ),
            },
            WarningKind::UndeclaredExchange {
                broker: broker.to_owned(),
                exchange: exchange.to_owned(),
            },
        ));
    };
    for (name, outbox) in &config.outboxes {
        if let Some(destination) = &outbox.destination {
            check(
                &outbox.target,
                destination,
                at(&["outboxes", name, "destination"]),
                format!("outbox `{name}`"),
            );
        }
    }
    for (name, dl) in &config.dead_letters {
        for (i, rule) in dl.rules.iter().enumerate() {
            if let Action::Forward { target, .. } = &rule.action {
                check(
                    &dl.source,
                    target,
                    at(&["dead_letters", name, "rules", &i.to_string(), "exchange"]),
                    format!("dead-letter processor `{name}` (rule {}, `forward`)", i + 1),
                );
            }
        }
    }
}
