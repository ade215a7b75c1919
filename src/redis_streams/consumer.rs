//! The consumer-group component.
//!
//! Task tree of one running consumer:
//! - the reader (this task): takes its own pending entries (XPENDING, then XCLAIM of those
//!   not in flight), then reads new ones with `>` and `BLOCK` on a connection of its own;
//!   reconnects with backoff;
//! - the keeper ([`keep_name`]): renews the consumer-name lock while the reader runs;
//! - one task per entry, up to `concurrency` at once, that runs the handler and turns its
//!   outcome into a [`Settlement`] (the dispatcher of [`super::dispatch`]);
//! - the settler ([`settle`]): batches settlements into one pipeline (one XACK for every
//!   ack and drop, one script call per retry or dead letter) on the managed connection;
//! - the claimer ([`super::claim`]) and the retry mover ([`super::retry`]).
//!
//! An entry id stays in the `inflight` set from the moment it is read until its settlement
//! is confirmed, so neither the pending re-read after a reconnect nor XAUTOCLAIM hands it to
//! a second handler in this process.
//!
//! Delivery counts (`XPENDING`'s, compared with `max_deliveries`) count deliveries to a
//! handler only: entries still in flight here are never re-read nor claimed in a way that
//! counts (own pending entries are listed with XPENDING and only those not in flight are
//! XCLAIMed; XAUTOCLAIM runs with `JUSTID`, which does not count, and only the entries not
//! in flight are then XCLAIMed), and a release gives its delivery back ([`RELEASE`]). XCLAIM
//! claims only entries still pending, so an entry settled between a listing and its claim is
//! never handed out again.
//!
//! The consumer name is held with a lock key renewed while the consumer runs: a second
//! live process with the same name waits instead of reading under it.
//!
//! [`RELEASE`]: super::scripts::RELEASE

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt as _;
use metrics::Gauge;
use redis::Value;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatch::{
    Action, Delivery, Dispatcher, Inflight, Inner, Metrics, NameLock, SETTLE_BATCH, Settlement,
    id_key, parse_read_any,
};
use super::scripts::Scripts;
use super::{Ops, RedisStreamsError, client_name, connect_reader};
use crate::config::{ConsumerConfig, RedisBrokerConfig, RedisConsumerConfig, redis_keys};
use crate::flow_control::Gate;
use crate::handler::Handler;
use crate::health::HealthHandle;
use crate::retry::{ExponentialBackoff, sleep_or_cancel};
use crate::supervisor::{Component, ComponentContext};

/// Waits between reconnects and between tries of a settlement: 0.1 s doubling to 5 s.
const BACKOFF: ExponentialBackoff =
    ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(5));
/// How often the running consumer renews its name lock.
const LOCK_RENEW: Duration = Duration::from_millis(2500);

/// A Redis Streams consumer-group consumer: one `[consumers.NAME]` whose source is a redis
/// broker.
pub struct RedisConsumer {
    inner: Arc<Inner>,
}

/// What a redis consumer is made from.
pub struct RedisConsumerSpec<'a> {
    /// The `[consumers.*]` name.
    pub name: &'a str,
    pub consumer: &'a ConsumerConfig,
    pub redis: &'a RedisConsumerConfig,
    /// The `[brokers.*]` name and its config.
    pub broker_name: &'a str,
    pub broker: &'a RedisBrokerConfig,
    pub handler: Arc<dyn Handler>,
    pub gate: Gate,
    pub inbox: Option<Arc<crate::inbox::Inbox>>,
}

