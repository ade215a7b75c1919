//! `bosun topology`: print, or declare with `--apply`, every exchange, queue and binding the
//! configured amqp consumers need, and the exchanges outboxes and dead-letter `forward`
//! rules publish to (which bosun never declares: `--apply` checks that they exist).

use std::fmt::Write as _;

use lapin::options::ExchangeDeclareOptions;
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;

use super::{CliError, ConfigArg, EXIT_OK};
use crate::Runtime;
use crate::amqp::{Topology, connection};
use crate::config::{AmqpBrokerConfig, BrokerConfig, Config, ConsumerKind};

/// An exchange something publishes to: who, on which broker, and which consumer declares it.
struct Destination {
    user: String,
    broker: String,
    exchange: String,
    declared_by: Option<String>,
}

/// The amqp exchanges outboxes and dead-letter `forward` rules publish to.
fn destinations(config: &Config) -> Vec<Destination> {
    let declarer = |broker: &str, exchange: &str| -> Option<String> {
        config.consumers.iter().find_map(|(name, c)| match &c.kind {
            ConsumerKind::Amqp(a)
                if c.source == broker && a.bindings.iter().any(|b| b.exchange == exchange) =>
            {
                Some(name.clone())
            }
            _ => None,
        })
    };
    let is_amqp = |broker: &str| matches!(config.brokers.get(broker), Some(BrokerConfig::Amqp(_)));
    let mut out = Vec::new();
    for (name, o) in &config.outboxes {
        if let Some(exchange) = o.destination.as_deref().filter(|e| !e.is_empty())
            && is_amqp(&o.target)
        {
            out.push(Destination {
                user: format!("outbox {name}"),
                broker: o.target.clone(),
                exchange: exchange.to_owned(),
                declared_by: declarer(&o.target, exchange),
            });
        }
    }
    for (name, d) in &config.dead_letters {
        for (i, rule) in d.rules.iter().enumerate() {
            if let crate::config::Action::Forward { target, .. } = &rule.action
                && is_amqp(&d.source)
            {
                out.push(Destination {
                    user: format!("dead letters {name} (rule {}, forward)", i + 1),
                    broker: d.source.clone(),
                    exchange: target.clone(),
                    declared_by: declarer(&d.source, target),
                });
            }
        }
    }
    out
}

/// Whether `exchange` exists on `broker` (a passive declare on a fresh connection).
pub async fn exchange_exists(
    broker: &AmqpBrokerConfig,
    service: &str,
    exchange: &str,
) -> anyhow::Result<bool> {
    let name = connection::connection_name(broker, service, "check");
    let conn = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        connection::connect(broker, &name),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer within 5s"))??;
    let result = async {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| anyhow::anyhow!("cannot open a channel: {e}"))?;
        let declared = channel
            .exchange_declare(
                crate::amqp::short("exchange", exchange)?,
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(()) => Ok(true),
            Err(e) => match crate::amqp::soft_error(&e) {
                Some((AMQPSoftError::NOTFOUND, _)) => Ok(false),
                _ => Err(anyhow::anyhow!("cannot check exchange `{exchange}`: {e}")),
            },
        }
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}

#[derive(clap::Args)]
pub struct TopologyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Declare everything on the brokers (consumers with `declare = false` are only checked).
    #[arg(long)]
    pub apply: bool,
}

pub fn topology(runtime: &Runtime, args: TopologyArgs) -> Result<u8, CliError> {
    let config = args.config.load(runtime)?;
    let mut plans = Vec::new();
    for (name, consumer) in &config.consumers {
        let ConsumerKind::Amqp(amqp) = &consumer.kind else {
            continue;
        };
        let Some(BrokerConfig::Amqp(broker)) = config.brokers.get(&consumer.source) else {
            continue;
        };
        plans.push((
            name,
            &consumer.source,
            broker,
            amqp.declare,
            Topology::for_consumer(consumer, amqp),
        ));
    }
    let mut out = String::new();
    for (name, source, _, declare, plan) in &plans {
        let _ = writeln!(
            out,
            "# consumer {name} on broker {source}{}",
            if *declare {
                ""
            } else {
                " (declare = false: checked only)"
            }
        );
        out.push_str(&plan.describe());
    }
    let destinations = destinations(&config);
    for d in &destinations {
        let _ = writeln!(
            out,
            "# {} publishes on broker {} to exchange {}: {}",
            d.user,
            d.broker,
            d.exchange,
            match &d.declared_by {
                Some(consumer) => format!("declared by consumer {consumer}"),
                None => "declared by no consumer; it must exist on the broker (`--apply` checks)"
                    .to_owned(),
            }
        );
    }
    print!("{out}");
    if !args.apply || (plans.is_empty() && destinations.is_empty()) {
        return Ok(EXIT_OK);
    }
    super::block_on(async {
        for (name, source, broker, declare, plan) in &plans {
            let conn_name = connection::connection_name(broker, &config.service.name, "topology");
            let conn = connection::connect(broker, &conn_name)
                .await
                .map_err(|e| CliError::Other(anyhow::anyhow!("broker {source}: {e}")))?;
            let result = async {
                let channel = conn
                    .create_channel()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot open a channel: {e}"))?;
                plan.apply(&channel, *declare)
                    .await
                    .map_err(anyhow::Error::from)
            }
            .await;
            let _ = conn.close(200, "done".into()).await;
            result.map_err(|e| CliError::Other(e.context(format!("consumer {name}"))))?;
            println!(
                "consumer {name}: {}",
                if *declare { "declared" } else { "checked" }
            );
        }
        // After the consumers' exchanges are declared, every destination must exist.
        let mut missing = Vec::new();
        for d in destinations.iter().filter(|d| d.declared_by.is_none()) {
            let Some(BrokerConfig::Amqp(broker)) = config.brokers.get(&d.broker) else {
                continue;
            };
            let exists = exchange_exists(broker, &config.service.name, &d.exchange)
                .await
                .map_err(|e| CliError::Other(e.context(format!("broker {}", d.broker))))?;
            if exists {
                println!("{}: exchange {} exists", d.user, d.exchange);
            } else {
                missing.push(format!(
                    "{} publishes to exchange `{}`, which does not exist on broker `{}` and no consumer declares",
                    d.user, d.exchange, d.broker
                ));
            }
        }
        if !missing.is_empty() {
            return Err(CliError::Other(anyhow::anyhow!("{}", missing.join("; "))));
        }
        Ok(EXIT_OK)
    })?
}
