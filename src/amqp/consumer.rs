//! The amqp consumer: a supervised component that reads one queue, runs the handler on each
//! delivery (up to `concurrency` at once) and settles every delivery only once its outcome is
//! durable.
//!
//! Handlers run as futures polled by the consumer's own task (no spawn per message), so a
//! handler that does heavy CPU work should move it to `tokio::task::spawn_blocking`; a
//! panicking handler is caught and its message retried.
//!
//! One connection per consumer, two channels: one consumes (with `prefetch`), one publishes
//! retry and dead-letter copies in confirm mode. A copy is confirmed before the original is
//! acked. Acks go out with `multiple` for the longest run of settled tags at the head of the
//! window; a tag settled behind a slow one waits, and is acked alone only when the window is
//! full. A head that stays unsettled far longer than the handler may take, while later
//! deliveries settle, is a bug surfaced by ending the session (logged and counted).
//!
//! A copy is built from the original's properties, minus `expiration` (kept as the
//! `bosun-orig-expiration` header, so a dead letter never expires in the dead-letter queue)
//! and `user_id` (the broker closes the channel when it is not the connection's user). Its
//! header frame must fit the negotiated `frame_max`: bosun's own `bosun-error` is cut first,
//! and a message whose own headers are too large is dead-lettered as `invalid` with the
//! headers that fit and a `bosun-headers-truncated` count.
//!
//! A copy the broker refuses (a nack, a return, a channel closed over it) concerns that
//! message alone: the copy channel is opened again and the copy tried again with backoff; a
//! refused retry copy falls back to a dead-letter copy, and a refused dead-letter copy hands
//! the original back to the queue (counted, logged). Only a lost connection ends the
//! session.
//!
//! Retries and replays come back through the default exchange with the queue's name as
//! routing key; handlers and routes are shown the first delivery's exchange and routing key
//! from `bosun-original-*` instead ([`headers::presented`]).
//!
//! A connection or channel loss ends the session: in-flight handlers are dropped (their
//! deliveries come back, marked redelivered), nothing is acked through the dead channel, and
//! the consumer reconnects with backoff and declares its topology again. A queue declared
//! elsewhere with other arguments (PRECONDITION_FAILED) is returned as an error, so the
//! supervisor restarts this consumer alone with its own backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use metrics::{Counter, Gauge};
use tracing::Instrument as _;

use super::publisher::{PERSISTENT, confirm_channel, confirmation, publish_error};
use super::topology::Topology;
use super::{AmqpError, connection, headers, limits, short, soft_error};
use crate::config::{
    AmqpBrokerConfig, AmqpConsumerConfig, ConsumerConfig, DeliveryLimits, LaneRetry, OrderingKey,
};
use crate::disposition::{self, Decision, Panicked};
use crate::flow_control::{Admission, Admit, Gate};
use crate::handler::{FailureKind, Handler, Message, Source};
use crate::inbox::{self, Finish, Inbox};
use crate::ordering::{self, Held, Lanes, Place};
use crate::publish::PublishError;
use crate::retry::{ExponentialBackoff, RetryPolicy};
use crate::supervisor::{Component, ComponentContext};
use crate::trace_context::{self, Produced, System, TraceMode};

/// Waits between reconnects: 0.2 s doubling to 30 s.
const RECONNECT: ExponentialBackoff =
    ExponentialBackoff::new(Duration::from_millis(200), Duration::from_secs(30));
/// A session that lasted this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// How often settled tags are acked when fewer than a batch are waiting.
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound on settled tags waiting for one `multiple` ack.
const MAX_ACK_BATCH: usize = 100;
/// Time allowed to close the channels and connection after a drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries a copy the broker refuses gets before that path is given up for this delivery.
const COPY_TRIES: u32 = 5;
/// Pauses between tries of a refused copy: 250 ms doubling, without jitter (their sum is
/// budgeted in [`COPY_RETRY_BUDGET`]).
const COPY_RETRY: ExponentialBackoff =
    ExponentialBackoff::new(Duration::from_millis(250), Duration::from_secs(2)).without_jitter();
/// All pauses of one copy path: 250 ms + 500 ms + 1 s + 2 s.
const COPY_RETRY_BUDGET: Duration = Duration::from_millis(3750);
/// Handler time assumed when the handler's configuration names no `timeout`.
const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack on top of the handler's time and the copy retries before a head is called stuck.
const STUCK_GRACE: Duration = Duration::from_secs(30);
/// `bosun-error` is cut to this when a copy's headers must shrink to fit one frame.
const TRIMMED_ERROR_BYTES: usize = 256;
/// Bytes of a content header frame besides the properties: the frame header (7), class,
/// weight and body size (12), the frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// Everything a consumer needs, built once and shared by its sessions and handler futures.
struct Inner {
    /// The `[consumers.*]` name: metrics label, `bosun-consumer` header.
    name: String,
    /// The `[brokers.*]` name: metrics label, `Message::source`.
    broker_name: String,
    broker: AmqpBrokerConfig,
    /// Shown by the broker, and how operators find this consumer's connection.
    connection_name: String,
    handler: Arc<dyn Handler>,
    /// Asked before each delivery is taken: the handler's breaker, rate limit and pauses.
    gate: Gate,
    /// Where each message's key is claimed before its handler runs, if anywhere.
    inbox: Option<Arc<Inbox>>,
    /// Handlers in flight at once.
    concurrency: usize,
    /// The configured prefetch, cut to the byte budget (`limits::prefetch`).
    prefetch: u16,
    limits: DeliveryLimits,
    /// With `false`, topology is only checked passively.
    declare: bool,
    retry: RetryPolicy,
    /// What each delivery's span does with the producer's trace context.
    trace: TraceMode,
    /// How often `backlog` is sampled; zero: never.
    backlog_interval: Duration,
    /// `bosun_consumer_backlog`.
    backlog: Gauge,
    /// A header an earlier consumer counted retries in (`attempt_header`), read when
    /// `bosun-attempt` is absent.
    attempt_header: Option<String>,
    topology: Topology,
    /// `bosun-host` on copies.
    host: String,
    metrics: Metrics,
    copy_metrics: CopyMetrics,
    /// A head delivery unsettled for longer than this, while later ones settle, ends the
    /// session: the handler's timeout plus the copy retries plus slack. `None` for a handler
    /// that may hold a message without bound by design (a dead-letter processor's keeps a
    /// letter in hand while its archive is down).
    stuck_after: Option<Duration>,
    /// `ordering = { ... }`: lanes by key, one message per lane at a time.
    ordering: Option<crate::config::ConsumerOrdering>,
    /// `single_active`: the queue has `x-single-active-consumer`.
    single_active: bool,
    /// `bosun_consumer_active` and the standby list.
    activity: crate::activity::Activity,
}

type Metrics = crate::telemetry::ConsumerMetrics;

/// What the amqp consumer counts about its copies and its ack window.
struct CopyMetrics {
    /// A copy the broker refused on every try of a path.
    refused: Counter,
    /// A copy whose `bosun-error` was cut to fit one frame.
    trimmed: Counter,
    /// A message dead-lettered as `invalid` because its headers do not fit one frame.
    oversized: Counter,
    /// A session ended over a head delivery that never settled.
    stuck: Counter,
}

impl CopyMetrics {
    fn new(consumer: &str) -> Self {
        let c = |what: &'static str| metrics::counter!("bosun_amqp_copy_problems_total", "consumer" => consumer.to_owned(), "problem" => what);
        Self {
            refused: c("refused"),
            trimmed: c("trimmed"),
            oversized: c("headers_over_frame_max"),
            stuck: metrics::counter!("bosun_amqp_stuck_deliveries_total", "consumer" => consumer.to_owned()),
        }
    }
}