impl RedisConsumer {
    /// A consumer for `[consumers.NAME]`, reading its redis broker.
    pub fn new(spec: RedisConsumerSpec<'_>) -> Self {
        let RedisConsumerSpec {
            name,
            consumer,
            redis: config,
            broker_name,
            broker,
            handler,
            gate,
            inbox,
        } = spec;
        let cluster = broker.is_cluster();
        let lock_prefix = super::dispatch::lock_prefix(&config.stream, &config.group, cluster);
        Self {
            inner: Arc::new(Inner {
                inbox,
                name: name.to_owned(),
                broker_name: broker_name.to_owned(),
                broker: broker.clone(),
                config: config.clone(),
                retry: consumer.retry.clone(),
                trace: consumer.trace,
                concurrency: consumer.concurrency.max(1),
                handler,
                gate,
                retry_key: redis_keys::derived_key(&config.stream, "retry", cluster),
                lock_prefix: lock_prefix.clone(),
                dead_letter_apart: cluster
                    && redis_keys::hash_slot(config.dead_letter_stream.as_bytes())
                        != redis_keys::hash_slot(config.stream.as_bytes()),
                scripts: Scripts::default(),
                metrics: Metrics::new(name, broker_name, &consumer.handler),
                name_lock: NameLock::new(config, &lock_prefix),
                lease: consumer
                    .single_active
                    .then(|| super::lease::Lease::new(config, cluster)),
                activity: crate::activity::Activity::new(name),
                ordering: consumer.ordering.clone().map(|o| {
                    let lanes = std::sync::Mutex::new(crate::ordering::Lanes::new(o.lanes));
                    (o, lanes)
                }),
            }),
        }
    }
}

#[async_trait]
impl Component for RedisConsumer {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()> {
        let inner = self.inner.clone();
        let health = ctx.health.clone();
        let broker = inner.broker_name.clone();

