//! Housekeeping beside the relay loop: the backlog gauges, retention of published rows, and
//! the records of batches whose rows are all settled.
//!
//! Retention runs on one replica at a time: each DELETE batch takes the table's advisory
//! lock ([`RETENTION_LOCK`]) and a replica that finds it taken leaves the round to the one
//! holding it.
//!
//! Both run on the shared pool, never on the relay's own connection, so a slow DELETE never
//! delays a batch. Failures here are logged and retried on the next round; they do not make
//! the relay unready, since publishing is unaffected.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::store::Queries;
use crate::retry::sleep_or_cancel;

/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// Rows deleted per statement: small, so each DELETE holds its locks briefly and the WAL
/// volume per transaction stays modest.
const DELETE_BATCH: i64 = 1000;

/// The advisory-lock namespace of outbox retention.
pub(crate) const RETENTION_LOCK: &str = "bosun.outbox.retention";

/// Runs until `shutdown`.
pub async fn run(
    outbox: String,
    pool: PgPool,
    queries: Queries,
    retain: Duration,
    shutdown: CancellationToken,
) {
    let cleanup_every = cleanup_interval(retain);
    let mut last_cleanup: Option<tokio::time::Instant> = None;
    loop {
        match queries.backlog(&pool).await {
            Ok(backlog) => {
                metrics::gauge!("bosun_outbox_pending", "outbox" => outbox.clone())
                    .set(backlog.pending as f64);
                metrics::gauge!("bosun_outbox_oldest_pending_age_seconds", "outbox" => outbox.clone())
                    .set(backlog.oldest_age_seconds);
            }
            Err(e) => {
                tracing::warn!(outbox = %outbox, error = %e, "cannot measure the outbox backlog")
            }
        }
        if last_cleanup.is_none_or(|t| t.elapsed() >= cleanup_every) {
            last_cleanup = Some(tokio::time::Instant::now());
            delete_expired(&outbox, &pool, &queries, retain, &shutdown).await;
            forget_settled_batches(&outbox, &pool, &queries).await;
        }
        if sleep_or_cancel(BACKLOG_EVERY, &shutdown).await {
            return;
        }
    }
}

/// Retention is coarse: a row lives between `retain` and `retain` plus this interval.
fn cleanup_interval(retain: Duration) -> Duration {
    (retain / 4).clamp(BACKLOG_EVERY, Duration::from_secs(60))
}

async fn delete_expired(
    outbox: &str,
    pool: &PgPool,
    queries: &Queries,
    retain: Duration,
    shutdown: &CancellationToken,
) {
    let Some(key) = queries.retention_key() else {
        return;
    };
    let mut total = 0u64;
    while !shutdown.is_cancelled() {
        match delete_batch(pool, queries, key, retain).await {
            Ok(Some(deleted)) => {
                total += deleted;
                if deleted < DELETE_BATCH as u64 {
                    break;
                }
            }
            // Another replica deletes from this table now: the round is theirs.
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(outbox = %outbox, error = %e, "cannot delete published outbox rows");
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    if total > 0 {
        tracing::debug!(outbox = %outbox, deleted = total, "deleted published outbox rows past retention");
    }
}

/// Deletes the records of batches being sent whose rows are all settled: left by a batch
/// whose outcome was lost, once its rows were published (again) or failed.
async fn forget_settled_batches(outbox: &str, pool: &PgPool, queries: &Queries) {
    let Some(sending) = queries.sending() else {
        return;
    };
    let result = async {
        if !sending.exists(pool).await? {
            return Ok(0);
        }
        sending.cleanup(pool).await
    }
    .await;
    match result {
        Ok(0) => {}
        Ok(n) => {
            tracing::debug!(outbox = %outbox, records = n, "forgot batches whose rows are all settled")
        }
        Err(e) => {
            tracing::warn!(outbox = %outbox, error = %e, "cannot delete the records of settled batches")
        }
    }
}

/// One batch of the retention DELETE, under the table's retention lock (one replica at a
/// time); `None` when another replica holds it.
async fn delete_batch(
    pool: &PgPool,
    queries: &Queries,
    key: &str,
    retain: Duration,
) -> Result<Option<u64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if !crate::database::try_singleton(&mut tx, RETENTION_LOCK, key).await? {
        return Ok(None);
    }
    let deleted = queries
        .delete_published(&mut *tx, retain, DELETE_BATCH)
        .await?;
    tx.commit().await?;
    Ok(Some(deleted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_runs_between_every_backlog_round_and_every_minute() {
        assert_eq!(cleanup_interval(Duration::ZERO), BACKLOG_EVERY);
        assert_eq!(
            cleanup_interval(Duration::from_secs(24 * 3600)),
            Duration::from_secs(60)
        );
        assert_eq!(
            cleanup_interval(Duration::from_secs(120)),
            Duration::from_secs(30)
        );
    }
}
