//! An outbox table as the database has it: identifiers quoted for SQL, and the inspection
//! behind `bosun outbox check` and the relay's start-up warnings (missing columns, no index
//! on the pending rows, no NOTIFY trigger), with the DDL that adds what is missing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use sqlx::PgPool;

use super::schema::{Schema, derived_name};
use crate::config::{ExistingOutbox, OutboxConfig};

/// `"name"`. Only for validated identifiers (lowercase letters, digits, `_`); the quotes
/// keep even a reserved word such as `order` a plain column name.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."table"` or `"table"`.
pub fn quote_table(table: &str) -> String {
    table
        .split('.')
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(".")
}

/// `'value'`, for the status values of the configuration (validated to hold no backslash or
/// control character, so the literal means the same under any `standard_conforming_strings`).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// What the database holds for one table.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    pub exists: bool,
    /// Column name → type as `format_type` spells it.
    pub columns: BTreeMap<String, String>,
    /// Each index's first key column and its predicate (`WHERE ...`), if any.
    pub indexes: Vec<(Option<String>, Option<String>)>,
    /// An enabled INSERT trigger whose function notifies the configured channel.
    pub notify_trigger: bool,
}

/// Reads the table's columns, indexes and triggers from the catalog.
pub async fn inspect(pool: &PgPool, table: &str, channel: &str) -> Result<Inspection, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Inspection::default());
    }
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    let indexes: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT (SELECT a.attname::text FROM pg_attribute a
                 WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]),
                pg_get_expr(i.indpred, i.indrelid)
         FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisvalid",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    // tgtype bit 2 is INSERT; the channel is either the trigger's argument (as bosun's own
    // trigger passes it) or written in the function's body.
    let notify_trigger: bool = sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
             WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
               AND (t.tgtype & 4) <> 0 AND p.prosrc ILIKE '%notify%'
               AND (position($2 in p.prosrc) > 0
                    OR position($2 in encode(t.tgargs, 'escape')) > 0))",
    )
    .bind(table)
    .bind(channel)
    .fetch_one(pool)
    .await?;
    Ok(Inspection {
        exists,
        columns: columns.into_iter().collect(),
        indexes,
        notify_trigger,
    })
}

/// One thing `bosun outbox check` looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `ok`, `missing` (required: the check fails) or `note` (works, with a limitation).
    pub status: Status,
    pub what: String,
    /// Statements that add what is missing.
    pub ddl: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Missing,
    Note,
}

impl Finding {
    fn new(status: Status, what: impl Into<String>, ddl: Option<String>) -> Self {
        Self {
            status,
            what: what.into(),
            ddl,
        }
    }
}

/// The columns of bosun's own table the relay reads or writes.
const OWN_COLUMNS: [&str; 14] = [
    "id",
    "message_id",
    "destination",
    "routing_key",
    "headers",
    "payload",
    "content_type",
    "partition_key",
    "created_at",
    "attempts",
    "last_error",
    "next_attempt_at",
    "published_at",
    "failed_at",
];

/// What `config`'s table lacks, given what the database holds.
pub fn findings(config: &OutboxConfig, found: &Inspection) -> Vec<Finding> {
    match &config.existing {
        Some(layout) => existing_findings(config, layout, found),
        None => own_findings(config, found),
    }
}

fn own_findings(config: &OutboxConfig, found: &Inspection) -> Vec<Finding> {
    let script = Schema::new(&config.table, &config.notify_channel)
        .map(|s| s.script())
        .ok();
    let mut out = Vec::new();
    if !found.exists {
        out.push(Finding::new(
            Status::Missing,
            format!("table {}", config.table),
            script,
        ));
        return out;
    }
    let missing: Vec<&str> = OWN_COLUMNS
        .into_iter()
        .filter(|c| !found.columns.contains_key(*c))
        .collect();
    let index = found.indexes.iter().any(|(first, predicate)| {
        first.as_deref() == Some("id")
            && predicate
                .as_deref()
                .is_some_and(|p| p.contains("published_at IS NULL"))
    });
    let mut needs_script = false;
    if missing.is_empty() {
        out.push(Finding::new(
            Status::Ok,
            "columns of bosun's outbox table",
            None,
        ));
    } else {
        needs_script = true;
        out.push(Finding::new(
            Status::Missing,
            format!("columns {}", missing.join(", ")),
            None,
        ));
    }
    needs_script |= push_index_and_trigger(&mut out, config, found, index, None, None);
    let by_message_id = found
        .indexes
        .iter()
        .any(|(first, predicate)| first.as_deref() == Some("message_id") && predicate.is_none());
    if by_message_id {
        out.push(Finding::new(Status::Ok, "index on message_id", None));
    } else {
        needs_script = true;
        out.push(Finding::new(
            Status::Note,
            "no index on message_id: a lookup or cancel by message id (`/v1/scheduled/ID`) reads the whole table",
            None,
        ));
    }
    if needs_script {
        out.push(Finding::new(
            Status::Note,
            "`bosun outbox migrate` applies this DDL (every statement is idempotent)",
            script,
        ));
    }
    out
}

