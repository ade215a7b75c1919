//! The relay loop: claim a batch, publish it with confirms, record the outcome, commit.
//!
//! One batch is one transaction on the relay's own connection:
//! 1. `SELECT ... FOR UPDATE SKIP LOCKED ORDER BY id LIMIT batch` claims rows, and their ids
//!    are recorded as being sent, committed on a second connection (see
//!    [`super::store::Sending`]), before anything is sent;
//! 2. the batch goes to the publisher, pipelined, and every confirm is awaited, bounded by
//!    `publish_timeout` (the row locks are held meanwhile); with per_key, a key's rows are
//!    sent one after another, each once the one before it is confirmed, and a key stops at
//!    its first row that is not;
//! 3. confirmed rows are marked published in one statement, refused ones get their failure
//!    recorded in one statement, and the record of step 1 is removed (or keeps the rows whose
//!    outcome is unknown);
//! 4. COMMIT.
//!
//! A crash or a lost connection anywhere before 4 rolls the transaction back, and the rows are
//! claimed again: the broker may see a message twice (same `message_id`), never zero times.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};
use tokio::sync::Notify;

use super::store::{Failure, OutboxRow, Queries};
use super::{OutboxError, PublisherSource, RECONNECT};
use crate::config::{Ordering, OutboxConfig};
use crate::publish::{OutgoingMessage, PublishError, Publisher};
use crate::retry::sleep_or_cancel;
use crate::supervisor::ComponentContext;

/// Extra time a batch may take beyond `publish_timeout` for its SQL; past it the connection
/// is considered hung and dropped (PostgreSQL then rolls the transaction back).
const SQL_ALLOWANCE: Duration = Duration::from_secs(30);

/// How soon a per_key relay looks again when due rows wait only for an older transaction
/// (of any table) to end.
const HELD_RECHECK: Duration = Duration::from_millis(100);

/// Longest `last_error` kept on a row.
const MAX_ERROR_LEN: usize = 2048;

/// A relay's own connections.
pub(super) struct Connections {
    /// Runs each batch's transaction, holding the claimed rows' locks while they are sent.
    batch: PgConnection,
    /// Records batches as being sent, outside their transaction; `None` when the table has
    /// no such record (an existing table, or one not migrated since it was added).
    side: Option<PgConnection>,
}

/// The relay for one `[outboxes.NAME]`.
pub struct Relay {
    /// The outbox's name: the `outbox` label of its metrics and logs.
    pub(super) name: String,
    pub(super) config: OutboxConfig,
    pub(super) queries: Queries,
    /// Options for the relay's own connection, which carries an `application_name` naming the
    /// outbox so operators can find (or terminate) it in `pg_stat_activity`.
    pub(super) connect: PgConnectOptions,
    pub(super) publishers: Arc<dyn PublisherSource>,
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    pub claimed: usize,
    pub published: usize,
    /// Rows that failed and will be tried again after a backoff.
    pub retried: usize,
    /// Rows that failed for the last time (`failed_at` set).
    pub failed: usize,
    /// per_key, nothing claimed: due rows wait only for an older transaction to end.
    pub held: bool,
    /// When the relay is about to wait: how long until the earliest pending row that is not
    /// due yet (scheduled, or in backoff) becomes due, so the relay wakes for it on time
    /// rather than at the next NOTIFY or poll.
    pub next_due: Option<Duration>,
}

/// Why a row cannot become a message at all.
enum RowProblem {
    /// No destination on the row and none configured: fixable by configuration, so retried.
    NoDestination,
    /// Content that can never be published (headers that are not a bounded JSON object).
    Invalid(String),
}

impl Relay {
    /// Runs `concurrency` batch loops until shutdown, side by side in this task (so they end
    /// with it). Each claims with SKIP LOCKED on connections of its own, as separate relays
    /// would: while one waits for the broker's confirms another claims or commits, and
    /// `per_key` order holds across them as it does across relays.
    pub(super) async fn run(&self, ctx: &ComponentContext, wake: &Notify) {
        let loops = self.config.concurrency.max(1);
        futures::future::join_all((0..loops).map(|_| self.run_loop(ctx, wake, loops > 1))).await;
    }

