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
//! full.
//!
//! A connection or channel loss ends the session: in-flight handlers are dropped (their
//! deliveries come back, marked redelivered), nothing is acked through the dead channel, and
//! the consumer reconnects with backoff and declares its topology again. A queue declared
//! elsewhere with other arguments (PRECONDITION_FAILED) is returned as an error, so the
//! supervisor restarts this consumer alone with its own backoff.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use metrics::Gauge;

use super::publisher::{PERSISTENT, confirmation};
use super::topology::Topology;
use super::{AmqpError, connection, headers, limits, short};
use crate::config::{
    AmqpBrokerConfig, AmqpConsumerConfig, BrokerConfig, ConsumerConfig, DeliveryLimits,
};
use crate::handler::{FailureKind, Handler, Message, Outcome, Source};
use crate::publish::PublishError;
use crate::retry::RetryPolicy;
use crate::runtime::{Resources, consumer_component_name};
use crate::supervisor::{Component, ComponentContext};

/// First reconnect delay.
const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the reconnect backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// How often settled tags are acked when fewer than a batch are waiting.
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound on settled tags waiting for one `multiple` ack.
const MAX_ACK_BATCH: usize = 100;
/// Time allowed to close the channels and connection after a drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Handlers in flight at once.
    concurrency: usize,
    /// The configured prefetch, cut to the byte budget (`limits::prefetch`).
    prefetch: u16,
    limits: DeliveryLimits,
    /// With `false`, topology is only checked passively.
    declare: bool,
    retry: RetryPolicy,
    topology: Topology,
    /// `bosun-host` on copies.
    host: String,
    metrics: Metrics,
}

type Metrics = crate::telemetry::ConsumerMetrics;

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
            concurrency: spec.consumer.concurrency.max(1),
            prefetch,
            limits,
            declare: spec.amqp.declare,
            retry: spec.consumer.retry.clone(),
            topology: Topology::for_consumer(spec.consumer, spec.amqp),
            host,
            metrics: Metrics::new(spec.name, spec.broker_name, &spec.consumer.handler),
        };
        Self {
            inner: Arc::new(inner),
        }
    }
}

/// Builds the component for `[consumers.NAME]` from the runtime's resources.
pub fn build(
    name: &str,
    consumer: &ConsumerConfig,
    amqp: &AmqpConsumerConfig,
    resources: &Resources,
) -> anyhow::Result<Arc<dyn Component>> {
    let broker = match resources.config.brokers.get(&consumer.source) {
        Some(BrokerConfig::Amqp(broker)) => broker,
        Some(other) => anyhow::bail!("broker `{}` is {}, not amqp", consumer.source, other.kind()),
        None => anyhow::bail!("broker `{}` is not defined", consumer.source),
    };
    let component = consumer_component_name(name);
    Ok(Arc::new(AmqpConsumer::new(AmqpConsumerSpec {
        name,
        consumer,
        amqp,
        broker_name: &consumer.source,
        broker,
        connection_name: connection::connection_name(
            broker,
            &resources.config.service.name,
            &component,
        ),
        handler: resources.handler(&consumer.handler)?,
    })))
}