        let ops_name = client_name(&inner.config.consumer, "ops");
        let mut backoff = BACKOFF;
        let ops = loop {
            health.set_not_ready(format!("connecting to redis broker `{broker}`"));
            match Ops::connect(&inner.broker, &ops_name).await {
                Ok(ops) => break ops,
                Err(e) => {
                    let delay = backoff.failed();
                    tracing::warn!(consumer = %inner.name, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot connect to redis; retrying");
                    health.set_not_ready(format!("connecting to redis broker `{broker}`: {e}"));
                    if sleep_or_cancel(delay, &ctx.shutdown).await {
                        return Ok(());
                    }
                }
            }
        };

        let (settle_tx, settle_rx) = mpsc::channel(SETTLE_BATCH.max(inner.concurrency * 2));
        let inflight = Inflight::default();
        let dispatcher = Dispatcher {
            inner: inner.clone(),
            permits: Arc::new(Semaphore::new(inner.concurrency)),
            tracker: TaskTracker::new(),
            settle: settle_tx,
            inflight: inflight.clone(),
            shutdown: ctx.shutdown.clone(),
        };
        let settler = tokio::spawn(settle(inner.clone(), ops.clone(), settle_rx, inflight));
        // The helpers stop with the reader, before the drain, so nothing new is dispatched.
        let helpers = ctx.shutdown.child_token();
        let claimer = tokio::spawn(super::claim::run(
            inner.clone(),
            ops.clone(),
            dispatcher.clone(),
            helpers.clone(),
        ));
        let mover = tokio::spawn(super::retry::run(
            super::retry::Mover {
                name: inner.name.clone(),
                config: inner.config.clone(),
                retry_key: inner.retry_key.clone(),
                parked_key: inner
                    .dead_letter_apart
                    .then(|| redis_keys::derived_key(&inner.config.stream, "invalid", true)),
                scripts: inner.scripts.clone(),
                invalid_retries: inner.metrics.invalid_retries.clone(),
            },
            ops.clone(),
            helpers.clone(),
        ));
        let trim = super::trim::targets(&inner.config);
        let trimmer = tokio::spawn(super::trim::run(
            inner.name.clone(),
            ops.clone(),
            trim,
            helpers.clone(),
        ));

        read_loop(&inner, &ops, &dispatcher, &ctx.shutdown, &health).await;

        helpers.cancel();
        let _ = claimer.await;
        let _ = mover.await;
        let _ = trimmer.await;
        health.set_not_ready("draining");
        dispatcher.tracker.close();
        dispatcher.tracker.wait().await;
        // The last sender goes with the dispatcher: the settler drains its queue and ends.
        drop(dispatcher);
        if let Err(e) = settler.await {
            tracing::error!(consumer = %inner.name, error = %e, "the settler task failed");
        }
        inner.unlock_name(&ops).await;
        if let Some(lease) = &inner.lease {
            lease.release(&inner.scripts, &ops).await;
        }
        inner.activity.idle();
        tracing::info!(consumer = %inner.name, "redis consumer stopped");
        Ok(())
    }
}

/// Reads until shutdown, reconnecting with backoff when the read connection fails.
async fn read_loop(
    inner: &Arc<Inner>,
    ops: &Ops,
    dispatcher: &Dispatcher,
    shutdown: &CancellationToken,
    health: &HealthHandle,
) {
    let mut backoff = BACKOFF;
    let mut was_connected = false;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let result = session(
            inner,
            ops,
            dispatcher,
            shutdown,
            health,
            &mut was_connected,
            &mut backoff,
        )
        .await;
        inner.name_lock.set_held(false);
        inner.activity.idle();
        match result {
            Ok(()) => return,
            Err(e @ RedisStreamsError::LeaseLost { .. }) => {
                // Back to standing by at once: the next session waits for the lease.
                tracing::warn!(consumer = %inner.name, error = %e, "stopped reading");
            }
            Err(e @ RedisStreamsError::NameInUse { .. }) => {
                let delay = backoff.failed();
                tracing::error!(consumer = %inner.name, error = %e, retry_in_ms = delay.as_millis() as u64, "not reading: the consumer name is taken");
                health.set_not_ready(e.to_string());
                if sleep_or_cancel(delay, shutdown).await {
                    return;
                }
            }
            Err(e) => {
                let delay = backoff.failed();
                tracing::warn!(consumer = %inner.name, broker = %inner.broker_name, error = %e, retry_in_ms = delay.as_millis() as u64, "redis consumer lost its connection; reconnecting");
                health.set_not_ready(format!(
                    "reconnecting to redis broker `{}`: {e}",
                    inner.broker_name
                ));
                if sleep_or_cancel(delay, shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Decrements the connected gauge however the session ends (including an abort).
struct ConnectedGuard<'a>(&'a Gauge);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One connected stretch of reading: Ok at shutdown, Err when the connection fails.
async fn session(
    inner: &Arc<Inner>,
    ops: &Ops,
    dispatcher: &Dispatcher,
    shutdown: &CancellationToken,
    health: &HealthHandle,
    was_connected: &mut bool,
    backoff: &mut ExponentialBackoff,
) -> Result<(), RedisStreamsError> {
    let config = &inner.config;
    let mut reader = connect_reader(
        &inner.broker,
        &client_name(&config.consumer, "read"),
        config.block,
    )
    .await?;
    // On a cluster, the node the stream lives on: the read blocks there.
    let reader_id: i64 = reader
        .query_on_node_of(&config.stream, &redis::cmd("CLIENT").arg("ID").to_owned())
        .await
        .map_err(RedisStreamsError::command("CLIENT ID"))?;
    inner.ensure_group(ops).await?;
    inner
        .scripts
        .load(ops)
        .await
        .map_err(RedisStreamsError::command("SCRIPT LOAD"))?;
    if let Some(lease) = &inner.lease {
        let mut told = false;
        loop {
            if let Some(fence) = lease.take(&inner.scripts, ops).await? {
                tracing::info!(consumer = %inner.name, stream = %config.stream, group = %config.group, fence, "took the single-active lease; this process reads");
                break;
            }
            let holder = lease.holder(ops).await.unwrap_or_default();
            if !told {
                tracing::info!(consumer = %inner.name, stream = %config.stream, group = %config.group, %holder, "single_active: another process reads; standing by");
                told = true;
            }
            inner.activity.standby(format!(
                "single_active: another process holds the lease ({holder})"
            ));
            // A standby is healthy and ready: it takes over by itself.
            health.set_ready();
            if sleep_or_cancel(super::lease::LEASE_RENEW, shutdown).await {
                return Ok(());
            }
        }
    }
    if !inner.lock_name(ops).await? {
        return Err(name_in_use(config));
    }
    inner.name_lock.set_held(true);
    inner.activity.active();
    // The keeper renews the name lock while this session reads, and says when it was lost.
    let lost = CancellationToken::new();
    let keeper_stop = CancellationToken::new();
    let _keeper = keeper_stop.clone().drop_guard();
    tokio::spawn(keep_name(
        inner.clone(),
        ops.clone(),
        lost.clone(),
        keeper_stop,
    ));

    if *was_connected {
        inner.metrics.reconnects.increment(1);
        tracing::info!(consumer = %inner.name, broker = %inner.broker_name, "reconnected to redis");
    }
    *was_connected = true;
    backoff.reset();
    // One per connected consumer, as for amqp: several consumers share a broker's gauge.
    inner.metrics.connected.increment(1.0);
    let _connected = ConnectedGuard(&inner.metrics.connected);
    health.set_ready();
    tracing::info!(consumer = %inner.name, stream = %config.stream, group = %config.group, redis_consumer = %config.consumer, "redis consumer reading");

    // Own pending entries first (from a crash or a lost connection), then new ones.
    if !read_own_pending(inner, ops, dispatcher, &lost, shutdown).await? {
        return Ok(());
    }
    // The task starting the previous batch's handlers (it lives in the tracker, so the drain
    // at shutdown waits for it).
    let mut starting: Option<tokio::task::JoinHandle<()>> = None;
    let block_ms = config.block.as_millis().max(1) as u64;
    loop {
        if inner.gate.stopped().is_some() {
            // Stopped by the gate (a pause, an open breaker): no read, no claim, until it
            // opens; then the entries released meanwhile are read first.
            tokio::select! {
                _ = inner.gate.wait_open() => {}
                _ = lost.cancelled() => return Err(lost_error(inner)),
                _ = shutdown.cancelled() => return Ok(()),
            }
            tracing::info!(consumer = %inner.name, "reading again");
            if !read_own_pending(inner, ops, dispatcher, &lost, shutdown).await? {
                return Ok(());
            }
        }
        // One entry at a time while the breaker is half-open: its one probe.
        let count = if inner.gate.probing() {
            1
        } else {
            config.batch
        };
        // Only the lease's holder reads: one that could not renew in time stops first.
        if inner.lease.as_ref().is_some_and(|l| !l.is_fresh()) {
            return Err(lost_error(inner));
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&config.group)
            .arg(&config.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&config.stream)
            .arg(">");

        let read = cmd.query_async::<Value>(&mut reader);
        tokio::pin!(read);
        let mut stopping = false;
        let reply = tokio::select! {
            reply = &mut read => reply,
            _ = lost.cancelled() => {
                // Another process took the name (or the lease) while this one could not
                // renew it: stop reading. Whatever the abandoned read took stays pending.
                return Err(lost_error(inner));
            }
            _ = shutdown.cancelled() => {
                // Wake the blocked read so whatever it already took is handled, not left
                // pending until the next start.
                stopping = true;
                let unblock = redis::cmd("CLIENT").arg("UNBLOCK").arg(reader_id).to_owned();
                if let Err(e) = ops
                    .conn()
                    .query_on_node_of::<i64>(&config.stream, &unblock)
                    .await
                {
                    tracing::debug!(consumer = %inner.name, error = %e, "CLIENT UNBLOCK failed");
                }
                match tokio::time::timeout(Duration::from_secs(2), &mut read).await {
                    Ok(reply) => reply,
                    Err(_) => return Ok(()),
                }
            }
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) if e.code() == Some("NOGROUP") => {
                if stopping {
                    return Ok(());
                }
                tracing::warn!(consumer = %inner.name, stream = %config.stream, group = %config.group, "the stream or its consumer group vanished; re-creating it");
                inner.ensure_group(ops).await?;
                continue;
            }
            Err(source) if stopping => {
                tracing::debug!(consumer = %inner.name, error = %source, "read ended at shutdown");
                return Ok(());
            }
            Err(source) => {
                return Err(RedisStreamsError::Command {
                    command: "XREADGROUP",
                    source,
                });
            }
        };
        let (entries, _) = parse_read_any(reply)?;
        let deliveries = entries
            .into_iter()
            .map(|entry| Delivery {
                entry,
                deliveries: 1,
            })
            .collect();
        // The next read goes out while this batch waits for handler capacity, so Redis is
        // never idle between batches; one batch waits at most.
        if let Some(previous) = starting.take() {
            let _ = previous.await;
        }
        let fresh = dispatcher.admit(deliveries);
        let d = dispatcher.clone();
        starting = Some(
            dispatcher
                .tracker
                .spawn(async move { d.start(fresh, false).await }),
        );
        if stopping || shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// Hands this consumer's own pending entries to its handlers (after a crash, a lost
/// connection, or a pause that released them). They are listed with XPENDING and claimed one
/// by one, so those still in flight here are not delivered (and counted) again. False at
/// shutdown.
async fn read_own_pending(
    inner: &Arc<Inner>,
    ops: &Ops,
    dispatcher: &Dispatcher,
    lost: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<bool, RedisStreamsError> {
    let mut after: Option<String> = None;
    loop {
        if lost.is_cancelled() {
            return Err(name_in_use(&inner.config));
        }
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        let (deliveries, next) = inner
            .own_pending_page(ops, dispatcher, after.as_deref())
            .await?;
        if !deliveries.is_empty() {
            dispatcher.dispatch_reserved(deliveries).await;
        }
        match next {
            Some(id) => after = Some(id),
            None => return Ok(true),
        }
    }
}

/// Why reading stopped when `lost` fired: the lease, if it is no longer fresh, else the name.
fn lost_error(inner: &Inner) -> RedisStreamsError {
    if inner.lease.as_ref().is_some_and(|l| !l.is_fresh()) {
        RedisStreamsError::LeaseLost {
            group: inner.config.group.clone(),
            stream: inner.config.stream.clone(),
        }
    } else {
        name_in_use(&inner.config)
    }
}

fn name_in_use(config: &RedisConsumerConfig) -> RedisStreamsError {
    RedisStreamsError::NameInUse {
        consumer: config.consumer.clone(),
        group: config.group.clone(),
        stream: config.stream.clone(),
    }
}

/// Renews the name lock every [`LOCK_RENEW`] until `stop`; cancels `lost` when another
/// process holds it. A renewal that fails on the connection is tried again: the lock lives
/// [`LOCK_TTL`], several renewals.
async fn keep_name(inner: Arc<Inner>, ops: Ops, lost: CancellationToken, stop: CancellationToken) {
    loop {
        if sleep_or_cancel(LOCK_RENEW, &stop).await {
            return;
        }
        match inner.lock_name(&ops).await {
            Ok(true) => {}
            Ok(false) => {
                inner.name_lock.set_held(false);
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::debug!(consumer = %inner.name, error = %e, "cannot renew the consumer-name lock; trying again");
            }
        }
        if let Some(lease) = &inner.lease {
            match lease.take(&inner.scripts, &ops).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    inner.name_lock.set_held(false);
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    tracing::debug!(consumer = %inner.name, error = %e, "cannot renew the single-active lease; trying again");
                }
            }
            if !lease.is_fresh() {
                inner.name_lock.set_held(false);
                lost.cancel();
                return;
            }
        }
    }
}

/// The settler: applies settlements in batches until every sender is gone.
async fn settle(
    inner: Arc<Inner>,
    ops: Ops,
    mut rx: mpsc::Receiver<Settlement>,
    inflight: Inflight,
) {
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    while rx.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
        if batch.len() < SETTLE_BATCH {
            // Let handlers that are about to finish queue theirs: fewer, larger XACKs.
            tokio::task::yield_now().await;
            let room = SETTLE_BATCH - batch.len();
            // recv_many is cancel-safe: when nothing is queued, nothing is taken.
            let _ = rx.recv_many(&mut batch, room).now_or_never();
        }
        let durable = settle_batch(&inner, &ops, &batch).await;
        {
            let mut set = inflight.lock();
            for s in &batch {
                set.remove(&id_key(&s.id));
            }
        }
        // A dead letter's inbox claim is done only once its copy is in the dead-letter
        // stream; one whose copy was refused stays pending and its claim is released (the
        // ticket's drop), so the entry runs again when it is claimed.
        for (s, durable) in batch.drain(..).zip(durable) {
            // A copy's PRODUCER span ends once the batch carrying it is written.
            drop(s.span);
            if let Some(ticket) = s.ticket
                && durable
            {
                tokio::spawn(ticket.finish(crate::inbox::Finish::Done));
            }
        }
    }
}

/// Sends one batch of settlements as a pipeline, again and again until the connection
/// carries it; commands the server refuses for now (`OOM`, `BUSY`, `LOADING`...) are sent
/// again too. Re-sending is safe: XACK is idempotent and each script acts only if its entry
/// is still pending.
async fn settle_batch(inner: &Inner, ops: &Ops, batch: &[Settlement]) -> Vec<bool> {
    let config = &inner.config;
    // Whether each settlement's script was applied (copies written, entry acked).
    let mut durable = vec![false; batch.len()];
    let acks: Vec<&str> = batch
        .iter()
        .filter(|s| matches!(s.action, Action::Ack | Action::Drop))
        .map(|s| s.id.as_str())
        .collect();
    // Each command with the settlement it belongs to (`None`: the shared XACK).
    let mut commands: Vec<(Option<usize>, redis::Cmd)> = Vec::with_capacity(batch.len() + 1);
    if !acks.is_empty() {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&config.stream).arg(&config.group).arg(&acks);
        commands.push((None, cmd));
    }
    // Dead letters whose stream is in another slot: written apart, after the pipeline.
    let mut apart = Vec::new();
    for (i, s) in batch.iter().enumerate() {
        let cmd = match &s.action {
            Action::Ack | Action::Drop => continue,
            Action::DeadLetter { .. } if inner.dead_letter_apart => {
                apart.push(i);
                continue;
            }
            Action::Release => {
                let mut cmd = inner.scripts.release.call(&[&config.stream]);
                cmd.arg(&config.group).arg(&s.id).arg(&config.consumer);
                cmd
            }
            Action::Retry { fields, delay_ms } => {
                let mut cmd = inner
                    .scripts
                    .retry
                    .call(&[&config.stream, &inner.retry_key]);
                cmd.arg(&config.group).arg(&s.id).arg(*delay_ms);
                push_fields(&mut cmd, fields);
                cmd
            }
            Action::DeadLetter { fields } => {
                let mut cmd = inner
                    .scripts
                    .dead_letter
                    .call(&[&config.stream, &config.dead_letter_stream]);
                cmd.arg(&config.group).arg(&s.id);
                push_fields(&mut cmd, fields);
                cmd
            }
        };
        commands.push((Some(i), cmd));
    }

    let metrics = &inner.metrics;
    let mut backoff = BACKOFF;
    while !commands.is_empty() {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (_, cmd) in &commands {
            pipe.add_command(cmd.clone());
        }
        let replies = match ops
            .query_pipe::<Vec<redis::RedisResult<Value>>>(&pipe)
            .await
        {
            Ok(replies) => replies,
            Err(e) => {
                let delay = backoff.failed();
                tracing::warn!(consumer = %inner.name, error = %e, pending = batch.len(), retry_in_ms = delay.as_millis() as u64, "cannot settle entries; retrying");
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let mut again = Vec::new();
        let mut reload = false;
        for ((owner, cmd), reply) in commands.into_iter().zip(replies) {
            match (owner, reply) {
                (None, Ok(_)) => {
                    for s in batch {
                        match s.action {
                            Action::Ack => metrics.settled_ack.increment(1),
                            Action::Drop => metrics.settled_drop.increment(1),
                            _ => {}
                        }
                    }
                }
                (Some(i), Ok(value)) => {
                    let s = &batch[i];
                    let applied = !matches!(value, Value::Nil | Value::Int(0));
                    durable[i] = applied;
                    match (&s.action, applied) {
                        (Action::Retry { .. }, true) => metrics.settled_retry.increment(1),
                        (Action::DeadLetter { .. }, true) => {
                            metrics.settled_dead_letter.increment(1)
                        }
                        (Action::Release, _) => metrics.released.increment(1),
                        _ => {
                            tracing::info!(consumer = %inner.name, entry_id = %s.id, "entry was settled elsewhere (claimed by another consumer); nothing to do")
                        }
                    }
                }
                (owner, Err(e)) if e.code() == Some("NOSCRIPT") || super::is_transient(&e) => {
                    reload |= e.code() == Some("NOSCRIPT");
                    tracing::warn!(consumer = %inner.name, error = %e, entry_id = owner.map(|i| batch[i].id.as_str()), "redis cannot take a settlement now; retrying");
                    again.push((owner, cmd));
                }
                (owner, Err(e)) => {
                    let ids: Vec<&str> = match owner {
                        Some(i) => vec![batch[i].id.as_str()],
                        None => acks.clone(),
                    };
                    // Left pending: XAUTOCLAIM offers it again after `claim_idle`.
                    tracing::error!(consumer = %inner.name, error = %e, entries = %ids.join(", "), "redis refused a settlement; the entries stay pending");
                }
            }
        }
        commands = again;
        if commands.is_empty() {
            break;
        }
        if reload {
            tracing::info!(consumer = %inner.name, "redis lost its script cache; loading the scripts again");
            if let Err(e) = inner.scripts.load(ops).await {
                tracing::warn!(consumer = %inner.name, error = %e, "cannot load scripts");
            } else {
                continue;
            }
        }
        tokio::time::sleep(backoff.failed()).await;
    }
    for i in apart {
        durable[i] = dead_letter_apart(inner, ops, &batch[i]).await;
    }
    durable
}

/// Dead-letters one entry whose dead-letter stream is in another slot of the cluster than
/// its stream, so no script can write both: checked still pending, copied with XADD, then
/// acknowledged, each a command of its own, each tried again until the cluster takes it. A
/// crash between the copy and the XACK leaves the entry pending: it is dead-lettered again
/// (a duplicate copy, never a loss). Whether the copy was written.
async fn dead_letter_apart(inner: &Inner, ops: &Ops, s: &Settlement) -> bool {
    let config = &inner.config;
    let Action::DeadLetter { fields } = &s.action else {
        return false;
    };
    let mut backoff = BACKOFF;
    let mut copied = false;
    loop {
        let step: redis::RedisResult<bool> = async {
            if !copied {
                let pending: Vec<Value> = ops
                    .query(
                        redis::cmd("XPENDING")
                            .arg(&config.stream)
                            .arg(&config.group)
                            .arg(&s.id)
                            .arg(&s.id)
                            .arg(1),
                    )
                    .await?;
                if pending.is_empty() {
                    return Ok(false);
                }
                let mut xadd = redis::cmd("XADD");
                xadd.arg(&config.dead_letter_stream).arg("*");
                push_fields(&mut xadd, fields);
                ops.query::<Value>(&xadd).await?;
                copied = true;
            }
            ops.query::<i64>(
                redis::cmd("XACK")
                    .arg(&config.stream)
                    .arg(&config.group)
                    .arg(&s.id),
            )
            .await?;
            Ok(true)
        }
        .await;
        match step {
            Ok(true) => {
                inner.metrics.settled_dead_letter.increment(1);
                return true;
            }
            Ok(false) => {
                tracing::info!(consumer = %inner.name, entry_id = %s.id, "entry was settled elsewhere (claimed by another consumer); nothing to do");
                return false;
            }
            Err(e) if super::is_transient(&e) => {
                let delay = backoff.failed();
                tracing::warn!(consumer = %inner.name, error = %e, entry_id = %s.id, retry_in_ms = delay.as_millis() as u64, "redis cannot take a dead letter now; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                // Left pending (or copied and pending): XAUTOCLAIM offers it again.
                tracing::error!(consumer = %inner.name, error = %e, entry_id = %s.id, copied, "redis refused a dead letter; the entry stays pending");
                return copied;
            }
        }
    }
}

fn push_fields(cmd: &mut redis::Cmd, fields: &[(Bytes, Bytes)]) {
    for (k, v) in fields {
        cmd.arg(k.as_ref()).arg(v.as_ref());
    }
}
