//! The dead-letter processor: a [`Handler`] that applies the rules to each dead letter and
//! answers `Ack` (or `Drop`) only once the decision's effect is durable, plus the periodic
//! work beside it (delayed replays, the archived gauge).
//!
//! The handler is run by the ordinary amqp or redis consumer on the dead-letter queue or
//! stream, so delivery, prefetch, concurrency, reconnects and settling are the consumers'
//! own code. When an effect cannot be made durable (database or broker down), the handler
//! keeps the dead letter in hand and tries again with backoff, reporting not ready; the
//! dead letter stays unsettled at its source all along. At shutdown it is released (handed
//! back unsettled) at once, so an outage does not hold up the drain.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::FutureExt as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::archive::{self, Details, Failure, NewRow, status};
use super::copy::{BrokerKind, forward_copy, replay_copy};
use super::group::group_key;
use super::letter::{DeadLetter, headers_to_json};
use super::ops::Ops;
use super::publishers::PublisherSource;
use super::rules::{Decision, decide};
use super::{DeadLetterError, metric};
use crate::config::{
    self, BrokerConfig, Config, ConsumerConfig, ConsumerKind, DeadLetterConfig, DeadLetterSource,
    RedisConsumerConfig,
};
use crate::consumers::ConsumerSpec;
use crate::handler::{Handler, Message, Outcome, UNDECODABLE};
use crate::health::HealthHandle;
use crate::resources::{Resources, consumer_component_name, dead_letter_component_name};
use crate::retry::{ExponentialBackoff, RetryPolicy};
use crate::supervisor::{Component, ComponentContext};

/// Waits after a failed effect: 0.2 s doubling to 30 s.
const BACKOFF: ExponentialBackoff =
    ExponentialBackoff::new(Duration::from_millis(200), Duration::from_secs(30));
/// How often scheduled replays are looked for.
const SCHEDULER_TICK: Duration = Duration::from_secs(1);
/// How often `bosun_dead_letters_archived` is sampled.
const GAUGE_INTERVAL: Duration = Duration::from_secs(15);

/// The archive a processor writes to.
#[derive(Clone)]
pub struct ArchiveTarget {
    pub pool: PgPool,
    pub table: String,
    /// Apply the table's DDL before the first dead letter is taken.
    pub migrate: bool,
}

/// Applies one processor's rules to its dead letters.
pub struct DeadLetterHandler {
    /// The `[dead_letters.NAME]` name: the `processor` label and archive column.
    name: String,
    config: DeadLetterConfig,
    kind: BrokerKind,
    archive: Option<ArchiveTarget>,
    publishers: Arc<dyn PublisherSource>,
    /// A replay forgets its key in the inbox of the consumer it goes to.
    inboxes: crate::consumers::ReplayInboxes,
    /// The running component's readiness entry: effects that fail make it not ready until
    /// one succeeds.
    health: HealthHandle,
    /// The running component's shutdown: a dead letter whose effect keeps failing is
    /// released (handed back unsettled) once it fires, instead of holding up the drain.
    shutdown: CancellationToken,
}