/// Why a session ended without an error worth restarting the component for.
enum SessionEnd {
    /// Shutdown was requested and every in-flight delivery was settled.
    Drained,
    /// The connection or a channel broke; reconnect.
    Lost(String),
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
        let mut delay = RECONNECT_INITIAL;
        let mut connected_before = false;
        loop {
            if ctx.shutdown.is_cancelled() {
                return Ok(());
            }
            let started = Instant::now();
            let reason = match inner.session(&ctx, &mut connected_before).await {
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
            if started.elapsed() >= HEALTHY_SESSION {
                delay = RECONNECT_INITIAL;
            }
            tokio::select! {
                _ = tokio::time::sleep(crate::retry::apply_jitter(delay, 0.2)) => {}
                _ = ctx.shutdown.cancelled() => return Ok(()),
            }
            delay = (delay * 2).min(RECONNECT_MAX);
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
            c = connection::connect(&self.broker, &self.connection_name) => c?,
            _ = ctx.shutdown.cancelled() => return Ok(SessionEnd::Drained),
        };
        self.metrics.connected.increment(1.0);
        let _connected = ConnectedGuard(&self.metrics.connected);
        if *connected_before {
            self.metrics.reconnects.increment(1);
        }
        *connected_before = true;
        let result = self.consume(ctx, &connection).await;
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
        let publish = connection
            .create_channel()
            .await
            .map_err(|e| AmqpError::channel("cannot open a channel", e))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| AmqpError::channel("cannot enable publisher confirms", e))?;
        // Shared by every handler task; an Arc is cheaper to hand out than a channel clone.
        let publish = Arc::new(publish);
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| AmqpError::channel("cannot set prefetch", e))?;
        let tag = short("consumer tag", &self.connection_name)
            .unwrap_or_else(|_| ShortString::from(String::new()));
        let mut deliveries = channel
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
        let consumer_tag = deliveries.tag();
        ctx.health.set_ready();
        tracing::info!(consumer = %self.name, queue = %self.topology.queue, prefetch = self.prefetch, concurrency = self.concurrency, connection = %self.connection_name, "consuming");

        let mut acks = Acks::new(ack_batch(self.prefetch), usize::from(self.prefetch));
        // Handlers run as futures of this task: no spawn or cross-thread wake per message.
        let mut tasks = FuturesUnordered::new();
        let mut flush = tokio::time::interval(ACK_FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

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
                        break Some(format!("cannot ack: {e}"));
                    }
                }
                delivery = deliveries.next(), if tasks.len() < self.concurrency => match delivery {
                    Some(Ok(delivery)) => {
                        acks.delivered(delivery.delivery_tag);
                        self.metrics.received.increment(1);
                        tasks.push(process(self.clone(), publish.clone(), delivery));
                    }
                    Some(Err(e)) => break Some(e.to_string()),
                    None => break Some(format!("the broker cancelled the consumer of queue `{}`", self.topology.queue)),
                },
                _ = flush.tick() => {
                    if let Err(e) = acks.flush(&channel, true).await {
                        break Some(format!("cannot ack: {e}"));
                    }
                }
            }
        };
        if let Some(reason) = lost {
            // Dropping the tasks drops their handlers; their deliveries are redelivered.
            drop(tasks);
            return Ok(SessionEnd::Lost(reason));
        }

        // Drain: stop new deliveries, let every running handler finish and settle it. The
        // supervisor aborts this task if the shutdown timeout passes first; unacked
        // deliveries then return to the queue when the connection drops.
        ctx.health.set_not_ready("draining");
        let _ = channel
            .basic_cancel(consumer_tag, BasicCancelOptions::default())
            .await;
        tracing::info!(consumer = %self.name, in_flight = tasks.len(), "draining");
        while let Some(done) = tasks.next().await {
            if let Err(reason) = self.finish(done, &mut acks, &channel).await {
                drop(tasks);
                return Ok(SessionEnd::Lost(reason));
            }
        }
        if let Err(e) = acks.flush(&channel, true).await {
            return Ok(SessionEnd::Lost(format!("cannot ack: {e}")));
        }
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            channel.close(200, "bosun consumer stopping".into()),
        )
        .await;
        let _ = tokio::time::timeout(
            CLOSE_TIMEOUT,
            publish.close(200, "bosun consumer stopping".into()),
        )
        .await;
        tracing::info!(consumer = %self.name, "drained");
        Ok(SessionEnd::Drained)
    }

    /// Records a finished delivery; an error means its copy could not be made durable (or a
    /// release could not be sent), so the session must end without acking it.
    async fn finish(
        &self,
        done: (u64, Result<Settled, String>),
        acks: &mut Acks,
        channel: &Channel,
    ) -> Result<(), String> {
        match done {
            (tag, Ok(Settled::Release)) => {
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                channel
                    .basic_nack(tag, requeue)
                    .await
                    .map_err(|e| format!("cannot release a delivery: {e}"))?;
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

fn ack_batch(prefetch: u16) -> usize {
    (usize::from(prefetch) / 4).clamp(1, MAX_ACK_BATCH)
}

/// Runs the handler on one delivery and makes its outcome durable (a confirmed copy for
/// retries and dead letters). Returns the delivery tag and how to settle it, or why it
/// cannot be settled.
async fn process(
    inner: Arc<Inner>,
    publish: Arc<Channel>,
    delivery: Delivery,
) -> (u64, Result<Settled, String>) {
    let Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        ..
    } = delivery;
    if let Some(invalid) = limits::check(&properties, data.len(), &inner.limits) {
        let original = (exchange.as_str(), routing_key.as_str(), &properties);
        let result = inner.refuse(&publish, original, data, &invalid).await;
        return (delivery_tag, result);
    }
    let attempt = headers::attempt(properties.headers().as_ref());
    let message = Message {
        message_id: properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
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
        source: Source {
            broker: inner.broker_name.clone(),
            consumer: inner.name.clone(),
            queue: inner.topology.queue.clone(),
            exchange: Some(exchange.as_str().to_owned()),
            routing_key: Some(routing_key.as_str().to_owned()),
            entry_id: None,
        },
    };
    inner.metrics.in_flight.increment(1.0);
    let started = Instant::now();
    let outcome = match AssertUnwindSafe(inner.handler.handle(&message))
        .catch_unwind()
        .await
    {
        Ok(outcome) => outcome,
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(consumer = %inner.name, message_id = message.message_id.as_deref().unwrap_or(""), panic = %text, "handler panicked; retrying the message");
            Outcome::Retry {
                after: None,
                reason: format!("handler panicked: {text}"),
            }
        }
    };
    inner
        .metrics
        .duration(&outcome)
        .record(started.elapsed().as_secs_f64());
    inner.metrics.in_flight.decrement(1.0);

    let original = Original {
        exchange: exchange.as_str(),
        routing_key: routing_key.as_str(),
        properties: &properties,
        body: &message.body,
        attempt,
    };
    let result = match outcome {
        Outcome::Ack => Ok(Settled::Ack),
        Outcome::Drop { reason } => {
            tracing::debug!(consumer = %inner.name, message_id = message.message_id.as_deref().unwrap_or(""), reason = %reason, "message dropped by the handler");
            Ok(Settled::Drop)
        }
        Outcome::Retry { after, reason } if inner.retry.should_retry(attempt) => {
            let delay = after.unwrap_or_else(|| inner.retry.delay(attempt));
            match inner.topology.tier_for(&inner.retry, delay) {
                Some(tier) => inner
                    .copy(
                        &publish,
                        &original,
                        "",
                        tier,
                        attempt + 1,
                        FailureKind::Transient,
                        &reason,
                    )
                    .await
                    .map(|()| Settled::Retry),
                // No delay tier (every delay is zero): straight back to the queue.
                None => inner
                    .copy(
                        &publish,
                        &original,
                        "",
                        &inner.topology.queue,
                        attempt + 1,
                        FailureKind::Transient,
                        &reason,
                    )
                    .await
                    .map(|()| Settled::Retry),
            }
        }
        Outcome::Retry { reason, .. } => {
            inner
                .dead_letter(&publish, &original, FailureKind::Exhausted, &reason)
                .await
        }
        Outcome::DeadLetter { reason, kind } => {
            inner.dead_letter(&publish, &original, kind, &reason).await
        }
        Outcome::Release { reason } => {
            tracing::info!(consumer = %inner.name, message_id = message.message_id.as_deref().unwrap_or(""), reason = %reason, "released unsettled; it goes back to the queue");
            Ok(Settled::Release)
        }
    };
    (delivery_tag, result)
}

/// What a copy is made from.
struct Original<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    properties: &'a BasicProperties,
    body: &'a Bytes,
    attempt: u32,
}