    /// One batch loop. Returns only on shutdown: every failure is retried here with backoff,
    /// with `/readyz` saying why. `peers`: other loops run beside it, and one that finds more
    /// rows than a batch wakes another.
    async fn run_loop(&self, ctx: &ComponentContext, wake: &Notify, peers: bool) {
        let mut conn: Option<Connections> = None;
        let mut publisher: Option<Arc<dyn Publisher>> = None;
        let mut failures = 0u32;
        while !ctx.shutdown.is_cancelled() {
            match self.step(&mut conn, &mut publisher).await {
                Ok(report) => {
                    if failures > 0 {
                        tracing::info!(outbox = %self.name, "outbox relay recovered");
                    }
                    failures = 0;
                    ctx.health.set_ready();
                    // A full batch may have more behind it; so may a batch that published or
                    // gave up anything under per_key ordering, which claims a key's rows only
                    // up to an equal share of the batch and stops a key at a row given up: the
                    // next rows of each key are claimable now, not after a poll interval.
                    // A batch that only retried waits, so failing rows never spin.
                    if report.claimed >= self.config.batch
                        || report.published > 0
                        || report.failed > 0
                    {
                        if peers && report.claimed >= self.config.batch {
                            wake.notify_one();
                        }
                        continue;
                    }
                    let mut wait = if report.held {
                        self.config.poll_interval.min(HELD_RECHECK)
                    } else {
                        self.config.poll_interval
                    };
                    if let Some(due) = report.next_due {
                        wait = wait.min(due);
                    }
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => {}
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    if e.resets_database() {
                        conn = None;
                    }
                    if e.resets_broker() {
                        publisher = None;
                    }
                    failures = failures.saturating_add(1);
                    let delay = RECONNECT.delay(failures);
                    ctx.health.set_not_ready(e.to_string());
                    tracing::warn!(outbox = %self.name, error = %e, failures, retry_in_ms = delay.as_millis() as u64,
                        "outbox batch failed; rows stay pending and are claimed again");
                    if sleep_or_cancel(delay, &ctx.shutdown).await {
                        break;
                    }
                }
            }
        }
        if let Some(conn) = conn {
            let _ = conn.batch.close().await;
            if let Some(side) = conn.side {
                let _ = side.close().await;
            }
        }
    }

    async fn step(
        &self,
        conn: &mut Option<Connections>,
        publisher: &mut Option<Arc<dyn Publisher>>,
    ) -> Result<BatchReport, OutboxError> {
        let publisher = match publisher {
            Some(p) => p.clone(),
            None => {
                let p = self
                    .publishers
                    .connect()
                    .await
                    .map_err(|e| OutboxError::Broker(format!("{e:#}")))?;
                *publisher = Some(p.clone());
                p
            }
        };
        if conn.is_none() {
            *conn = Some(self.connect().await?);
        }
        let Some(conn) = conn.as_mut() else {
            return Err(OutboxError::Broker("no database connection".into()));
        };
        let limit = self.config.publish_timeout + SQL_ALLOWANCE;
        match tokio::time::timeout(limit, self.batch(conn, &*publisher)).await {
            Ok(result) => result,
            Err(_) => Err(OutboxError::DatabaseTimeout(limit)),
        }
    }

    async fn connect(&self) -> Result<Connections, OutboxError> {
        let mut conn = PgConnection::connect_with(&self.connect).await?;
        // A server-side backstop for the client-side timeouts: should this process stall
        // with row locks held, PostgreSQL ends the session and the rows become claimable.
        let idle_limit = self.config.publish_timeout + SQL_ALLOWANCE;
        let set = format!(
            "SET idle_in_transaction_session_timeout = {}",
            idle_limit.as_millis()
        );
        sqlx::query(&set).execute(&mut conn).await?;
        // The claim must walk the pending index in id order and stop at `batch` rows. Right
        // after a burst of inserts, before autovacuum has analyzed the table, the planner
        // believes almost nothing is pending and prefers a bitmap scan that collects every
        // pending row and sorts them all (on disk for a large backlog): 130 ms instead of
        // 9 ms per claim with 150,000 rows pending. This session runs only the relay's own
        // statements, so the bitmap scan is turned off for it alone.
        sqlx::query("SET enable_bitmapscan = off")
            .execute(&mut conn)
            .await?;
        let side = match self.queries.sending() {
            Some(sending) if sending.exists(&mut conn).await? => {
                Some(PgConnection::connect_with(&self.connect).await?)
            }
            Some(_) => {
                tracing::warn!(outbox = %self.name, table = %self.config.table,
                    "the outbox table has no record of batches being sent (run `bosun outbox migrate`): a cancel cannot tell a row whose publish was interrupted from one never sent");
                None
            }
            None => None,
        };
        Ok(Connections { batch: conn, side })
    }

