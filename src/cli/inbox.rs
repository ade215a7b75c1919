//! `bosun inbox schema|show|forget`: the inbox tables' DDL, and one record looked at or
//! removed so an operator can force a key to run again.

use clap::Subcommand;

use super::{CliError, ConfigArg, EXIT_FAILURE, EXIT_OK, block_on};
use crate::Runtime;
use crate::config::{Config, InboxStore};
use crate::inbox::Store;
use crate::inbox::postgres::Schema;

#[derive(Subcommand)]
pub enum InboxCommand {
    /// Print the DDL of the configured postgres inboxes: the table and the function
    /// `bosun_inbox_complete(consumer, key, token)` an application calls in its own
    /// transaction.
    Schema {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this `[inboxes.NAME]` (default: every postgres inbox).
        #[arg(long)]
        inbox: Option<String>,
    },
    /// Print the record of KEY in CONSUMER's inbox; exits 1 when there is none.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        consumer: String,
        key: String,
    },
    /// Delete the record of KEY in CONSUMER's inbox, so the next message with that key runs.
    Forget {
        #[command(flatten)]
        config: ConfigArg,
        consumer: String,
        key: String,
    },
}

/// The inbox store of consumer `name`.
fn store_of(config: &Config, name: &str) -> Result<std::sync::Arc<dyn Store>, CliError> {
    let Some(consumer) = config.consumers.get(name) else {
        return Err(CliError::Usage(format!(
            "no consumer `{name}` in the configuration"
        )));
    };
    let Some(inbox) = &consumer.inbox else {
        return Err(CliError::Usage(format!("consumer `{name}` has no inbox")));
    };
    let pools = crate::database::pools(&config.databases)?;
    Ok(crate::consumers::inbox_store(&inbox.store, config, &pools)?)
}

pub fn run(runtime: &Runtime, command: InboxCommand) -> Result<u8, CliError> {
    match command {
        InboxCommand::Schema { config, inbox } => {
            let config = config.load(runtime)?;
            if let Some(name) = &inbox
                && !config.inboxes.contains_key(name)
            {
                return Err(CliError::Usage(format!(
                    "no inbox `{name}` in the configuration"
                )));
            }
            let mut printed = 0;
            for (name, i) in &config.inboxes {
                if inbox.as_ref().is_some_and(|only| only != name) {
                    continue;
                }
                if let InboxStore::Postgres { table, .. } = &i.store {
                    let schema = Schema::new(table).map_err(anyhow::Error::from)?;
                    println!("-- inbox `{name}`");
                    print!("{}", schema.script());
                    printed += 1;
                }
            }
            if printed == 0 {
                return Err(CliError::Usage(
                    "no postgres inbox in the configuration (a redis inbox has no schema)".into(),
                ));
            }
            Ok(EXIT_OK)
        }
        InboxCommand::Show {
            config,
            consumer,
            key,
        } => {
            let config = config.load(runtime)?;
            // Pools need the runtime they are made in.
            let record = block_on(async {
                let store = store_of(&config, &consumer)?;
                store
                    .show(&consumer, &key)
                    .await
                    .map_err(|e| CliError::Other(e.into()))
            })??;
            match record {
                Some(r) => {
                    println!("consumer:   {consumer}");
                    println!("key:        {key}");
                    println!("status:     {}", r.status);
                    println!("token:      {}", r.token);
                    println!("claimed_at: {}", r.claimed_at);
                    println!("done_at:    {}", r.done_at.as_deref().unwrap_or("-"));
                    println!("takeovers:  {}", r.takeovers);
                    Ok(EXIT_OK)
                }
                None => {
                    eprintln!("no record of key {key:?} for consumer `{consumer}`");
                    Ok(EXIT_FAILURE)
                }
            }
        }
        InboxCommand::Forget {
            config,
            consumer,
            key,
        } => {
            let config = config.load(runtime)?;
            let gone = block_on(async {
                let store = store_of(&config, &consumer)?;
                store
                    .forget(&consumer, &key)
                    .await
                    .map_err(|e| CliError::Other(e.into()))
            })??;
            if gone {
                println!("forgot key {key:?} of consumer `{consumer}`: its next message runs");
            } else {
                println!("no record of key {key:?} for consumer `{consumer}`");
            }
            Ok(EXIT_OK)
        }
    }
}
