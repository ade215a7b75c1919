//! The sweeper of a postgres inbox: deletes done records older than the window, and claims
//! abandoned for as long (their message was settled by a process that died before writing
//! done), in bounded batches, on one replica at a time, and samples the record count.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;

use super::InboxError;
use super::postgres::Schema;
use crate::retry::sleep_or_cancel;
use crate::supervisor::{Component, ComponentContext};

/// Rows deleted per statement: short transactions, short row locks.
const BATCH: i64 = 1000;
/// Batches per round at most, so one round never runs unbounded.
const MAX_BATCHES: usize = 100;
/// Time between rounds.
const INTERVAL: Duration = Duration::from_secs(60);

/// The supervised sweeper of one postgres inbox (`inbox:NAME`).
pub struct Sweeper {
    inbox: String,
    pool: PgPool,
    schema: Schema,
    window: Duration,
    migrate: bool,
    records: metrics::Gauge,
}

impl Sweeper {
    pub fn new(
        inbox: &str,
        pool: PgPool,
        table: &str,
        window: Duration,
        migrate: bool,
    ) -> Result<Self, InboxError> {
        let records =
            metrics::gauge!(crate::telemetry::inbox_metric::RECORDS, "inbox" => inbox.to_owned());
        records.set(0.0);
        Ok(Self {
            inbox: inbox.to_owned(),
            pool,
            schema: Schema::new(table)?,
            window,
            migrate,
            records,
        })
    }

    /// One round: under the table's advisory lock (skipped when another replica holds it),
    /// delete expired rows in batches, then count what is left. Returns the rows deleted, or
    /// `None` when another replica is sweeping.
    pub async fn sweep(&self) -> Result<Option<u64>, InboxError> {
        let mut conn = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtext('bosun.inbox.sweep'), hashtext($1))",
        )
        .bind(self.schema.table())
        .fetch_one(&mut *conn)
        .await?;
        if !locked {
            return Ok(None);
        }
        let window_ms = self.window.as_millis() as f64;
        let table = self.schema.table();
        let delete = format!(
            "DELETE FROM {table} WHERE ctid IN (
                SELECT ctid FROM {table}
                 WHERE (status = 'done' AND done_at < now() - $1 * interval '1 millisecond')
                    OR (status = 'claimed' AND lease_until < now() - $1 * interval '1 millisecond')
                 LIMIT $2)"
        );
        let mut deleted = 0u64;
        let mut result = Ok(());
        for _ in 0..MAX_BATCHES {
            match sqlx::query(&delete)
                .bind(window_ms)
                .bind(BATCH)
                .execute(&mut *conn)
                .await
            {
                Ok(done) => {
                    deleted += done.rows_affected();
                    if done.rows_affected() < BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            match sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&mut *conn)
                .await
            {
                Ok(n) => self.records.set(n as f64),
                Err(e) => result = Err(e),
            }
        }
        let _ =
            sqlx::query("SELECT pg_advisory_unlock(hashtext('bosun.inbox.sweep'), hashtext($1))")
                .bind(table)
                .execute(&mut *conn)
                .await;
        result?;
        Ok(Some(deleted))
    }
}

#[async_trait]
impl Component for Sweeper {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()> {
        ctx.health.set_ready();
        loop {
            if self.migrate
                && let Err(e) = self.schema.migrate(&self.pool).await
            {
                tracing::warn!(inbox = %self.inbox, error = %e, "cannot migrate the inbox table; trying again");
            } else {
                match self.sweep().await {
                    Ok(Some(deleted)) if deleted > 0 => {
                        tracing::info!(inbox = %self.inbox, deleted, "inbox records past the window deleted")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(inbox = %self.inbox, error = %e, "cannot sweep the inbox; trying again")
                    }
                }
            }
            if sleep_or_cancel(INTERVAL, &ctx.shutdown).await {
                return Ok(());
            }
        }
    }
}
