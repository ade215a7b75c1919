//! `bosun topology`: print, or declare with `--apply`, every exchange, queue and binding the
//! configured amqp consumers need.

use std::fmt::Write as _;

use super::{CliError, ConfigArg, EXIT_OK};
use crate::Runtime;
use crate::amqp::{Topology, connection};
use crate::config::{BrokerConfig, ConsumerKind};

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
    print!("{out}");
    if !args.apply || plans.is_empty() {
        return Ok(EXIT_OK);
    }
    super::block_on(async move {
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
        Ok(EXIT_OK)
    })?
}
