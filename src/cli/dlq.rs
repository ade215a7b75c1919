//! `bosun dlq ...`: the archive of dead letters from the command line. Everything but
//! `schema` reads the configuration for the archive database and the brokers to replay to,
//! and goes through [`Ops`], the code the admin HTTP API uses too.

use std::fmt::Write as _;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::{CliError, ConfigArg, EXIT_FAILURE, EXIT_OK, block_on};
use crate::Runtime;
use crate::dead_letter::DeadLetterError;
use crate::dead_letter::archive::{self, Group, ListFilter, Selector, Summary};
use crate::dead_letter::browse::Filter;
use crate::dead_letter::operations::{self, Kind};
use crate::dead_letter::ops::{MAX_IDS, Ops, confirm_all, parse_time, row_json};
use crate::dead_letter::publishers::Publishers;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Print the archive table's DDL.
    Schema {
        /// Table name (default `dead_letters`; `schema.table` allowed).
        #[arg(long, default_value = "dead_letters")]
        table: String,
    },
    /// Create the archive table of every archiving processor (or of one), idempotently.
    Migrate {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        processor: Option<String>,
    },
    /// List archived dead letters, newest first.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this failure group.
        #[arg(long)]
        group: Option<String>,
        /// Only dead letters archived since this time (RFC 3339) or age (`2h`).
        #[arg(long)]
        since: Option<String>,
        /// Only this status (archived, scheduled, replayed, purged); default: all but purged.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Failure groups of archived dead letters: count, first and last seen, a sample error.
    Groups {
        #[command(flatten)]
        common: Common,
    },
    /// One archived dead letter, headers and body included.
    Show {
        #[command(flatten)]
        common: Common,
        id: i64,
    },
    /// Republish archived dead letters to their original queue or stream.
    ///
    /// With `--rate` or `--batch-size` the replay runs as a recorded operation (the one the
    /// console and the admin API start): paced, with its progress in the operations table,
    /// cancellable with `bosun dlq cancel`, and audited.
    Replay {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        select: Select,
        /// Show what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        pace: Pace,
    },
    /// Purge archived dead letters (status `purged`, body and headers removed).
    Purge {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        select: Select,
        /// Rows archived before this time (RFC 3339) or age (`30d`).
        #[arg(long, conflicts_with_all = ["ids", "group", "all"])]
        before: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        pace: Pace,
    },
    /// Recorded replays and purges (from the console, the admin API or `--rate`), newest
    /// first, and the audit trail.
    Operations {
        #[command(flatten)]
        common: Common,
        /// Also print the latest audit lines.
        #[arg(long)]
        audit: bool,
    },
    /// Cancel a running recorded operation; it stops before its next batch.
    Cancel {
        #[command(flatten)]
        common: Common,
        id: i64,
    },
}

/// How fast a recorded operation goes; giving either makes the replay or purge one.
#[derive(Args)]
pub struct Pace {
    /// Rows per second (`20/s`, `600/m`).
    #[arg(long)]
    rate: Option<String>,
    /// Rows per batch (1 to 1000, default 100).
    #[arg(long)]
    batch_size: Option<i64>,
}

impl Pace {
    fn recorded(&self) -> bool {
        self.rate.is_some() || self.batch_size.is_some()
    }
}

