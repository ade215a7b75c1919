//! The archive table in PostgreSQL: its schema, the insert a processor commits before it
//! acks a dead letter, and the queries behind `bosun dlq` and `/admin/dead-letters`.
//!
//! Table names come only from validated configuration (`valid_sql_identifier`), so they can
//! be spliced into SQL; every value goes in as a bind parameter.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use super::DeadLetterError;

/// Row statuses. `scheduled` rows wait for a delayed replay; `failed` rows are scheduled
/// replays that failed for good (`last_error` says why); `purged` rows keep their
/// bookkeeping but not their body or headers.
pub mod status {
    pub const ARCHIVED: &str = "archived";
    pub const SCHEDULED: &str = "scheduled";
    pub const REPLAYED: &str = "replayed";
    pub const FAILED: &str = "failed";
    /// Every status a purge takes a row from (all but `purged`): [`super::purge`] and a
    /// purge's dry run read this one list, so the dry run lists what the purge removes.
    pub const PURGEABLE: &[&str] = &[ARCHIVED, SCHEDULED, REPLAYED, FAILED];
}

/// Scheduled replay attempts before a row that keeps failing ends `failed`.
pub const MAX_SCHEDULED_ATTEMPTS: i32 = 10;

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
    status            text        NOT NULL DEFAULT 'archived',
    note              text,
    replay_due_at     timestamptz,
    replayed_at       timestamptz,
    purged_at         timestamptz
);
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS escaped text[];
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS replay_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS last_error text;
DO $$
DECLARE
    old text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = '{table}'::regclass AND contype = 'c'
                     AND pg_get_constraintdef(oid) LIKE '%''failed''%') THEN
        FOR old IN SELECT conname FROM pg_constraint
                   WHERE conrelid = '{table}'::regclass AND contype = 'c'
                     AND pg_get_constraintdef(oid) LIKE '%status%' LOOP
            EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I', old);
        END LOOP;
        ALTER TABLE {table} ADD CONSTRAINT {base}_status_check
            CHECK (status IN ('archived', 'scheduled', 'replayed', 'failed', 'purged'));
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS {base}_processor_status_idx ON {table} (processor, status, archived_at);
CREATE INDEX IF NOT EXISTS {base}_group_idx ON {table} (processor, group_key) WHERE status = 'archived';
CREATE INDEX IF NOT EXISTS {base}_due_idx ON {table} (replay_due_at) WHERE status = 'scheduled';
CREATE INDEX IF NOT EXISTS {base}_message_id_idx ON {table} (message_id);
CREATE INDEX IF NOT EXISTS {base}_archived_at_idx ON {table} (archived_at);
{operations}",
        operations = super::operations::schema(table)
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

/// Whether `table` (which exists) has every column this version writes; one created by an
/// earlier version needs `bosun dlq migrate` first.
pub async fn up_to_date(pool: &PgPool, table: &str) -> Result<bool, DeadLetterError> {
    let columns: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_attribute
         WHERE attrelid = to_regclass($1) AND NOT attisdropped
           AND attname IN ('escaped', 'replay_attempts', 'last_error')",
    )
    .bind(table)
    .fetch_one(pool)
    .await?;
    Ok(columns == 3)
}

/// Text columns that may hold a NUL character, which PostgreSQL's `text` cannot store: such
/// a value is stored escaped (`\\` for a backslash, `\0` for NUL) and the column named in the
/// row's `escaped` list, so [`unescape`] gives it back exactly.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\0', "\\0")
}

/// The inverse of [`escape`].
pub fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// What a row records of its dead letter, column for column: where it came from and how it
/// failed. Written by [`insert`] in a [`NewRow`] and read back in a [`Row`].
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Details {
    pub processor: String,
    pub broker: String,
    pub source: String,
    pub source_entry_id: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub original: Option<String>,
    pub original_exchange: Option<String>,
    pub routing_key: Option<String>,
    pub content_type: Option<String>,
    pub timestamp_ms: Option<i64>,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub failure: Failure,
    pub first_failed_at: Option<DateTime<Utc>>,
}

/// How a dead letter failed, as a list shows it too: the kind, error text and reason, the
/// attempts and replays so far, and the failure group they make.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Failure {
    pub error_kind: String,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub attempts: i32,
    pub replay_count: i32,
    pub group_key: String,
}

/// A row to insert.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub details: Details,
    pub headers: serde_json::Value,
    pub body: Vec<u8>,
    /// `archived`, or `scheduled` with `replay_due_at`.
    pub status: &'static str,
    pub note: Option<String>,
    pub replay_due_at: Option<DateTime<Utc>>,
}