impl Inner {
    /// Dead-letters a delivery that breaks a limit as `invalid`, without running the handler.
    async fn refuse(
        &self,
        publish: &Channel,
        (exchange, routing_key, properties): (&str, &str, &BasicProperties),
        data: Vec<u8>,
        invalid: &limits::Invalid,
    ) -> Result<Settled, String> {
        let (properties, body) =
            limits::kept(properties, Bytes::from(data), self.broker.max_message_size);
        let original = Original {
            exchange,
            routing_key,
            properties: &properties,
            body: &body,
            attempt: headers::attempt(properties.headers().as_ref()),
        };
        self.dead_letter(publish, &original, FailureKind::Invalid, &invalid.reason)
            .await
    }

    async fn dead_letter(
        &self,
        publish: &Channel,
        original: &Original<'_>,
        kind: FailureKind,
        reason: &str,
    ) -> Result<Settled, String> {
        let target = &self.topology.dead_letter;
        let key = target
            .routing_key
            .as_deref()
            .unwrap_or(original.routing_key);
        tracing::warn!(consumer = %self.name, message_id = original.properties.message_id().as_ref().map(|m| m.as_str()).unwrap_or(""), attempt = original.attempt, kind = %kind, reason = %headers::truncate(reason, 512), "dead-lettering message");
        self.copy(
            publish,
            original,
            &target.exchange,
            key,
            original.attempt,
            kind,
            reason,
        )
        .await
        .map(|()| Settled::DeadLetter)
    }

