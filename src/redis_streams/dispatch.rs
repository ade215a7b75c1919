//! What a consumer's tasks share: the fixed state ([`Inner`]), the dispatcher that hands
//! entries to handler tasks and keeps the in-flight set, the handling of one entry into an
//! [`Action`], and the reply parsing and claims the reader and the claimer both use.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{Counter, Gauge};
use redis::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fields::{self, Entry, Failure};
use super::scripts::Scripts;
use super::{Ops, RedisStreamsError};
use crate::config::{ConsumerOrdering, LaneRetry, RedisBrokerConfig, RedisConsumerConfig};
use crate::disposition::{self, Decision, Panicked};
use crate::flow_control::{Admission, Admit, Gate};
use crate::handler::{FailureKind, Handler, Source};
use crate::inbox::{self, Finish, Inbox, Ticket};
use crate::ordering::{self, Held, Lanes, Place};
use crate::retry::{RetryPolicy, saturating_millis};
use crate::trace_context::{self, System, TraceMode};
use tracing::Instrument as _;

/// Handler capacity is taken this many permits at a time.
const PERMIT_CHUNK: usize = 64;
/// Most settlements sent in one pipeline.
pub(crate) const SETTLE_BATCH: usize = 1000;
/// How long a consumer-name lock lives without renewal: how long a restarted process waits
/// for the name after its predecessor was killed.
const LOCK_TTL: Duration = Duration::from_secs(10);

/// Everything the consumer's tasks share; fixed for the component's lifetime.
pub(crate) struct Inner {
    /// The `[consumers.NAME]` name: the `consumer` label of the metrics.
    pub(crate) name: String,
    /// The `[brokers.NAME]` name: the `broker` label of the connection metrics.
    pub(crate) broker_name: String,
    pub(crate) broker: RedisBrokerConfig,
    pub(crate) config: RedisConsumerConfig,
    pub(crate) retry: RetryPolicy,
    /// What each entry's span does with the producer's trace context.
    pub(crate) trace: TraceMode,
    /// Handlers in flight at once.
    pub(crate) concurrency: usize,
    pub(crate) handler: Arc<dyn Handler>,
    /// Asked before each entry's handler starts: breaker, rate limit, pauses.
    pub(crate) gate: Gate,
    /// Where each entry's key is claimed before its handler runs, if anywhere.
    pub(crate) inbox: Option<Arc<Inbox>>,
    /// `<stream>:retry` (`{<stream>}:retry` on a cluster): the sorted set of scheduled
    /// retries, score = due time in ms.
    pub(crate) retry_key: String,
    /// The prefix of the name-lock keys (see [`lock_prefix`]).
    pub(crate) lock_prefix: String,
    /// Whether the dead-letter stream is in another slot of a cluster than the stream: its
    /// copies are then written by a command of their own, never in a script with the stream.
    pub(crate) dead_letter_apart: bool,
    pub(crate) scripts: Scripts,
    pub(crate) metrics: Metrics,
    /// The consumer name's lock, held while this process reads under the name.
    pub(crate) name_lock: NameLock,
    /// `ordering = { ... }` and its lanes: one entry per lane at a time.
    pub(crate) ordering: Option<(ConsumerOrdering, Mutex<Lanes>)>,
    /// `single_active`: the lease only whose holder reads.
    pub(crate) lease: Option<super::lease::Lease>,
    /// `bosun_consumer_active` and the standby list.
    pub(crate) activity: crate::activity::Activity,
}

/// The prefix of the name-lock keys of `group` on `stream`, in the stream's slot on a
/// cluster.
pub(crate) fn lock_prefix(stream: &str, group: &str, cluster: bool) -> String {
    crate::config::redis_keys::derived_key(stream, &format!("lock:{group}:"), cluster)
}

/// The lock on a consumer name, so two processes never read under one name.
pub(crate) struct NameLock {
    /// `<stream>:lock:<group>:<consumer>`.
    key: String,
    /// This process's value in the lock: host, pid and a random part.
    token: String,
    /// Whether the lock is held: claims wait while it is not.
    held: AtomicBool,
}