/// The settled-messages counter for how a delivery was settled.
fn settled_counter(metrics: &Metrics, settled: Settled) -> &metrics::Counter {
    match settled {
        Settled::Ack => &metrics.settled_ack,
        Settled::Retry => &metrics.settled_retry,
        Settled::DeadLetter => &metrics.settled_dead_letter,
        Settled::Drop => &metrics.settled_drop,
        Settled::Release => &metrics.released,
    }
}

/// How a delivery was settled, once its outcome is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Ack,
    Retry,
    DeadLetter,
    Drop,
    /// Handed back unsettled: nacked with requeue, not acked.
    Release,
}

impl Settled {
    /// `bosun.outcome` on the delivery's span.
    fn label(self) -> &'static str {
        match self {
            Settled::Ack => "ack",
            Settled::Retry => "retry",
            Settled::DeadLetter => "dead_letter",
            Settled::Drop => "drop",
            Settled::Release => "release",
        }
    }
}

/// A supervised consumer of one RabbitMQ queue.
pub struct AmqpConsumer {
    inner: Arc<Inner>,
}

/// What a consumer is built from.
pub struct AmqpConsumerSpec<'a> {
    /// The `[consumers.*]` name.
    pub name: &'a str,
    pub consumer: &'a ConsumerConfig,
    pub amqp: &'a AmqpConsumerConfig,
    /// The `[brokers.*]` name and its config.
    pub broker_name: &'a str,
    pub broker: &'a AmqpBrokerConfig,
    pub connection_name: String,
    pub handler: Arc<dyn Handler>,
    pub gate: Gate,
    pub inbox: Option<Arc<Inbox>>,
}