/// Adds the pending-index and NOTIFY-trigger findings; true when either is missing.
fn push_index_and_trigger(
    out: &mut Vec<Finding>,
    config: &OutboxConfig,
    found: &Inspection,
    index: bool,
    index_ddl: Option<String>,
    trigger_ddl: Option<String>,
) -> bool {
    if index {
        out.push(Finding::new(Status::Ok, "index on the pending rows", None));
    } else {
        out.push(Finding::new(
            Status::Missing,
            "index on the pending rows (without it every claim scans the table)",
            index_ddl,
        ));
    }
    if found.notify_trigger {
        out.push(Finding::new(
            Status::Ok,
            format!("NOTIFY trigger on channel {}", config.notify_channel),
            None,
        ));
    } else {
        out.push(Finding::new(
            Status::Missing,
            format!(
                "NOTIFY trigger on channel {} (without it the relay polls every {:?})",
                config.notify_channel, config.poll_interval
            ),
            trigger_ddl,
        ));
    }
    !index || !found.notify_trigger
}

/// The type a role's column may have, and the one the DDL suggests.
fn role_types(role: &str) -> (fn(&str) -> bool, &'static str) {
    fn integer(t: &str) -> bool {
        matches!(t, "smallint" | "integer" | "bigint")
    }
    fn text(t: &str) -> bool {
        t == "text"
            || t == "name"
            || t == "citext"
            || t.starts_with("character varying")
            || t.starts_with("character")
    }
    fn payload(t: &str) -> bool {
        text(t) || matches!(t, "bytea" | "json" | "jsonb")
    }
    fn json(t: &str) -> bool {
        text(t) || matches!(t, "json" | "jsonb")
    }
    fn uuid(t: &str) -> bool {
        text(t) || t == "uuid"
    }
    fn timestamp(t: &str) -> bool {
        t.starts_with("timestamp")
    }
    fn any(_: &str) -> bool {
        true
    }
    match role {
        "id" => (integer, "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
        "payload" => (payload, "text NOT NULL"),
        "routing_key" => (text, "text NOT NULL DEFAULT ''"),
        "headers" => (json, "jsonb NOT NULL DEFAULT '{}'"),
        "message_id" => (uuid, "uuid NOT NULL DEFAULT gen_random_uuid()"),
        "created_at" => (timestamp, "timestamptz NOT NULL DEFAULT now()"),
        "attempts" => (integer, "integer NOT NULL DEFAULT 0"),
        "state" => (any, "text NOT NULL"),
        _ => (text, "text"),
    }
}

fn existing_findings(
    config: &OutboxConfig,
    layout: &ExistingOutbox,
    found: &Inspection,
) -> Vec<Finding> {
    let table = quote_table(&config.table);
    let mut out = Vec::new();
    if !found.exists {
        let mut ddl = format!("CREATE TABLE IF NOT EXISTS {table} (\n");
        let columns: Vec<String> = layout
            .columns()
            .into_iter()
            .map(|(role, column)| {
                let suggested = if role == "state" {
                    format!("text NOT NULL DEFAULT {}", quote_literal(&layout.pending))
                } else {
                    role_types(role).1.to_owned()
                };
                format!("    {} {suggested}", quote_ident(column))
            })
            .collect();
        ddl.push_str(&columns.join(",\n"));
        ddl.push_str("\n);");
        out.push(Finding::new(
            Status::Missing,
            format!("table {}", config.table),
            Some(ddl),
        ));
    } else {
        for (role, column) in layout.columns() {
            let (accepts, suggested) = role_types(role);
            match found.columns.get(column) {
                Some(ty) if accepts(ty) => out.push(Finding::new(
                    Status::Ok,
                    format!("{role} column {column} ({ty})"),
                    None,
                )),
                Some(ty) => out.push(Finding::new(
                    Status::Missing,
                    format!(
                        "{role} column {column} has type {ty}; expected {}",
                        suggested.split(' ').next().unwrap_or(suggested)
                    ),
                    None,
                )),
                None => out.push(Finding::new(
                    Status::Missing,
                    format!("{role} column {column}"),
                    Some(format!(
                        "ALTER TABLE {table} ADD COLUMN {} {suggested};",
                        quote_ident(column)
                    )),
                )),
            }
        }
    }
    let index = found.indexes.iter().any(|(first, predicate)| {
        first.as_deref() == Some(layout.state.as_str())
            || (first.as_deref() == Some(layout.id.as_str())
                && predicate.as_deref().is_some_and(|p| {
                    p.contains(layout.state.as_str()) && p.contains(&quote_literal(&layout.pending))
                }))
    });
    let base = config
        .table
        .rsplit('.')
        .next()
        .unwrap_or(config.table.as_str());
    let index_ddl = format!(
        "CREATE INDEX IF NOT EXISTS {} ON {table} ({})\n    WHERE {} = {};",
        quote_ident(&derived_name(base, "pending_idx")),
        quote_ident(&layout.id),
        quote_ident(&layout.state),
        quote_literal(&layout.pending),
    );
    let schema_prefix = match config.table.rfind('.') {
        Some(i) => format!("{}.", quote_ident(&config.table[..i])),
        None => String::new(),
    };
    let function = format!(
        "{schema_prefix}{}",
        quote_ident(&derived_name(base, "notify"))
    );
    let trigger_ddl = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER {} AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}({});",
        quote_ident(&derived_name(base, "notify")),
        quote_literal(&config.notify_channel),
    );
    push_index_and_trigger(
        &mut out,
        config,
        found,
        index,
        Some(index_ddl),
        Some(trigger_ddl),
    );
    if layout.last_error.is_none() {
        out.push(Finding::new(
            Status::Note,
            "no last_error column mapped: a failed row's reason is only logged and counted",
            None,
        ));
    }
    if layout.attempts.is_none() {
        out.push(Finding::new(
            Status::Note,
            "no attempts column mapped: a row the broker refuses is marked failed at once",
            None,
        ));
    }
    out
}