impl NameLock {
    /// The lock on the name `config` reads under, not held yet.
    pub(crate) fn new(config: &RedisConsumerConfig, lock_prefix: &str) -> Self {
        Self {
            key: format!("{lock_prefix}{}", config.consumer),
            token: format!(
                "{}/{}/{}",
                crate::config::default_consumer_name(),
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
            held: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    pub(crate) fn set_held(&self, held: bool) {
        self.held.store(held, Ordering::Relaxed);
    }
}

/// Metric handles, registered once so the per-message path does no label lookups: the ones
/// every consumer records, plus the stream-specific ones.
pub(crate) struct Metrics {
    common: crate::telemetry::ConsumerMetrics,
    pub(crate) pending: Gauge,
    /// `bosun_consumer_backlog`: lag + pending + scheduled retries, sampled by the claimer.
    pub(crate) backlog: Gauge,
    pub(crate) claimed: Counter,
    /// Pending entries whose stream entry was deleted: nothing left to handle.
    pub(crate) deleted: Counter,
    /// Scheduled retries that could not be re-added and were dead-lettered as `invalid`.
    pub(crate) invalid_retries: Counter,
}

impl std::ops::Deref for Metrics {
    type Target = crate::telemetry::ConsumerMetrics;
    fn deref(&self) -> &Self::Target {
        &self.common
    }
}

impl Metrics {
    pub(crate) fn new(consumer: &str, broker: &str, handler: &str) -> Self {
        let c = consumer.to_owned();
        Self {
            common: crate::telemetry::ConsumerMetrics::new(consumer, broker, handler),
            pending: metrics::gauge!("bosun_redis_pending_messages", "consumer" => c.clone()),
            backlog: crate::telemetry::backlog_gauge(consumer),
            claimed: metrics::counter!("bosun_redis_claimed_total", "consumer" => c.clone()),
            deleted: metrics::counter!("bosun_redis_deleted_entries_total", "consumer" => c.clone()),
            invalid_retries: metrics::counter!("bosun_redis_invalid_retries_total", "consumer" => c),
        }
    }
}

/// How one entry is settled at its source.
pub(crate) enum Action {
    Ack,
    Drop,
    /// Re-added with these fields after `delay_ms`.
    Retry {
        fields: Vec<(Bytes, Bytes)>,
        delay_ms: u64,
    },
    /// Copied to the dead-letter stream with these fields.
    DeadLetter {
        fields: Vec<(Bytes, Bytes)>,
    },
    /// Left pending, unsettled, its delivery not counted: read again at the next start, or
    /// claimed by another consumer.
    Release,
}

impl Action {
    /// `bosun.outcome` on the entry's span.
    fn label(&self) -> &'static str {
        match self {
            Action::Ack => "ack",
            Action::Drop => "drop",
            Action::Retry { .. } => "retry",
            Action::DeadLetter { .. } => "dead_letter",
            Action::Release => "release",
        }
    }
}

pub(crate) struct Settlement {
    pub(crate) id: String,
    pub(crate) action: Action,
    /// The inbox claim of a dead letter, finished once its copy is written.
    pub(crate) ticket: Option<Ticket>,
    /// The PRODUCER span of a retry or dead-letter copy (none for the other actions, and
    /// while tracing is off): it ends when the settler has written the batch carrying it.
    pub(crate) span: tracing::Span,
}

/// The in-flight set: entry ids read and not yet settled.
#[derive(Clone, Default)]
pub(crate) struct Inflight(Arc<Mutex<HashSet<u128>>>);

/// An entry id (`<ms>-<seq>`) as one number: the in-flight set's key, without an allocation
/// per entry. Ids that do not parse (none do, from Redis) share key 0 and are merely
/// under-protected, never lost.
pub(crate) fn id_key(id: &str) -> u128 {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let ms: u64 = ms.parse().unwrap_or(0);
    let seq: u64 = seq.parse().unwrap_or(0);
    (u128::from(ms) << 64) | u128::from(seq)
}

impl Inflight {
    pub(crate) fn lock(&self) -> MutexGuard<'_, HashSet<u128>> {
        // Every update is a single insert or remove: a panic elsewhere cannot leave the set
        // half-written, so a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands entries to handler tasks, at most `concurrency` at once.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    pub(crate) inner: Arc<Inner>,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) tracker: TaskTracker,
    pub(crate) settle: mpsc::Sender<Settlement>,
    pub(crate) inflight: Inflight,
    /// The consumer's shutdown: entries still waiting for their lane are handed back.
    pub(crate) shutdown: CancellationToken,
}

/// An entry to handle, with how often it was delivered (from XPENDING; 1 for a fresh read).
pub(crate) struct Delivery {
    pub(crate) entry: Entry,
    pub(crate) deliveries: u64,
}

impl Dispatcher {
    /// Marks deliveries in flight and drops those already in flight here. Synchronous, so a
    /// read that follows cannot admit the same entry again.
    pub(crate) fn admit(&self, deliveries: Vec<Delivery>) -> Vec<Delivery> {
        let fresh: Vec<Delivery> = {
            let mut inflight = self.inflight.lock();
            deliveries
                .into_iter()
                .filter(|d| inflight.insert(id_key(&d.entry.id)))
                .collect()
        };
        self.inner.metrics.received.increment(fresh.len() as u64);
        fresh
    }

    /// Starts a handler task per admitted delivery, waiting for free capacity and for the
    /// gate. Once the gate says stop, the deliveries not started are released: they stay
    /// pending, their delivery not counted, and are read again when the gate opens.
    pub(crate) async fn start(&self, fresh: Vec<Delivery>, redelivered: bool) {
        let mut left = fresh.len();
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut stopped = false;
        for delivery in fresh {
            left -= 1;
            if stopped {
                self.release(delivery).await;
                continue;
            }
            // Capacity is taken in chunks: one wake-up per chunk instead of one per entry.
            if held.as_ref().is_none_or(|p| p.num_permits() == 0) {
                let want = (left + 1)
                    .min(PERMIT_CHUNK)
                    .min(self.inner.concurrency)
                    .max(1);
                match self.permits.clone().acquire_many_owned(want as u32).await {
                    Ok(permits) => held = Some(permits),
                    Err(_) => return,
                }
            }
            let Some(permit) = held.as_mut().and_then(|p| p.split(1)) else {
                return;
            };
            let admission = match self.inner.gate.admit().await {
                Admit::Go(admission) => admission,
                Admit::Stop(reason) => {
                    tracing::info!(consumer = %self.inner.name, %reason, "not starting handlers; releasing what was read");
                    stopped = true;
                    drop(permit);
                    self.release(delivery).await;
                    continue;
                }
            };
            let place = self.place(&delivery, redelivered);
            let inner = self.inner.clone();
            let settle = self.settle.clone();
            self.tracker.spawn(async move {
                inner.metrics.in_flight.increment(1.0);
                let Delivery { entry, deliveries } = delivery;
                let (action, ticket, span) = inner
                    .process(&entry, deliveries, redelivered, admission, place)
                    .await;
                let id = entry.id;
                inner.metrics.in_flight.decrement(1.0);
                // The permit is held until the settlement is queued, so a slow settler slows
                // reading instead of piling up finished work.
                let _ = settle
                    .send(Settlement {
                        id,
                        action,
                        ticket,
                        span,
                    })
                    .await;
                drop(permit);
            });
        }
    }

    /// Where an entry goes in the lanes (`ordering`). An entry that will be dead-lettered
    /// before its handler anyway (over its bounds, undecodable) takes no lane.
    fn place(&self, delivery: &Delivery, redelivered: bool) -> Place {
        let Some((ordering, lanes)) = self.inner.ordering.as_ref() else {
            return Place::default();
        };
        let entry = &delivery.entry;
        let config = &self.inner.config;
        if fields::over_limits(entry, &config.limits).is_some() {
            return Place::default();
        }
        let decoded = super::formats::decode(
            entry,
            &config.format,
            config.limits.max_fields,
            self.inner.source(entry),
            redelivered || delivery.deliveries > 1,
        );
        let Ok(message) = decoded else {
            return Place::default();
        };
        let key = ordering::key_of(
            &ordering.key,
            message.message_id.as_deref(),
            None,
            &message.headers,
            &message.body,
        );
        match key {
            Ok(key) => Place {
                turn: Some(
                    lanes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enter(key.as_bytes()),
                ),
                bad_key: None,
                hold: ordering.retry == LaneRetry::Hold,
                shutdown: self.shutdown.clone(),
            },
            Err(reason) => Place {
                bad_key: Some(reason),
                ..Place::default()
            },
        }
    }

    /// Hands a delivery back unstarted.
    async fn release(&self, delivery: Delivery) {
        let _ = self
            .settle
            .send(Settlement {
                id: delivery.entry.id,
                action: Action::Release,
                ticket: None,
                span: tracing::Span::none(),
            })
            .await;
    }

    /// Marks the ids not in flight here as in flight and returns them: the ones to claim.
    /// Reserved before the claim, so no other path can hand them out meanwhile.
    pub(crate) fn reserve(&self, ids: Vec<String>) -> Vec<String> {
        let mut inflight = self.inflight.lock();
        ids.into_iter()
            .filter(|id| inflight.insert(id_key(id)))
            .collect()
    }

    /// Gives back reserved ids that were not claimed after all (settled meanwhile, deleted,
    /// or taken by another consumer).
    pub(crate) fn unreserve<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut inflight = self.inflight.lock();
        for id in ids {
            inflight.remove(&id_key(id));
        }
    }

    /// Starts handlers for deliveries already reserved with [`reserve`](Self::reserve).
    pub(crate) async fn dispatch_reserved(&self, deliveries: Vec<Delivery>) {
        self.inner
            .metrics
            .received
            .increment(deliveries.len() as u64);
        self.start(deliveries, true).await;
    }
}

/// What deciding an entry leaves beside its action: the inbox claim to finish once the
/// outcome is durable, and the PRODUCER span of the copy it writes.
struct Kept {
    ticket: Option<Ticket>,
    copy_span: tracing::Span,
}

impl Inner {
    /// Runs the handler on one entry and decides how to settle it; a dead letter's inbox
    /// claim comes with it, to be finished once the copy is written, and a copy's PRODUCER
    /// span, to be ended once it is.
    async fn process(
        &self,
        entry: &Entry,
        deliveries: u64,
        redelivered: bool,
        admission: Admission,
        mut place: Place,
    ) -> (Action, Option<Ticket>, tracing::Span) {
        // After the entry before it in its lane, if it has one; at shutdown, back unstarted.
        if !place.wait().await {
            return (Action::Release, None, tracing::Span::none());
        }
        let mut kept = Kept {
            ticket: None,
            copy_span: tracing::Span::none(),
        };
        let action = self
            .decide(
                entry,
                deliveries,
                redelivered,
                admission,
                &mut place,
                &mut kept,
            )
            .await;
        let Kept {
            ticket,
            copy_span: mut span,
        } = kept;
        // A copy decided before the handler ran (an invalid entry, one delivered too often)
        // has no CONSUMER span: its PRODUCER span starts a trace.
        if span.is_none() {
            span = self.copy_span(&action, None, true);
        }
        let Some(held) = ticket else {
            return (action, None, span);
        };
        match &action {
            Action::DeadLetter { .. } => (action, Some(held), span),
            // Before the XACK: a crash in between finds the key done on redelivery.
            Action::Ack | Action::Drop => {
                held.finish(Finish::Done).await;
                (action, None, span)
            }
            Action::Retry { .. } | Action::Release => {
                held.finish(Finish::Release).await;
                (action, None, span)
            }
        }
    }