impl NewRow {
    /// The row with every text value PostgreSQL cannot store escaped, and the escaped
    /// columns listed.
    fn storable(&self) -> (NewRow, Vec<String>) {
        let mut row = self.clone();
        let mut escaped = Vec::new();
        let details = &mut row.details;
        let mut fix = |name: &str, value: &mut String| {
            if value.contains('\0') {
                *value = escape(value);
                escaped.push(name.to_owned());
            }
        };
        for (name, value) in [
            ("processor", &mut details.processor),
            ("broker", &mut details.broker),
            ("source", &mut details.source),
            ("error_kind", &mut details.failure.error_kind),
            ("group_key", &mut details.failure.group_key),
        ] {
            fix(name, value);
        }
        for (name, value) in [
            ("source_entry_id", &mut details.source_entry_id),
            ("message_id", &mut details.message_id),
            ("correlation_id", &mut details.correlation_id),
            ("original", &mut details.original),
            ("original_exchange", &mut details.original_exchange),
            ("routing_key", &mut details.routing_key),
            ("content_type", &mut details.content_type),
            ("error", &mut details.failure.error),
            ("reason", &mut details.failure.reason),
            ("note", &mut row.note),
        ] {
            if let Some(value) = value {
                fix(name, value);
            }
        }
        (row, escaped)
    }
}

/// Inserts `row` and commits; returns its id. Only after this returns may the dead letter
/// be settled at its source.
pub async fn insert(pool: &PgPool, table: &str, row: &NewRow) -> Result<i64, DeadLetterError> {
    let (row, escaped) = row.storable();
    let row = &row;
    let sql = format!(
        "INSERT INTO {table} (processor, broker, source, source_entry_id, message_id,
            correlation_id, original, original_exchange, routing_key, headers, body,
            content_type, timestamp_ms, error_kind, error, reason, attempts, replay_count,
            group_key, first_failed_at, status, note, replay_due_at, escaped)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
            $18, $19, $20, $21, $22, $23, $24)
         RETURNING id"
    );
    let d = &row.details;
    let id: i64 = sqlx::query_scalar(&sql)
        .bind(&d.processor)
        .bind(&d.broker)
        .bind(&d.source)
        .bind(&d.source_entry_id)
        .bind(&d.message_id)
        .bind(&d.correlation_id)
        .bind(&d.original)
        .bind(&d.original_exchange)
        .bind(&d.routing_key)
        .bind(&row.headers)
        .bind(&row.body)
        .bind(&d.content_type)
        .bind(d.timestamp_ms)
        .bind(&d.failure.error_kind)
        .bind(&d.failure.error)
        .bind(&d.failure.reason)
        .bind(d.failure.attempts)
        .bind(d.failure.replay_count)
        .bind(&d.failure.group_key)
        .bind(d.first_failed_at)
        .bind(row.status)
        .bind(&row.note)
        .bind(row.replay_due_at)
        .bind((!escaped.is_empty()).then_some(escaped))
        .fetch_one(pool)
        .await?;
    Ok(id)
}

/// The archived headers as read back. They are read as text and parsed per row, so a row
/// whose JSON the reader refuses (nested too deep) fails alone instead of failing the query
/// that lists, shows or replays every other row.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredJson {
    Value(serde_json::Value),
    /// Why the stored JSON cannot be read.
    Undecodable(String),
}

impl From<String> for StoredJson {
    fn from(text: String) -> Self {
        match serde_json::from_str(&text) {
            Ok(value) => StoredJson::Value(value),
            Err(e) => StoredJson::Undecodable(format!("the archived headers cannot be read: {e}")),
        }
    }
}

impl Serialize for StoredJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            StoredJson::Value(value) => value.serialize(serializer),
            StoredJson::Undecodable(error) => {
                serde_json::json!({ "$undecodable": error }).serialize(serializer)
            }
        }
    }
}

/// The columns of [`Row`], headers as text (see [`StoredJson`]).
const ROW_COLUMNS: &str = "id, processor, broker, source, source_entry_id, message_id,
    correlation_id, original, original_exchange, routing_key, headers::text AS headers, body,
    content_type, timestamp_ms, error_kind, error, reason, attempts, replay_count, group_key,
    first_failed_at, archived_at, status, note, replay_due_at, replayed_at, purged_at, escaped,
    replay_attempts, last_error";

/// One archived dead letter, everything included.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Row {
    pub id: i64,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub details: Details,
    #[sqlx(try_from = "String")]
    pub headers: StoredJson,
    #[serde(skip)]
    pub body: Option<Vec<u8>>,
    pub archived_at: DateTime<Utc>,
    pub status: String,
    pub note: Option<String>,
    pub replay_due_at: Option<DateTime<Utc>>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub purged_at: Option<DateTime<Utc>>,
    /// Text columns stored escaped because they held a NUL character (see [`escape`]).
    pub escaped: Option<Vec<String>>,
    /// Scheduled replays tried and failed so far.
    pub replay_attempts: i32,
    /// Why the latest scheduled replay failed.
    pub last_error: Option<String>,
}

