//! The idempotency records: one row per message id the API accepted, with its answer, kept
//! for `idempotency_window`.
//!
//! A request first inserts its id's row in a transaction that stays open while the message
//! is sent (or, scheduled, while its outbox row is written in that same transaction), and
//! commits the answer only once the send is confirmed (or the row is written). So:
//! - a repeat after the commit finds the row and gets the first answer, nothing is sent;
//! - a concurrent repeat's insert waits on the first one's uncommitted row, then finds it
//!   committed (the first answer) or gone (the first failed: this one sends);
//! - a refused or failed send rolls back: nothing is remembered, and the id may be tried
//!   again;
//! - bosun dying between the broker's confirm and the commit leaves no record: a repeat
//!   sends again, a duplicate with the same message id (at-least-once, never a loss). A
//!   scheduled send has no such gap: the outbox row and the record commit together.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

/// The table's DDL: idempotent, applied at start unless `migrate = false`.
pub fn statements(table: &str) -> Vec<String> {
    let index =
        crate::database::derived_name(table.rsplit('.').next().unwrap_or(table), "expires_idx");
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
    message_id  text        PRIMARY KEY,
    fingerprint bytea       NOT NULL,
    status      smallint    NOT NULL,
    answer      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
)"
        ),
        format!("CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at)"),
    ]
}

/// Creates the table, idempotently; concurrent starts wait for each other.
pub async fn migrate(pool: &PgPool, table: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('bosun.publish_api.migrate'), hashtext($1))",
    )
    .bind(table)
    .execute(&mut *tx)
    .await?;
    for statement in statements(table) {
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// What an earlier request with the same id left.
#[derive(Debug, Clone, PartialEq)]
pub struct Earlier {
    pub fingerprint: Vec<u8>,
    pub status: u16,
    pub answer: serde_json::Value,
}

/// The statements of one records table, formatted once from a validated identifier.
#[derive(Debug, Clone)]
pub struct Records {
    claim: String,
    earlier: String,
    answer: String,
    expire: String,
}

impl Records {
    pub fn new(table: &str) -> Self {
        Self {
            // Takes the id, or an expired row of it. Blocks while another transaction holds
            // an uncommitted row of the same id.
            claim: format!(
                "INSERT INTO {table} AS r (message_id, fingerprint, status, answer, expires_at)
                 VALUES ($1, $2, 0, '{{}}'::jsonb, now() + make_interval(secs => $3))
                 ON CONFLICT (message_id) DO UPDATE
                     SET fingerprint = EXCLUDED.fingerprint, status = 0, answer = '{{}}'::jsonb,
                         created_at = now(), expires_at = EXCLUDED.expires_at
                     WHERE r.expires_at <= now()
                 RETURNING true"
            ),
            earlier: format!(
                "SELECT fingerprint, status, answer FROM {table}
                 WHERE message_id = $1 AND expires_at > now()"
            ),
            answer: format!("UPDATE {table} SET status = $2, answer = $3 WHERE message_id = $1"),
            expire: format!(
                "DELETE FROM {table} WHERE message_id IN (
                     SELECT message_id FROM {table} WHERE expires_at <= now()
                     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            ),
        }
    }

    /// Takes `id` in the open transaction `tx`; `Err(earlier)` when a live record has it
    /// (its answer is the answer), `Ok(())` when this request is the one to send.
    pub async fn claim(
        &self,
        tx: &mut PgConnection,
        id: &str,
        fingerprint: &[u8],
        window: Duration,
    ) -> Result<Result<(), Option<Earlier>>, sqlx::Error> {
        let took: Option<bool> = sqlx::query_scalar(&self.claim)
            .bind(id)
            .bind(fingerprint)
            .bind(window.as_secs_f64())
            .fetch_optional(&mut *tx)
            .await?;
        if took.is_some() {
            return Ok(Ok(()));
        }
        let earlier: Option<(Vec<u8>, i16, serde_json::Value)> = sqlx::query_as(&self.earlier)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        Ok(Err(earlier.map(|(fingerprint, status, answer)| Earlier {
            fingerprint,
            status: u16::try_from(status).unwrap_or(500),
            answer,
        })))
    }

    /// Records the answer of the request that holds `id` in `tx`.
    pub async fn answer(
        &self,
        tx: &mut PgConnection,
        id: &str,
        status: u16,
        answer: &serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&self.answer)
            .bind(id)
            .bind(i16::try_from(status).unwrap_or(i16::MAX))
            .bind(answer)
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Deletes up to `limit` expired records; returns how many.
    pub async fn expire(&self, pool: &PgPool, limit: i64) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(&self.expire)
            .bind(limit)
            .execute(pool)
            .await?
            .rows_affected())
    }
}
