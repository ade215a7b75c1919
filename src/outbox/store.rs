//! The relay's SQL against one outbox table: claim, mark published, record failures,
//! report the backlog, and delete published rows past retention.
//!
//! The table name is formatted into the statements once, from validated configuration only;
//! everything that comes from rows is bound as a parameter.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, PgConnection, PgExecutor, Postgres, Type, TypeInfo as _, ValueRef as _};

use super::table::{quote_ident, quote_literal, quote_table};
use crate::config::{ExistingOutbox, Ordering};

/// Columns the relay reads from a claimed row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    /// Becomes the published message's id, so a re-sent row is recognisable downstream.
    pub message_id: String,
    /// NULL means the outbox's configured default destination.
    pub destination: Option<String>,
    /// NULL only in an existing table's nullable column: the row fails, invalid.
    pub routing_key: Option<String>,
    /// The `headers` column as JSON text, parsed per row with bounds by the relay, so one
    /// row's headers can never fail the claim of a whole batch. Cut to just past the
    /// relay's limit ([`super::headers::MAX_BYTES`]), so huge headers are never read whole.
    pub headers: String,
    /// Bytes of the whole `headers` text, to report an oversized one.
    pub headers_bytes: i32,
    /// NULL only in an existing table's nullable column: the row fails, invalid.
    pub payload: Option<Payload>,
    pub content_type: Option<String>,
    /// Stamped on the message as its timestamp: when the application wrote it. None for an
    /// existing table without a mapped `created_at`.
    pub created_at: Option<DateTime<Utc>>,
    /// Publish attempts before this one, to decide whether a failure is the last.
    pub attempts: i32,
    /// With per_key, the rows of one key are sent one after another.
    pub partition_key: Option<String>,
    /// With per_key, the row's place in its key's claimed run (0: the key's head); the rows
    /// of a key are sent only while these follow on without a gap. 0 otherwise.
    pub key_rank: i64,
}

/// A payload column's bytes: `bytea` as stored; `text`, `varchar`, `json` and `jsonb` as
/// their UTF-8 text, so an existing table's payload goes out unchanged whatever its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(pub Vec<u8>);

impl Type<Postgres> for Payload {
    fn type_info() -> PgTypeInfo {
        <Vec<u8> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Vec<u8> as Type<Postgres>>::compatible(ty)
            || <String as Type<Postgres>>::compatible(ty)
            || <serde_json::Value as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for Payload {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let jsonb = value.format() == PgValueFormat::Binary && value.type_info().name() == "JSONB";
        let bytes = value.as_bytes()?;
        // jsonb's binary form is a version byte (1) before the JSON text.
        let bytes = match bytes {
            [1, rest @ ..] if jsonb => rest,
            _ if jsonb => return Err("unknown jsonb version".into()),
            _ => bytes,
        };
        Ok(Payload(bytes.to_vec()))
    }
}

/// What to record for a row whose publish failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub id: i64,
    pub error: String,
    /// Wait before the row may be claimed again; ignored when `give_up` is set.
    pub retry_after: Duration,
    /// Set `failed_at`: the row is never claimed again (but kept and counted).
    pub give_up: bool,
}

/// Rows unpublished and not failed, and how long the oldest has waited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub pending: i64,
    pub oldest_age_seconds: f64,
}

/// The statements for one table, formatted once.
#[derive(Debug, Clone)]
pub struct Queries {
    claim: String,
    /// The claim takes the per_key window as its second parameter.
    per_key: bool,
    /// Whether due keyed rows in the per_key window wait for older transactions to end.
    held: String,
    mark_published: String,
    record_failures: String,
    backlog: String,
    /// None: published rows are never deleted (an existing table without `published_at`).
    delete_published: Option<String>,
    /// The table, as configured: the key of its retention lock.
    table: String,
    /// Failures count up an attempts column; without one a refused row is given up at once.
    tracks_attempts: bool,
    /// Seconds until the earliest pending row that is not due yet, by the database's clock.
    next_due: String,
    /// The record of batches being sent; `None` for an existing table, which has none.
    sending: Option<Sending>,
}