    /// The PRODUCER span of `action`'s copy (`send <stream>:retry`, `send <stream>:dlq`), a
    /// child of the current span (the entry's CONSUMER span) unless `root`; none for an
    /// action that writes no copy.
    fn copy_span(&self, action: &Action, message_id: Option<&str>, root: bool) -> tracing::Span {
        let destination = match action {
            Action::Retry { .. } => &self.retry_key,
            Action::DeadLetter { .. } => &self.config.dead_letter_stream,
            Action::Ack | Action::Drop | Action::Release => return tracing::Span::none(),
        };
        trace_context::producer_span(trace_context::Produced {
            system: System::Redis,
            destination,
            message_id,
            parent: None,
            link: None,
            root,
        })
    }

    /// The entry's action; its inbox claim and its copy's PRODUCER span are left in `kept`.
    async fn decide(
        &self,
        entry: &Entry,
        deliveries: u64,
        redelivered: bool,
        admission: Admission,
        place: &mut Place,
        kept: &mut Kept,
    ) -> Action {
        let source = self.source(entry);
        let over_limits = fields::over_limits(entry, &self.config.limits);
        if let Some(reason) = &over_limits
            && !self.handler.takes_undecodable()
        {
            tracing::warn!(consumer = %self.name, entry_id = %entry.id, %reason, "dead-lettering an entry over its bounds");
            let failure = self.failure(deliveries, 1, reason, FailureKind::Invalid);
            return Action::DeadLetter {
                fields: fields::oversized_fields(entry, &failure),
            };
        }
        let max = u64::from(self.config.max_deliveries);
        if deliveries > max {
            let error = format!(
                "delivered {deliveries} times without being settled (max_deliveries {max})"
            );
            tracing::warn!(consumer = %self.name, entry_id = %entry.id, deliveries, "dead-lettering an entry delivered too often");
            return self.dead_letter(entry, deliveries, 1, &error, FailureKind::Exhausted);
        }
        // A handler that takes undecodable input (a dead-letter processor, which archives it)
        // gets an entry over its bounds or one that cannot be decoded as it is: a copy of
        // such an entry into yet another stream would be read by nobody.
        let decoded = match over_limits {
            Some(reason) => Err(reason),
            None => super::formats::decode(
                entry,
                &self.config.format,
                self.config.limits.max_fields,
                source.clone(),
                redelivered || deliveries > 1,
            )
            .map_err(|e| e.0),
        };
        let mut message = match decoded {
            Ok(message) => message,
            Err(reason) if self.handler.takes_undecodable() => {
                tracing::warn!(consumer = %self.name, entry_id = %entry.id, %reason, "handing an undecodable entry to the handler as it is");
                fields::undecodable(entry, &self.config.format, source, &reason)
            }
            Err(reason) => {
                tracing::warn!(consumer = %self.name, entry_id = %entry.id, %reason, "dead-lettering an invalid entry");
                return self.dead_letter(entry, deliveries, 1, &reason, FailureKind::Invalid);
            }
        };
        // No ordering key: it cannot be put in order, so it fails alone.
        if let Some(reason) = place.bad_key.take() {
            tracing::warn!(consumer = %self.name, entry_id = %entry.id, %reason, "dead-lettering an entry without an ordering key");
            return self.dead_letter(entry, deliveries, 1, &reason, FailureKind::Invalid);
        }
        // The gate shut while this entry waited for it: released, unstarted.
        if let Some(reason) = admission.revoked(&self.gate) {
            tracing::debug!(consumer = %self.name, entry_id = %entry.id, %reason, "released unstarted");
            return Action::Release;
        }
        let span = disposition::span(&message, System::Redis, self.trace);
        let mut attempt = message.attempt;
        let admitted = inbox::admit(self.inbox.as_deref(), &mut message)
            .instrument(span.clone())
            .await;
        let decision = match admitted {
            inbox::Admission::Run(claim) => {
                kept.ticket = claim;
                let mut admission = admission;
                loop {
                    let started = Instant::now();
                    let handled = disposition::handle(self.handler.as_ref(), &message)
                        .instrument(span.clone())
                        .await;
                    if let Err(Panicked(text)) = &handled {
                        tracing::error!(consumer = %self.name, entry_id = %entry.id, panic = %text, "handler panicked; treating it as a transient failure");
                    }
                    let outcome = admission.finish(disposition::outcome(handled));
                    self.metrics
                        .duration(&outcome)
                        .record(started.elapsed().as_secs_f64());
                    let decision = disposition::decide(outcome, attempt, &self.retry);
                    // `retry = "hold"`: the retry waits in its lane, pending, and runs again
                    // (the claimer keeps it from going idle while it is in hand).
                    let Decision::Retry {
                        delay,
                        attempt: next,
                        ..
                    } = &decision
                    else {
                        break decision;
                    };
                    if !place.hold {
                        break decision;
                    }
                    match ordering::hold(*delay, &self.gate, &place.shutdown).await {
                        Held::Again(again) => {
                            self.metrics.settled_retry.increment(1);
                            admission = again;
                            attempt = *next;
                            message.attempt = *next;
                        }
                        Held::Stopped(reason) => break Decision::Release { reason },
                        Held::ShuttingDown => break decision,
                    }
                }
            }
            // The handler is not called: the gate's admission goes back unused.
            inbox::Admission::Settle(decision) => decision,
            // Left pending, its delivery not counted: claimed again after `claim_idle`.
            inbox::Admission::Postpone(reason) => Decision::Release { reason },
        };
        let trace = disposition::trace_for_copy(&message, &span);
        let with_trace = |mut fields: Vec<(Bytes, Bytes)>| {
            fields.extend(trace.iter().map(|(name, value)| {
                (
                    Bytes::from_static(name.as_bytes()),
                    Bytes::from(value.clone()),
                )
            }));
            fields
        };
        let action = match decision {
            Decision::Ack => Action::Ack,
            Decision::Drop { reason } => {
                tracing::debug!(consumer = %self.name, entry_id = %entry.id, %reason, "handler dropped the message");
                Action::Drop
            }
            Decision::Retry {
                delay,
                attempt: next,
                reason,
            } => {
                let delay_ms = saturating_millis(delay);
                tracing::debug!(consumer = %self.name, entry_id = %entry.id, attempt, delay_ms, %reason, "retry scheduled");
                Action::Retry {
                    fields: with_trace(fields::retry_fields(
                        entry,
                        &self.config.format.id_field,
                        next,
                        &reason,
                    )),
                    delay_ms,
                }
            }
            Decision::DeadLetter { kind, reason } => {
                tracing::warn!(consumer = %self.name, entry_id = %entry.id, attempt, %reason, kind = %kind, "dead-lettering");
                match self.dead_letter(entry, deliveries, attempt, &reason, kind) {
                    Action::DeadLetter { fields } => Action::DeadLetter {
                        fields: with_trace(fields),
                    },
                    other => other,
                }
            }
            Decision::Release { reason } => {
                tracing::info!(consumer = %self.name, entry_id = %entry.id, %reason, "released unsettled; it stays pending");
                Action::Release
            }
        };
        trace_context::record_outcome(&span, action.label());
        kept.copy_span =
            span.in_scope(|| self.copy_span(&action, message.message_id.as_deref(), false));
        action
    }

