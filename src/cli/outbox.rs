//! `bosun outbox schema|migrate|check`: the outbox table's DDL, printed or applied, and what
//! a live table lacks.

use std::collections::BTreeSet;

use clap::Subcommand;

use super::{CliError, ConfigArg, EXIT_FAILURE, EXIT_OK, block_on};
use crate::Runtime;
use crate::config::{Config, OutboxConfig};
use crate::outbox::{Schema, table};

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
    /// Inspect the live tables of the configured outboxes: columns and their types, the
    /// index on pending rows, the NOTIFY trigger. Prints the DDL that adds what is missing;
    /// exits 1 when something required is missing.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this `[outboxes.NAME]` (default: every outbox).
        name: Option<String>,
    },
}

/// A pool on the outbox's database, connecting on first use.
fn pool_for(config: &Config, name: &str, o: &OutboxConfig) -> anyhow::Result<sqlx::PgPool> {
    let db = config.databases.get(&o.database).ok_or_else(|| {
        anyhow::anyhow!("outbox `{name}`: database `{}` is not defined", o.database)
    })?;
    crate::database::lazy_pool(db)
}

/// The outboxes a command applies to: `only`, or all of them.
fn select<'c>(
    config: &'c Config,
    only: Option<&String>,
) -> Result<Vec<(&'c String, &'c OutboxConfig)>, CliError> {
    if let Some(name) = only
        && !config.outboxes.contains_key(name)
    {
        let known: Vec<&str> = config.outboxes.keys().map(String::as_str).collect();
        return Err(CliError::Usage(format!(
            "no outbox `{name}` in the configuration (outboxes: {})",
            known.join(", ")
        )));
    }
    Ok(config
        .outboxes
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| o == *name))
        .collect())
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
            let selected = select(&config, outbox.as_ref())?;
            if selected.is_empty() {
                println!("no outboxes configured; nothing to migrate");
                return Ok(EXIT_OK);
            }
            block_on(async {
                // Two outboxes on one table (several relays) need one migration.
                let mut done = BTreeSet::new();
                for (name, o) in selected {
                    if o.existing.is_some() {
                        println!(
                            "outbox {name}: table {} is the application's own (`columns`); not migrated, see `bosun outbox check`",
                            o.table
                        );
                        continue;
                    }
                    if !done.insert((
                        o.database.clone(),
                        o.table.clone(),
                        o.notify_channel.clone(),
                    )) {
                        continue;
                    }
                    let pool = pool_for(&config, name, o)?;
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
        OutboxCommand::Check { config, name } => {
            let config = config.load(runtime)?;
            let selected = select(&config, name.as_ref())?;
            if selected.is_empty() {
                println!("no outboxes configured; nothing to check");
                return Ok(EXIT_OK);
            }
            block_on(async {
                let mut code = EXIT_OK;
                for (name, o) in selected {
                    let pool = pool_for(&config, name, o)?;
                    let found = table::inspect(&pool, &o.table, &o.notify_channel)
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "outbox `{name}`: inspecting table {} in database `{}`: {e}",
                                o.table,
                                o.database
                            )
                        })?;
                    pool.close().await;
                    let findings = table::findings(o, &found);
                    print!("{}", table::report(name, o, &findings));
                    if table::any_missing(&findings) {
                        code = EXIT_FAILURE;
                    }
                }
                Ok::<u8, CliError>(code)
            })?
        }
    }
}