/// The statements on the table of batches being sent ([`super::schema::sending_table`]).
///
/// A batch's row ids are inserted there, on a connection of their own and committed, before
/// its first message goes out; the batch's own transaction removes the record once every
/// row's outcome is known (confirmed, refused), or keeps in it the rows whose outcome is not
/// (a lost connection; a timeout or a crash keeps the whole record). So a pending row that a
/// record names may be on the broker already: a cancel refuses it rather than answering that
/// it was never sent. Records whose rows are all settled are deleted by the housekeeping.
#[derive(Debug, Clone)]
pub struct Sending {
    /// The table's name, for `to_regclass`: a table from before the record is relayed
    /// without one until migrated.
    table: String,
    insert: String,
    delete: String,
    narrow: String,
    /// Whether a record names any of the rows `$1` (pending rows, locked by the caller).
    names_any: String,
    cleanup: String,
}

impl Sending {
    /// For bosun's own outbox `table` (a validated identifier).
    pub fn new(table: &str) -> Self {
        let sending = super::schema::sending_table(table);
        Self {
            insert: format!("INSERT INTO {sending} (ids) VALUES ($1) RETURNING batch"),
            delete: format!("DELETE FROM {sending} WHERE batch = $1"),
            narrow: format!("UPDATE {sending} SET ids = $2 WHERE batch = $1"),
            names_any: format!("SELECT EXISTS (SELECT 1 FROM {sending} WHERE ids && $1)"),
            cleanup: format!(
                "DELETE FROM {sending} s WHERE NOT EXISTS (
                     SELECT 1 FROM {table} t WHERE t.id = ANY(s.ids)
                       AND t.published_at IS NULL AND t.failed_at IS NULL)"
            ),
            table: sending,
        }
    }

    /// Whether the table exists (`bosun outbox migrate` creates it).
    pub async fn exists<'e>(&self, db: impl PgExecutor<'e>) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&self.table)
            .fetch_one(db)
            .await
    }

    /// Records `ids` as being sent; returns the record's key. Run outside the batch's
    /// transaction (autocommit), so the record is durable before anything is sent.
    pub async fn record<'e>(
        &self,
        db: impl PgExecutor<'e>,
        ids: &[i64],
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(&self.insert)
            .bind(ids)
            .fetch_one(db)
            .await
    }

    /// In the batch's transaction: removes record `batch`, or keeps in it only `doubtful`,
    /// the rows sent without a known outcome.
    pub async fn settle(
        &self,
        tx: &mut PgConnection,
        batch: i64,
        doubtful: &[i64],
    ) -> Result<(), sqlx::Error> {
        if doubtful.is_empty() {
            sqlx::query(&self.delete).bind(batch).execute(tx).await?;
        } else {
            sqlx::query(&self.narrow)
                .bind(batch)
                .bind(doubtful)
                .execute(tx)
                .await?;
        }
        Ok(())
    }

    /// Whether any of `ids` may have been sent: named by a record. The caller holds the
    /// rows' locks, taken in an earlier statement, so this statement's snapshot sees every
    /// record written before the relay that held them let go.
    /// Without the table (not migrated yet) no relay records anything: false.
    pub async fn names_any(
        &self,
        conn: &mut PgConnection,
        ids: &[i64],
    ) -> Result<bool, sqlx::Error> {
        if ids.is_empty() || !self.exists(&mut *conn).await? {
            return Ok(false);
        }
        sqlx::query_scalar(&self.names_any)
            .bind(ids)
            .fetch_one(conn)
            .await
    }

    /// Deletes the records whose rows are all settled (published, failed or gone).
    pub async fn cleanup<'e>(&self, db: impl PgExecutor<'e>) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(&self.cleanup)
            .execute(db)
            .await?
            .rows_affected())
    }
}

/// With per_key, keys are looked for among the oldest `batch ×` this many due rows.
const CLAIM_WINDOW_BATCHES: i64 = 4;

/// Characters of `headers` read at most: one past the limit, so an oversized value shows.
const HEADERS_READ: usize = super::headers::MAX_BYTES + 1;

