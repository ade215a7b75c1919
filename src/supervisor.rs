//! The supervisor: runs every component as a tokio task, restarts the ones that fail, and
//! drives shutdown and reload.
//!
//! It is one explicit event loop over [`Event`]. Components never call each other; they
//! report only by returning (or panicking), which the loop sees as [`Event::Exited`].
//!
//! Restarts use capped exponential backoff, reset once a component has run for
//! `healthy_after`. Shutdown cancels the root token, waits up to `shutdown_timeout` for
//! every component to drain, then aborts the rest.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::health::Health;
/// A component's readiness entry on `/readyz`, in its [`ComponentContext`].
pub use crate::health::HealthHandle;
use crate::retry::ExponentialBackoff;

/// A long-running part of the daemon: a consumer, a relay, a dead-letter processor.
///
/// `run` returns when `ctx.shutdown` is cancelled and its in-flight work is settled. An
/// error (or a panic) makes the supervisor restart it after a backoff.
#[async_trait]
pub trait Component: Send + Sync + 'static {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()>;
}

/// What a running component gets from the supervisor.
#[derive(Clone)]
pub struct ComponentContext {
    /// Its name, e.g. `consumer:orders`.
    pub name: String,
    /// Cancelled when the component must stop taking work, drain, and return.
    pub shutdown: CancellationToken,
    /// Its readiness entry on `/readyz`.
    pub health: HealthHandle,
}

/// A named component, as the supervisor is given it.
pub(crate) type NamedComponent = (String, Arc<dyn Component>);

/// Signals the supervisor acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    /// SIGTERM / SIGINT: drain and stop; a second one stops at once.
    Terminate,
    /// SIGQUIT: stop at once.
    Quit,
    /// SIGHUP: reload the configuration.
    Reload,
}

/// Components to stop and start, computed by a [`ReloadHook`].
#[derive(Default)]
pub(crate) struct Changes {
    /// Components to stop gracefully (removed or changed).
    pub stop: Vec<String>,
    /// Components to start once the stopped ones are gone (added or changed).
    pub start: Vec<NamedComponent>,
}

/// Called on SIGHUP (and on config-file change when watching). Returns what to change;
/// `None` (an invalid file, or nothing changed) leaves every component running.
#[async_trait]
pub(crate) trait ReloadHook: Send {
    async fn reload(&mut self, running: &[String]) -> Option<Changes>;
    /// Called once the changes from the last `reload` are applied.
    async fn applied(&mut self) {}
}

/// Observes supervisor milestones (systemd notification uses this).
pub trait Lifecycle: Send {
    /// Every initial component has been started (it may still be connecting or retrying).
    fn started(&mut self) {}
    fn reloading(&mut self) {}
    fn reloaded(&mut self, _ok: bool) {}
    fn stopping(&mut self) {}
    /// Called on each loop tick while the loop is healthy.
    fn tick(&mut self) {}
}

/// A lifecycle that observes nothing.
pub(crate) struct NoLifecycle;
impl Lifecycle for NoLifecycle {}

/// Tunables of the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// How long a graceful shutdown may take before the rest is aborted.
    pub shutdown_timeout: Duration,
    /// First restart delay.
    pub backoff_initial: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// A component that ran this long before failing is restarted from `backoff_initial`.
    pub healthy_after: Duration,
    /// Loop tick (heartbeat for `/healthz` and the systemd watchdog).
    pub tick: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
            tick: Duration::from_secs(1),
        }
    }
}

/// How the supervisor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Every component drained in time.
    Clean,
    /// The shutdown timeout cut some components off.
    TimedOut,
    /// A second signal (or SIGQUIT) stopped the process at once.
    Forced,
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExitStatus::Clean => "clean",
            ExitStatus::TimedOut => "timed_out",
            ExitStatus::Forced => "forced",
        })
    }
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Clean => 0,
            ExitStatus::TimedOut | ExitStatus::Forced => 1,
        }
    }
}

/// Why a component's task ended other than by returning `Ok`.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0:#}")]
    Failed(anyhow::Error),
    #[error("panicked: {0}")]
    Panicked(String),
}

/// Everything the loop reacts to.
enum Event {
    /// A component's task ended: returned Ok/Err, or panicked.
    Exited {
        name: String,
        generation: u64,
        result: Result<(), Ended>,
        ran_for: Duration,
    },
    /// A failed component's backoff elapsed.
    RestartDue {
        name: String,
        generation: u64,
    },
    Signal(SignalKind),
    Tick,
    /// The drain deadline passed.
    DrainDeadline,
    /// `shutdown_timeout` passed since a reload asked this run of a component to stop.
    ReloadStopDeadline {
        name: String,
        generation: u64,
    },
}