    /// Publishes a copy with every original property and header plus the failure headers,
    /// and waits for the broker's confirm.
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        publish: &Channel,
        original: &Original<'_>,
        exchange: &str,
        routing_key: &str,
        attempt: u32,
        kind: FailureKind,
        reason: &str,
    ) -> Result<(), String> {
        let mut table = original.properties.headers().clone().unwrap_or_default();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        headers::add_failure(
            &mut table,
            &headers::Failure {
                attempt,
                kind,
                error: reason,
                exchange: original.exchange,
                routing_key: original.routing_key,
                queue: &self.topology.queue,
                consumer: &self.name,
                host: &self.host,
                now: &now,
            },
        );
        let mut properties = original
            .properties
            .clone()
            .with_headers(table)
            .with_delivery_mode(PERSISTENT);
        if original.properties.message_id().is_none() {
            // Later attempts and the dead letter must share one id for deduplication.
            properties = properties.with_message_id(uuid::Uuid::now_v7().to_string().into());
        }
        let (exchange_name, key) = match (
            short("exchange", exchange),
            short("routing key", routing_key),
        ) {
            (Ok(e), Ok(k)) => (e, k),
            (Err(e), _) | (_, Err(e)) => return Err(e.to_string()),
        };
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let confirm = publish
            .basic_publish(exchange_name, key, options, original.body, properties)
            .await
            .map_err(|e| {
                format!("cannot publish a {kind} copy to {exchange:?}/{routing_key:?}: {e}")
            })?;
        match confirmation(confirm.await, exchange, routing_key, original.body.len()) {
            Ok(()) => Ok(()),
            Err(PublishError::Connection(e)) => {
                Err(format!("the {kind} copy was not confirmed: {e}"))
            }
            // The destination is gone or refuses: end the session so the topology is declared
            // again; the original stays unacked and comes back.
            Err(e) => {
                tracing::error!(consumer = %self.name, exchange, routing_key, error = %e, "retry or dead-letter copy was not accepted; the original is kept");
                Err(format!("the {kind} copy was not accepted: {e}"))
            }
        }
    }
}

/// The settlement window of one channel: which delivery tags are settled and which are
/// already acked. Tags on a channel with one consumer arrive in order, one apart.
struct Acks {
    /// Tag of `states[0]`.
    base: u64,
    states: VecDeque<State>,
    /// Settled tags not yet acked.
    settled: usize,
    /// Tags acked one by one, still in `states` behind an unsettled one.
    acked: usize,
    /// Settled tags that make a `multiple` ack worth sending now.
    batch: usize,
    /// The broker's window: when this many tags are unacked it sends no more.
    window: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Settled,
    Acked,
}