impl AmqpConsumer {
    pub fn new(spec: AmqpConsumerSpec<'_>) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        let limits = spec.amqp.limits;
        let prefetch = limits::prefetch(spec.amqp.prefetch.max(1), &limits);
        if prefetch < spec.amqp.prefetch {
            tracing::info!(consumer = %spec.name, prefetch, configured = spec.amqp.prefetch, max_in_flight_bytes = limits.max_in_flight_bytes, max_message_size = limits.max_message_size, "prefetch cut to fit max_in_flight_bytes");
        }
        let inner = Inner {
            name: spec.name.to_owned(),
            broker_name: spec.broker_name.to_owned(),
            broker: spec.broker.clone(),
            connection_name: spec.connection_name,
            handler: spec.handler,
            gate: spec.gate,
            inbox: spec.inbox,
            concurrency: spec.consumer.concurrency.max(1),
            prefetch,
            limits,
            declare: spec.amqp.declare,
            retry: spec.consumer.retry.clone(),
            trace: spec.consumer.trace,
            backlog_interval: spec.amqp.backlog_interval,
            backlog: crate::telemetry::backlog_gauge(spec.name),
            attempt_header: spec.amqp.attempt_header.clone(),
            topology: Topology::for_consumer(spec.consumer, spec.amqp),
            host,
            metrics: Metrics::new(spec.name, spec.broker_name, &spec.consumer.handler),
            copy_metrics: CopyMetrics::new(spec.name),
            stuck_after: None,
            ordering: spec.consumer.ordering.clone(),
            single_active: spec.consumer.single_active,
            activity: crate::activity::Activity::new(spec.name),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Sets the longest time the handler may take on one message (its `timeout`), from which
    /// the stuck-head limit of the ack window is derived. Without it, no head is called
    /// stuck.
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        // With ordering, a delivery may wait behind its lane or hold its retries in hand for
        // as long as the retry policy allows: no head is called stuck.
        if let Some(inner) = Arc::get_mut(&mut self.inner)
            && inner.ordering.is_none()
        {
            inner.stuck_after = Some(stuck_after(timeout));
        }
        self
    }
}

/// The stuck-head limit for a handler that takes at most `timeout`: a retry path and a
/// dead-letter path of copy retries, and slack.
fn stuck_after(timeout: Duration) -> Duration {
    timeout
        .saturating_add(COPY_RETRY_BUDGET * 2)
        .saturating_add(STUCK_GRACE)
}

/// The longest `timeout` option among the handlers `name` may call: its own, or for a
/// `route` handler the longest of every configured handler (routes reach any of them).
pub fn handler_timeout(config: &crate::config::Config, name: &str) -> Duration {
    let timeout = |options: &toml::Table| {
        options
            .get("timeout")
            .and_then(toml::Value::as_str)
            .and_then(|t| crate::config::parse_duration(t).ok())
    };
    match config.handlers.get(name) {
        Some(h) if h.kind == "route" => config
            .handlers
            .values()
            .filter_map(|h| timeout(&h.options))
            .max()
            .unwrap_or(DEFAULT_HANDLER_TIMEOUT)
            .max(DEFAULT_HANDLER_TIMEOUT),
        Some(h) => timeout(&h.options).unwrap_or(DEFAULT_HANDLER_TIMEOUT),
        None => DEFAULT_HANDLER_TIMEOUT,
    }
}

/// Why a session ended without an error worth restarting the component for.
enum SessionEnd {
    /// Shutdown was requested and every in-flight delivery was settled.
    Drained,
    /// The connection or a channel broke; reconnect.
    Lost(SessionLost),
}

/// Decrements the connected gauge however the session ends (including an abort).
struct ConnectedGuard<'a>(&'a Gauge);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[async_trait]
impl Component for AmqpConsumer {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()> {
        let inner = &self.inner;
        let mut backoff = RECONNECT;
        let mut connected_before = false;
        loop {
            if ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let started = Instant::now();
            let ended = inner.session(&ctx, &mut connected_before).await;
            if started.elapsed() >= HEALTHY_SESSION {
                backoff.reset();
            }
            let delay = backoff.failed();
            let reason = match ended {
                Ok(SessionEnd::Drained) => return Ok(()),
                Ok(SessionEnd::Lost(reason)) => {
                    tracing::warn!(consumer = %inner.name, broker = %inner.broker_name, reason = %reason, "connection lost; reconnecting");
                    format!(
                        "connection to {} lost: {reason}; reconnecting",
                        inner.broker_name
                    )
                }
                Err(e) if e.is_permanent() => {
                    tracing::error!(consumer = %inner.name, queue = %inner.topology.queue, error = %e, "consumer cannot start");
                    ctx.health.set_not_ready(e.to_string());
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::warn!(consumer = %inner.name, broker = %inner.broker_name, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot consume; retrying");
                    format!("{e}; retrying")
                }
            };
            ctx.health.set_not_ready(reason);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ctx.shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

impl Inner {
    /// One connection's life: connect, declare, consume until shutdown or loss.
    async fn session(
        self: &Arc<Self>,
        ctx: &ComponentContext,
        connected_before: &mut bool,
    ) -> Result<SessionEnd, AmqpError> {
        let connection = tokio::select! {
            c = connection::connect_for(&self.broker, &self.broker_name, &self.connection_name) => c?,
            _ = ctx.shutdown.cancelled() => return Ok(SessionEnd::Drained),
        };
        self.metrics.connected.increment(1.0);
        let _connected = ConnectedGuard(&self.metrics.connected);
        if *connected_before {
            self.metrics.reconnects.increment(1);
        }
        *connected_before = true;
        let result = self.consume(ctx, &connection).await;
        self.activity.idle();
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            connection.close(200, "bosun consumer stopping".into()),
        )
        .await;
        result
    }

    async fn consume(
        self: &Arc<Self>,
        ctx: &ComponentContext,
        connection: &Connection,
    ) -> Result<SessionEnd, AmqpError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| AmqpError::channel("cannot open a channel", e))?;
        self.topology.apply(&channel, self.declare).await?;
        let copies = Copies {
            connection,
            channel: tokio::sync::Mutex::new(confirm_channel(connection).await?),
            frame_max: match connection.configuration().frame_max() {
                0 => usize::MAX,
                max => max as usize,
            },
            probe: tokio::sync::Mutex::new(None),
        };
        let mut probing = self.gate.probing();
        let mut consuming = Some(self.subscribe(&channel, 0).await?);
        ctx.health.set_ready();
        tracing::info!(consumer = %self.name, queue = %self.topology.queue, prefetch = self.prefetch, concurrency = self.concurrency, connection = %self.connection_name, "consuming");
        // The broker does not tell a consumer that it became the single active one: it is
        // shown active from its first delivery on.
        let mut delivered = false;
        if self.single_active {
            self.activity.standby(format!(
                "single_active: no delivery yet; the broker delivers queue `{}` to one consumer at a time",
                self.topology.queue
            ));
        } else {
            self.activity.active();
        }

        // Deliveries this session holds unsettled, for the backlog sampler.
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sampler = self.backlog_sampler(connection, held.clone()).await;
        let mut acks = Acks::new(ack_batch(self.prefetch), usize::from(self.prefetch));
        // Declared after `copies`: handler futures borrow it and are dropped first.
        // Handlers run as futures of this task: no spawn or cross-thread wake per message.
        let mut tasks = FuturesUnordered::new();
        let mut flush = tokio::time::interval(ACK_FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The gate's admission for the next delivery: taken before the delivery, so a
        // prefetched delivery never waits for a rate-limit token inside a handler's time.
        let mut admitted: Option<Admission> = None;
        let mut subscriptions: u32 = 0;
        let mut lanes = self.ordering.as_ref().map(|o| Lanes::new(o.lanes));

        let lost = loop {
            tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => break None,
                Some(done) = tasks.next(), if !tasks.is_empty() => {
                    if let Err(reason) = self.finish(done, &mut acks, &channel).await {
                        break Some(reason);
                    }
                    if acks.batch_ready()
                        && let Err(e) = acks.flush(&channel, false).await
                    {
                        break Some(SessionLost(format!("cannot ack: {e}")));
                    }
                    // The probe closed the breaker: subscribe again with the whole prefetch.
                    if probing && !self.gate.probing() && self.gate.stopped().is_none()
                        && let Some((deliveries, tag)) = consuming.take()
                    {
                        drop(admitted.take());
                        if let Err(e) = self.unsubscribe(&channel, deliveries, tag, &mut acks, "the circuit breaker closed; restoring prefetch").await {
                            break Some(e);
                        }
                    }
                }
                admit = self.gate.admit(), if consuming.is_some() && admitted.is_none() && tasks.len() < self.concurrency => match admit {
                    Admit::Go(admission) => admitted = Some(admission),
                    Admit::Stop(reason) => {
                        let Some((deliveries, tag)) = consuming.take() else { continue };
                        if let Err(e) = self.unsubscribe(&channel, deliveries, tag, &mut acks, &reason).await {
                            break Some(e);
                        }
                    }
                },
                _ = self.gate.wait_open(), if consuming.is_none() => {
                    subscriptions += 1;
                    probing = self.gate.probing();
                    consuming = Some(self.subscribe(&channel, subscriptions).await?);
                }
                delivery = next_delivery(&mut consuming), if admitted.is_some() => match delivery {
                    Some(Ok(delivery)) => {
                        if !delivered {
                            delivered = true;
                            self.activity.active();
                        }
                        acks.delivered(delivery.delivery_tag);
                        self.metrics.received.increment(1);
                        if let Some(admission) = admitted.take() {
                            let place = self.place(lanes.as_mut(), &delivery, &ctx.shutdown);
                            tasks.push(process(self.clone(), &copies, delivery, admission, place));
                        }
                    }
                    Some(Err(e)) => break Some(SessionLost(e.to_string())),
                    None => break Some(SessionLost(format!("the broker cancelled the consumer of queue `{}`", self.topology.queue))),
                },
                _ = flush.tick() => {
                    held.store(acks.len(), std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = acks.flush(&channel, true).await {
                        break Some(SessionLost(format!("cannot ack: {e}")));
                    }
                    if let Some(limit) = self.stuck_after
                        && let Some((tag, age)) = acks.stuck_head(limit)
                    {
                        self.copy_metrics.stuck.increment(1);
                        tracing::error!(consumer = %self.name, queue = %self.topology.queue, delivery_tag = tag, unsettled_for_s = age.as_secs(), limit_s = limit.as_secs(), window = acks.len(), "a delivery has been in hand far longer than its handler may take while later ones settle; restarting the session (it comes back redelivered)");
                        break Some(SessionLost(format!("delivery {tag} unsettled for {} s; restarting the session", age.as_secs())));
                    }
                }
            }
        };
        drop(admitted);
        if let Some(reason) = lost {
            // Dropping the tasks drops their handlers; their deliveries are redelivered.
            drop(tasks);
            return Ok(SessionEnd::Lost(reason));
        }

        // Drain: stop new deliveries, let every running handler finish and settle it. The
        // supervisor aborts this task if the shutdown timeout passes first; unacked
        // deliveries then return to the queue when the connection drops.
        ctx.health.set_not_ready("draining");
        if let Some((_, consumer_tag)) = &consuming {
            let _ = channel
                .basic_cancel(consumer_tag.clone(), BasicCancelOptions::default())
                .await;
        }
        tracing::info!(consumer = %self.name, in_flight = tasks.len(), "draining");
        while let Some(done) = tasks.next().await {
            if let Err(reason) = self.finish(done, &mut acks, &channel).await {
                drop(tasks);
                return Ok(SessionEnd::Lost(reason));
            }
        }
        if let Err(e) = acks.flush(&channel, true).await {
            return Ok(SessionEnd::Lost(SessionLost(format!("cannot ack: {e}"))));
        }
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            channel.close(200, "bosun consumer stopping".into()),
        )
        .await;
        let publish = copies.channel.lock().await.clone();
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            publish.close(200, "bosun consumer stopping".into()),
        )
        .await;
        if let Some(sampler) = sampler {
            sampler.stop().await;
        }
        tracing::info!(consumer = %self.name, "drained");
        Ok(SessionEnd::Drained)
    }