/// Options every archive command takes.
#[derive(Args)]
pub struct Common {
    #[command(flatten)]
    config: ConfigArg,
    /// The `[dead_letters.NAME]` whose archive to use (needed when processors archive into
    /// different tables).
    #[arg(long)]
    processor: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Which rows: ids, a group, or all.
#[derive(Args)]
pub struct Select {
    /// Row ids.
    ids: Vec<i64>,
    /// Every archived row of this failure group.
    #[arg(long, conflicts_with_all = ["ids", "all"])]
    group: Option<String>,
    /// Every archived row of `--processor`; needs `--confirm` naming it again (not with
    /// `--dry-run`).
    #[arg(long, conflicts_with_all = ["ids", "group"])]
    all: bool,
    /// With `--all`: the processor's name once more, to confirm.
    #[arg(long, value_name = "PROCESSOR", requires = "all")]
    confirm: Option<String>,
}

impl Select {
    fn selector(
        &self,
        before: Option<&str>,
        processor: Option<&str>,
        dry_run: bool,
    ) -> Result<Selector, CliError> {
        if let Some(before) = before {
            return Ok(Selector::Before(parse_time(before).map_err(usage)?));
        }
        if self.ids.len() > MAX_IDS {
            return Err(CliError::Usage(format!(
                "{} ids given; at most {MAX_IDS} per command (split the list, or use --group)",
                self.ids.len()
            )));
        }
        if self.all {
            confirm_all(
                processor,
                self.confirm.as_deref(),
                dry_run,
                "`--confirm <processor>`",
            )
            .map_err(usage)?;
        }
        match (&self.group, self.all, self.ids.is_empty()) {
            (Some(g), false, true) => Ok(Selector::Group(g.clone())),
            (None, true, true) => Ok(Selector::All),
            (None, false, false) => Ok(Selector::Ids(self.ids.clone())),
            _ => Err(CliError::Usage("give row ids, --group G or --all".into())),
        }
    }
}

fn usage(e: DeadLetterError) -> CliError {
    CliError::Usage(e.to_string())
}

/// Invalid requests (unknown processor, ambiguous archive) are usage errors; the rest fail.
fn failed(e: DeadLetterError) -> CliError {
    match e {
        DeadLetterError::Invalid(_) => usage(e),
        other => CliError::Other(anyhow::Error::new(other)),
    }
}

fn ops(runtime: &Runtime, config: &ConfigArg) -> Result<Ops, CliError> {
    let config = Arc::new(config.load(runtime)?);
    let pools = crate::database::pools(&config.databases)?;
    let publishers = Arc::new(Publishers::new(config.clone(), "cli"));
    Ok(Ops::new(config, pools, publishers))
}

fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot render JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

/// How long `dlq replay` waits for its spans to be exported before it exits.
const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

pub fn run(runtime: &Runtime, command: DlqCommand) -> Result<u8, CliError> {
    if let DlqCommand::Replay {
        common,
        dry_run: false,
        ..
    } = &command
    {
        trace_replays(runtime, &common.config)?;
    }
    // Pools and publishers need the async runtime from the moment they are built.
    block_on(run_async(runtime, command))?
}

/// With `[tracing]` on, a replay records a PRODUCER span per message, in a new trace linked
/// to the archived message's, as a replay from the admin API does: the exporter goes in
/// (spans and warnings only: the command's output is its own).
fn trace_replays(runtime: &Runtime, config: &ConfigArg) -> Result<(), CliError> {
    let config = config.load(runtime)?;
    if config.tracing.enabled {
        crate::telemetry::init_logging(
            config.service.log_format,
            "warn",
            &config.tracing,
            &config.service.name,
        )
        .map_err(|e| CliError::Other(e.into()))?;
    }
    Ok(())
}

async fn run_async(runtime: &Runtime, command: DlqCommand) -> Result<u8, CliError> {
    match command {
        DlqCommand::Schema { table } => {
            if !crate::config::valid_sql_identifier(&table) {
                return Err(CliError::Usage(format!(
                    "`{table}` is not a plain lowercase SQL identifier"
                )));
            }
            print!("{}", archive::schema(&table));
            Ok(EXIT_OK)
        }
        DlqCommand::Migrate { config, processor } => {
            let config = config.load(runtime)?;
            let pools = crate::database::pools(&config.databases)?;
            let mut done = Vec::new();
            for (name, dl) in &config.dead_letters {
                if processor.as_ref().is_some_and(|p| p != name) {
                    continue;
                }
                let Some(db) = &dl.archive else { continue };
                let pool = pools
                    .get(db)
                    .ok_or_else(|| CliError::Usage(format!("database `{db}` is not defined")))?;
                if done.contains(&(db.clone(), dl.table.clone())) {
                    continue;
                }
                archive::migrate(pool, &dl.table).await.map_err(failed)?;
                println!("{}: table {} in database {db} is ready", name, dl.table);
                done.push((db.clone(), dl.table.clone()));
            }
            if done.is_empty() {
                return Err(CliError::Usage(match processor {
                    Some(p) => format!("no dead-letter processor `{p}` with an archive"),
                    None => "no dead-letter processor with an archive is configured".into(),
                }));
            }
            Ok(EXIT_OK)
        }
        DlqCommand::List {
            common,
            group,
            since,
            status,
            limit,
        } => {
            let ops = ops(runtime, &common.config)?;
            let filter = ListFilter {
                group,
                since: since
                    .as_deref()
                    .map(parse_time)
                    .transpose()
                    .map_err(usage)?,
                status,
                limit: limit.clamp(1, 10_000),
            };
            let rows = ops
                .list(common.processor.as_deref(), &filter)
                .await
                .map_err(failed)?;
            if common.json {
                print_json(&rows)?;
            } else {
                print!("{}", summaries_table(&rows));
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Groups { common } => {
            let ops = ops(runtime, &common.config)?;
            let groups = ops
                .groups(common.processor.as_deref())
                .await
                .map_err(failed)?;
            if common.json {
                print_json(&groups)?;
            } else {
                print!("{}", groups_table(&groups));
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Show { common, id } => {
            let ops = ops(runtime, &common.config)?;
            let row = ops
                .show(common.processor.as_deref(), id)
                .await
                .map_err(failed)?;
            let value = row_json(&row);
            if common.json {
                print_json(&value)?;
            } else if let Some(map) = value.as_object() {
                for (k, v) in map {
                    let shown = match v {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    println!("{k:<18} {shown}");
                }
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Replay {
            common,
            select,
            dry_run,
            pace,
        } => {
            let selector = select.selector(None, common.processor.as_deref(), dry_run)?;
            if pace.recorded() && !dry_run {
                let ops = ops(runtime, &common.config)?;
                return recorded(&ops, &common, Kind::Replay, &selector, &pace).await;
            }
            let ops = ops(runtime, &common.config)?;
            let report = ops
                .replay(common.processor.as_deref(), &selector, dry_run)
                .await
                .map_err(failed);
            crate::otlp::flush(FLUSH_WITHIN).await;
            let report = report?;
            if common.json {
                print_json(&report)?;
            } else if dry_run {
                println!("would replay {} dead letters", report.would_replay.len());
                print!("{}", summaries_table(&report.would_replay));
            } else {
                println!("replayed {} dead letters", report.replayed.len());
                for f in &report.failed {
                    println!("not replayed: id {}: {}", f.id, f.error);
                }
            }
            Ok(if report.failed.is_empty() {
                EXIT_OK
            } else {
                EXIT_FAILURE
            })
        }
        DlqCommand::Purge {
            common,
            select,
            before,
            dry_run,
            pace,
        } => {
            let selector =
                select.selector(before.as_deref(), common.processor.as_deref(), dry_run)?;
            if pace.recorded() && !dry_run {
                let ops = ops(runtime, &common.config)?;
                return recorded(&ops, &common, Kind::Purge, &selector, &pace).await;
            }
            let ops = ops(runtime, &common.config)?;
            let report = ops
                .purge(common.processor.as_deref(), &selector, dry_run)
                .await
                .map_err(failed)?;
            if common.json {
                print_json(&report)?;
            } else if dry_run {
                println!("would purge {} dead letters", report.would_purge.len());
                print!("{}", summaries_table(&report.would_purge));
            } else {
                println!("purged {} dead letters", report.purged.len());
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Operations { common, audit } => {
            let ops = ops(runtime, &common.config)?;
            let processor = common.processor.as_deref();
            let list = operations::list(&ops, processor, 50)
                .await
                .map_err(failed)?;
            let entries = if audit {
                operations::audit_log(&ops, processor, 50)
                    .await
                    .map_err(failed)?
            } else {
                Vec::new()
            };
            if common.json {
                print_json(&serde_json::json!({ "operations": list, "audit": entries }))?;
                return Ok(EXIT_OK);
            }
            println!(
                "{:>6}  {:<7}  {:<10}  {:>8}  {:>8}  {:>8}  {:<16}  {:<20}  FILTER",
                "ID", "KIND", "STATE", "TOTAL", "DONE", "FAILED", "BY", "STARTED"
            );
            for op in &list {
                println!(
                    "{:>6}  {:<7}  {:<10}  {:>8}  {:>8}  {:>8}  {:<16}  {:<20}  {}",
                    op.id,
                    op.kind,
                    op.state,
                    op.total,
                    op.done,
                    op.failed,
                    cell(&op.requested_by, 16),
                    op.created_at.format("%Y-%m-%d %H:%M:%S"),
                    cell(&op.filter.describe(), 80)
                );
            }
            for a in &entries {
                println!(
                    "{}  {:<16}  {}  count={}",
                    a.at.format("%Y-%m-%d %H:%M:%S"),
                    cell(&a.actor, 16),
                    a.action,
                    a.count.map(|c| c.to_string()).unwrap_or_else(|| "-".into())
                );
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Cancel { common, id } => {
            let ops = ops(runtime, &common.config)?;
            let op = operations::cancel(&ops, common.processor.as_deref(), id, &cli_user())
                .await
                .map_err(failed)?;
            if common.json {
                print_json(&op)?;
            } else {
                println!("operation {id}: {}", op.state);
            }
            Ok(EXIT_OK)
        }
    }
}

/// Who runs a command, for the audit trail.
fn cli_user() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

/// The filter a selector stands for.
fn selector_filter(selector: &Selector, processor: Option<&str>) -> Filter {
    let mut filter = Filter {
        processor: processor.map(str::to_owned),
        ..Filter::default()
    };
    match selector {
        Selector::Ids(ids) => filter.ids = Some(ids.clone()),
        Selector::Group(g) => filter.group = Some(g.clone()),
        Selector::All => {}
        Selector::Before(t) => filter.until = Some(*t),
    }
    filter
}

/// Runs a replay or purge as a recorded operation, printing its progress.
async fn recorded(
    ops: &Ops,
    common: &Common,
    kind: Kind,
    selector: &Selector,
    pace: &Pace,
) -> Result<u8, CliError> {
    let rate = pace
        .rate
        .as_deref()
        .map(operations::parse_rate)
        .transpose()
        .map_err(CliError::Usage)?;
    let request = operations::Request {
        kind,
        processor: common.processor.clone(),
        filter: selector_filter(selector, common.processor.as_deref()),
        rate,
        batch_size: pace.batch_size.unwrap_or(operations::DEFAULT_BATCH),
        requested_by: cli_user(),
    };
    let op = operations::start(ops, &request).await.map_err(failed)?;
    if !common.json {
        println!(
            "operation {}: {} of {} dead letters ({})",
            op.id,
            kind.name(),
            op.total,
            request.filter.describe()
        );
    }
    let json = common.json;
    let done = operations::run(ops, common.processor.as_deref(), op.id, |op| {
        if !json {
            println!(
                "operation {}: {}/{} done, {} failed",
                op.id, op.done, op.total, op.failed
            );
        }
    })
    .await
    .map_err(failed)?;
    if json {
        print_json(&done)?;
    } else {
        let past = match kind {
            Kind::Replay => "replayed",
            Kind::Purge => "purged",
        };
        println!(
            "operation {} {}: {past} {} dead letters, {} failed",
            done.id, done.state, done.done, done.failed
        );
        if let Some(e) = &done.last_error {
            println!("last error: {e}");
        }
    }
    Ok(if done.state == "done" && done.failed == 0 {
        EXIT_OK
    } else {
        EXIT_FAILURE
    })
}

/// Cuts `text` to `max` characters for a table cell.
fn cell(text: &str, max: usize) -> String {
    let flat = text.replace(['\n', '\r', '\t'], " ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

fn summaries_table(rows: &[Summary]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>8}  {:<20}  {:<10}  {:<16}  {:<16}  {:>3}  {:<20}  ERROR",
        "ID", "ARCHIVED", "STATUS", "GROUP", "ORIGINAL", "TRY", "KIND"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>8}  {:<20}  {:<10}  {:<16}  {:<16}  {:>3}  {:<20}  {}",
            r.id,
            r.archived_at.format("%Y-%m-%d %H:%M:%S"),
            r.status,
            r.failure.group_key,
            cell(r.original.as_deref().unwrap_or("-"), 16),
            r.failure.attempts,
            cell(
                &match &r.failure.reason {
                    Some(reason) => format!("{} ({reason})", r.failure.error_kind),
                    None => r.failure.error_kind.clone(),
                },
                20
            ),
            cell(r.failure.error.as_deref().unwrap_or("-"), 80)
        );
    }
    out
}

fn groups_table(groups: &[Group]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16}  {:<10}  {:>7}  {:<20}  {:<20}  SAMPLE ERROR",
        "GROUP", "KIND", "COUNT", "FIRST SEEN", "LAST SEEN"
    );
    for g in groups {
        let _ = writeln!(
            out,
            "{:<16}  {:<10}  {:>7}  {:<20}  {:<20}  {}",
            g.group_key,
            g.error_kind,
            g.count,
            g.first_seen.format("%Y-%m-%d %H:%M:%S"),
            g.last_seen.format("%Y-%m-%d %H:%M:%S"),
            cell(g.sample_error.as_deref().unwrap_or("-"), 80)
        );
    }
    out
}