    /// Where an entry comes from, as its handler is shown.
    pub(crate) fn source(&self, entry: &Entry) -> Source {
        Source {
            broker: self.broker_name.clone(),
            consumer: self.name.clone(),
            queue: self.config.stream.clone(),
            exchange: None,
            routing_key: None,
            entry_id: Some(entry.id.clone()),
        }
    }

    fn failure<'a>(
        &'a self,
        deliveries: u64,
        attempt: u32,
        error: &'a str,
        kind: FailureKind,
    ) -> Failure<'a> {
        Failure {
            stream: &self.config.stream,
            group: &self.config.group,
            consumer: &self.config.consumer,
            deliveries,
            attempt,
            error,
            kind,
            format: &self.config.format,
        }
    }

    fn dead_letter(
        &self,
        entry: &Entry,
        deliveries: u64,
        attempt: u32,
        error: &str,
        kind: FailureKind,
    ) -> Action {
        let failure = self.failure(deliveries, attempt, error, kind);
        Action::DeadLetter {
            fields: fields::dead_letter_fields(entry, &failure),
        }
    }

    /// Takes or renews the consumer-name lock; false when another live process holds it.
    pub(crate) async fn lock_name(&self, ops: &Ops) -> Result<bool, RedisStreamsError> {
        let cmd = self
            .scripts
            .lock
            .call(&[&self.name_lock.key])
            .arg(&self.name_lock.token)
            .arg(LOCK_TTL.as_millis() as u64)
            .to_owned();
        let held: i64 = self
            .scripts
            .run(ops, &cmd)
            .await
            .map_err(RedisStreamsError::command("name lock"))?;
        Ok(held == 1)
    }

    /// Drops the name lock at a clean stop, so a restart takes the name at once.
    pub(crate) async fn unlock_name(&self, ops: &Ops) {
        let cmd = self
            .scripts
            .unlock
            .call(&[&self.name_lock.key])
            .arg(&self.name_lock.token)
            .to_owned();
        if let Err(e) = self.scripts.run::<i64>(ops, &cmd).await {
            tracing::debug!(consumer = %self.name, error = %e, "cannot drop the consumer-name lock; it expires by itself");
        }
    }

    /// Claims `ids` (reserved in `dispatcher`) for this consumer with XCLAIM, which counts
    /// the delivery and returns only entries still pending; the others are unreserved.
    /// `min_idle` per id keeps an entry another consumer took meanwhile with it.
    pub(crate) async fn claim_reserved(
        &self,
        ops: &Ops,
        dispatcher: &Dispatcher,
        ids: &[(String, u64)],
    ) -> Result<Vec<Entry>, RedisStreamsError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, min_idle) in ids {
            pipe.cmd("XCLAIM")
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&self.config.consumer)
                .arg(*min_idle)
                .arg(id);
        }
        let replies: Vec<Value> = match ops.query_pipe(&pipe).await {
            Ok(replies) => replies,
            Err(e) => {
                dispatcher.unreserve(ids.iter().map(|(id, _)| id.as_str()));
                return Err(RedisStreamsError::command("XCLAIM")(e));
            }
        };
        let mut entries = Vec::with_capacity(ids.len());
        let mut deleted = Vec::new();
        for reply in replies {
            if let Err(e) = parse_entries(reply, &mut entries, &mut deleted, "XCLAIM") {
                tracing::warn!(consumer = %self.name, error = %e, "unreadable XCLAIM reply; those entries stay pending");
            }
        }
        let claimed: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        dispatcher.unreserve(
            ids.iter()
                .map(|(id, _)| id.as_str())
                .filter(|id| !claimed.contains(id)),
        );
        // Servers before 7.0 return deleted entries as nil instead of dropping them. Not
        // fatal: the claimed entries must still be handed out, or they stay reserved.
        if let Err(e) = self.ack_deleted(ops, &deleted).await {
            tracing::debug!(consumer = %self.name, error = %e, "cannot acknowledge deleted entries; they are dropped at the next claim");
        }
        Ok(entries)
    }

    /// One page of this consumer's own pending entries after `after` (exclusive; `None`
    /// from the start): those not in flight here are claimed and returned with their counts.
    /// Returns the id to continue after, or `None` when the list is done.
    pub(crate) async fn own_pending_page(
        &self,
        ops: &Ops,
        dispatcher: &Dispatcher,
        after: Option<&str>,
    ) -> Result<(Vec<Delivery>, Option<String>), RedisStreamsError> {
        let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
        let rows = self
            .own_pending(ops, &start, "+", self.config.batch)
            .await?;
        let Some(last) = rows.last().map(|r| r.0.clone()) else {
            return Ok((Vec::new(), None));
        };
        let order: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let counts: std::collections::HashMap<String, (u64, u64)> = rows
            .into_iter()
            .map(|(id, _, idle, count)| (id, (idle, count)))
            .collect();
        let free = dispatcher.reserve(order);
        let ids: Vec<(String, u64)> = free
            .into_iter()
            .map(|id| {
                let idle = counts.get(&id).map_or(0, |c| c.0);
                (id, idle)
            })
            .collect();
        let entries = self.claim_reserved(ops, dispatcher, &ids).await?;
        let deliveries = entries
            .into_iter()
            .map(|entry| {
                let before = counts.get(&entry.id).map_or(0, |c| c.1);
                Delivery {
                    entry,
                    deliveries: before.saturating_add(1),
                }
            })
            .collect();
        Ok((deliveries, Some(last)))
    }

    /// `XGROUP CREATE ... MKSTREAM`; an existing group is fine.
    pub(crate) async fn ensure_group(&self, ops: &Ops) -> Result<(), RedisStreamsError> {
        let cmd = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.config.start_id)
            .arg("MKSTREAM")
            .to_owned();
        match ops.query::<()>(&cmd).await {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(source) => {
                return Err(RedisStreamsError::Command {
                    command: "XGROUP CREATE",
                    source,
                });
            }
        }
        // A blocking read on an empty stream does not make the consumer known to the group
        // (Redis 7.0): join it now, so it is listed (and kept) from the start.
        let join = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.config.consumer)
            .to_owned();
        ops.query::<i64>(&join)
            .await
            .map_err(RedisStreamsError::command("XGROUP CREATECONSUMER"))?;
        Ok(())
    }

    /// Up to `most` of this consumer's pending entries from `start` to `end`, from the
    /// extended XPENDING: (id, consumer, idle ms, delivery count).
    async fn own_pending(
        &self,
        ops: &Ops,
        start: &str,
        end: &str,
        most: usize,
    ) -> Result<Vec<(String, String, u64, u64)>, RedisStreamsError> {
        let cmd = redis::cmd("XPENDING")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(start)
            .arg(end)
            .arg(most)
            .arg(&self.config.consumer)
            .to_owned();
        ops.query(&cmd)
            .await
            .map_err(RedisStreamsError::command("XPENDING"))
    }

    /// Delivery counts of `entries` (pending for this consumer), from the extended XPENDING.
    pub(crate) async fn delivery_counts(
        &self,
        ops: &Ops,
        entries: &[Entry],
    ) -> Result<std::collections::HashMap<String, u64>, RedisStreamsError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Default::default());
        };
        // The range may also hold this consumer's entries that are in flight or awaiting
        // settlement: leave room for all of them.
        let most = entries.len() + 2 * self.concurrency + SETTLE_BATCH;
        let rows = self.own_pending(ops, &first.id, &last.id, most).await?;
        Ok(rows
            .into_iter()
            .map(|(id, _, _, count)| (id, count))
            .collect())
    }

    /// Pairs entries with their delivery counts; an entry missing from XPENDING counts as
    /// delivered once (it was settled meanwhile, and the script's XACK check will see that).
    pub(crate) async fn with_counts(
        &self,
        ops: &Ops,
        entries: Vec<Entry>,
    ) -> Result<Vec<Delivery>, RedisStreamsError> {
        let counts = self.delivery_counts(ops, &entries).await?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                let deliveries = counts.get(&entry.id).copied().unwrap_or(1);
                Delivery { entry, deliveries }
            })
            .collect())
    }

    /// XACKs entries whose stream entry is gone (they are pending with nothing to handle).
    pub(crate) async fn ack_deleted(
        &self,
        ops: &Ops,
        ids: &[String],
    ) -> Result<(), RedisStreamsError> {
        if ids.is_empty() {
            return Ok(());
        }
        let cmd = redis::cmd("XACK")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(ids)
            .to_owned();
        let _: u64 = ops
            .query(&cmd)
            .await
            .map_err(RedisStreamsError::command("XACK"))?;
        self.metrics.deleted.increment(ids.len() as u64);
        tracing::info!(consumer = %self.name, count = ids.len(), "acknowledged pending entries that were deleted from the stream");
        Ok(())
    }
}