impl DeadLetterHandler {
    /// The handler of one run of the processor `name`, reporting into that run's `health` and
    /// stopping its retries when `shutdown` fires.
    pub fn new(
        name: impl Into<String>,
        config: DeadLetterConfig,
        kind: BrokerKind,
        archive: Option<ArchiveTarget>,
        publishers: Arc<dyn PublisherSource>,
        ctx: &ComponentContext,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            kind,
            archive,
            publishers,
            inboxes: Default::default(),
            health: ctx.health.clone(),
            shutdown: ctx.shutdown.clone(),
        }
    }

    /// The inboxes its replays forget their keys in.
    pub fn with_inboxes(mut self, inboxes: crate::consumers::ReplayInboxes) -> Self {
        self.inboxes = inboxes;
        self
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
            details: Details {
                processor: self.name.clone(),
                broker: self.config.source.clone(),
                source: letter.source.clone(),
                source_entry_id: letter.entry_id.clone(),
                message_id: letter.message_id.clone(),
                correlation_id: letter.correlation_id.clone(),
                original: letter.original.clone(),
                original_exchange: letter.original_exchange.clone(),
                routing_key: letter.routing_key.clone(),
                content_type: letter.content_type.clone(),
                timestamp_ms: letter.timestamp_ms.and_then(|t| i64::try_from(t).ok()),
                failure: Failure {
                    group_key: group_key(&letter.error_kind, error.as_deref().unwrap_or("")),
                    error_kind: letter.error_kind.clone(),
                    error,
                    reason: letter.reason.clone(),
                    attempts: i32::try_from(letter.attempts).unwrap_or(i32::MAX),
                    replay_count: i32::try_from(letter.replay_count).unwrap_or(i32::MAX),
                },
                first_failed_at: letter.first_failed_at,
            },
            headers: headers_to_json(&letter.headers),
            body: letter.body.to_vec(),
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
                let copy = replay_copy(self.kind, letter, &self.config.replay_to)?;
                // The consumer it goes back to must not find it done.
                self.inboxes.forget(&copy).await?;
                self.publish(&copy).await?;
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
                self.archive(letter, status::ARCHIVED, note.clone(), None)
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

    /// What to do instead when `decision` failed with an error that will never pass: a replay
    /// or forward is archived with its error, or, without an archive, forwarded to the
    /// configured fallback; `None` when there is nothing left to try.
    fn instead(&self, decision: &Decision, error: &DeadLetterError) -> Option<Decision> {
        let fallback = self.config.fallback.as_ref();
        match decision {
            Decision::Replay { .. } | Decision::Forward { .. } if self.archive.is_some() => {
                Some(Decision::Archive {
                    note: Some(format!("{} failed: {error}", decision.label())),
                })
            }
            Decision::Forward { target, .. } if fallback.is_some_and(|f| f == target) => None,
            Decision::Replay { .. } | Decision::Forward { .. } | Decision::Drop => {
                fallback.map(|target| Decision::Forward {
                    target: target.clone(),
                    routing_key: None,
                })
            }
            Decision::Archive { .. } => {
                fallback
                    .filter(|_| self.archive.is_none())
                    .map(|target| Decision::Forward {
                        target: target.clone(),
                        routing_key: None,
                    })
            }
        }
    }

    /// The processor's own input that it cannot read as a dead letter (the consumer could
    /// not decode it): kept in the archive as kind `invalid`, body as bytes and every field
    /// as a header; no rule applies to it.
    fn undecodable(letter: &mut DeadLetter, reason: &str) -> Decision {
        letter.headers.remove(UNDECODABLE);
        letter.error_kind = "invalid".into();
        letter.error = Some(format!("unusable dead letter: {reason}"));
        Decision::Archive {
            note: Some("the dead-letter processor could not read this entry".into()),
        }
    }

    /// A dead letter with nowhere to go stays unsettled at its source, counted and logged:
    /// a redis entry is released (it stays pending and is read again after `claim_idle`); an
    /// amqp delivery is held and tried again every `BACKOFF.max`, since handing it back
    /// would redeliver it at once.
    fn held(&self, cause: &'static str, error: &str) -> Option<Outcome> {
        metrics::counter!(metric::HELD, "processor" => self.name.clone(), "cause" => cause)
            .increment(1);
        tracing::error!(processor = %self.name, cause, error = %error, "dead letter has nowhere to go; it stays unsettled at its source");
        self.health
            .set_not_ready(format!("a dead letter has nowhere to go: {error}"));
        match self.kind {
            BrokerKind::Redis => Some(Outcome::Release {
                reason: format!("nowhere to go: {error}"),
            }),
            BrokerKind::Amqp => None,
        }
    }
}

#[async_trait]
impl Handler for DeadLetterHandler {
    fn takes_undecodable(&self) -> bool {
        true
    }

    async fn handle(&self, message: &Message) -> Outcome {
        // A panic here must not reach the consumer, which would retry and then dead-letter
        // the dead letter onwards: the processor's input has nowhere further to go.
        match AssertUnwindSafe(self.process(message)).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(_) => {
                let error = "the dead-letter processor panicked on this dead letter";
                match self.held("panic", error) {
                    Some(outcome) => outcome,
                    None => {
                        self.wait(BACKOFF.max).await;
                        Outcome::Release {
                            reason: error.into(),
                        }
                    }
                }
            }
        }
    }
}

