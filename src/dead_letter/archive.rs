//! The archive table in PostgreSQL: its schema, the insert a processor commits before it
//! acks a dead letter, and the queries behind `bosun dlq` and `/admin/dead-letters`.
//!
//! Table names come only from validated configuration (`valid_sql_identifier`), so they can
//! be spliced into SQL; every value goes in as a bind parameter.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use super::DeadLetterError;

/// Row statuses. `scheduled` rows wait for a delayed replay; `purged` rows keep their
/// bookkeeping but not their body or headers.
pub mod status {
    pub const ARCHIVED: &str = "archived";
    pub const SCHEDULED: &str = "scheduled";
    pub const REPLAYED: &str = "replayed";
    pub const PURGED: &str = "purged";
}

/// The DDL for `table`: idempotent, so `bosun dlq migrate` can run on every deploy.
pub fn schema(table: &str) -> String {
    // Index names live in the table's schema and must not carry its qualifier.
    let base = table.rsplit('.').next().unwrap_or(table);
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    id                bigserial   PRIMARY KEY,
    processor         text        NOT NULL,
    broker            text        NOT NULL,
    source            text        NOT NULL,
    source_entry_id   text,
    message_id        text,
    correlation_id    text,
    original          text,
    original_exchange text,
    routing_key       text,
    headers           jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    body              bytea,
    content_type      text,
    timestamp_ms      bigint,
    error_kind        text        NOT NULL,
    error             text,
    reason            text,
    attempts          integer     NOT NULL DEFAULT 1,
    replay_count      integer     NOT NULL DEFAULT 0,
    group_key         text        NOT NULL,
    first_failed_at   timestamptz,
    archived_at       timestamptz NOT NULL DEFAULT now(),
    status            text        NOT NULL DEFAULT 'archived'
                      CHECK (status IN ('archived', 'scheduled', 'replayed', 'purged')),
    note              text,
    replay_due_at     timestamptz,
    replayed_at       timestamptz,
    purged_at         timestamptz
);
CREATE INDEX IF NOT EXISTS {base}_processor_status_idx ON {table} (processor, status, archived_at);
CREATE INDEX IF NOT EXISTS {base}_group_idx ON {table} (processor, group_key) WHERE status = 'archived';
CREATE INDEX IF NOT EXISTS {base}_due_idx ON {table} (replay_due_at) WHERE status = 'scheduled';
"
    )
}

/// Applies [`schema`] under an advisory lock, so two deploys migrating at once do not race
/// on `CREATE ... IF NOT EXISTS`.
pub async fn migrate(pool: &PgPool, table: &str) -> Result<(), DeadLetterError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("bosun-dead-letters:{table}"))
        .execute(&mut *tx)
        .await?;
    let ddl = schema(table);
    // A plain string runs as a simple query, which may hold several statements; unlike
    // `raw_sql`, its future is `Send` inside a component's task.
    sqlx::Executor::execute(&mut *tx, ddl.as_str()).await?;
    tx.commit().await?;
    Ok(())
}

/// Whether `table` exists: a processor refuses to start without it, naming the fix.
pub async fn exists(pool: &PgPool, table: &str) -> Result<bool, DeadLetterError> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(pool)
        .await?;
    Ok(found.is_some())
}

/// A row to insert.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub processor: String,
    pub broker: String,
    pub source: String,
    pub source_entry_id: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub original: Option<String>,
    pub original_exchange: Option<String>,
    pub routing_key: Option<String>,
    pub headers: serde_json::Value,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub timestamp_ms: Option<i64>,
    pub error_kind: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub attempts: i32,
    pub replay_count: i32,
    pub group_key: String,
    pub first_failed_at: Option<DateTime<Utc>>,
    /// `archived`, or `scheduled` with `replay_due_at`.
    pub status: &'static str,
    pub note: Option<String>,
    pub replay_due_at: Option<DateTime<Utc>>,
}

/// Inserts `row` and commits; returns its id. Only after this returns may the dead letter
/// be settled at its source.
pub async fn insert(pool: &PgPool, table: &str, row: &NewRow) -> Result<i64, DeadLetterError> {
    let sql = format!(
        "INSERT INTO {table} (processor, broker, source, source_entry_id, message_id,
            correlation_id, original, original_exchange, routing_key, headers, body,
            content_type, timestamp_ms, error_kind, error, reason, attempts, replay_count,
            group_key, first_failed_at, status, note, replay_due_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
            $18, $19, $20, $21, $22, $23)
         RETURNING id"
    );
    let id: i64 = sqlx::query_scalar(&sql)
        .bind(&row.processor)
        .bind(&row.broker)
        .bind(&row.source)
        .bind(&row.source_entry_id)
        .bind(&row.message_id)
        .bind(&row.correlation_id)
        .bind(&row.original)
        .bind(&row.original_exchange)
        .bind(&row.routing_key)
        .bind(&row.headers)
        .bind(&row.body)
        .bind(&row.content_type)
        .bind(row.timestamp_ms)
        .bind(&row.error_kind)
        .bind(&row.error)
        .bind(&row.reason)
        .bind(row.attempts)
        .bind(row.replay_count)
        .bind(&row.group_key)
        .bind(row.first_failed_at)
        .bind(row.status)
        .bind(&row.note)
        .bind(row.replay_due_at)
        .fetch_one(pool)
        .await?;
    Ok(id)
}