impl Acks {
    fn new(batch: usize, window: usize) -> Self {
        Self {
            base: 0,
            states: VecDeque::with_capacity(window),
            settled: 0,
            acked: 0,
            batch,
            window,
        }
    }

    fn delivered(&mut self, tag: u64) {
        if self.states.is_empty() {
            self.base = tag;
        }
        let next = self.base + self.states.len() as u64;
        if tag < next {
            return;
        }
        for _ in next..tag {
            // A gap would be a broker bug; treating the missing tags as settled by someone
            // else would ack them, so keep them pending instead (never acked past).
            self.states.push_back(State::Pending);
        }
        self.states.push_back(State::Pending);
    }

    fn settle(&mut self, tag: u64) {
        if let Some(state) = tag
            .checked_sub(self.base)
            .and_then(|i| self.states.get_mut(i as usize))
            && *state == State::Pending
        {
            *state = State::Settled;
            self.settled += 1;
        }
    }

    /// `tag` was nacked on its own: it is no longer outstanding, and a later `multiple` ack
    /// passes over it.
    fn released(&mut self, tag: u64) {
        if let Some(state) = tag
            .checked_sub(self.base)
            .and_then(|i| self.states.get_mut(i as usize))
            && *state == State::Pending
        {
            *state = State::Acked;
            self.acked += 1;
        }
    }

    fn batch_ready(&self) -> bool {
        self.settled >= self.batch
    }

    /// Acks the settled run at the head with one `multiple` ack; with `stragglers` and a full
    /// window, also acks the settled tags behind the first unsettled one, one by one.
    async fn flush(&mut self, channel: &Channel, stragglers: bool) -> Result<(), lapin::Error> {
        if self.settled == 0 {
            return Ok(());
        }
        let run = self
            .states
            .iter()
            .position(|s| *s == State::Pending)
            .unwrap_or(self.states.len());
        let last_settled = self
            .states
            .iter()
            .take(run)
            .rposition(|s| *s == State::Settled);
        if let Some(last) = last_settled {
            let tag = self.base + last as u64;
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
            let settled_in_run = self
                .states
                .iter()
                .take(run)
                .filter(|s| **s == State::Settled)
                .count();
            let acked_in_run = run - settled_in_run;
            self.settled -= settled_in_run;
            self.acked -= acked_in_run;
            self.states.drain(..run);
            self.base += run as u64;
        }
        if stragglers && self.settled > 0 && self.states.len() - self.acked >= self.window {
            for (i, state) in self.states.iter_mut().enumerate() {
                if *state == State::Settled {
                    channel
                        .basic_ack(self.base + i as u64, BasicAckOptions { multiple: false })
                        .await?;
                    *state = State::Acked;
                    self.settled -= 1;
                    self.acked += 1;
                }
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
        assert_eq!(
            acks.states.iter().position(|s| *s == State::Pending),
            Some(0)
        );
        acks.settle(1);
        acks.settle(1);
        assert_eq!(acks.settled, 3);
        assert!(acks.batch_ready());
        acks.settle(99);
        assert_eq!(acks.settled, 3);
    }

    #[test]
    fn a_released_tag_leaves_the_window_without_an_ack() {
        let mut acks = Acks::new(2, 10);
        for tag in 1..=3 {
            acks.delivered(tag);
        }
        acks.released(1);
        acks.released(1);
        assert_eq!((acks.acked, acks.settled), (1, 0));
        assert_eq!(acks.states[0], State::Acked);
        // A settled tag cannot be released afterwards: it is acked, never nacked too.
        acks.settle(2);
        acks.released(2);
        assert_eq!((acks.acked, acks.settled), (1, 1));
    }
}
