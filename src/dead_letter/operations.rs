//! Recorded operations: a replay or purge of every archived row matching a filter, run in
//! batches at an optional rate, with its progress in a table (`<archive>_operations`) that
//! the console, the admin API and `bosun dlq` all read and write, and an audit trail
//! (`<archive>_audit`) of who did what.
//!
//! An operation covers the rows that exist when it starts (ids up to `max_id`): failures
//! that arrive while it runs are not swept into it, so the groups page can show them as
//! new. Cancelling sets the state; the runner stops before its next batch.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::DeadLetterError;
use super::archive::{Selector, status};
use super::browse::{self, Filter};
use super::ops::{Ops, Target};

/// Rows per batch unless asked otherwise.
pub const DEFAULT_BATCH: i64 = 100;
/// Largest batch: one batch's rows stay locked while their copies are published.
pub const MAX_BATCH: i64 = 1000;
/// Attempts at a batch that fails for a transient reason (database or broker down) before
/// the operation ends `failed`.
const BATCH_ATTEMPTS: u32 = 10;

/// What an operation does to its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Replay,
    Purge,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Replay => "replay",
            Kind::Purge => "purge",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "replay" => Some(Kind::Replay),
            "purge" => Some(Kind::Purge),
            _ => None,
        }
    }

    /// The statuses the operation takes rows from.
    pub fn statuses(self) -> &'static [&'static str] {
        match self {
            Kind::Replay => &[status::ARCHIVED, status::SCHEDULED, status::FAILED],
            Kind::Purge => status::PURGEABLE,
        }
    }
}

/// An operation to start.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: Kind,
    /// The processor whose archive (needed when processors archive into different tables).
    pub processor: Option<String>,
    pub filter: Filter,
    /// Rows per second; `None`: as fast as batches go.
    pub rate: Option<f64>,
    pub batch_size: i64,
    /// Who asked: a token's name, a proxy-named user, `cli:<user>`.
    pub requested_by: String,
}

/// A row of the operations table.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Operation {
    pub id: i64,
    pub kind: String,
    pub processor: Option<String>,
    #[sqlx(json)]
    pub filter: Filter,
    pub requested_by: String,
    pub rate_per_second: Option<f64>,
    pub batch_size: i32,
    pub max_id: i64,
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub cursor_id: i64,
    /// `running`, `done`, `failed`, `cancelled`.
    pub state: String,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancelled_by: Option<String>,
}

impl Operation {
    pub fn finished(&self) -> bool {
        self.state != "running"
    }
}

/// A line of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub filter: Option<serde_json::Value>,
    pub count: Option<i64>,
    pub detail: Option<String>,
}

/// The operations and audit tables next to archive `table`.
pub fn tables(table: &str) -> (String, String) {
    (format!("{table}_operations"), format!("{table}_audit"))
}

/// DDL of the operations and audit tables of archive `table` (idempotent).
pub fn schema(table: &str) -> String {
    let (ops, audit) = tables(table);
    let base = ops.rsplit('.').next().unwrap_or(&ops).to_owned();
    format!(
        "CREATE TABLE IF NOT EXISTS {ops} (
    id              bigserial   PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN ('replay', 'purge')),
    processor       text,
    filter          jsonb       NOT NULL,
    requested_by    text        NOT NULL,
    rate_per_second double precision,
    batch_size      integer     NOT NULL,
    max_id          bigint      NOT NULL,
    total           bigint      NOT NULL,
    done            bigint      NOT NULL DEFAULT 0,
    failed          bigint      NOT NULL DEFAULT 0,
    cursor_id       bigint      NOT NULL DEFAULT 0,
    state           text        NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    cancelled_by    text
);
CREATE INDEX IF NOT EXISTS {base}_group_idx ON {ops} ((filter ->> 'group'), id);
CREATE TABLE IF NOT EXISTS {audit} (
    id      bigserial   PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL,
    action  text        NOT NULL,
    filter  jsonb,
    count   bigint,
    detail  text
);
"
    )
}