/// One archived dead letter, everything included.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    pub processor: String,
    pub broker: String,
    pub source: String,
    pub source_entry_id: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub original: Option<String>,
    pub original_exchange: Option<String>,
    pub routing_key: Option<String>,
    pub headers: serde_json::Value,
    #[serde(skip)]
    pub body: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub timestamp_ms: Option<i64>,
    pub error_kind: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub attempts: i32,
    pub replay_count: i32,
    pub group_key: String,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub archived_at: DateTime<Utc>,
    pub status: String,
    pub note: Option<String>,
    pub replay_due_at: Option<DateTime<Utc>>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub purged_at: Option<DateTime<Utc>>,
}

/// A list line: no headers, no body.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Summary {
    pub id: i64,
    pub processor: String,
    pub message_id: Option<String>,
    pub original: Option<String>,
    pub error_kind: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub attempts: i32,
    pub replay_count: i32,
    pub group_key: String,
    pub archived_at: DateTime<Utc>,
    pub status: String,
}

/// One failure group.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Group {
    pub group_key: String,
    pub error_kind: String,
    pub count: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The error text of the group's latest dead letter.
    pub sample_error: Option<String>,
    pub processors: Vec<String>,
}

/// Filters of `list`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    pub group: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// `None`: every status but `purged`.
    pub status: Option<String>,
    pub limit: i64,
}

pub async fn list(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    filter: &ListFilter,
) -> Result<Vec<Summary>, DeadLetterError> {
    let sql = format!(
        "SELECT id, processor, message_id, original, error_kind, error, reason, attempts,
                replay_count, group_key, archived_at, status
         FROM {table}
         WHERE processor = ANY($1)
           AND ($2::text IS NULL OR group_key = $2)
           AND ($3::timestamptz IS NULL OR archived_at >= $3)
           AND (CASE WHEN $4::text IS NULL THEN status <> 'purged' ELSE status = $4 END)
         ORDER BY id DESC
         LIMIT $5"
    );
    Ok(sqlx::query_as::<_, Summary>(&sql)
        .bind(processors)
        .bind(&filter.group)
        .bind(filter.since)
        .bind(&filter.status)
        .bind(filter.limit)
        .fetch_all(pool)
        .await?)
}

/// Groups of archived (not yet replayed or purged) dead letters, largest first.
pub async fn groups(
    pool: &PgPool,
    table: &str,
    processors: &[String],
) -> Result<Vec<Group>, DeadLetterError> {
    let sql = format!(
        "SELECT group_key, error_kind, count(*) AS count, min(archived_at) AS first_seen,
                max(archived_at) AS last_seen,
                (array_agg(error ORDER BY id DESC))[1] AS sample_error,
                array_agg(DISTINCT processor) AS processors
         FROM {table}
         WHERE processor = ANY($1) AND status = 'archived'
         GROUP BY group_key, error_kind
         ORDER BY count(*) DESC, max(archived_at) DESC"
    );
    Ok(sqlx::query_as::<_, Group>(&sql)
        .bind(processors)
        .fetch_all(pool)
        .await?)
}

pub async fn show(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    id: i64,
) -> Result<Option<Row>, DeadLetterError> {
    let sql = format!("SELECT * FROM {table} WHERE id = $1 AND processor = ANY($2)");
    Ok(sqlx::query_as::<_, Row>(&sql)
        .bind(id)
        .bind(processors)
        .fetch_optional(pool)
        .await?)
}

/// Which rows a replay or purge applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    Ids(Vec<i64>),
    Group(String),
    All,
    /// Purge only: rows archived before this time.
    Before(DateTime<Utc>),
}

/// `WHERE` conditions for `selector`, with binds at `$2` and on (`$1` is the processors).
fn selector_sql(selector: &Selector) -> &'static str {
    match selector {
        Selector::Ids(_) => "id = ANY($2)",
        Selector::Group(_) => "group_key = $2",
        Selector::All => "$2::int IS NULL",
        Selector::Before(_) => "archived_at < $2",
    }
}