/// The report `bosun outbox check` prints: one line per finding, then the DDL that adds
/// what is missing.
pub fn report(name: &str, config: &OutboxConfig, findings: &[Finding]) -> String {
    let mut out = format!(
        "outbox {name}: table {} in database {}\n",
        config.table, config.database
    );
    for f in findings {
        let label = match f.status {
            Status::Ok => "ok     ",
            Status::Missing => "MISSING",
            Status::Note => "note   ",
        };
        let _ = writeln!(out, "  {label} {}", f.what);
    }
    let ddl: Vec<&str> = findings.iter().filter_map(|f| f.ddl.as_deref()).collect();
    if !ddl.is_empty() {
        let _ = writeln!(out, "-- DDL for outbox {name}:");
        for statement in ddl {
            out.push_str(statement.trim_end());
            out.push_str("\n\n");
        }
    }
    out
}

/// Whether anything required is missing.
pub fn any_missing(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.status == Status::Missing)
}

/// At relay start: says what the table lacks in the log, never blocking the relay (which
/// reports its own SQL errors on `/readyz`).
pub async fn warn_at_start(name: String, pool: PgPool, config: OutboxConfig) {
    let found = match inspect(&pool, &config.table, &config.notify_channel).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(outbox = %name, error = %e, "cannot inspect the outbox table");
            return;
        }
    };
    for f in findings(&config, &found) {
        if f.status != Status::Missing {
            continue;
        }
        if f.what.starts_with("NOTIFY trigger") {
            tracing::warn!(outbox = %name, table = %config.table, channel = %config.notify_channel,
                poll_interval_ms = config.poll_interval.as_millis() as u64,
                "no NOTIFY trigger on the outbox table: the relay polls; `bosun outbox check` prints the trigger's DDL");
        } else {
            tracing::warn!(outbox = %name, table = %config.table, missing = %f.what,
                "the outbox table lacks something; `bosun outbox check` prints the DDL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("order"), "\"order\"");
        assert_eq!(quote_table("app.outbox"), "\"app\".\"outbox\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