/// Tables known to have their operations and audit tables in this process.
static ENSURED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// Creates the operations and audit tables of `t` once per process (an archive created by
/// an earlier version has none until its first operation).
async fn ensure(t: &Target) -> Result<(), DeadLetterError> {
    let known = match ENSURED.lock() {
        Ok(set) => set.contains(&t.table),
        Err(poisoned) => poisoned.into_inner().contains(&t.table),
    };
    if known {
        return Ok(());
    }
    let mut tx = t.pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("bosun-dead-letters:{}", t.table))
        .execute(&mut *tx)
        .await?;
    let ddl = schema(&t.table);
    sqlx::Executor::execute(&mut *tx, ddl.as_str()).await?;
    tx.commit().await?;
    match ENSURED.lock() {
        Ok(mut set) => set.insert(t.table.clone()),
        Err(poisoned) => poisoned.into_inner().insert(t.table.clone()),
    };
    Ok(())
}

/// A rate as `50/s`, `300/m`, `2000/h` or a plain number (per second).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (number, per) = match text.split_once('/') {
        Some((n, unit)) => (n.trim(), unit.trim()),
        None => (text, "s"),
    };
    let seconds = match per {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(format!("`{text}`: the rate's unit is /s, /m or /h")),
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(n / seconds),
        _ => Err(format!(
            "`{text}` is not a rate (expected e.g. \"50/s\" or \"300/m\")"
        )),
    }
}

const OPERATION_COLUMNS: &str = "id, kind, processor, filter, requested_by, rate_per_second,
    batch_size, max_id, total, done, failed, cursor_id, state, last_error, created_at,
    updated_at, finished_at, cancelled_by";

/// How many rows an operation of `kind` over `filter` would touch now (its dry run).
pub async fn dry_run(
    ops: &Ops,
    kind: Kind,
    processor: Option<&str>,
    filter: &Filter,
) -> Result<i64, DeadLetterError> {
    let t = ops.target(processor)?;
    let max = browse::max_id(&t.pool, &t.table).await?;
    browse::count(
        &t.pool,
        &t.table,
        &t.processors,
        filter,
        kind.statuses(),
        max,
    )
    .await
}

/// Records a new operation (state `running`, its total counted) and audits the request.
/// The caller runs it with [`run`].
pub async fn start(ops: &Ops, request: &Request) -> Result<Operation, DeadLetterError> {
    if !(1..=MAX_BATCH).contains(&request.batch_size) {
        return Err(DeadLetterError::Invalid(format!(
            "batch size {} is outside 1..={MAX_BATCH}",
            request.batch_size
        )));
    }
    if request.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(DeadLetterError::Invalid("the rate must be above 0".into()));
    }
    let t = ops.target(request.processor.as_deref())?;
    ensure(&t).await?;
    let max = browse::max_id(&t.pool, &t.table).await?;
    let total = browse::count(
        &t.pool,
        &t.table,
        &t.processors,
        &request.filter,
        request.kind.statuses(),
        max,
    )
    .await?;
    let (table, _) = tables(&t.table);
    let filter = serde_json::to_value(&request.filter)
        .map_err(|e| DeadLetterError::Invalid(format!("filter: {e}")))?;
    let sql = format!(
        "INSERT INTO {table} (kind, processor, filter, requested_by, rate_per_second,
            batch_size, max_id, total)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING {OPERATION_COLUMNS}"
    );
    let op: Operation = sqlx::query_as(&sql)
        .bind(request.kind.name())
        .bind(&request.processor)
        .bind(&filter)
        .bind(&request.requested_by)
        .bind(request.rate)
        .bind(request.batch_size as i32)
        .bind(max)
        .bind(total)
        .fetch_one(&t.pool)
        .await?;
    audit(
        ops,
        request.processor.as_deref(),
        &request.requested_by,
        &format!("{} started (operation {})", request.kind.name(), op.id),
        Some(&request.filter),
        Some(total),
        request.rate.map(|r| format!("rate {r}/s")),
    )
    .await?;
    Ok(op)
}