    /// Claims, publishes and settles one batch in one transaction.
    pub(super) async fn batch(
        &self,
        conn: &mut Connections,
        publisher: &dyn Publisher,
    ) -> Result<BatchReport, OutboxError> {
        let started = Instant::now();
        let Connections { batch, side } = conn;
        let mut tx = batch.begin().await?;
        let rows = self.queries.claim(&mut tx, self.config.batch).await?;
        if rows.is_empty() {
            // Only asked when the relay is about to wait: a batch that published anything
            // loops at once anyway.
            let held = self
                .queries
                .held_by_older_transactions(&mut tx, self.config.batch)
                .await?;
            let next_due = self.queries.next_due(&mut tx).await?;
            tx.commit().await?;
            return Ok(BatchReport {
                held,
                next_due,
                ..BatchReport::default()
            });
        }
        let mut report = BatchReport {
            claimed: rows.len(),
            ..BatchReport::default()
        };
        // Durable before the first message goes out: should the outcome be lost (a confirm,
        // the connection, this process), the rows stay marked as possibly sent, and a cancel
        // does not delete a message the broker may have. Nothing is sent if it fails.
        let record = match (self.queries.sending(), side.as_mut()) {
            (Some(sending), Some(side)) => {
                let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
                Some((sending, sending.record(side, &ids).await?))
            }
            _ => None,
        };
        // Each run is sent one row after another; runs go out side by side. A row that
        // cannot become a message fails when its run reaches it, never earlier: should a row
        // before it fail, it stays pending, untouched, like every row behind that one.
        let runs: Vec<Vec<(&OutboxRow, Result<OutgoingMessage, Failure>)>> = self
            .runs(&rows)
            .into_iter()
            .map(|run| {
                run.into_iter()
                    .map(|row| {
                        let message = self
                            .message_for(row)
                            .map_err(|problem| self.problem_failure(row, problem));
                        (row, message)
                    })
                    .collect()
            })
            .collect();

        // Rounds start only in the first half of publish_timeout, so one long key cannot make
        // every batch time out and roll back: the rows left wait for the next batch.
        let last_round_start = Instant::now() + self.config.publish_timeout / 2;
        let outcome = match tokio::time::timeout(
            self.config.publish_timeout,
            publish_runs(publisher, runs, last_round_start),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                tx.rollback().await?;
                return Err(OutboxError::PublishTimeout(self.config.publish_timeout));
            }
        };
        let published = outcome.published;
        let connection_lost = outcome.connection_lost;
        let mut failures = outcome.unsendable;
        for (row, error) in outcome.refused {
            // No retry can shrink the payload or its headers: given up at once, like an
            // invalid row.
            let permanent = matches!(
                error,
                PublishError::TooLarge { .. } | PublishError::Invalid(_)
            );
            failures.push(self.failure(row, error.to_string(), permanent));
        }

        self.queries.mark_published(&mut tx, &published).await?;
        self.queries.record_failures(&mut tx, &failures).await?;
        if let Some((sending, batch)) = record {
            sending.settle(&mut tx, batch, &outcome.doubtful).await?;
        }
        report.published = published.len();
        report.failed = failures.iter().filter(|f| f.give_up).count();
        report.retried = failures.len() - report.failed;
        // A batch that only retried rows is followed by a wait (see `run`): it needs to
        // know when the next row falls due, which may be one of those just retried.
        if report.claimed < self.config.batch && report.published == 0 && report.failed == 0 {
            report.next_due = self.queries.next_due(&mut tx).await?;
        }
        tx.commit().await?;