    /// Starts consuming: with the configured prefetch, or one delivery at a time while the
    /// handler's breaker is half-open (its one probe). The first subscription of a session
    /// uses the connection's name as consumer tag, later ones (after a pause) a numbered one.
    async fn subscribe(
        &self,
        channel: &Channel,
        n: u32,
    ) -> Result<(lapin::Consumer, ShortString), AmqpError> {
        let prefetch = if self.gate.probing() {
            1
        } else {
            self.prefetch
        };
        channel
            // Per consumer, never global: RabbitMQ 4.x dropped global QoS for quorum queues.
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| AmqpError::channel("cannot set prefetch", e))?;
        let tag = match n {
            0 => self.connection_name.clone(),
            n => format!("{}#{n}", self.connection_name),
        };
        let tag = short("consumer tag", &tag).unwrap_or_else(|_| ShortString::from(String::new()));
        let deliveries = channel
            .basic_consume(
                short("queue", &self.topology.queue)?,
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                AmqpError::channel(
                    format!("cannot consume from queue `{}`", self.topology.queue),
                    e,
                )
            })?;
        let tag = deliveries.tag();
        if n > 0 {
            tracing::info!(consumer = %self.name, queue = %self.topology.queue, prefetch, "resumed consuming");
        }
        Ok((deliveries, tag))
    }

    /// Stops consuming while the gate is shut: cancels the consumer (the channel stays, so
    /// running handlers still settle their deliveries on it) and hands every delivery
    /// received but not started back to the queue, without using an attempt.
    async fn unsubscribe(
        &self,
        channel: &Channel,
        mut deliveries: lapin::Consumer,
        tag: ShortString,
        acks: &mut Acks,
        reason: &str,
    ) -> Result<(), SessionLost> {
        tracing::warn!(consumer = %self.name, queue = %self.topology.queue, reason, "stopped consuming");
        channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
            .map_err(|e| SessionLost(format!("cannot cancel the consumer: {e}")))?;
        // After the cancel, the stream yields what the broker had sent, then ends.
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let mut released = 0u64;
        while let Some(delivery) = deliveries.next().await {
            let delivery = delivery.map_err(|e| SessionLost(e.to_string()))?;
            channel
                .basic_nack(delivery.delivery_tag, requeue)
                .await
                .map_err(|e| SessionLost(format!("cannot release a delivery: {e}")))?;
            acks.delivered(delivery.delivery_tag);
            acks.released(delivery.delivery_tag);
            released += 1;
        }
        self.metrics.released.increment(released);
        if released > 0 {
            tracing::info!(consumer = %self.name, released, "handed back deliveries received but not started");
        }
        Ok(())
    }

    /// Where a delivery goes in the lanes (`ordering`): its key read as the handler will be
    /// shown it (the first delivery's routing key, for a retry).
    fn place(
        &self,
        lanes: Option<&mut Lanes>,
        delivery: &Delivery,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Place {
        let (Some(lanes), Some(ordering)) = (lanes, self.ordering.as_ref()) else {
            return Place::default();
        };
        let properties = &delivery.properties;
        let table = properties.headers().as_ref();
        let (_, routing_key) = headers::presented(
            table,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
        );
        let needed = matches!(
            ordering.key,
            OrderingKey::Inbox(crate::config::InboxKey::MessageId)
        );
        let message_id = needed.then(|| {
            headers::message_id(
                properties,
                delivery.exchange.as_str(),
                delivery.routing_key.as_str(),
                &delivery.data,
            )
        });
        let header_values = if ordering::needs_headers(&ordering.key) {
            headers::from_table(table)
        } else {
            Default::default()
        };
        let key = ordering::key_of(
            &ordering.key,
            message_id.as_deref(),
            Some(routing_key),
            &header_values,
            &delivery.data,
        );
        match key {
            Ok(key) => Place {
                turn: Some(lanes.enter(key.as_bytes())),
                bad_key: None,
                hold: ordering.retry == LaneRetry::Hold,
                shutdown: shutdown.clone(),
            },
            Err(reason) => Place {
                bad_key: Some(reason),
                ..Place::default()
            },
        }
    }

    /// Records a finished delivery; an error means its copy could not be made durable (or a
    /// release could not be sent), so the session must end without acking it.
    async fn finish(
        &self,
        done: (u64, Result<Settled, SessionLost>),
        acks: &mut Acks,
        channel: &Channel,
    ) -> Result<(), SessionLost> {
        match done {
            (tag, Ok(Settled::Release)) => {
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                channel
                    .basic_nack(tag, requeue)
                    .await
                    .map_err(|e| SessionLost(format!("cannot release a delivery: {e}")))?;
                acks.released(tag);
                self.metrics.released.increment(1);
                Ok(())
            }
            (tag, Ok(settled)) => {
                acks.settle(tag);
                settled_counter(&self.metrics, settled).increment(1);
                Ok(())
            }
            (_, Err(reason)) => Err(reason),
        }
    }
}

/// The next delivery of the consumer, if one is subscribed (else never).
async fn next_delivery(
    consuming: &mut Option<(lapin::Consumer, ShortString)>,
) -> Option<lapin::Result<Delivery>> {
    match consuming {
        Some((deliveries, _)) => deliveries.next().await,
        None => std::future::pending().await,
    }
}

fn ack_batch(prefetch: u16) -> usize {
    (usize::from(prefetch) / 4).clamp(1, MAX_ACK_BATCH)
}

/// The confirm-mode channel retry and dead-letter copies go out on. The broker closes it when
/// it refuses one publish outright; it is opened again on the same connection, so only the
/// copies in flight on it are tried again and the session goes on.
struct Copies<'a> {
    connection: &'a Connection,
    channel: tokio::sync::Mutex<Channel>,
    /// The negotiated frame size: a copy's header frame must fit in it.
    frame_max: usize,
    /// A channel for passive exchange checks before a copy goes to a named exchange: a
    /// missing exchange closes this one, never the copy channel with other copies' confirms
    /// still pending on it (which would then be sent again, as duplicates).
    probe: tokio::sync::Mutex<Option<Channel>>,
}

impl Copies<'_> {
    /// The copy channel, opened again if the broker closed it; an error when the connection
    /// itself is gone.
    async fn channel(&self) -> Result<Channel, SessionLost> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() {
            if !self.connection.status().connected() {
                return Err(SessionLost("the connection is closed".into()));
            }
            *channel = confirm_channel(self.connection)
                .await
                .map_err(|e| SessionLost(e.to_string()))?;
        }
        Ok(channel.clone())
    }

    /// True when the broker says `exchange` does not exist; false when it exists or cannot
    /// be asked (the publish itself then finds out).
    async fn exchange_missing(&self, exchange: &ShortString) -> bool {
        let mut probe = self.probe.lock().await;
        let channel = match probe.as_ref() {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => match self.connection.create_channel().await {
                Ok(channel) => {
                    *probe = Some(channel.clone());
                    channel
                }
                Err(_) => return false,
            },
        };
        let options = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .exchange_declare(
                exchange.clone(),
                ExchangeKind::Direct,
                options,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => false,
            Err(e) => matches!(soft_error(&e), Some((AMQPSoftError::NOTFOUND, _))),
        }
    }
}

/// The backlog sampler of a session: its task ends when dropped (with the session), and a
/// drain closes its channel before the connection closes, so a clean stop logs nothing.
struct Sampler {
    task: tokio::task::JoinHandle<()>,
    channel: Channel,
}

impl Sampler {
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            self.channel.close(200, "bosun consumer stopping".into()),
        )
        .await;
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Inner {
    /// Starts sampling `bosun_consumer_backlog` on a channel of its own, every
    /// `backlog_interval`: the ready messages of `Q` and of every retry tier (passive
    /// declares: no management API needed) plus the deliveries this session holds (`held`).
    /// Other replicas' unacknowledged deliveries are theirs to report. `None` when off or
    /// when no channel opens (the gauge keeps its last value; the session goes on).
    async fn backlog_sampler(
        self: &Arc<Self>,
        connection: &Connection,
        held: Arc<std::sync::atomic::AtomicUsize>,
    ) -> Option<Sampler> {
        if self.backlog_interval.is_zero() {
            return None;
        }
        let channel = connection.create_channel().await.ok()?;
        let inner = self.clone();
        let sampling = channel.clone();
        let task = tokio::spawn(async move {
            let channel = sampling;
            let mut tick = tokio::time::interval(inner.backlog_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let queues: Vec<String> = std::iter::once(inner.topology.queue.clone())
                .chain(inner.topology.tiers.iter().map(|(_, name)| name.clone()))
                .collect();
            loop {
                tick.tick().await;
                let mut ready = 0u64;
                for queue in &queues {
                    let Ok(name) = short("queue", queue) else {
                        return;
                    };
                    let options = QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    match channel
                        .queue_declare(name, options, FieldTable::default())
                        .await
                    {
                        Ok(declared) => ready += u64::from(declared.message_count()),
                        // A missing queue closes the channel: the next session tries again.
                        Err(e) => {
                            tracing::debug!(consumer = %inner.name, queue = %queue, error = %e, "cannot sample the backlog");
                            return;
                        }
                    }
                }
                let held = held.load(std::sync::atomic::Ordering::Relaxed) as u64;
                inner.backlog.set((ready + held) as f64);
            }
        });
        Some(Sampler { task, channel })
    }
}

/// Why a session cannot go on: its connection, or a channel it cannot do without, is gone.
/// The deliveries it holds come back from the broker.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SessionLost(String);

/// Why a copy could not be made durable.
enum CopyFailure {
    /// The connection is gone: the session ends and the original comes back.
    Lost(String),
    /// The broker refused this copy on every try: a matter of this message alone.
    Refused(String),
}

/// How a copy went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// To the destination asked for.
    AsAsked,
    /// Its headers do not fit one frame: dead-lettered as `invalid` instead.
    Invalid,
}