fn bind_selector<'q, O>(
    query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
    selector: &'q Selector,
) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
    match selector {
        Selector::Ids(ids) => query.bind(ids),
        Selector::Group(g) => query.bind(g),
        Selector::All => query.bind(None::<i32>),
        Selector::Before(t) => query.bind(t),
    }
}

/// Locks up to `limit` replayable rows (archived or scheduled) matching `selector`, skipping
/// those in `exclude` (rows that failed to publish in this run) and rows another replay holds.
pub async fn claim_for_replay(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    processors: &[String],
    selector: &Selector,
    exclude: &[i64],
    limit: i64,
) -> Result<Vec<Row>, DeadLetterError> {
    let sql = format!(
        "SELECT * FROM {table}
         WHERE processor = ANY($1) AND status IN ('archived', 'scheduled') AND {}
           AND NOT (id = ANY($3))
         ORDER BY id LIMIT $4
         FOR UPDATE SKIP LOCKED",
        selector_sql(selector)
    );
    let query = sqlx::query_as::<_, Row>(&sql).bind(processors);
    Ok(bind_selector(query, selector)
        .bind(exclude)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?)
}

/// Rows a replay would touch, without locking (for `--dry-run`).
pub async fn preview(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    selector: &Selector,
    statuses: &[&str],
) -> Result<Vec<Summary>, DeadLetterError> {
    let sql = format!(
        "SELECT id, processor, message_id, original, error_kind, error, reason, attempts,
                replay_count, group_key, archived_at, status
         FROM {table}
         WHERE processor = ANY($1) AND {} AND status = ANY($3)
         ORDER BY id",
        selector_sql(selector)
    );
    let statuses: Vec<String> = statuses.iter().map(|s| (*s).to_owned()).collect();
    let query = sqlx::query_as::<_, Summary>(&sql).bind(processors);
    Ok(bind_selector(query, selector)
        .bind(statuses)
        .fetch_all(pool)
        .await?)
}

/// Locks scheduled rows of `processor` whose replay is due.
pub async fn claim_due(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    processor: &str,
    limit: i64,
) -> Result<Vec<Row>, DeadLetterError> {
    let sql = format!(
        "SELECT * FROM {table}
         WHERE processor = $1 AND status = 'scheduled' AND replay_due_at <= now()
         ORDER BY replay_due_at LIMIT $2
         FOR UPDATE SKIP LOCKED"
    );
    Ok(sqlx::query_as::<_, Row>(&sql)
        .bind(processor)
        .bind(limit)
        .fetch_all(&mut **tx)
        .await?)
}

/// Marks rows replayed (their copies are confirmed by the broker).
pub async fn mark_replayed(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    ids: &[i64],
) -> Result<(), DeadLetterError> {
    let sql = format!(
        "UPDATE {table} SET status = 'replayed', replayed_at = now(), replay_count = replay_count + 1
         WHERE id = ANY($1)"
    );
    sqlx::query(&sql).bind(ids).execute(&mut **tx).await?;
    Ok(())
}

/// Purges matching rows that are not purged yet: status `purged`, body and headers cleared.
/// Returns the ids purged.
pub async fn purge(
    pool: &PgPool,
    table: &str,
    processors: &[String],
    selector: &Selector,
) -> Result<Vec<i64>, DeadLetterError> {
    let sql = format!(
        "UPDATE {table} SET status = 'purged', purged_at = now(), body = NULL, headers = '{{}}'::jsonb
         WHERE processor = ANY($1) AND {} AND status <> 'purged'
         RETURNING id",
        selector_sql(selector)
    );
    let query = sqlx::query_scalar::<_, i64>(&sql).bind(processors);
    let query = match selector {
        Selector::Ids(ids) => query.bind(ids),
        Selector::Group(g) => query.bind(g),
        Selector::All => query.bind(None::<i32>),
        Selector::Before(t) => query.bind(t),
    };
    let mut ids = query.fetch_all(pool).await?;
    ids.sort_unstable();
    Ok(ids)
}

/// Archived rows of `processor`, for the `bosun_dead_letters_archived` gauge.
pub async fn count_archived(
    pool: &PgPool,
    table: &str,
    processor: &str,
) -> Result<i64, DeadLetterError> {
    let sql = format!("SELECT count(*) FROM {table} WHERE processor = $1 AND status = 'archived'");
    Ok(sqlx::query_scalar(&sql)
        .bind(processor)
        .fetch_one(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_qualified_tables_get_unqualified_index_names() {
        let ddl = schema("ops.dead_letters");
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS ops.dead_letters"));
        assert!(ddl.contains("INDEX IF NOT EXISTS dead_letters_group_idx ON ops.dead_letters"));
        assert!(ddl.contains("'{}'::jsonb"));
    }
}