impl DeadLetterHandler {
    async fn process(&self, message: &Message) -> Outcome {
        let mut letter = DeadLetter::from_message(message);
        let undecodable = message.headers.get(UNDECODABLE).and_then(|v| v.as_text());
        let (rule, mut decision) = match &undecodable {
            Some(reason) => (None, Self::undecodable(&mut letter, reason)),
            None => decide(&self.config, &letter),
        };
        if undecodable.is_some()
            && self.archive.is_none()
            && let Some(outcome) = self.held(
                "undecodable",
                "the entry cannot be read as a dead letter and there is no archive",
            )
        {
            return outcome;
        }
        let mut backoff = BACKOFF;
        loop {
            match self.apply(&letter, &decision).await {
                Ok(()) => {
                    self.health.set_ready();
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
                Err(e) if !e.is_transient() => {
                    // The same effect fails the same way every time: never a hot loop.
                    if let Some(next) = self.instead(&decision, &e) {
                        tracing::warn!(processor = %self.name, action = decision.label(), instead = next.label(), error = %e, "action failed for good; doing the fallback instead");
                        decision = next;
                        continue;
                    }
                    if let Some(outcome) = self.held("refused", &e.to_string()) {
                        return outcome;
                    }
                    if self.wait(BACKOFF.max).await {
                        return Outcome::Release {
                            reason: format!("cannot {} dead letters: {e}", decision.label()),
                        };
                    }
                }
                Err(e) => {
                    let reason = format!("cannot {} dead letters: {e}", decision.label());
                    let delay = backoff.failed();
                    tracing::warn!(processor = %self.name, action = decision.label(), error = %e, retry_in_ms = delay.as_millis() as u64, "dead letter kept unsettled; retrying");
                    self.health.set_not_ready(reason.clone());
                    if self.wait(delay).await {
                        return Outcome::Release { reason };
                    }
                }
            }
        }
    }

    /// Sleeps `wait`; `true` when the processor is stopping instead: the dead letter is then
    /// handed back rather than holding up the drain (it stays at its source and is processed
    /// after the restart).
    async fn wait(&self, wait: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.shutdown.cancelled() => return true,
        }
        false
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

/// Dead letters handled at once per processor: dead letters are few, and each one's effect
/// is a database insert or a confirmed publish.
const CONCURRENCY: usize = 16;

/// A running `[dead_letters.NAME]`: the consumer that reads its queue or stream with the
/// rules handler, and the scheduler beside it.
pub struct DeadLetterProcessor {
    /// The `[dead_letters.NAME]` name.
    name: String,
    /// `dead_letter:NAME`: the consumer's name, metrics label and connection name.
    component: String,
    /// The configuration the processor was built from: its source broker and service name.
    config: Arc<config::Config>,
    dl: DeadLetterConfig,
    kind: BrokerKind,
    /// The consumer settings its source is read with ([`consumer_config`]).
    consumer: ConsumerConfig,
    publishers: Arc<dyn PublisherSource>,
    ops: Ops,
    archive: Option<ArchiveTarget>,
    /// amqp: the dead-letter queue and the consumers of this process that declare it; the
    /// processor starts once one of them has.
    declared_by: Option<(String, Vec<String>)>,
}

/// How long a processor waits for the consumers that declare its queue before it starts
/// anyway (a consumer that cannot start reports why itself).
const DECLARED_WAIT: Duration = Duration::from_secs(60);

/// Waits until one of `consumers` (components of this process that declare the processor's
/// dead-letter queue) is ready, so that on a fresh broker the processor does not race them
/// to a queue that does not exist yet (a failed passive check closes the channel and the
/// processor reconnects). Returns `false` when stopped meanwhile.
async fn wait_for_declaring_consumers(
    processor: &str,
    queue: &str,
    consumers: &[String],
    ctx: &ComponentContext,
) -> bool {
    let deadline = tokio::time::Instant::now() + DECLARED_WAIT;
    let mut logged = false;
    loop {
        let states: Vec<Option<bool>> = consumers.iter().map(|c| ctx.health.is_ready(c)).collect();
        // Ready, or not running in this process at all (removed by a reload).
        if states.contains(&Some(true)) || states.iter().all(Option::is_none) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(processor = %processor, queue = %queue, "the consumers that declare the dead-letter queue are not ready yet; starting anyway");
            return true;
        }
        if !logged {
            tracing::info!(processor = %processor, queue = %queue, consumers = %consumers.join(", "), "waiting for the consumer that declares the dead-letter queue");
            ctx.health.set_not_ready(format!(
                "waiting for {} to declare dead-letter queue `{queue}`",
                consumers.join(", ")
            ));
            logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = ctx.shutdown.cancelled() => return false,
        }
    }
}

/// The components of `config` that declare `queue` on `broker`: the amqp consumers that
/// dead-letter into it.
fn declaring_consumers(config: &config::Config, broker: &str, queue: &str) -> Vec<String> {
    config
        .consumers
        .iter()
        .filter(|(_, c)| c.source == broker)
        .filter(|(_, c)| {
            matches!(&c.kind, ConsumerKind::Amqp(amqp)
                if amqp.declare && matches!(&amqp.dead_letter, config::AmqpDeadLetter::Queue(q) if q == queue))
        })
        .map(|(name, _)| consumer_component_name(name))
        .collect()
}

/// Builds the processor `[dead_letters.name]` from shared resources.
pub fn build(
    name: &str,
    dl: &DeadLetterConfig,
    resources: &Resources,
) -> anyhow::Result<Arc<dyn Component>> {
    let config = &resources.config;
    let component = dead_letter_component_name(name);
    let broker = config
        .brokers
        .get(&dl.source)
        .ok_or_else(|| anyhow::anyhow!("broker `{}` is not defined", dl.source))?;
    let archive = match &dl.archive {
        Some(db) => Some(ArchiveTarget {
            pool: resources.database(db)?,
            table: dl.table.clone(),
            migrate: dl.migrate,
        }),
        None => None,
    };
    let publishers: Arc<dyn PublisherSource> = Arc::new(super::publishers::Publishers::new(
        writing_config(config, dl),
        component.clone(),
    ));
    let consumer = consumer_config(dl, &component);
    let kind = BrokerKind::of(broker);
    if !matches!(
        (&consumer.kind, broker),
        (ConsumerKind::Amqp(_), BrokerConfig::Amqp(_))
            | (ConsumerKind::Redis(_), BrokerConfig::Redis(_))
    ) {
        anyhow::bail!(
            "broker `{}` is {}, not the kind the processor's source needs",
            dl.source,
            broker.kind()
        );
    }
    Ok(Arc::new(DeadLetterProcessor {
        name: name.to_owned(),
        component,
        config: config.clone(),
        dl: dl.clone(),
        kind,
        consumer,
        publishers: publishers.clone(),
        ops: Ops::new(config.clone(), resources.databases.clone(), publishers),
        archive,
        declared_by: match &dl.from {
            DeadLetterSource::Queue(queue) => {
                let consumers = declaring_consumers(config, &dl.source, queue);
                (!consumers.is_empty()).then(|| (queue.clone(), consumers))
            }
            DeadLetterSource::Stream { .. } => None,
        },
    }))
}

/// The configuration a processor's publishers are built from: on a redis source, replays
/// and forwards are written in the entry format the processor reads, so a replay of a
/// dead-letter copy is the entry its producer wrote.
fn writing_config(config: &Arc<Config>, dl: &DeadLetterConfig) -> Arc<Config> {
    let written = config
        .brokers
        .get(&dl.source)
        .and_then(|broker| super::publishers::written_by(&dl.source, broker, dl));
    match written {
        Some(broker) => {
            let mut config = Config::clone(config);
            config.brokers.insert(dl.source.clone(), broker);
            Arc::new(config)
        }
        None => config.clone(),
    }
}

/// The consumer settings a processor reads its source with. The handler never asks for a
/// retry or a dead-letter copy (it holds a dead letter until its effect is durable), so the
/// retry policy is a single attempt and the delivery limit is off: a dead letter is never
/// moved on because it was delivered often.
fn consumer_config(dl: &DeadLetterConfig, component: &str) -> ConsumerConfig {
    let kind = match &dl.from {
        DeadLetterSource::Stream {
            stream,
            group,
            format,
        } => ConsumerKind::Redis(RedisConsumerConfig {
            stream: stream.clone(),
            group: group.clone(),
            consumer: config::default_consumer_name(),
            start_id: "0".into(),
            batch: CONCURRENCY * 2,
            block: Duration::from_secs(5),
            // Longer than a held dead letter usually waits for a database to come back.
            claim_idle: Duration::from_secs(300),
            claim_interval: Duration::from_secs(60),
            max_deliveries: u32::MAX,
            // Not used by the processor: the handler takes undecodable entries itself and
            // never asks for a retry or a dead-letter copy. It must not be the processor's
            // own stream: an entry refused before it reaches the handler would be copied
            // back into it and refused again, for ever.
            dead_letter_stream: format!("{stream}:dlq"),
            limits: Default::default(),
            forget_idle: Duration::from_secs(86_400),
            trim: Default::default(),
            format: Box::new(format.clone()),
        }),
        DeadLetterSource::Queue(queue) => amqp_kind(queue),
    };
    ConsumerConfig {
        source: dl.source.clone(),
        handler: component.to_owned(),
        concurrency: CONCURRENCY,
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        trace: Default::default(),
        kind,
        inbox: None,
        ordering: None,
        single_active: false,
    }
}

#[async_trait]
impl Component for DeadLetterProcessor {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()> {
        // The handler and its consumer are made for each run, with the run's readiness entry
        // and shutdown.
        let handler = Arc::new(
            DeadLetterHandler::new(
                &self.name,
                self.dl.clone(),
                self.kind,
                self.archive.clone(),
                self.publishers.clone(),
                &ctx,
            )
            .with_inboxes(self.ops.inboxes()),
        );
        let consumer = crate::consumers::build(ConsumerSpec {
            name: &self.component,
            component: &self.component,
            consumer: &self.consumer,
            config: &self.config,
            handler,
            // Its input has nowhere further to go: no breaker or pause stops it.
            gate: crate::flow_control::Gate::open(),
            bounded_handler: false,
            inbox: None,
        })?;
        if let Some(target) = &self.archive {
            if target.migrate
                && let Err(e) = archive::migrate(&target.pool, &target.table).await
            {
                ctx.health
                    .set_not_ready(format!("cannot migrate the archive table: {e}"));
                anyhow::bail!("cannot migrate archive table `{}`: {e}", target.table);
            }
            let problem = match archive::exists(&target.pool, &target.table).await {
                Ok(true) => match archive::up_to_date(&target.pool, &target.table).await {
                    Ok(true) => None,
                    Ok(false) => Some(format!(
                        "archive table `{}` was created by an earlier version; update it with `bosun dlq migrate`",
                        target.table
                    )),
                    Err(e) => Some(format!("cannot reach the archive database: {e}")),
                },
                Ok(false) => Some(format!(
                    "archive table `{}` does not exist; create it with `bosun dlq migrate`",
                    target.table
                )),
                Err(e) => Some(format!("cannot reach the archive database: {e}")),
            };
            if let Some(problem) = problem {
                ctx.health.set_not_ready(problem.clone());
                anyhow::bail!(problem);
            }
        }
        if let Some((queue, consumers)) = &self.declared_by
            && !wait_for_declaring_consumers(&self.name, queue, consumers, &ctx).await
        {
            return Ok(());
        }
        let stop = ctx.shutdown.child_token();
        let background = tokio::spawn(background(
            self.name.clone(),
            self.ops.clone(),
            self.archive.clone(),
            stop.clone(),
        ));
        let result = consumer.run(ctx).await;
        stop.cancel();
        let _ = background.await;
        result
    }
}

/// The amqp consumer settings for a dead-letter queue. The queue is only checked, never
/// declared: the consumer that dead-letters into it declared it with its own arguments, and
/// declaring it again with others would fail (PRECONDITION_FAILED). A single attempt means no
/// retry tiers; the consumer's own dead-letter target is the queue itself, which exists, and
/// is used only if the handler panicked (it never answers `DeadLetter`).
fn amqp_kind(queue: &str) -> ConsumerKind {
    ConsumerKind::Amqp(config::AmqpConsumerConfig {
        queue: queue.to_owned(),
        queue_type: config::QueueType::Classic,
        bindings: Vec::new(),
        declare: false,
        prefetch: (CONCURRENCY * 2) as u16,
        dead_letter: config::AmqpDeadLetter::Queue(queue.to_owned()),
        limits: config::DeliveryLimits::unchecked(),
        attempt_header: None,
        backlog_interval: config::DEFAULT_BACKLOG_INTERVAL,
    })
}