/// Runs the handler on one delivery and makes its outcome durable (a confirmed copy for
/// retries and dead letters). Returns the delivery tag and how to settle it, or why it
/// cannot be settled.
async fn process(
    inner: Arc<Inner>,
    copies: &Copies<'_>,
    delivery: Delivery,
    admission: Admission,
    mut place: Place,
) -> (u64, Result<Settled, SessionLost>) {
    // After the delivery before it in its lane, if it has one; at shutdown, back unstarted.
    if !place.wait().await {
        return (delivery.delivery_tag, Ok(Settled::Release));
    }
    let Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        ..
    } = delivery;
    let message_id =
        headers::message_id(&properties, exchange.as_str(), routing_key.as_str(), &data);
    if let Some(invalid) = limits::check(&properties, data.len(), &inner.limits) {
        let original = (exchange.as_str(), routing_key.as_str(), &properties);
        let result = inner
            .refuse(copies, original, &message_id, data, &invalid)
            .await;
        return (delivery_tag, result);
    }
    let mut attempt = inner.attempt(&properties);
    let (exchange, routing_key) = headers::presented(
        properties.headers().as_ref(),
        exchange.as_str(),
        routing_key.as_str(),
    );
    let mut message = Message {
        message_id: Some(message_id.clone()),
        correlation_id: properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        headers: headers::from_table(properties.headers().as_ref()),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        body: Bytes::from(data),
        attempt,
        redelivered,
        inbox: None,
        source: Source {
            broker: inner.broker_name.clone(),
            consumer: inner.name.clone(),
            queue: inner.topology.queue.clone(),
            exchange: Some(exchange.to_owned()),
            routing_key: Some(routing_key.to_owned()),
            entry_id: None,
        },
    };
    // The gate shut while this delivery waited for it: back to the queue, unstarted.
    if let Some(reason) = admission.revoked(&inner.gate) {
        drop(admission);
        tracing::debug!(consumer = %inner.name, message_id = %message_id, reason = %reason, "released unstarted");
        return (delivery_tag, Ok(Settled::Release));
    }
    let span = disposition::span(&message, System::RabbitMq, inner.trace);
    let admitted = match place.bad_key.take() {
        // No ordering key: it cannot be put in order, so it fails alone.
        Some(reason) => {
            tracing::warn!(consumer = %inner.name, message_id = %message_id, %reason, "dead-lettering a message without an ordering key");
            inbox::Admission::Settle(Decision::DeadLetter {
                kind: FailureKind::Invalid,
                reason,
            })
        }
        None => {
            inbox::admit(inner.inbox.as_deref(), &mut message)
                .instrument(span.clone())
                .await
        }
    };
    let (decision, ticket) = match admitted {
        inbox::Admission::Run(ticket) => {
            let mut admission = admission;
            loop {
                inner.metrics.in_flight.increment(1.0);
                let started = Instant::now();
                let handled = disposition::handle(inner.handler.as_ref(), &message)
                    .instrument(span.clone())
                    .await;
                if let Err(Panicked(text)) = &handled {
                    tracing::error!(consumer = %inner.name, message_id = %message_id, panic = %text, "handler panicked; retrying the message");
                }
                let outcome = admission.finish(disposition::outcome(handled));
                inner
                    .metrics
                    .duration(&outcome)
                    .record(started.elapsed().as_secs_f64());
                inner.metrics.in_flight.decrement(1.0);
                let decision = disposition::decide(outcome, attempt, &inner.retry);
                // `retry = "hold"`: the retry waits in its lane, unacked, and runs again.
                let Decision::Retry {
                    delay,
                    attempt: next,
                    ..
                } = &decision
                else {
                    break (decision, ticket);
                };
                if !place.hold {
                    break (decision, ticket);
                }
                match ordering::hold(*delay, &inner.gate, &place.shutdown).await {
                    Held::Again(again) => {
                        inner.metrics.settled_retry.increment(1);
                        admission = again;
                        attempt = *next;
                        message.attempt = *next;
                    }
                    Held::Stopped(reason) => break (Decision::Release { reason }, ticket),
                    Held::ShuttingDown => break (decision, ticket),
                }
            }
        }
        // The handler is not called: the gate's admission goes back unused.
        inbox::Admission::Settle(decision) => (decision, None),
        // Through the shortest retry tier (straight back to the queue without one), on the
        // same attempt: the claim held elsewhere has settled or expired by the time it is back.
        inbox::Admission::Postpone(reason) => (
            Decision::Retry {
                delay: Duration::ZERO,
                attempt,
                reason,
            },
            None,
        ),
    };

    let original = Original {
        exchange,
        routing_key,
        properties: &properties,
        message_id: &message_id,
        body: &message.body,
        attempt,
        trace: disposition::trace_for_copy(&message, &span),
    };
    let settle = async {
        match decision {
            Decision::Ack => Ok(Settled::Ack),
            Decision::Drop { reason } => {
                tracing::debug!(consumer = %inner.name, message_id = %message_id, reason = %reason, "message dropped by the handler");
                Ok(Settled::Drop)
            }
            Decision::Retry {
                delay,
                attempt: next,
                reason,
            } => {
                // No delay tier (every delay is zero): straight back to the queue.
                let target = inner
                    .topology
                    .tier_for(&inner.retry, delay)
                    .unwrap_or(&inner.topology.queue);
                let copy = Copy {
                    exchange: "",
                    routing_key: target,
                    attempt: next,
                    kind: FailureKind::Transient,
                    reason: &reason,
                };
                match inner.copy(copies, &original, &copy).await {
                    Ok(Sent::AsAsked) => Ok(Settled::Retry),
                    Ok(Sent::Invalid) => Ok(Settled::DeadLetter),
                    Err(CopyFailure::Lost(e)) => Err(SessionLost(e)),
                    Err(CopyFailure::Refused(e)) => {
                        // Its own path: a dead letter keeps it, with why.
                        tracing::warn!(consumer = %inner.name, message_id = %message_id, queue = target, error = %e, "the broker refused the retry copy; dead-lettering the message instead");
                        let reason =
                            format!("{reason}; the retry copy to {target:?} was refused: {e}");
                        inner
                            .dead_letter(copies, &original, FailureKind::Transient, &reason)
                            .await
                    }
                }
            }
            Decision::DeadLetter { kind, reason } => {
                inner.dead_letter(copies, &original, kind, &reason).await
            }
            Decision::Release { reason } => {
                tracing::info!(consumer = %inner.name, message_id = %message_id, reason = %reason, "released unsettled; it goes back to the queue");
                Ok(Settled::Release)
            }
        }
    };
    let result = settle.instrument(span.clone()).await;
    if let Ok(settled) = &result {
        trace_context::record_outcome(&span, settled.label());
    }
    // Durable now (a copy confirmed, or the handler's own success), and not yet acked: a
    // crash before the ack finds the key done on redelivery.
    if let Some(ticket) = ticket {
        ticket
            .finish(match result {
                Ok(Settled::Ack | Settled::Drop | Settled::DeadLetter) => Finish::Done,
                Ok(Settled::Retry | Settled::Release) | Err(_) => Finish::Release,
            })
            .await;
    }
    (delivery_tag, result)
}