/// The columns of a claimed row, as [`OutboxRow`] reads them.
fn row_columns() -> String {
    format!(
        "o.id, o.message_id::text AS message_id, o.destination, o.routing_key, \
         left(o.headers::text, {HEADERS_READ}) AS headers, \
         octet_length(o.headers::text) AS headers_bytes, \
         o.payload, o.content_type, o.created_at, o.attempts, o.partition_key"
    )
}

impl Queries {
    /// `table` must be a validated identifier; `delete_on_publish` is `retain_published = "0"`.
    pub fn new(table: &str, ordering: Ordering, delete_on_publish: bool) -> Self {
        let pending = "o.published_at IS NULL AND o.failed_at IS NULL";
        let columns = row_columns();
        let claim = match ordering {
            Ordering::None => format!(
                "SELECT {columns}, 0::bigint AS key_rank FROM {table} o
                 WHERE {pending} AND o.next_attempt_at <= now()
                 ORDER BY o.id LIMIT $1
                 FOR UPDATE SKIP LOCKED"
            ),
            // Per-key ordering: a key's rows go out in the order of (insert_xid, id). A keyed
            // row is claimable only when
            // - every pending row of its key that comes before it is claimed by this same
            //   statement (the first, the key's head, being claimable on its own), and
            // - its transaction began writing before every transaction still running
            //   (`insert_xid` below the snapshot's xmin).
            // The second condition is what makes the first one safe: a row of the key that
            // comes before it has a smaller or equal `insert_xid`, so its transaction has
            // ended too, and the row is either visible here (and is claimed before it) or
            // rolled back (and never appears). Without it, a row committed by a slower
            // transaction with a lower id would go out after a higher id of its key.
            //
            // Heads first: which keys come from the oldest $2 due rows (a window a few batches
            // wide, so several relays find different keys), each looked up in the key index
            // for its head, and the heads are locked with SKIP LOCKED. A head another relay
            // holds is skipped, and so is its whole key: rows behind a head are only ever
            // taken by the statement that locked the head, so one key is held by at most one
            // relay. A head waiting in backoff keeps blocking its key; a failed head releases
            // it. Walking every pending row for heads, as a plain `ORDER BY id LIMIT` would
            // when few keys hold many rows, took over a second per claim with 10,000 rows on
            // one key; this costs the window plus one index probe per key.
            //
            // Then each locked head's followers, from the same index, in key order: each key
            // gets an equal share of the room the heads left in the batch (rounded up), then
            // they are cut to that room taking every key's next row before any key's row after
            // it. `key_rank` numbers a key's rows from 0 (the head) before any is left out;
            // the relay sends a key's rows only up to the first gap (a follower not due, or
            // locked by anyone else, which the protocol never does but an operator could).
            Ordering::PerKey => format!(
                "WITH due AS MATERIALIZED (
                     SELECT id, partition_key FROM {table}
                     WHERE published_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
                     ORDER BY id LIMIT $2),
                 heads AS MATERIALIZED (
                     SELECT o.id, o.partition_key, o.insert_xid FROM {table} o
                     WHERE {pending} AND o.next_attempt_at <= now()
                       AND (o.partition_key IS NULL
                            OR o.insert_xid < pg_snapshot_xmin(pg_current_snapshot()))
                       AND o.id = ANY(ARRAY(
                            SELECT id FROM due WHERE partition_key IS NULL
                            UNION ALL
                            SELECT (SELECT h.id FROM {table} h
                                    WHERE h.partition_key = k.partition_key
                                      AND h.published_at IS NULL AND h.failed_at IS NULL
                                    ORDER BY h.insert_xid, h.id LIMIT 1)
                            FROM (SELECT DISTINCT partition_key FROM due
                                  WHERE partition_key IS NOT NULL) k))
                     ORDER BY o.id LIMIT $1
                     FOR UPDATE OF o SKIP LOCKED),
                 room AS (
                     SELECT $1 - count(*) AS rows,
                            greatest(count(partition_key), 1) AS keys
                     FROM heads),
                 followers AS (
                     SELECT f.id, f.key_rank
                     FROM heads h CROSS JOIN room r
                     CROSS JOIN LATERAL (
                         SELECT s.id, s.key_rank FROM (
                             SELECT f.id, f.next_attempt_at,
                                    row_number() OVER (ORDER BY f.insert_xid, f.id) AS key_rank
                             FROM {table} f
                             WHERE f.partition_key = h.partition_key
                               AND f.published_at IS NULL AND f.failed_at IS NULL
                               AND (f.insert_xid, f.id) > (h.insert_xid, h.id)
                               AND f.insert_xid < pg_snapshot_xmin(pg_current_snapshot())
                             ORDER BY f.insert_xid, f.id
                             LIMIT (r.rows + r.keys - 1) / r.keys) s
                         WHERE s.next_attempt_at <= now()) f
                     WHERE h.partition_key IS NOT NULL AND r.rows > 0
                     ORDER BY f.key_rank, f.id
                     LIMIT (SELECT greatest(rows, 0) FROM room)),
                 claimed AS (
                     SELECT id, 0::bigint AS key_rank FROM heads
                     UNION ALL
                     SELECT id, key_rank FROM followers)
                 SELECT {columns}, c.key_rank FROM {table} o
                 JOIN claimed c ON c.id = o.id
                 WHERE o.id = ANY(ARRAY(SELECT id FROM claimed)) AND {pending}
                 ORDER BY o.id
                 FOR UPDATE OF o SKIP LOCKED"
            ),
        };
        let mark_published = if delete_on_publish {
            format!("DELETE FROM {table} WHERE id = ANY($1)")
        } else {
            format!(
                "UPDATE {table} SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1)"
            )
        };
        let record_failures = format!(
            "UPDATE {table} AS t SET
                 attempts = t.attempts + 1,
                 last_error = f.error,
                 next_attempt_at = now() + make_interval(secs => f.retry_after),
                 failed_at = CASE WHEN f.give_up THEN now() END
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[])
                  AS f(id, error, retry_after, give_up)
             WHERE t.id = f.id"
        );
        // A row scheduled for later (never tried, due in the future) is not backlog yet, and
        // a scheduled row's age counts from its due time: otherwise a message scheduled for
        // tomorrow would look like a stuck relay.
        let backlog = format!(
            "SELECT count(*)::bigint,
                    COALESCE(EXTRACT(EPOCH FROM now() - min(
                        CASE WHEN attempts = 0 THEN greatest(created_at, next_attempt_at)
                             ELSE created_at END)), 0)::float8
             FROM {table} WHERE published_at IS NULL AND failed_at IS NULL
               AND (attempts > 0 OR next_attempt_at <= now())"
        );
        let delete_published = Some(format!(
            "DELETE FROM {table} WHERE id IN (
                 SELECT id FROM {table}
                 WHERE published_at < now() - make_interval(secs => $1)
                 ORDER BY published_at LIMIT $2
                 FOR UPDATE SKIP LOCKED)"
        ));
        let held = format!(
            "SELECT EXISTS (
                 SELECT 1 FROM (
                     SELECT partition_key, insert_xid FROM {table}
                     WHERE published_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
                     ORDER BY id LIMIT $1) w
                 WHERE w.partition_key IS NOT NULL
                   AND w.insert_xid >= pg_snapshot_xmin(pg_current_snapshot()))"
        );
        // Served by the due-time index (`<table>_due_idx`); `clock_timestamp()`, not `now()`,
        // since the wait starts after this transaction, not at its start. A row parked at
        // `'infinity'` is never due, and subtracting it from a time is an error that would
        // stop the relay: finite times only, each turned into seconds before subtracting.
        let next_due = format!(
            "SELECT (EXTRACT(EPOCH FROM min(next_attempt_at))
                     - EXTRACT(EPOCH FROM clock_timestamp()))::float8
             FROM {table}
             WHERE published_at IS NULL AND failed_at IS NULL AND next_attempt_at > now()
               AND isfinite(next_attempt_at)"
        );
        Self {
            table: table.to_owned(),
            claim,
            next_due,
            per_key: ordering == Ordering::PerKey,
            held,
            mark_published,
            record_failures,
            backlog,
            delete_published,
            tracks_attempts: true,
            sending: Some(Sending::new(table)),
        }
    }

    /// The statements for an application's existing table: pending, published and failed
    /// are values of its status column, and every column is read through its mapping, cast
    /// to what [`OutboxRow`] reads. `table` must be a validated identifier.
    pub fn existing(table: &str, layout: &ExistingOutbox, delete_on_publish: bool) -> Self {
        let col = |c: &str| format!("o.{}", quote_ident(c));
        let table_literal = quote_literal(table);
        let t = quote_table(table);
        let id = col(&layout.id);
        let state = col(&layout.state);
        let pending = format!("{state} = {}", quote_literal(&layout.pending));
        let text_or_null = |c: &Option<String>| match c {
            Some(c) => format!("{}::text", col(c)),
            None => "NULL::text".to_owned(),
        };
        let message_id = match &layout.message_id {
            Some(c) => format!("{}::text", col(c)),
            // Stable across re-sends: the same row always gets the same id.
            None => format!("md5({table_literal} || ':' || {id}::text)::uuid::text"),
        };
        let (headers, headers_bytes) = match &layout.headers {
            Some(c) => (
                format!("coalesce(left({}::text, {HEADERS_READ}), '{{}}')", col(c)),
                format!("coalesce(octet_length({}::text), 2)", col(c)),
            ),
            None => ("'{}'::text".to_owned(), "2".to_owned()),
        };
        let created_at = match &layout.created_at {
            Some(c) => format!("{}::timestamptz", col(c)),
            None => "NULL::timestamptz".to_owned(),
        };
        let attempts = match &layout.attempts {
            Some(c) => format!("coalesce({}, 0)::integer", col(c)),
            None => "0".to_owned(),
        };
        let claim = format!(
            "SELECT {id}::bigint AS id, {message_id} AS message_id,
                    {destination} AS destination, {routing_key}::text AS routing_key,
                    {headers} AS headers, {headers_bytes}::integer AS headers_bytes,
                    {payload} AS payload, {content_type} AS content_type,
                    {created_at} AS created_at, {attempts} AS attempts,
                    NULL::text AS partition_key, 0::bigint AS key_rank
             FROM {t} o
             WHERE {pending}
             ORDER BY {id} LIMIT $1
             FOR UPDATE SKIP LOCKED",
            destination = text_or_null(&layout.destination),
            routing_key = col(&layout.routing_key),
            payload = col(&layout.payload),
            content_type = text_or_null(&layout.content_type),
        );
        let id_column = quote_ident(&layout.id);
        let state_column = quote_ident(&layout.state);
        let mark_published = if delete_on_publish {
            format!("DELETE FROM {t} WHERE {id_column} = ANY($1)")
        } else {
            format!(
                "UPDATE {t} SET {state_column} = {} WHERE {id_column} = ANY($1)",
                quote_literal(&layout.published)
            )
        };
        let mut sets = vec![format!(
            "{state_column} = CASE WHEN f.give_up THEN {} ELSE {state} END",
            quote_literal(&layout.failed)
        )];
        if let Some(c) = &layout.last_error {
            sets.push(format!("{} = f.error", quote_ident(c)));
        }
        if let Some(c) = &layout.attempts {
            sets.push(format!("{} = coalesce({}, 0) + 1", quote_ident(c), col(c)));
        }
        let record_failures = format!(
            "UPDATE {t} AS o SET {}
             FROM unnest($1::bigint[], $2::text[], $3::float8[], $4::bool[])
                  AS f(id, error, retry_after, give_up)
             WHERE {id} = f.id",
            sets.join(", ")
        );
        let oldest = match &layout.created_at {
            Some(c) => format!("min({}::timestamptz)", col(c)),
            None => "now()".to_owned(),
        };
        let backlog = format!(
            "SELECT count(*)::bigint,
                    COALESCE(EXTRACT(EPOCH FROM now() - {oldest}), 0)::float8
             FROM {t} o WHERE {pending}"
        );
        Self {
            table: table.to_owned(),
            claim,
            per_key: false,
            held: "SELECT false".to_owned(),
            mark_published,
            record_failures,
            backlog,
            delete_published: None,
            tracks_attempts: layout.attempts.is_some(),
            // An existing table has no due time: its rows are claimable once pending.
            next_due: "SELECT NULL::float8".to_owned(),
            sending: None,
        }
    }

    /// The record of batches being sent, for bosun's own table.
    pub fn sending(&self) -> Option<&Sending> {
        self.sending.as_ref()
    }

    /// Whether a failed row's attempts are counted; if not, a refused row is given up at
    /// once rather than retried without end.
    pub fn tracks_attempts(&self) -> bool {
        self.tracks_attempts
    }

    /// Locks and returns up to `limit` claimable rows, lowest id first. Must run inside the
    /// batch's transaction: the locks are what keep other relays off these rows.
    pub async fn claim(
        &self,
        tx: &mut PgConnection,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, sqlx::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // The per_key window; the unordered claim has no $2 and ignores it.
        let window = limit.saturating_mul(CLAIM_WINDOW_BATCHES);
        let query = sqlx::query_as::<_, OutboxRow>(&self.claim).bind(limit);
        let query = if self.per_key {
            query.bind(window)
        } else {
            query
        };
        query.fetch_all(tx).await
    }

    /// With per_key, whether due keyed rows among the claim window are held back only
    /// because a transaction older than theirs is still running. No NOTIFY comes when that
    /// transaction ends (unless it wrote to the outbox), so the relay looks again soon
    /// instead of after a whole poll interval.
    pub async fn held_by_older_transactions(
        &self,
        tx: &mut PgConnection,
        limit: usize,
    ) -> Result<bool, sqlx::Error> {
        if !self.per_key {
            return Ok(false);
        }
        let window = i64::try_from(limit)
            .unwrap_or(i64::MAX)
            .saturating_mul(CLAIM_WINDOW_BATCHES);
        sqlx::query_scalar(&self.held)
            .bind(window)
            .fetch_one(tx)
            .await
    }

    /// How long until the earliest pending row that is not yet due becomes due; `None` when
    /// there is none. Zero when it fell due while this transaction ran.
    pub async fn next_due(&self, tx: &mut PgConnection) -> Result<Option<Duration>, sqlx::Error> {
        let seconds: Option<f64> = sqlx::query_scalar(&self.next_due).fetch_one(tx).await?;
        Ok(seconds.map(|s| Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)))
    }

    /// Marks every confirmed row in one statement.
    pub async fn mark_published(
        &self,
        tx: &mut PgConnection,
        ids: &[i64],
    ) -> Result<(), sqlx::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(&self.mark_published)
            .bind(ids)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Records every failure of a batch in one statement.
    pub async fn record_failures(
        &self,
        tx: &mut PgConnection,
        failures: &[Failure],
    ) -> Result<(), sqlx::Error> {
        if failures.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<f64> = failures
            .iter()
            .map(|f| f.retry_after.as_secs_f64())
            .collect();
        let give_up: Vec<bool> = failures.iter().map(|f| f.give_up).collect();
        sqlx::query(&self.record_failures)
            .bind(&ids)
            .bind(&errors)
            .bind(&delays)
            .bind(&give_up)
            .execute(tx)
            .await?;
        Ok(())
    }

    pub async fn backlog<'e>(&self, db: impl PgExecutor<'e>) -> Result<Backlog, sqlx::Error> {
        let (pending, oldest_age_seconds): (i64, f64) =
            sqlx::query_as(&self.backlog).fetch_one(db).await?;
        Ok(Backlog {
            pending,
            oldest_age_seconds,
        })
    }

    /// What identifies this table's retention among replicas (the table's name); `None`
    /// when published rows are never deleted.
    pub fn retention_key(&self) -> Option<&str> {
        self.delete_published.as_ref().map(|_| self.table.as_str())
    }

    /// Deletes up to `limit` rows published longer than `retain` ago; returns how many.
    /// SKIP LOCKED keeps two relays' cleanups from queueing behind each other.
    pub async fn delete_published<'e>(
        &self,
        db: impl PgExecutor<'e>,
        retain: Duration,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let Some(delete_published) = &self.delete_published else {
            return Ok(0);
        };
        let done = sqlx::query(delete_published)
            .bind(retain.as_secs_f64())
            .bind(limit)
            .execute(db)
            .await?;
        Ok(done.rows_affected())
    }
}