/// Runs operation `id` to its end (done, failed or cancelled); returns its final row.
/// `progress` is called after every batch.
pub async fn run(
    ops: &Ops,
    processor: Option<&str>,
    id: i64,
    mut progress: impl FnMut(&Operation),
) -> Result<Operation, DeadLetterError> {
    let t = ops.target(processor)?;
    let mut op = get_in(&t, id).await?;
    let kind = Kind::parse(&op.kind)
        .ok_or_else(|| DeadLetterError::Invalid(format!("unknown kind `{}`", op.kind)))?;
    let started = Instant::now();
    let mut processed: f64 = 0.0;
    let mut attempts = 0;
    let (table, _) = tables(&t.table);
    while op.state == "running" {
        let mut limit = i64::from(op.batch_size).max(1);
        if let Some(rate) = op.rate_per_second {
            // A batch never holds more than a second's worth, so the pace stays even.
            limit = limit.min((rate.ceil() as i64).max(1));
        }
        let batch = async {
            let ids = browse::next_ids(
                &t.pool,
                &t.table,
                &t.processors,
                &op.filter,
                kind.statuses(),
                op.cursor_id,
                op.max_id,
                limit,
            )
            .await?;
            let Some(&last) = ids.last() else {
                return Ok(None);
            };
            let n = ids.len() as i64;
            let selector = Selector::Ids(ids);
            let (done, failed, error) = match kind {
                Kind::Replay => {
                    let report = ops.replay(processor, &selector, false).await?;
                    let error = report.failed.first().map(|f| f.error.clone());
                    (
                        report.replayed.len() as i64,
                        report.failed.len() as i64,
                        error,
                    )
                }
                Kind::Purge => {
                    let report = ops.purge(processor, &selector, false).await?;
                    let done = report.purged.len() as i64;
                    (done, n - done, None)
                }
            };
            Ok::<_, DeadLetterError>(Some((last, n, done, failed, error)))
        }
        .await;
        let sql = match batch {
            Ok(Some((last, n, done, failed, error))) => {
                attempts = 0;
                processed += n as f64;
                let sql = format!(
                    "UPDATE {table} SET done = done + $2, failed = failed + $3, cursor_id = $4,
                        last_error = COALESCE($5, last_error), updated_at = now()
                     WHERE id = $1 RETURNING {OPERATION_COLUMNS}"
                );
                sqlx::query_as::<_, Operation>(&sql)
                    .bind(id)
                    .bind(done)
                    .bind(failed)
                    .bind(last)
                    .bind(error)
                    .fetch_one(&t.pool)
                    .await
            }
            Ok(None) => finish(&t, id, "done", None).await,
            Err(e) if e.is_transient() && attempts + 1 < BATCH_ATTEMPTS => {
                attempts += 1;
                tracing::warn!(operation = id, error = %e, attempt = attempts, "operation batch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                match get_in(&t, id).await {
                    Ok(latest) => {
                        op = latest;
                        continue;
                    }
                    Err(_) => continue,
                }
            }
            Err(e) => finish(&t, id, "failed", Some(&e.to_string())).await,
        };
        op = sql?;
        progress(&op);
        if op.state == "running"
            && let Some(rate) = op.rate_per_second
        {
            let due = Duration::from_secs_f64(processed / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            // A cancel during the wait is seen before the next batch.
            op = get_in(&t, id).await?;
        }
    }
    if op.state != "cancelled" {
        tracing::info!(operation = id, kind = %op.kind, state = %op.state, done = op.done, failed = op.failed, total = op.total, "dead-letter operation finished");
        audit(
            ops,
            processor,
            &op.requested_by,
            &format!("{} {} (operation {id})", op.kind, op.state),
            Some(&op.filter),
            Some(op.done),
            (op.failed > 0).then(|| format!("{} failed", op.failed)),
        )
        .await?;
    }
    Ok(op)
}

/// Ends operation `id` with `state`, unless it ended already (a cancel wins).
async fn finish(
    t: &Target,
    id: i64,
    state: &str,
    error: Option<&str>,
) -> Result<Operation, sqlx::Error> {
    let (table, _) = tables(&t.table);
    let sql = format!(
        "UPDATE {table} SET state = CASE WHEN state = 'running' THEN $2 ELSE state END,
            last_error = COALESCE($3, last_error), updated_at = now(),
            finished_at = COALESCE(finished_at, now())
         WHERE id = $1 RETURNING {OPERATION_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(id)
        .bind(state)
        .bind(error)
        .fetch_one(&t.pool)
        .await
}

/// Cancels running operation `id`; the runner stops before its next batch. Returns the row
/// (unchanged when it had ended already).
pub async fn cancel(
    ops: &Ops,
    processor: Option<&str>,
    id: i64,
    by: &str,
) -> Result<Operation, DeadLetterError> {
    let t = ops.target(processor)?;
    ensure(&t).await?;
    let (table, _) = tables(&t.table);
    let sql = format!(
        "UPDATE {table} SET state = 'cancelled', cancelled_by = $2, updated_at = now(),
            finished_at = now()
         WHERE id = $1 AND state = 'running' RETURNING {OPERATION_COLUMNS}"
    );
    let cancelled: Option<Operation> = sqlx::query_as(&sql)
        .bind(id)
        .bind(by)
        .fetch_optional(&t.pool)
        .await?;
    match cancelled {
        Some(op) => {
            audit(
                ops,
                processor,
                by,
                &format!("{} cancelled (operation {id})", op.kind),
                Some(&op.filter),
                Some(op.done),
                None,
            )
            .await?;
            Ok(op)
        }
        None => get_in(&t, id).await,
    }
}

async fn get_in(t: &Target, id: i64) -> Result<Operation, DeadLetterError> {
    let (table, _) = tables(&t.table);
    let sql = format!("SELECT {OPERATION_COLUMNS} FROM {table} WHERE id = $1");
    sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(&t.pool)
        .await?
        .ok_or_else(|| DeadLetterError::Invalid(format!("no operation {id}")))
}

/// Operation `id`.
pub async fn get(
    ops: &Ops,
    processor: Option<&str>,
    id: i64,
) -> Result<Operation, DeadLetterError> {
    let t = ops.target(processor)?;
    ensure(&t).await?;
    get_in(&t, id).await
}

/// The latest operations, newest first.
pub async fn list(
    ops: &Ops,
    processor: Option<&str>,
    limit: i64,
) -> Result<Vec<Operation>, DeadLetterError> {
    let t = ops.target(processor)?;
    ensure(&t).await?;
    let (table, _) = tables(&t.table);
    let sql = format!("SELECT {OPERATION_COLUMNS} FROM {table} ORDER BY id DESC LIMIT $1");
    Ok(sqlx::query_as(&sql).bind(limit).fetch_all(&t.pool).await?)
}

/// The latest replay of each failure group among `keys`: (group key, operation).
pub async fn latest_group_replays(
    ops: &Ops,
    processor: Option<&str>,
    keys: &[String],
) -> Result<Vec<Operation>, DeadLetterError> {
    let t = ops.target(processor)?;
    ensure(&t).await?;
    let (table, _) = tables(&t.table);
    let sql = format!(
        "SELECT DISTINCT ON (filter ->> 'group') {OPERATION_COLUMNS} FROM {table}
         WHERE kind = 'replay' AND filter ->> 'group' = ANY($1)
         ORDER BY filter ->> 'group', id DESC"
    );
    Ok(sqlx::query_as(&sql).bind(keys).fetch_all(&t.pool).await?)
}

/// Writes an audit line (and a log line).
pub async fn audit(
    ops: &Ops,
    processor: Option<&str>,
    actor: &str,
    action: &str,
    filter: Option<&Filter>,
    count: Option<i64>,
    detail: Option<String>,
) -> Result<(), DeadLetterError> {
    let t = ops.target(processor)?;
    ensure(&t).await?;
    tracing::info!(actor, action, filter = %filter.map(Filter::describe).unwrap_or_default(), count, detail = detail.as_deref().unwrap_or(""), "dead-letter audit");
    let (_, table) = tables(&t.table);
    let filter = filter.and_then(|f| serde_json::to_value(f).ok());
    let sql = format!(
        "INSERT INTO {table} (actor, action, filter, count, detail) VALUES ($1, $2, $3, $4, $5)"
    );
    sqlx::query(&sql)
        .bind(actor)
        .bind(action)
        .bind(filter)
        .bind(count)
        .bind(detail)
        .execute(&t.pool)
        .await?;
    Ok(())
}

/// The latest audit lines, newest first.
pub async fn audit_log(
    ops: &Ops,
    processor: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditEntry>, DeadLetterError> {
    let t = ops.target(processor)?;
    ensure(&t).await?;
    let (_, table) = tables(&t.table);
    let sql = format!(
        "SELECT id, at, actor, action, filter, count, detail FROM {table} ORDER BY id DESC LIMIT $1"
    );
    Ok(sqlx::query_as(&sql).bind(limit).fetch_all(&t.pool).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_per_second() {
        assert_eq!(parse_rate("50/s"), Ok(50.0));
        assert_eq!(parse_rate("120/m"), Ok(2.0));
        assert_eq!(parse_rate("7"), Ok(7.0));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("5/d").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn operation_tables_sit_next_to_the_archive() {
        let ddl = schema("ops.dead_letters");
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS ops.dead_letters_operations"));
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS ops.dead_letters_audit"));
        assert!(ddl.contains("dead_letters_operations_group_idx ON ops.dead_letters_operations"));
    }
}
