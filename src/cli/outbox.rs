//! `bosun outbox schema|migrate`: the outbox table's DDL, printed or applied.

use std::collections::BTreeSet;

use clap::Subcommand;

use super::{CliError, ConfigArg, EXIT_OK, block_on};
use crate::Runtime;
use crate::outbox::Schema;

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Print the DDL of an outbox table (table, indexes, NOTIFY trigger).
    Schema {
        /// Table name, optionally schema-qualified.
        #[arg(long, default_value = "bosun_outbox")]
        table: String,
        /// NOTIFY channel (default: the table name with `.` replaced by `_`).
        #[arg(long)]
        channel: Option<String>,
    },
    /// Create or update the tables of the configured outboxes. Safe to run again.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this `[outboxes.NAME]` (default: every outbox).
        #[arg(long)]
        outbox: Option<String>,
    },
}

pub fn run(runtime: &Runtime, command: OutboxCommand) -> Result<u8, CliError> {
    match command {
        OutboxCommand::Schema { table, channel } => {
            let channel = channel.unwrap_or_else(|| Schema::default_channel(&table));
            let schema =
                Schema::new(&table, &channel).map_err(|e| CliError::Usage(e.to_string()))?;
            print!("{}", schema.script());
            Ok(EXIT_OK)
        }
        OutboxCommand::Migrate { config, outbox } => {
            let config = config.load(runtime)?;
            if let Some(name) = &outbox
                && !config.outboxes.contains_key(name)
            {
                let known: Vec<&str> = config.outboxes.keys().map(String::as_str).collect();
                return Err(CliError::Usage(format!(
                    "no outbox `{name}` in the configuration (outboxes: {})",
                    known.join(", ")
                )));
            }
            let selected: Vec<_> = config
                .outboxes
                .iter()
                .filter(|(name, _)| outbox.as_ref().is_none_or(|o| o == *name))
                .collect();
            if selected.is_empty() {
                println!("no outboxes configured; nothing to migrate");
                return Ok(EXIT_OK);
            }
            block_on(async {
                // Two outboxes on one table (several relays) need one migration.
                let mut done = BTreeSet::new();
                for (name, o) in selected {
                    if !done.insert((
                        o.database.clone(),
                        o.table.clone(),
                        o.notify_channel.clone(),
                    )) {
                        continue;
                    }
                    let db = config.databases.get(&o.database).ok_or_else(|| {
                        anyhow::anyhow!("outbox `{name}`: database `{}` is not defined", o.database)
                    })?;
                    let pool = crate::database::lazy_pool(db)?;
                    let schema =
                        Schema::new(&o.table, &o.notify_channel).map_err(anyhow::Error::from)?;
                    schema.migrate(&pool).await.map_err(|e| {
                        anyhow::anyhow!(
                            "outbox `{name}`: migrating table {} in database `{}`: {e}",
                            o.table,
                            o.database
                        )
                    })?;
                    pool.close().await;
                    println!(
                        "outbox {name}: table {} in database {} is up to date (channel {})",
                        o.table, o.database, o.notify_channel
                    );
                }
                Ok::<u8, CliError>(EXIT_OK)
            })?
        }
    }
}