/// Parses an XREADGROUP reply for one stream into entries; entries whose fields are nil
/// (deleted from the stream while pending) come back in the second list.
pub(crate) fn parse_read(reply: Value) -> Result<(Vec<Entry>, Vec<String>), RedisStreamsError> {
    let streams = match reply {
        Value::Nil => return Ok((Vec::new(), Vec::new())),
        Value::Array(streams) => streams.into_iter().filter_map(|s| match s {
            Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
            _ => None,
        }),
        other => return Err(bad("XREADGROUP", &other)),
    };
    let mut entries = Vec::new();
    let mut deleted = Vec::new();
    for list in streams {
        parse_entries(list, &mut entries, &mut deleted, "XREADGROUP")?;
    }
    Ok((entries, deleted))
}

/// Same reply layout under RESP3 (a map keyed by stream).
pub(crate) fn parse_read_any(reply: Value) -> Result<(Vec<Entry>, Vec<String>), RedisStreamsError> {
    match reply {
        Value::Map(pairs) => {
            let mut entries = Vec::new();
            let mut deleted = Vec::new();
            for (_, list) in pairs {
                parse_entries(list, &mut entries, &mut deleted, "XREADGROUP")?;
            }
            Ok((entries, deleted))
        }
        other => parse_read(other),
    }
}