        self.record(&report, started.elapsed(), &failures);
        match connection_lost {
            Some(e) => Err(OutboxError::Broker(e)),
            None => Ok(report),
        }
    }

    /// The claimed rows as runs to send one row after another: with per_key, a key's rows
    /// in key order up to the first gap in their `key_rank` (the rows after it stay pending,
    /// untouched); every other row is a run of its own. Runs are in the order of their first
    /// row's id.
    fn runs<'r>(&self, rows: &'r [OutboxRow]) -> Vec<Vec<&'r OutboxRow>> {
        let mut runs: Vec<Vec<&OutboxRow>> = Vec::new();
        let mut by_key: HashMap<&str, usize> = HashMap::new();
        for row in rows {
            match (&row.partition_key, self.config.ordering) {
                (Some(key), Ordering::PerKey) => match by_key.get(key.as_str()) {
                    Some(&at) => runs[at].push(row),
                    None => {
                        by_key.insert(key, runs.len());
                        runs.push(vec![row]);
                    }
                },
                _ => runs.push(vec![row]),
            }
        }
        for run in &mut runs {
            run.sort_by_key(|row| row.key_rank);
            let unbroken = run
                .iter()
                .zip(0i64..)
                .take_while(|(row, rank)| row.key_rank == *rank)
                .count();
            run.truncate(unbroken);
        }
        runs.retain(|run| !run.is_empty());
        runs
    }

    fn problem_failure(&self, row: &OutboxRow, problem: RowProblem) -> Failure {
        match problem {
            RowProblem::NoDestination => self.failure(
                row,
                format!(
                    "row has no destination and outbox `{}` has no default `destination`",
                    self.name
                ),
                false,
            ),
            RowProblem::Invalid(why) => self.failure(row, why, true),
        }
    }

    fn record(&self, report: &BatchReport, took: Duration, failures: &[Failure]) {
        let outbox = self.name.clone();
        metrics::histogram!("bosun_outbox_batch_duration_seconds", "outbox" => outbox.clone())
            .record(took.as_secs_f64());
        metrics::counter!("bosun_outbox_published_total", "outbox" => outbox.clone())
            .increment(report.published as u64);
        if report.retried > 0 {
            metrics::counter!("bosun_outbox_retried_total", "outbox" => outbox.clone())
                .increment(report.retried as u64);
        }
        if report.failed > 0 {
            metrics::counter!("bosun_outbox_failed_total", "outbox" => outbox)
                .increment(report.failed as u64);
        }
        for failure in failures {
            if failure.give_up {
                tracing::error!(outbox = %self.name, row = failure.id, error = %failure.error,
                    "outbox row failed for the last time; it is kept with failed_at set");
            } else {
                tracing::warn!(outbox = %self.name, row = failure.id, error = %failure.error,
                    retry_in_ms = failure.retry_after.as_millis() as u64, "outbox row failed; will retry");
            }
        }
        tracing::debug!(outbox = %self.name, claimed = report.claimed, published = report.published,
            retried = report.retried, failed = report.failed, took_ms = took.as_millis() as u64, "outbox batch");
    }

    /// The failure to record for `row`; `invalid` rows are given up at once, since no retry
    /// can change their content.
    fn failure(&self, row: &OutboxRow, error: String, invalid: bool) -> Failure {
        let attempt = u32::try_from(row.attempts).unwrap_or(0).saturating_add(1);
        Failure {
            id: row.id,
            error: crate::text::truncate(&error, MAX_ERROR_LEN).to_owned(),
            retry_after: self.config.retry.delay(attempt),
            give_up: invalid
                || attempt >= self.config.max_attempts
                || !self.queries.tracks_attempts(),
        }
    }

    fn message_for(&self, row: &OutboxRow) -> Result<OutgoingMessage, RowProblem> {
        let destination = row
            .destination
            .clone()
            .or_else(|| self.config.destination.clone())
            .ok_or(RowProblem::NoDestination)?;
        let (Some(routing_key), Some(payload)) = (&row.routing_key, &row.payload) else {
            let (role, column) = match (&row.routing_key, &self.config.existing) {
                (None, Some(layout)) => ("routing key", layout.routing_key.as_str()),
                (None, None) => ("routing key", "routing_key"),
                (Some(_), Some(layout)) => ("payload", layout.payload.as_str()),
                (Some(_), None) => ("payload", "payload"),
            };
            return Err(RowProblem::Invalid(format!(
                "the row's {role} (column `{column}`) is NULL"
            )));
        };
        Ok(OutgoingMessage {
            destination,
            routing_key: routing_key.clone(),
            message_id: row.message_id.clone(),
            correlation_id: None,
            content_type: row.content_type.clone(),
            headers: super::headers::parse_sized(
                &row.headers,
                usize::try_from(row.headers_bytes).unwrap_or(usize::MAX),
            )
            .map_err(|e| RowProblem::Invalid(e.0))?,
            body: payload.0.clone().into(),
            timestamp_ms: row
                .created_at
                .and_then(|at| u64::try_from(at.timestamp_millis()).ok()),
            // Published under the `traceparent` the application wrote in the row's headers.
            trace: Default::default(),
        })
    }
}