/// One named component and its current run.
struct Slot {
    component: Arc<dyn Component>,
    generation: u64,
    token: CancellationToken,
    abort: Option<AbortHandle>,
    state: SlotState,
    failures: u32,
    health: HealthHandle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Running,
    WaitingRestart,
    /// Asked to stop for a reload: removed when it exits.
    Stopping,
}

enum Phase {
    Running,
    Draining,
}

pub(crate) struct Supervisor {
    config: SupervisorConfig,
    health: Health,
    root: CancellationToken,
    tracker: TaskTracker,
    slots: BTreeMap<String, Slot>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// Components waiting for a stopping predecessor of the same name to exit.
    pending_start: BTreeMap<String, Arc<dyn Component>>,
    reload_in_progress: bool,
    /// The last run's generation.
    generations: u64,
}

impl Supervisor {
    pub fn new(config: SupervisorConfig, health: Health) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Self {
            config,
            health,
            root: CancellationToken::new(),
            tracker: TaskTracker::new(),
            slots: BTreeMap::new(),
            events_tx,
            events_rx,
            pending_start: BTreeMap::new(),
            reload_in_progress: false,
            generations: 0,
        }
    }

    fn spawn(&mut self, name: &str, component: Arc<dyn Component>) {
        // Unique across names and removals, so a late event of an earlier run (one aborted
        // after a reload, or a removed component's) never matches a later run.
        self.generations += 1;
        let generation = self.generations;
        let failures = self.slots.get(name).map(|s| s.failures).unwrap_or(0);
        let token = self.root.child_token();
        let health = match self.slots.get(name) {
            Some(slot) => slot.health.clone(),
            None => self.health.register(name),
        };
        let ctx = ComponentContext {
            name: name.to_owned(),
            shutdown: token.clone(),
            health: health.clone(),
        };
        let events = self.events_tx.clone();
        let task_component = component.clone();
        let task_name = name.to_owned();
        let handle = self.tracker.spawn(async move {
            let started = Instant::now();
            let result = match AssertUnwindSafe(task_component.run(ctx))
                .catch_unwind()
                .await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Ended::Failed(e)),
                Err(panic) => Err(Ended::Panicked(crate::disposition::panic_text(
                    panic.as_ref(),
                ))),
            };
            let _ = events.send(Event::Exited {
                name: task_name,
                generation,
                result,
                ran_for: started.elapsed(),
            });
        });
        crate::telemetry::register_component(name);
        metrics::gauge!("bosun_component_up", "component" => name.to_owned()).set(1.0);
        tracing::info!(component = name, generation, "component started");
        self.slots.insert(
            name.to_owned(),
            Slot {
                component,
                generation,
                token,
                abort: Some(handle.abort_handle()),
                state: SlotState::Running,
                failures,
                health,
            },
        );
    }

    fn backoff(&self, failures: u32) -> Duration {
        ExponentialBackoff::new(self.config.backoff_initial, self.config.backoff_max)
            .delay(failures)
    }

    /// Runs `components` until a terminate signal (from `signals`) and the drain that follows.
    pub async fn run<S>(
        mut self,
        components: Vec<NamedComponent>,
        mut signals: S,
        mut reload: Box<dyn ReloadHook>,
        mut lifecycle: Box<dyn Lifecycle>,
    ) -> ExitStatus
    where
        S: Stream<Item = SignalKind> + Unpin + Send,
    {
        for (name, component) in components {
            self.spawn(&name, component);
        }
        lifecycle.started();
        self.health.beat();

        let events_tx = self.events_tx.clone();
        let tick = self.config.tick;
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                if events_tx.send(Event::Tick).is_err() {
                    break;
                }
            }
        });

        let mut phase = Phase::Running;
        let mut signals_open = true;
        let status = loop {
            let event = tokio::select! {
                Some(event) = self.events_rx.recv() => event,
                signal = signals.next(), if signals_open => match signal {
                    Some(signal) => Event::Signal(signal),
                    None => { signals_open = false; continue; }
                },
            };
            match event {
                Event::Tick => {
                    self.health.beat();
                    lifecycle.tick();
                }
                Event::Exited {
                    name,
                    generation,
                    result,
                    ran_for,
                } => {
                    let Some(slot) = self.slots.get_mut(&name) else {
                        continue;
                    };
                    if slot.generation != generation {
                        continue;
                    }
                    metrics::gauge!("bosun_component_up", "component" => name.clone()).set(0.0);
                    slot.abort = None;
                    match (&phase, slot.state) {
                        (Phase::Draining, _) => {
                            match &result {
                                Ok(()) => tracing::info!(component = %name, "component stopped"),
                                Err(e) => {
                                    tracing::warn!(component = %name, error = %e, "component failed while stopping")
                                }
                            }
                            self.slots.remove(&name);
                            self.health.remove(&name);
                            if self.slots.values().all(|s| s.abort.is_none()) {
                                break ExitStatus::Clean;
                            }
                        }
                        (Phase::Running, SlotState::Stopping) => {
                            tracing::info!(component = %name, "component stopped for reload");
                            self.stopped_for_reload(&name);
                            self.finish_reload_if_done(&mut *reload, &mut *lifecycle)
                                .await;
                        }
                        (Phase::Running, _) => {
                            let error = match result {
                                Ok(()) if slot.token.is_cancelled() => {
                                    self.slots.remove(&name);
                                    continue;
                                }
                                Ok(()) => "returned while it was meant to keep running".to_owned(),
                                Err(e) => e.to_string(),
                            };
                            if ran_for >= self.config.healthy_after {
                                slot.failures = 0;
                            }
                            slot.failures += 1;
                            slot.state = SlotState::WaitingRestart;
                            slot.health
                                .set_not_ready(format!("failed, restarting: {error}"));
                            let failures = slot.failures;
                            let delay = self.backoff(failures);
                            metrics::counter!("bosun_task_restarts_total", "component" => name.clone()).increment(1);
                            tracing::error!(component = %name, error = %error, restart_in_ms = delay.as_millis() as u64, failures, "component failed; restarting after backoff");
                            let events = self.events_tx.clone();
                            let token = self.root.clone();
                            tokio::spawn(async move {
                                tokio::select! {
                                    _ = tokio::time::sleep(delay) => { let _ = events.send(Event::RestartDue { name, generation }); }
                                    _ = token.cancelled() => {}
                                }
                            });
                        }
                    }
                }
                Event::RestartDue { name, generation } => {
                    if !matches!(phase, Phase::Running) {
                        continue;
                    }
                    let component = match self.slots.get(&name) {
                        Some(slot)
                            if slot.generation == generation
                                && slot.state == SlotState::WaitingRestart =>
                        {
                            slot.component.clone()
                        }
                        _ => continue,
                    };
                    self.spawn(&name, component);
                }
                Event::Signal(SignalKind::Terminate) => match phase {
                    Phase::Running => {
                        tracing::info!(
                            timeout_ms = self.config.shutdown_timeout.as_millis() as u64,
                            "shutdown requested; draining in-flight work"
                        );
                        lifecycle.stopping();
                        phase = Phase::Draining;
                        self.root.cancel();
                        // Components waiting for a restart have nothing in flight.
                        self.slots.retain(|_, s| s.abort.is_some());
                        if self.slots.is_empty() {
                            break ExitStatus::Clean;
                        }
                        let events = self.events_tx.clone();
                        let timeout = self.config.shutdown_timeout;
                        tokio::spawn(async move {
                            tokio::time::sleep(timeout).await;
                            let _ = events.send(Event::DrainDeadline);
                        });
                    }
                    Phase::Draining => {
                        tracing::warn!("second shutdown signal; stopping at once");
                        self.abort_all();
                        break ExitStatus::Forced;
                    }
                },
                Event::Signal(SignalKind::Quit) => {
                    tracing::warn!("SIGQUIT; stopping at once");
                    lifecycle.stopping();
                    self.root.cancel();
                    self.abort_all();
                    break ExitStatus::Forced;
                }
                Event::Signal(SignalKind::Reload) => {
                    if !matches!(phase, Phase::Running) {
                        continue;
                    }
                    if self.reload_in_progress {
                        tracing::warn!(
                            "reload requested while the previous one is still stopping components; ignored"
                        );
                        continue;
                    }
                    lifecycle.reloading();
                    let running: Vec<String> = self.slots.keys().cloned().collect();
                    match reload.reload(&running).await {
                        None => lifecycle.reloaded(false),
                        Some(changes) => {
                            self.apply(changes);
                            self.finish_reload_if_done(&mut *reload, &mut *lifecycle)
                                .await;
                        }
                    }
                }
                Event::ReloadStopDeadline { name, generation } => {
                    let overdue = self.slots.get_mut(&name).filter(|slot| {
                        slot.generation == generation && slot.state == SlotState::Stopping
                    });
                    let Some(slot) = overdue else { continue };
                    if !matches!(phase, Phase::Running) {
                        continue;
                    }
                    tracing::error!(
                        component = %name,
                        timeout_ms = self.config.shutdown_timeout.as_millis() as u64,
                        "component did not stop within shutdown_timeout after a reload; aborting it"
                    );
                    metrics::counter!("bosun_reload_stops_aborted_total", "component" => name.clone())
                        .increment(1);
                    if let Some(abort) = slot.abort.take() {
                        abort.abort();
                    }
                    self.stopped_for_reload(&name);
                    self.finish_reload_if_done(&mut *reload, &mut *lifecycle)
                        .await;
                }
                Event::DrainDeadline => {
                    if matches!(phase, Phase::Draining) {
                        let stuck: Vec<&String> = self
                            .slots
                            .iter()
                            .filter(|(_, s)| s.abort.is_some())
                            .map(|(n, _)| n)
                            .collect();
                        tracing::error!(components = %stuck.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "), "shutdown timeout passed; aborting components that are still running");
                        self.abort_all();
                        break ExitStatus::TimedOut;
                    }
                }
            }
        };
        ticker.abort();
        self.tracker.close();
        // Aborted tasks finish promptly; give them a moment to drop their resources.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
        status
    }

    /// A component stopped (or was aborted) for a reload: its slot, readiness and series go,
    /// and its replacement, if any, starts.
    fn stopped_for_reload(&mut self, name: &str) {
        metrics::gauge!("bosun_component_up", "component" => name.to_owned()).set(0.0);
        self.slots.remove(name);
        self.health.remove(name);
        crate::telemetry::forget_component(name);
        if let Some(next) = self.pending_start.remove(name) {
            self.spawn(name, next);
        }
    }

    fn apply(&mut self, changes: Changes) {
        self.reload_in_progress = true;
        for name in &changes.stop {
            if let Some(slot) = self.slots.get_mut(name) {
                tracing::info!(component = %name, "stopping component for reload");
                slot.token.cancel();
                if slot.abort.is_none() {
                    // Waiting for a restart: nothing runs, remove it now.
                    self.slots.remove(name);
                    self.health.remove(name);
                    crate::telemetry::forget_component(name);
                } else {
                    slot.state = SlotState::Stopping;
                    // A component that never drains must not hold this reload (and every
                    // later one) forever.
                    let events = self.events_tx.clone();
                    let deadline = self.config.shutdown_timeout;
                    let token = self.root.clone();
                    let (name, generation) = (name.clone(), slot.generation);
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = tokio::time::sleep(deadline) => {
                                let _ = events.send(Event::ReloadStopDeadline { name, generation });
                            }
                            _ = token.cancelled() => {}
                        }
                    });
                }
            }
        }
        for (name, component) in changes.start {
            if self.slots.contains_key(&name) {
                self.pending_start.insert(name, component);
            } else {
                self.spawn(&name, component);
            }
        }
    }

    async fn finish_reload_if_done(
        &mut self,
        reload: &mut dyn ReloadHook,
        lifecycle: &mut dyn Lifecycle,
    ) {
        if self.reload_in_progress
            && self.pending_start.is_empty()
            && !self.slots.values().any(|s| s.state == SlotState::Stopping)
        {
            self.reload_in_progress = false;
            reload.applied().await;
            lifecycle.reloaded(true);
        }
    }

    fn abort_all(&mut self) {
        for (name, slot) in &mut self.slots {
            if let Some(abort) = slot.abort.take() {
                abort.abort();
                metrics::gauge!("bosun_component_up", "component" => name.clone()).set(0.0);
            }
        }
    }
}

/// The process's signals as a stream of [`SignalKind`] (SIGTERM, SIGINT, SIGQUIT, SIGHUP).
pub(crate) fn os_signals() -> std::io::Result<impl Stream<Item = SignalKind> + Unpin + Send> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGQUIT, SIGHUP])?;
    Ok(signals
        .filter_map(|signal| async move {
            match signal {
                SIGTERM | SIGINT => Some(SignalKind::Terminate),
                SIGQUIT => Some(SignalKind::Quit),
                SIGHUP => Some(SignalKind::Reload),
                _ => None,
            }
        })
        .boxed())
}

#[cfg(test)]
mod live_tests;
