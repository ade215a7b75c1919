//! The dead-letter processor: a [`Handler`] that applies the rules to each dead letter and
//! answers `Ack` (or `Drop`) only once the decision's effect is durable, plus the periodic
//! work beside it (delayed replays, the archived gauge).
//!
//! The handler is run by the ordinary amqp or redis consumer on the dead-letter queue or
//! stream, so delivery, prefetch, concurrency, reconnects and settling are the consumers'
//! own code. When an effect cannot be made durable (database or broker down), the handler
//! keeps the dead letter in hand and tries again with backoff, reporting not ready; the
//! dead letter stays unsettled at its source all along and comes back if the process stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::archive::{self, NewRow, status};
use super::copy::{BrokerKind, forward_copy, replay_copy};
use super::group::group_key;
use super::letter::{DeadLetter, headers_to_json};
use super::ops::Ops;
use super::publishers::PublisherSource;
use super::rules::{Decision, decide};
use super::{DeadLetterError, metric};
use crate::config::DeadLetterConfig;
use crate::handler::{Handler, Message, Outcome};
use crate::health::HealthHandle;

/// First wait after a failed effect; doubles up to [`BACKOFF_MAX`].
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often scheduled replays are looked for.
const SCHEDULER_TICK: Duration = Duration::from_secs(1);
/// How often `bosun_dead_letters_archived` is sampled.
const GAUGE_INTERVAL: Duration = Duration::from_secs(15);

/// The archive a processor writes to.
#[derive(Clone)]
pub struct ArchiveTarget {
    pub pool: PgPool,
    pub table: String,
}

/// Applies one processor's rules to its dead letters.
pub struct DeadLetterHandler {
    /// The `[dead_letters.NAME]` name: the `processor` label and archive column.
    name: String,
    config: DeadLetterConfig,
    kind: BrokerKind,
    archive: Option<ArchiveTarget>,
    publishers: Arc<dyn PublisherSource>,
    /// The running component's readiness entry, set when it starts; effects that fail
    /// make it not ready until one succeeds.
    health: Mutex<Option<HealthHandle>>,
}

impl DeadLetterHandler {
    pub fn new(
        name: impl Into<String>,
        config: DeadLetterConfig,
        kind: BrokerKind,
        archive: Option<ArchiveTarget>,
        publishers: Arc<dyn PublisherSource>,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            kind,
            archive,
            publishers,
            health: Mutex::new(None),
        }
    }

    /// Reports into `health` from now on.
    pub fn attach(&self, health: HealthHandle) {
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(health);
    }

    fn health(&self) -> Option<HealthHandle> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The archive row for `letter`.
    fn row(
        &self,
        letter: &DeadLetter,
        status: &'static str,
        note: Option<String>,
        delay: Option<Duration>,
    ) -> NewRow {
        let error = letter.error.clone();
        NewRow {
            processor: self.name.clone(),
            broker: self.config.source.clone(),
            source: letter.source.clone(),
            source_entry_id: letter.entry_id.clone(),
            message_id: letter.message_id.clone(),
            correlation_id: letter.correlation_id.clone(),
            original: letter.original.clone(),
            original_exchange: letter.original_exchange.clone(),
            routing_key: letter.routing_key.clone(),
            headers: headers_to_json(&letter.headers),
            body: letter.body.to_vec(),
            content_type: letter.content_type.clone(),
            timestamp_ms: letter.timestamp_ms.and_then(|t| i64::try_from(t).ok()),
            group_key: group_key(&letter.error_kind, error.as_deref().unwrap_or("")),
            error_kind: letter.error_kind.clone(),
            error,
            reason: letter.reason.clone(),
            attempts: i32::try_from(letter.attempts).unwrap_or(i32::MAX),
            replay_count: i32::try_from(letter.replay_count).unwrap_or(i32::MAX),
            first_failed_at: letter.first_failed_at,
            status,
            note,
            replay_due_at: delay
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| Utc::now() + d),
        }
    }

    async fn archive(
        &self,
        letter: &DeadLetter,
        status: &'static str,
        note: Option<String>,
        delay: Option<Duration>,
    ) -> Result<i64, DeadLetterError> {
        let Some(target) = &self.archive else {
            // Validation requires an archive for every rule that can archive; this is a
            // fallback (a replay that cannot be routed) on a processor without one.
            return Err(DeadLetterError::Invalid(format!(
                "dead-letter processor `{}` has no archive to keep this dead letter in",
                self.name
            )));
        };
        archive::insert(
            &target.pool,
            &target.table,
            &self.row(letter, status, note, delay),
        )
        .await
    }

    async fn publish(&self, copy: &crate::publish::OutgoingMessage) -> Result<(), DeadLetterError> {
        let (_, publisher) = self.publishers.publisher(&self.config.source).await?;
        publisher.publish(copy).await?;
        Ok(())
    }

    /// Makes `decision` durable. `Ok` means the dead letter may be settled.
    async fn apply(&self, letter: &DeadLetter, decision: &Decision) -> Result<(), DeadLetterError> {
        match decision {
            Decision::Replay { delay } if delay.is_zero() => {
                self.publish(&replay_copy(self.kind, letter)?).await?;
                metrics::counter!(metric::REPLAYS, "processor" => self.name.clone()).increment(1);
                Ok(())
            }
            Decision::Replay { delay } => {
                // A long delay is not spent holding the delivery: the row waits in the
                // archive as `scheduled` and the scheduler replays it when due.
                self.archive(letter, status::SCHEDULED, None, Some(*delay))
                    .await?;
                Ok(())
            }
            Decision::Archive { note } => {
                self.archive(letter, status::ARCHIVED, note.map(str::to_owned), None)
                    .await?;
                Ok(())
            }
            Decision::Drop => Ok(()),
            Decision::Forward {
                target,
                routing_key,
            } => {
                self.publish(&forward_copy(
                    self.kind,
                    letter,
                    target,
                    routing_key.as_deref(),
                ))
                .await
            }
        }
    }
}