/// What a copy is made from.
struct Original<'a> {
    /// The exchange and routing key presented to the handler (the first delivery's).
    exchange: &'a str,
    routing_key: &'a str,
    properties: &'a BasicProperties,
    /// The delivery's id ([`headers::message_id`]): every copy carries it.
    message_id: &'a str,
    body: &'a Bytes,
    attempt: u32,
    /// Trace context the copies add (the span of a message that arrived without one).
    trace: Vec<(&'static str, String)>,
}

/// Where a copy goes and what it records.
struct Copy<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    /// `bosun-attempt` of the copy.
    attempt: u32,
    kind: FailureKind,
    reason: &'a str,
}

/// A copy's properties, ready to publish or dead-lettered as `invalid` instead.
enum Built {
    Fits(BasicProperties),
    /// The headers that fit, and why the rest did not.
    Invalid(BasicProperties, String),
}

impl Inner {
    /// The attempt a delivery is on ([`headers::attempt`]).
    fn attempt(&self, properties: &BasicProperties) -> u32 {
        headers::attempt(
            properties.headers().as_ref(),
            self.attempt_header.as_deref(),
        )
    }

    /// Dead-letters a delivery that breaks a limit as `invalid`, without running the handler.
    async fn refuse(
        &self,
        copies: &Copies<'_>,
        (exchange, routing_key, properties): (&str, &str, &BasicProperties),
        message_id: &str,
        data: Vec<u8>,
        invalid: &limits::Invalid,
    ) -> Result<Settled, SessionLost> {
        let (properties, body) =
            limits::kept(properties, Bytes::from(data), self.broker.max_message_size);
        let original = Original {
            exchange,
            routing_key,
            properties: &properties,
            message_id,
            body: &body,
            attempt: self.attempt(&properties),
            trace: Vec::new(),
        };
        self.dead_letter(copies, &original, FailureKind::Invalid, &invalid.reason)
            .await
    }

    /// Dead-letters the original. A dead-letter copy the broker refuses on every try hands
    /// the original back to its queue unsettled (counted and logged): never lost, and the
    /// other deliveries of the session go on.
    async fn dead_letter(
        &self,
        copies: &Copies<'_>,
        original: &Original<'_>,
        kind: FailureKind,
        reason: &str,
    ) -> Result<Settled, SessionLost> {
        let target = &self.topology.dead_letter;
        let key = target
            .routing_key
            .as_deref()
            .unwrap_or(original.routing_key);
        tracing::warn!(consumer = %self.name, message_id = original.message_id, attempt = original.attempt, kind = %kind, reason = %crate::text::truncate(reason, 512), "dead-lettering message");
        let copy = Copy {
            exchange: &target.exchange,
            routing_key: key,
            attempt: original.attempt,
            kind,
            reason,
        };
        match self.copy(copies, original, &copy).await {
            Ok(_) => Ok(Settled::DeadLetter),
            Err(CopyFailure::Lost(e)) => Err(SessionLost(e)),
            Err(CopyFailure::Refused(e)) => {
                tracing::error!(consumer = %self.name, message_id = original.message_id, exchange = %target.exchange, routing_key = key, error = %e, "the broker refused the dead-letter copy on every try; handing the message back to the queue");
                Ok(Settled::Release)
            }
        }
    }

    /// Publishes a copy of the original with the failure headers and waits for the broker's
    /// confirm; a copy whose headers do not fit one frame goes to the dead-letter destination
    /// as `invalid` instead.
    async fn copy(
        &self,
        copies: &Copies<'_>,
        original: &Original<'_>,
        copy: &Copy<'_>,
    ) -> Result<Sent, CopyFailure> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let failure = |attempt, kind, error| headers::Failure {
            attempt,
            kind,
            error,
            exchange: original.exchange,
            routing_key: original.routing_key,
            queue: &self.topology.queue,
            consumer: &self.name,
            host: &self.host,
            now: &now,
        };
        let built = build_copy(
            original,
            &failure(copy.attempt, copy.kind, copy.reason),
            copies.frame_max,
            || {
                self.copy_metrics.trimmed.increment(1);
            },
        );
        match built {
            Built::Fits(properties) => {
                self.publish_copy(
                    copies,
                    copy.exchange,
                    copy.routing_key,
                    original.body,
                    properties,
                    copy.kind,
                )
                .await?;
                Ok(Sent::AsAsked)
            }
            Built::Invalid(_, why) => {
                self.copy_metrics.oversized.increment(1);
                let reason = format!("{why}; the handler said: {}", copy.reason);
                let (Built::Invalid(properties, _) | Built::Fits(properties)) = build_copy(
                    original,
                    &failure(original.attempt, FailureKind::Invalid, &reason),
                    copies.frame_max,
                    || {},
                );
                let target = &self.topology.dead_letter;
                let key = target
                    .routing_key
                    .as_deref()
                    .unwrap_or(original.routing_key);
                tracing::error!(consumer = %self.name, message_id = original.message_id, reason = %why, "a copy's headers do not fit one frame; dead-lettering it as invalid with the headers that fit");
                self.publish_copy(
                    copies,
                    &target.exchange,
                    key,
                    original.body,
                    properties,
                    FailureKind::Invalid,
                )
                .await?;
                Ok(Sent::Invalid)
            }
        }
    }

    /// Publishes one copy, `mandatory`, and waits for its confirm. A refusal (a nack, a
    /// return, the channel closed over it) is tried again with backoff on a channel opened
    /// again; a missing destination is declared again first. Only a lost connection ends the
    /// tries at once.
    async fn publish_copy(
        &self,
        copies: &Copies<'_>,
        exchange: &str,
        routing_key: &str,
        body: &Bytes,
        properties: BasicProperties,
        kind: FailureKind,
    ) -> Result<(), CopyFailure> {
        let span = trace_context::producer_span(Produced {
            system: System::RabbitMq,
            destination: if exchange.is_empty() {
                routing_key
            } else {
                exchange
            },
            message_id: properties.message_id().as_ref().map(|id| id.as_str()),
            parent: None,
            link: None,
            root: false,
        });
        let tries = async {
            let (exchange_name, key) = match (
                short("exchange", exchange),
                short("routing key", routing_key),
            ) {
                (Ok(e), Ok(k)) => (e, k),
                (Err(e), _) | (_, Err(e)) => return Err(CopyFailure::Refused(e.to_string())),
            };
            let options = BasicPublishOptions {
                mandatory: true,
                immediate: false,
            };
            let mut pause = COPY_RETRY;
            let mut last = String::new();
            for attempt in 1..=COPY_TRIES {
                let channel = copies.channel().await.map_err(|e| {
                    CopyFailure::Lost(format!("the {kind} copy could not be sent: {e}"))
                })?;
                let result =
                    if !exchange.is_empty() && copies.exchange_missing(&exchange_name).await {
                        Err(PublishError::Unroutable(format!(
                            "exchange `{exchange}` does not exist"
                        )))
                    } else {
                        match channel
                            .basic_publish(
                                exchange_name.clone(),
                                key.clone(),
                                options,
                                body,
                                properties.clone(),
                            )
                            .await
                        {
                            Ok(confirm) => {
                                confirmation(confirm.await, exchange, routing_key, body.len())
                            }
                            Err(e) => Err(publish_error(&e, exchange, body.len())),
                        }
                    };
                let error = match result {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                };
                if !copies.connection.status().connected() {
                    return Err(CopyFailure::Lost(format!(
                        "the {kind} copy was not confirmed: {error}"
                    )));
                }
                if matches!(error, PublishError::Unroutable(_)) && self.declare {
                    self.declare_again(copies).await;
                }
                tracing::warn!(consumer = %self.name, exchange, routing_key, kind = %kind, try_ = attempt, error = %error, "a retry or dead-letter copy was not accepted; the original is kept and the copy tried again");
                last = error.to_string();
                if attempt < COPY_TRIES {
                    tokio::time::sleep(pause.failed()).await;
                }
            }
            self.copy_metrics.refused.increment(1);
            Err(CopyFailure::Refused(last))
        };
        tries.instrument(span).await
    }

    /// Declares the topology again on a channel of its own (a copy came back unroutable: its
    /// queue may have been deleted); a failure only shows in the log.
    async fn declare_again(&self, copies: &Copies<'_>) {
        let Ok(channel) = copies.connection.create_channel().await else {
            return;
        };
        if let Err(e) = self.topology.apply(&channel, true).await {
            tracing::warn!(consumer = %self.name, error = %e, "cannot declare the topology again");
        }
        if channel.status().connected() {
            let _ = channel.close(200, "declared".into()).await;
        }
    }
}