/// What became of the rows the runs reached.
struct RunsOutcome<'r> {
    /// Confirmed.
    published: Vec<i64>,
    /// Rows that could not become a message, reached in their run.
    unsendable: Vec<Failure>,
    /// Refused by the broker or before sending; recorded as failures.
    refused: Vec<(&'r OutboxRow, PublishError)>,
    /// The connection failed: the rows it hit (and every row not yet sent) stay untouched.
    connection_lost: Option<String>,
    /// Rows sent whose outcome is unknown (the connection failed before their confirm).
    doubtful: Vec<i64>,
}

/// Publishes the runs in rounds: round n sends the n-th row of every run still going,
/// pipelined, and awaits every confirm. A run stops at its first row that is not confirmed;
/// its later rows are never sent and stay pending, untouched, so a key's rows reach the
/// broker one after another and in order, and one key never has two rows in flight. No round
/// starts after `last_round_start`; the rows not reached stay pending, untouched.
async fn publish_runs<'r>(
    publisher: &dyn Publisher,
    runs: Vec<Vec<(&'r OutboxRow, Result<OutgoingMessage, Failure>)>>,
    last_round_start: Instant,
) -> RunsOutcome<'r> {
    let mut outcome = RunsOutcome {
        published: Vec::new(),
        unsendable: Vec::new(),
        refused: Vec::new(),
        connection_lost: None,
        doubtful: Vec::new(),
    };
    let mut runs: Vec<_> = runs.into_iter().map(Vec::into_iter).collect();
    let mut first = true;
    loop {
        if !first && Instant::now() >= last_round_start {
            return outcome;
        }
        first = false;
        let mut round_rows: Vec<(usize, &OutboxRow)> = Vec::new();
        let mut messages: Vec<OutgoingMessage> = Vec::new();
        for (at, run) in runs.iter_mut().enumerate() {
            match run.next() {
                Some((row, Ok(message))) => {
                    round_rows.push((at, row));
                    messages.push(message);
                }
                Some((_, Err(failure))) => {
                    outcome.unsendable.push(failure);
                    *run = Vec::new().into_iter();
                }
                None => {}
            }
        }
        if messages.is_empty() {
            return outcome;
        }
        let results = publisher.publish_batch(&messages).await;
        for (i, (at, row)) in round_rows.into_iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => {
                    outcome.published.push(row.id);
                    continue;
                }
                // The message may or may not have arrived; the row stays as it was (no
                // attempt used up by a broker outage) and is sent again after reconnecting.
                Some(Err(PublishError::Connection(e))) => {
                    outcome.connection_lost.get_or_insert_with(|| e.clone());
                    outcome.doubtful.push(row.id);
                }
                None => {
                    outcome.doubtful.push(row.id);
                    outcome.connection_lost.get_or_insert_with(|| {
                        "the publisher returned fewer results than messages".into()
                    });
                }
                Some(Err(e)) => outcome.refused.push((row, e.clone())),
            }
            runs[at] = Vec::new().into_iter();
        }
        if outcome.connection_lost.is_some() {
            return outcome;
        }
    }
}