#[async_trait]
impl Handler for DeadLetterHandler {
    async fn handle(&self, message: &Message) -> Outcome {
        let letter = DeadLetter::from_message(message);
        let (rule, mut decision) = decide(&self.config, &letter);
        let mut backoff = BACKOFF_INITIAL;
        loop {
            match self.apply(&letter, &decision).await {
                Ok(()) => {
                    if let Some(health) = self.health() {
                        health.set_ready();
                    }
                    metrics::counter!(metric::TOTAL, "processor" => self.name.clone(), "action" => decision.label()).increment(1);
                    tracing::info!(
                        processor = %self.name,
                        message_id = letter.message_id.as_deref().unwrap_or(""),
                        error_kind = %letter.error_kind,
                        original = letter.original.as_deref().unwrap_or(""),
                        rule = rule.map(|r| r as i64).unwrap_or(-1),
                        action = decision.label(),
                        "dead letter handled"
                    );
                    return match decision {
                        Decision::Drop => Outcome::Drop {
                            reason: format!("dropped by dead-letter processor `{}`", self.name),
                        },
                        _ => Outcome::Ack,
                    };
                }
                Err(e)
                    if !e.is_transient()
                        && self.archive.is_some()
                        && !matches!(decision, Decision::Archive { .. }) =>
                {
                    // A replay or forward that can never succeed as configured (no target,
                    // unroutable, refused) keeps the dead letter in the archive instead.
                    tracing::warn!(processor = %self.name, action = decision.label(), error = %e, "action failed for good; archiving instead");
                    decision = Decision::Archive {
                        note: Some("replay or forward failed"),
                    };
                }
                Err(e) => {
                    let reason = format!("cannot {} dead letters: {e}", decision.label());
                    tracing::warn!(processor = %self.name, action = decision.label(), error = %e, retry_in_ms = backoff.as_millis() as u64, "dead letter kept unsettled; retrying");
                    if let Some(health) = self.health() {
                        health.set_not_ready(reason);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Replays due scheduled rows and samples the archived gauge until `shutdown`.
pub async fn background(
    name: String,
    ops: Ops,
    archived: Option<ArchiveTarget>,
    shutdown: CancellationToken,
) {
    let mut scheduler = tokio::time::interval(SCHEDULER_TICK);
    scheduler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauge = tokio::time::interval(GAUGE_INTERVAL);
    gauge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Some(target) = archived else {
        shutdown.cancelled().await;
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = scheduler.tick() => {
                match ops.replay_due(&name).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(processor = %name, replayed = n, "scheduled dead letters replayed"),
                    Err(e) => tracing::warn!(processor = %name, error = %e, "scheduled replays failed; trying again"),
                }
            }
            _ = gauge.tick() => {
                match archive::count_archived(&target.pool, &target.table, &name).await {
                    Ok(n) => metrics::gauge!(metric::ARCHIVED, "processor" => name.clone()).set(n as f64),
                    Err(e) => tracing::debug!(processor = %name, error = %e, "cannot sample archived dead letters"),
                }
            }
        }
    }
}