/// The properties of a copy of `original` carrying `failure`, fitted to `frame_max`.
///
/// Properties are taken over one by one: never `expiration` (kept as `bosun-orig-expiration`)
/// nor `user_id`; always persistent; the message id is the delivery's own or the one derived
/// for it ([`headers::message_id`]), so every attempt and the dead letter share one. When the header frame would not fit, `bosun-error`
/// is cut first (`trimmed` is called); when it still does not fit, the result is `Invalid`:
/// bosun's headers and as many of the original's as fit, with `bosun-headers-truncated`.
fn build_copy(
    original: &Original<'_>,
    failure: &headers::Failure<'_>,
    frame_max: usize,
    trimmed: impl FnOnce(),
) -> Built {
    let source = original.properties.headers().clone().unwrap_or_default();
    let expiration = original
        .properties
        .expiration()
        .as_ref()
        .map(|e| e.as_str().to_owned());
    let mut table = source.clone();
    if let Some(expiration) = &expiration
        && !table.contains_key(headers::ORIG_EXPIRATION)
    {
        table.insert(headers::ORIG_EXPIRATION.into(), text(expiration));
    }
    headers::add_failure(&mut table, failure);
    for (name, value) in &original.trace {
        if !table.contains_key(name) {
            table.insert((*name).into(), text(value));
        }
    }
    let budget = frame_max.saturating_sub(HEADER_FRAME_OVERHEAD);
    let properties = copy_properties(original, table.clone());
    if properties_size(&properties) <= budget {
        return Built::Fits(properties);
    }
    let error = crate::text::truncate(failure.error, TRIMMED_ERROR_BYTES);
    table.insert(headers::ERROR.into(), text(error));
    let properties = copy_properties(original, table);
    let size = properties_size(&properties);
    if size <= budget {
        trimmed();
        return Built::Fits(properties);
    }
    let why = format!(
        "the message's headers do not fit one frame ({size} bytes of properties, frame_max {frame_max})"
    );
    // bosun's own headers first (those of this failure win), then the original's, smallest
    // first, while they fit.
    let mut kept = FieldTable::default();
    if let Some(expiration) = &expiration {
        kept.insert(headers::ORIG_EXPIRATION.into(), text(expiration));
    }
    headers::add_failure(&mut kept, &headers::Failure { error, ..*failure });
    kept.insert(headers::HEADERS_TRUNCATED.into(), AMQPValue::LongLongInt(0));
    let mut room = budget.saturating_sub(properties_size(&copy_properties(original, kept.clone())));
    let mut entries: Vec<(usize, &ShortString, &AMQPValue)> = source
        .inner()
        .iter()
        .filter(|(k, _)| !kept.contains_key(k.as_str()))
        .map(|(k, v)| (entry_size(k, v), k, v))
        .collect();
    entries.sort_by_key(|(size, _, _)| *size);
    let mut left_out = 0i64;
    for (size, k, v) in entries {
        if size <= room {
            room -= size;
            kept.insert(k.clone(), v.clone());
        } else {
            left_out += 1;
        }
    }
    kept.insert(
        headers::HEADERS_TRUNCATED.into(),
        AMQPValue::LongLongInt(left_out),
    );
    Built::Invalid(copy_properties(original, kept), why)
}

/// The original's properties for a copy with `headers`: see [`build_copy`].
fn copy_properties(copied: &Original<'_>, headers: FieldTable) -> BasicProperties {
    let original = copied.properties;
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT)
        .with_message_id(copied.message_id.into());
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The encoded size of `properties` (flags and values) in a content header frame.
fn properties_size(properties: &BasicProperties) -> usize {
    let serialize = lapin::protocol::basic::gen_properties::<Vec<u8>>(properties);
    match serialize(Vec::new().into()) {
        Ok(written) => written.write.len(),
        // Encoding into memory does not fail; if it did, the copy would not fit anywhere.
        Err(_) => usize::MAX,
    }
}

/// The encoded size of one header table entry.
fn entry_size(key: &ShortString, value: &AMQPValue) -> usize {
    let mut one = FieldTable::default();
    one.insert(key.clone(), value.clone());
    let serialize = lapin::types::generation::gen_field_table::<Vec<u8>>(&one);
    match serialize(Vec::new().into()) {
        // Less the table's own length prefix.
        Ok(written) => written.write.len().saturating_sub(4),
        Err(_) => usize::MAX,
    }
}

/// The settlement window of one channel: the tags delivered and not settled yet, and the
/// settled tags not acked yet. Both are bounded by the prefetch window (the broker sends no
/// more while that many are unacked), however long a head tag stays unsettled: a tag acked
/// or nacked on its own leaves no trace, and the work of a flush is proportional to the
/// settled tags it acks.
struct Acks {
    /// Delivered, unsettled tags, and when each was delivered.
    pending: BTreeMap<u64, Instant>,
    /// Settled tags not yet acked.
    settled: BTreeSet<u64>,
    /// The highest tag ever settled: a head older than it is being overtaken.
    newest_settled: u64,
    /// Settled tags that make a `multiple` ack worth sending now.
    batch: usize,
    /// The broker's window: when this many tags are unacked it sends no more.
    window: usize,
}

impl Acks {
    fn new(batch: usize, window: usize) -> Self {
        Self {
            pending: BTreeMap::new(),
            settled: BTreeSet::new(),
            newest_settled: 0,
            batch,
            window,
        }
    }

    fn delivered(&mut self, tag: u64) {
        self.pending.entry(tag).or_insert_with(Instant::now);
    }

    fn settle(&mut self, tag: u64) {
        if self.pending.remove(&tag).is_some() {
            self.settled.insert(tag);
            self.newest_settled = self.newest_settled.max(tag);
        }
    }

    /// `tag` was nacked on its own: it is no longer outstanding, and a later `multiple` ack
    /// passes over it (the broker no longer holds it).
    fn released(&mut self, tag: u64) {
        self.pending.remove(&tag);
    }

    fn batch_ready(&self) -> bool {
        self.settled.len() >= self.batch
    }

    /// Tags held: unsettled and settled-but-unacked.
    fn len(&self) -> usize {
        self.pending.len() + self.settled.len()
    }

    /// The oldest unsettled tag and its age, when it has been in hand longer than `limit`
    /// while a later delivery settled.
    fn stuck_head(&self, limit: Duration) -> Option<(u64, Duration)> {
        let (tag, at) = self.pending.first_key_value()?;
        let age = at.elapsed();
        (age > limit && self.newest_settled > *tag).then_some((*tag, age))
    }