impl Row {
    /// The text of column `name` as it was before it was stored (see [`escape`]).
    pub fn text(&self, name: &str, value: &Option<String>) -> Option<String> {
        let escaped = self
            .escaped
            .as_ref()
            .is_some_and(|columns| columns.iter().any(|c| c == name));
        value
            .as_deref()
            .map(|v| if escaped { unescape(v) } else { v.to_owned() })
    }
}

/// The columns of [`Summary`]: what a list and a dry run both show.
const SUMMARY_COLUMNS: &str = "id, processor, message_id, original, error_kind, error, reason,
    attempts, replay_count, group_key, archived_at, status";

/// A list line: no headers, no body.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct Summary {
    pub id: i64,
    pub processor: String,
    pub message_id: Option<String>,
    pub original: Option<String>,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub failure: Failure,
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
        "SELECT {SUMMARY_COLUMNS} FROM {table}
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
    let sql = format!("SELECT {ROW_COLUMNS} FROM {table} WHERE id = $1 AND processor = ANY($2)");
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
        "SELECT {ROW_COLUMNS} FROM {table}
         WHERE processor = ANY($1) AND status IN ('archived', 'scheduled', 'failed') AND {}
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
        "SELECT {SUMMARY_COLUMNS} FROM {table}
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
        "SELECT {ROW_COLUMNS} FROM {table}
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

/// Marks rows replayed (their copies are confirmed by the broker). Runs after the publish,
/// so nothing in it may fail on the rows' data: the count saturates.
pub async fn mark_replayed(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    ids: &[i64],
) -> Result<(), DeadLetterError> {
    let sql = format!(
        "UPDATE {table} SET status = 'replayed', replayed_at = now(),
                replay_count = LEAST(replay_count, 2147483646) + 1
         WHERE id = ANY($1)"
    );
    sqlx::query(&sql).bind(ids).execute(&mut **tx).await?;
    Ok(())
}

/// Records a failed scheduled replay of row `id`: a permanent failure, or the last allowed
/// attempt, ends it `failed`; otherwise it is due again after a backoff that doubles from
/// 5 s up to an hour, so rows that keep failing never block the ones behind them.
pub async fn mark_replay_failed(
    tx: &mut Transaction<'_, Postgres>,
    table: &str,
    id: i64,
    error: &str,
    permanent: bool,
) -> Result<(), DeadLetterError> {
    let sql = format!(
        "UPDATE {table} SET
            replay_attempts = LEAST(replay_attempts, 2147483646) + 1,
            last_error = $2,
            status = CASE WHEN $3 OR replay_attempts + 1 >= $4 THEN 'failed' ELSE status END,
            replay_due_at = now() + LEAST(interval '1 hour',
                interval '5 seconds' * power(2, LEAST(replay_attempts, 10)))
         WHERE id = $1"
    );
    sqlx::query(&sql)
        .bind(id)
        .bind(error.replace('\0', "\\0"))
        .bind(permanent)
        .bind(MAX_SCHEDULED_ATTEMPTS)
        .execute(&mut **tx)
        .await?;
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
         WHERE processor = ANY($1) AND {} AND status = ANY($3)
         RETURNING id",
        selector_sql(selector)
    );
    let statuses: Vec<String> = status::PURGEABLE.iter().map(|s| (*s).to_owned()).collect();
    // Read as one-column rows so the selector binds the same way as for the other queries.
    let query = sqlx::query_as::<_, (i64,)>(&sql).bind(processors);
    let rows = bind_selector(query, selector)
        .bind(statuses)
        .fetch_all(pool)
        .await?;
    let mut ids: Vec<i64> = rows.into_iter().map(|(id,)| id).collect();
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
    fn escaped_text_comes_back_exactly() {
        for text in [
            "plain",
            "a\0b",
            "back\\slash\0",
            "\\0 literal",
            "\0",
            "tail\\",
        ] {
            let stored = escape(text);
            assert!(!stored.contains('\0'), "{stored:?}");
            assert_eq!(unescape(&stored), text, "{stored:?}");
        }
    }

    #[test]
    fn schema_qualified_tables_get_unqualified_index_names() {
        let ddl = schema("ops.dead_letters");
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS ops.dead_letters"));
        assert!(ddl.contains("INDEX IF NOT EXISTS dead_letters_group_idx ON ops.dead_letters"));
        assert!(ddl.contains("'{}'::jsonb"));
    }
}