fn bad(command: &'static str, value: &Value) -> RedisStreamsError {
    let detail = format!("{value:?}");
    let detail = crate::text::truncate(&detail, 200).to_owned();
    RedisStreamsError::Reply { command, detail }
}

fn bytes_of(value: Value, command: &'static str) -> Result<Vec<u8>, RedisStreamsError> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        other => Err(bad(command, &other)),
    }
}

/// Parses `[[id, [field, value, ...] | nil], ...]`.
pub(crate) fn parse_entries(
    list: Value,
    entries: &mut Vec<Entry>,
    deleted: &mut Vec<String>,
    command: &'static str,
) -> Result<(), RedisStreamsError> {
    let Value::Array(items) = list else {
        return Err(bad(command, &list));
    };
    entries.reserve(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(bad(command, &item));
        };
        let mut pair = pair.into_iter();
        let (Some(id), Some(body)) = (pair.next(), pair.next()) else {
            return Err(RedisStreamsError::Reply {
                command,
                detail: "entry without id and fields".into(),
            });
        };
        let id =
            String::from_utf8(bytes_of(id, command)?).map_err(|_| RedisStreamsError::Reply {
                command,
                detail: "entry id is not UTF-8".into(),
            })?;
        let values = match body {
            Value::Nil => {
                deleted.push(id);
                continue;
            }
            Value::Array(values) => values,
            Value::Map(map) => map.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            other => return Err(bad(command, &other)),
        };
        let mut fields = Vec::with_capacity(values.len() / 2);
        let mut values = values.into_iter();
        while let (Some(k), Some(v)) = (values.next(), values.next()) {
            fields.push((
                Bytes::from(bytes_of(k, command)?),
                Bytes::from(bytes_of(v, command)?),
            ));
        }
        entries.push(Entry { id, fields });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn read_reply_parses_entries_and_deleted_ids() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![bulk(b"payload"), bulk(b"\xff")]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
            ]),
        ])]);
        let (entries, deleted) = parse_read_any(reply).expect("parse");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(
            entries[0].field("payload").map(|b| b.as_ref()),
            Some(&b"\xff"[..])
        );
        assert_eq!(deleted, vec!["2-0".to_owned()]);
        assert_eq!(parse_read_any(Value::Nil).expect("nil").0.len(), 0);
        assert!(parse_read_any(Value::Int(3)).is_err());
    }

    #[test]
    fn entry_ids_order_as_keys() {
        assert!(id_key("1700000000000-5") < id_key("1700000000000-6"));
        assert!(id_key("1700000000000-99") < id_key("1700000000001-0"));
        assert_ne!(id_key("1-0"), id_key("0-1"));
    }
}