    /// Acks the settled tags before the first unsettled one with one `multiple` ack; with
    /// `stragglers` and a full window, also acks the settled tags behind it, one by one.
    async fn flush(&mut self, channel: &Channel, stragglers: bool) -> Result<(), lapin::Error> {
        if self.settled.is_empty() {
            return Ok(());
        }
        let behind = match self.pending.first_key_value() {
            Some((head, _)) => self.settled.split_off(head),
            None => BTreeSet::new(),
        };
        // `self.settled` now holds only tags before the head.
        // A failed ack ends the session, and the window with it.
        if let Some(&last) = self.settled.last() {
            channel
                .basic_ack(last, BasicAckOptions { multiple: true })
                .await?;
        }
        self.settled = behind;
        if stragglers && !self.settled.is_empty() && self.len() >= self.window {
            while let Some(tag) = self.settled.pop_first() {
                channel
                    .basic_ack(tag, BasicAckOptions { multiple: false })
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_batches_scale_with_prefetch() {
        assert_eq!(ack_batch(1), 1);
        assert_eq!(ack_batch(100), 25);
        assert_eq!(ack_batch(1000), 100);
    }

    #[test]
    fn settlement_tracks_the_head_run() {
        let mut acks = Acks::new(2, 10);
        for tag in 1..=5 {
            acks.delivered(tag);
        }
        acks.settle(2);
        acks.settle(3);
        assert_eq!(acks.pending.first_key_value().map(|(t, _)| *t), Some(1));
        acks.settle(1);
        acks.settle(1);
        assert_eq!(acks.settled.len(), 3);
        assert!(acks.batch_ready());
        acks.settle(99);
        assert_eq!(acks.settled.len(), 3);
    }

    #[test]
    fn a_released_tag_leaves_the_window_without_an_ack() {
        let mut acks = Acks::new(2, 10);
        for tag in 1..=3 {
            acks.delivered(tag);
        }
        acks.released(1);
        acks.released(1);
        assert_eq!((acks.pending.len(), acks.settled.len()), (2, 0));
        // A settled tag cannot be released afterwards: it is acked, never nacked too.
        acks.settle(2);
        acks.released(2);
        assert_eq!((acks.pending.len(), acks.settled.len()), (1, 1));
    }

    #[test]
    fn the_ack_window_stays_bounded_behind_a_head_that_never_settles() {
        // Tag 1 never settles; 100,000 later deliveries settle behind it, and stragglers are
        // acked one by one each time the window fills (as the flush tick does).
        let window = 10;
        let mut acks = Acks::new(3, window);
        acks.delivered(1);
        let mut acked_alone = 0;
        for tag in 2..=100_001u64 {
            acks.delivered(tag);
            acks.settle(tag);
            if acks.len() >= window {
                // What `flush(.., true)` does without a channel.
                acked_alone += acks.settled.len();
                acks.settled.clear();
            }
            assert!(acks.len() <= window, "window grew to {}", acks.len());
        }
        assert_eq!(acks.pending.len(), 1);
        assert!(acked_alone >= 99_990);
    }

    #[test]
    fn a_head_overtaken_past_the_limit_is_stuck() {
        let mut acks = Acks::new(1, 10);
        acks.delivered(1);
        acks.delivered(2);
        // Old but not overtaken: a slow handler, not a stuck one.
        assert_eq!(acks.stuck_head(Duration::ZERO), None);
        acks.settle(2);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(acks.stuck_head(Duration::from_secs(60)), None);
        assert_eq!(acks.stuck_head(Duration::ZERO).map(|(t, _)| t), Some(1));
        acks.settle(1);
        assert_eq!(acks.stuck_head(Duration::ZERO), None);
    }

    fn props_with_header(size: usize) -> BasicProperties {
        let mut table = FieldTable::default();
        table.insert("big".into(), text(&"x".repeat(size)));
        table.insert("tenant".into(), text("acme"));
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_expiration("5000".into())
            .with_user_id("someone-else".into())
            .with_correlation_id("c-1".into())
            .with_priority(3)
            .with_headers(table)
    }

    fn failure<'a>(error: &'a str) -> headers::Failure<'a> {
        headers::Failure {
            attempt: 2,
            kind: FailureKind::Transient,
            error,
            exchange: "jobs",
            routing_key: "job.created",
            queue: "q",
            consumer: "c",
            host: "h",
            now: "2026-01-01T00:00:00.000Z",
        }
    }

    fn original<'a>(properties: &'a BasicProperties, body: &'a Bytes) -> Original<'a> {
        Original {
            exchange: "jobs",
            routing_key: "job.created",
            properties,
            message_id: "m-1",
            body,
            attempt: 1,
            trace: Vec::new(),
        }
    }

    fn header_of(p: &BasicProperties, key: &str) -> Option<crate::handler::HeaderValue> {
        headers::from_table(p.headers().as_ref()).remove(key)
    }

    #[test]
    fn copies_drop_expiration_and_user_id_and_keep_the_rest() {
        let props = props_with_header(10);
        let body = Bytes::from_static(b"b");
        let Built::Fits(copy) =
            build_copy(&original(&props, &body), &failure("boom"), 131_072, || {})
        else {
            panic!("a small copy fits")
        };
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(
            copy.correlation_id().as_ref().map(|s| s.as_str()),
            Some("c-1")
        );
        assert_eq!(copy.priority(), &Some(3));
        assert_eq!(copy.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            header_of(&copy, headers::ORIG_EXPIRATION).and_then(|v| v.as_text()),
            Some("5000".into())
        );
        assert_eq!(
            header_of(&copy, "tenant").and_then(|v| v.as_text()),
            Some("acme".into())
        );
    }

    #[test]
    fn a_copy_over_frame_max_loses_bosun_error_bulk_first() {
        let props = props_with_header(125_000);
        let body = Bytes::new();
        let long_error = "e".repeat(crate::failure_headers::MAX_ERROR_BYTES * 4);
        let mut trimmed = false;
        let Built::Fits(copy) = build_copy(
            &original(&props, &body),
            &failure(&long_error),
            127_000,
            || trimmed = true,
        ) else {
            panic!("fits once bosun-error is cut")
        };
        assert!(trimmed);
        assert!(properties_size(&copy) <= 127_000 - HEADER_FRAME_OVERHEAD);
        let error = header_of(&copy, headers::ERROR)
            .and_then(|v| v.as_text())
            .unwrap_or_default();
        assert_eq!(error.len(), TRIMMED_ERROR_BYTES);
        assert!(header_of(&copy, "big").is_some());
    }

    #[test]
    fn a_copy_whose_own_headers_exceed_frame_max_is_invalid_with_what_fits() {
        let props = props_with_header(130_900);
        let body = Bytes::new();
        let Built::Invalid(copy, why) =
            build_copy(&original(&props, &body), &failure("boom"), 131_072, || {})
        else {
            panic!("a 130,900-byte header plus bosun's cannot fit 131,072")
        };
        assert!(why.contains("frame_max 131072"), "{why}");
        assert!(properties_size(&copy) <= 131_072 - HEADER_FRAME_OVERHEAD);
        assert!(header_of(&copy, "big").is_none());
        assert_eq!(
            header_of(&copy, "tenant").and_then(|v| v.as_text()),
            Some("acme".into())
        );
        assert_eq!(
            header_of(&copy, headers::HEADERS_TRUNCATED),
            Some(crate::handler::HeaderValue::Int(1))
        );
        assert_eq!(
            header_of(&copy, headers::ORIGINAL_ROUTING_KEY).and_then(|v| v.as_text()),
            Some("job.created".into())
        );
    }
}
