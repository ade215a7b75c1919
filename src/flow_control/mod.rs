//! Flow control: what stops or slows the calls to a handler while its downstream is sick,
//! throttled or paused by an operator, so that an outage costs delay and nothing else.
//!
//! Each `[handlers.NAME]` has one [`HandlerFlow`] per process ([`Flows`] keeps them, across
//! reloads): its circuit breaker ([`breaker`]), its token bucket ([`limiter`]) and an
//! operator's pause. Consumers see one small interface, the [`Gate`]: before taking a
//! delivery they ask [`Gate::admit`], which waits for a rate-limit token and answers
//! [`Admit::Stop`] when the consumer must stop fetching (its handler's breaker is open, the
//! handler or the consumer is paused); the [`Admission`] it gives records the outcome of the
//! handler call it admitted. The amqp and redis consumers turn `Stop` into their own way of
//! not fetching and hand back what they hold unstarted ([`Outcome::Release`]).
//!
//! A `route` reaches its targets through [`Guarded`] wrappers instead: a message for a
//! target whose breaker is open, or that is paused, is not sent to it but deferred
//! ([`Outcome::Defer`], back through the retry path without using an attempt), so a route
//! pauses only the branch that is sick and its consumer keeps fetching for the others.

pub mod admin;
pub mod breaker;
pub mod limiter;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::watch;

use crate::handler::{
    Handler, HandlerConfig, Message, OptionError, Outcome, duration_option as duration,
};
use breaker::{Breaker, Permit};
pub use breaker::{BreakerSettings, BreakerState, Verdict};
use limiter::Limiter;
pub use limiter::{DEFAULT_MAX_RETRY_AFTER, RateLimitSettings};

/// A route holds a message for a rate-limit token at most this long; beyond, it defers it.
const MAX_HOLD: Duration = Duration::from_secs(1);
/// How often a call waiting for a half-open breaker's probe to end looks again (a verdict
/// also wakes it).
const PROBE_POLL: Duration = Duration::from_millis(200);
/// The shortest deferral: a deferred message never comes back at once.
const MIN_DEFER: Duration = Duration::from_secs(1);

/// A handler's flow-control settings, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlowSettings {
    pub breaker: Option<BreakerSettings>,
    pub rate_limit: Option<RateLimitSettings>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failure_ratio: Option<f64>,
    min_calls: Option<u32>,
    window: Option<String>,
    consecutive_failures: Option<u32>,
    open_for: Option<String>,
    max_open_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: f64,
    burst: Option<u32>,
    max_retry_after: Option<String>,
    scope: Option<String>,
    broker: Option<String>,
}

/// Splits a `[handlers.NAME]` table: the options for its kind, and its flow-control
/// settings (errors at paths relative to the table).
pub fn split_options(options: &toml::Table) -> (toml::Table, Result<FlowSettings, OptionError>) {
    let mut rest = options.clone();
    let breaker = rest.remove("circuit_breaker");
    let rate_limit = rest.remove("rate_limit");
    let settings = parse(breaker.as_ref(), rate_limit.as_ref());
    (rest, settings)
}

fn table<'a>(key: &str, value: &'a toml::Value) -> Result<&'a toml::Table, OptionError> {
    value
        .as_table()
        .ok_or_else(|| OptionError::new(&[key], "must be a table, e.g. `{ ... }`"))
}

fn prefixed(key: &str, mut e: OptionError) -> OptionError {
    e.path.insert(0, key.to_owned());
    e
}

fn parse(
    breaker: Option<&toml::Value>,
    rate_limit: Option<&toml::Value>,
) -> Result<FlowSettings, OptionError> {
    let mut settings = FlowSettings::default();
    if let Some(value) = breaker {
        const KEY: &str = "circuit_breaker";
        let raw: RawBreaker =
            crate::handler::parse_options(table(KEY, value)?).map_err(|e| prefixed(KEY, e))?;
        let d = BreakerSettings::default();
        let failure_ratio = raw.failure_ratio.unwrap_or(d.failure_ratio);
        if !(failure_ratio > 0.0 && failure_ratio <= 1.0) {
            return Err(OptionError::new(
                &[KEY, "failure_ratio"],
                "must be above 0 and at most 1",
            ));
        }
        let open_for = duration(&[KEY, "open_for"], raw.open_for.as_deref(), d.open_for)?;
        let max_open_for = duration(
            &[KEY, "max_open_for"],
            raw.max_open_for.as_deref(),
            d.max_open_for.max(open_for),
        )?;
        if max_open_for < open_for {
            return Err(OptionError::new(
                &[KEY, "max_open_for"],
                "must be at least `open_for`",
            ));
        }
        settings.breaker = Some(BreakerSettings {
            failure_ratio,
            min_calls: raw.min_calls.unwrap_or(d.min_calls).max(1),
            window: duration(&[KEY, "window"], raw.window.as_deref(), d.window)?,
            consecutive_failures: raw.consecutive_failures.unwrap_or(d.consecutive_failures),
            open_for,
            max_open_for,
        });
    }
    if let Some(value) = rate_limit {
        const KEY: &str = "rate_limit";
        let raw: RawRateLimit =
            crate::handler::parse_options(table(KEY, value)?).map_err(|e| prefixed(KEY, e))?;
        if !(raw.per_second.is_finite() && raw.per_second > 0.0) {
            return Err(OptionError::new(
                &[KEY, "per_second"],
                "must be a number above 0",
            ));
        }
        let global = match (raw.scope.as_deref(), raw.broker) {
            (None | Some("local"), None) => None,
            (None | Some("local"), Some(_)) => {
                return Err(OptionError::new(
                    &[KEY, "broker"],
                    "only with `scope = \"global\"`",
                ));
            }
            (Some("global"), Some(broker)) => Some(broker),
            (Some("global"), None) => {
                return Err(OptionError::new(
                    &[KEY, "broker"],
                    "`scope = \"global\"` needs `broker`: the redis broker the replicas share the budget through",
                ));
            }
            (Some(other), _) => {
                return Err(OptionError::new(
                    &[KEY, "scope"],
                    format!("unknown scope `{other}`, expected `local` or `global`"),
                ));
            }
        };
        if raw.burst == Some(0) {
            return Err(OptionError::new(&[KEY, "burst"], "must be at least 1"));
        }
        settings.rate_limit = Some(RateLimitSettings {
            per_second: raw.per_second,
            // One second's worth by default: a quiet spell allows a second of calls at once.
            burst: raw
                .burst
                .unwrap_or_else(|| raw.per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32),
            max_retry_after: duration(
                &[KEY, "max_retry_after"],
                raw.max_retry_after.as_deref(),
                DEFAULT_MAX_RETRY_AFTER,
            )?,
            global,
        });
    }
    Ok(settings)
}

/// The flow-control settings of a validated handler entry (its options hold them as
/// written; validation already accepted them).
pub fn settings_of(config: &HandlerConfig) -> FlowSettings {
    split_options(&config.options).1.unwrap_or_default()
}

/// A rate budget every replica shares (`scope = "global"`), kept in a store outside the
/// process (Redis, implemented by `redis_streams`).
#[async_trait]
pub trait SharedBudget: Send + Sync + 'static {
    /// Takes one token of budget `key` (`per_second`, `burst`), reserving it when it is due
    /// within `horizon`; `Err` when the store cannot be asked.
    async fn take(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
        horizon: Duration,
    ) -> Result<Taken, String>;
}

/// The answer of [`SharedBudget::take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// A token is held for the caller: the call may start this long from now (zero: at
    /// once). Tokens are reserved back to back, so a budget asked for without pause is used
    /// at its whole rate.
    Held(Duration),
    /// The next token is further away than the horizon: nothing taken; ask again after this.
    NotYet(Duration),
}

/// How far ahead a token of a shared budget is reserved: a caller waits at most this long
/// for one it holds.
const SHARED_HORIZON: Duration = MAX_HOLD;

/// A token of the shared budget taken ahead of its instant and not yet used: kept by the
/// consumer's gate across cancelled admissions (a consumer's `select!` drops a waiting
/// admission whenever something else happens), so a reservation is used rather than lost.
type Reserved = Mutex<Option<Instant>>;
/// A reserved token used later than this past its instant (and later than one interval) is
/// dropped: it was left over from before the consumer stopped.
const STALE_RESERVATION: Duration = Duration::from_millis(100);

/// The key of handler `name`'s shared budget: the same on every replica.
pub fn budget_key(name: &str) -> String {
    format!("bosun:ratelimit:{name}")
}

/// Why something is paused by an operator, and until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    pub reason: String,
    /// `None`: until resumed.
    pub until: Option<Instant>,
    /// When it was paused, for the status listing.
    pub since: SystemTime,
}

impl Pause {
    fn active(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// Every handler's flow and every consumer's pause in this process. Cloned cheaply; the
/// runtime keeps one for its whole life, so breakers and pauses survive reloads.
#[derive(Clone, Default)]
pub struct Flows {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Mutex<Registry>,
    /// Bumped on every change a waiting gate may care about (a pause, a resume, a breaker
    /// transition, a limiter pause).
    changed: watch::Sender<u64>,
    /// How many consumer pauses the registry holds (active or run out): while none, a gate
    /// need not look its consumer up under the registry's lock.
    consumer_pauses: AtomicUsize,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            registry: Mutex::default(),
            changed: watch::Sender::new(0),
            consumer_pauses: AtomicUsize::new(0),
        }
    }
}

impl Shared {
    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every update is a whole-value insert or remove: a poisoned lock is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps [`consumer_pauses`](Self::consumer_pauses) true to `registry` (called with its
    /// lock held, after each change to its pauses).
    fn count_pauses(&self, registry: &Registry) {
        self.consumer_pauses
            .store(registry.consumer_pauses.len(), Ordering::Release);
    }

    fn no_consumer_paused(&self) -> bool {
        self.consumer_pauses.load(Ordering::Acquire) == 0
    }
}

#[derive(Default)]
struct Registry {
    handlers: BTreeMap<String, Arc<HandlerFlow>>,
    /// Consumers with a gate, by name: their handler and in-flight count.
    consumers: BTreeMap<String, ConsumerEntry>,
    consumer_pauses: BTreeMap<String, Pause>,
}

#[derive(Clone)]
struct ConsumerEntry {
    handler: String,
    in_flight: Arc<AtomicUsize>,
}

/// Something a pause or resume names that this process does not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("no consumer `{0}` runs in this process")]
    UnknownConsumer(String),
    #[error("no handler `{0}` is configured in this process")]
    UnknownHandler(String),
}

impl Flows {
    /// The flow of handler `name` with `settings`: the one kept from before when its
    /// settings did not change (its breaker and limiter state go on), else a new one that
    /// takes over an operator's pause.
    pub fn handler(&self, name: &str, settings: &FlowSettings) -> Arc<HandlerFlow> {
        let mut registry = self.shared.registry();
        if let Some(flow) = registry.handlers.get(name)
            && flow.settings == *settings
        {
            return flow.clone();
        }
        let pause = registry
            .handlers
            .get(name)
            .and_then(|old| old.state().pause.clone());
        let flow = Arc::new(HandlerFlow::new(
            name,
            settings.clone(),
            pause,
            Arc::downgrade(&self.shared),
        ));
        registry.handlers.insert(name.to_owned(), flow.clone());
        flow
    }

    /// The gate of consumer `consumer`, whose handler is `handler` (already made with
    /// [`handler`](Self::handler)).
    pub fn gate(&self, consumer: &str, handler: &str) -> Gate {
        let mut registry = self.shared.registry();
        let flow = registry.handlers.get(handler).cloned();
        let in_flight = registry
            .consumers
            .entry(consumer.to_owned())
            .and_modify(|e| e.handler = handler.to_owned())
            .or_insert_with(|| ConsumerEntry {
                handler: handler.to_owned(),
                in_flight: Arc::new(AtomicUsize::new(0)),
            })
            .in_flight
            .clone();
        let paused = registry
            .consumer_pauses
            .get(consumer)
            .is_some_and(|p| p.active(Instant::now()));
        let gauge = metrics::gauge!(PAUSED_METRIC, "consumer" => consumer.to_owned());
        gauge.set(if paused { 1.0 } else { 0.0 });
        Gate {
            consumer: consumer.to_owned(),
            flow,
            shared: Some(self.shared.clone()),
            in_flight,
            reserved: Mutex::new(None),
        }
    }

    /// Pauses consumer `name` (for `duration`, else until resumed).
    pub fn pause_consumer(
        &self,
        name: &str,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<(), FlowError> {
        {
            let mut registry = self.shared.registry();
            if !registry.consumers.contains_key(name) {
                return Err(FlowError::UnknownConsumer(name.to_owned()));
            }
            registry
                .consumer_pauses
                .insert(name.to_owned(), pause(duration, reason));
            self.shared.count_pauses(&registry);
        }
        metrics::gauge!(PAUSED_METRIC, "consumer" => name.to_owned()).set(1.0);
        tracing::warn!(consumer = %name, until_s = duration.map(|d| d.as_secs()), reason, "consumer paused");
        self.shared.notify();
        Ok(())
    }

    /// Resumes consumer `name`; true when it was paused.
    pub fn resume_consumer(&self, name: &str) -> Result<bool, FlowError> {
        let was = {
            let mut registry = self.shared.registry();
            if !registry.consumers.contains_key(name) {
                return Err(FlowError::UnknownConsumer(name.to_owned()));
            }
            let was = registry.consumer_pauses.remove(name).is_some();
            self.shared.count_pauses(&registry);
            was
        };
        metrics::gauge!(PAUSED_METRIC, "consumer" => name.to_owned()).set(0.0);
        tracing::info!(consumer = %name, "consumer resumed");
        self.shared.notify();
        Ok(was)
    }

    /// Pauses handler `name`: every consumer calling it stops fetching, every route defers
    /// its messages for it.
    pub fn pause_handler(
        &self,
        name: &str,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<(), FlowError> {
        let flow = self.flow(name)?;
        flow.state().pause = Some(pause(duration, reason));
        tracing::warn!(handler = %name, until_s = duration.map(|d| d.as_secs()), reason, "handler paused");
        self.shared.notify();
        Ok(())
    }

    /// Resumes handler `name`; true when it was paused.
    pub fn resume_handler(&self, name: &str) -> Result<bool, FlowError> {
        let flow = self.flow(name)?;
        let was = flow.state().pause.take().is_some();
        tracing::info!(handler = %name, "handler resumed");
        self.shared.notify();
        Ok(was)
    }

    fn flow(&self, name: &str) -> Result<Arc<HandlerFlow>, FlowError> {
        self.shared
            .registry()
            .handlers
            .get(name)
            .cloned()
            .ok_or_else(|| FlowError::UnknownHandler(name.to_owned()))
    }

    /// Forgets consumers and handlers a reload removed (their pauses too).
    pub fn retain(&self, consumers: &[&str], handlers: &[&str]) {
        let mut registry = self.shared.registry();
        registry
            .consumers
            .retain(|name, _| consumers.contains(&name.as_str()));
        registry
            .consumer_pauses
            .retain(|name, _| consumers.contains(&name.as_str()));
        registry
            .handlers
            .retain(|name, _| handlers.contains(&name.as_str()));
        self.shared.count_pauses(&registry);
    }

    /// What runs and why it is stopped: for `bosun status`, `/admin/status` and
    /// `/healthz?verbose`.
    pub fn status(&self) -> FlowStatus {
        let now = Instant::now();
        let registry = self.shared.registry();
        let handlers: BTreeMap<String, HandlerStatus> = registry
            .handlers
            .iter()
            .map(|(name, flow)| (name.clone(), flow.status(now)))
            .collect();
        let consumers = registry
            .consumers
            .iter()
            .map(|(name, entry)| {
                let paused = registry
                    .consumer_pauses
                    .get(name)
                    .filter(|p| p.active(now))
                    .map(|p| PauseStatus::of(p, now));
                let handler = handlers.get(&entry.handler);
                let stopped = match (&paused, handler.and_then(|h| h.stopped.clone())) {
                    (Some(p), _) => Some(format!("paused by an operator: {}", p.reason)),
                    (None, reason) => reason,
                };
                (
                    name.clone(),
                    ConsumerStatus {
                        handler: entry.handler.clone(),
                        state: if stopped.is_some() {
                            "paused"
                        } else {
                            "running"
                        },
                        stopped,
                        paused,
                        breaker: handler.and_then(|h| h.breaker),
                        in_flight: entry.in_flight.load(Ordering::Relaxed),
                    },
                )
            })
            .collect();
        FlowStatus {
            consumers,
            handlers,
        }
    }
}

fn pause(duration: Option<Duration>, reason: &str) -> Pause {
    Pause {
        reason: crate::text::truncate(reason, 200).to_owned(),
        until: duration.map(|d| Instant::now() + d),
        since: SystemTime::now(),
    }
}

/// The gauge of a consumer's operator pause.
pub const PAUSED_METRIC: &str = "bosun_consumer_paused";
/// The gauge of a handler's breaker (0 closed, 1 half-open, 2 open).
pub const BREAKER_STATE_METRIC: &str = "bosun_breaker_state";
/// The counter of a handler's breaker transitions, by the state moved to.
pub const BREAKER_TRANSITIONS_METRIC: &str = "bosun_breaker_transitions_total";
/// Seconds consumers waited for a handler's rate-limit token (a gauge that only grows: the
/// metrics crate's counters are integers).
pub const RATE_LIMIT_WAIT_METRIC: &str = "bosun_rate_limit_wait_seconds_total";

/// Describes the flow-control metrics (`telemetry` calls this with the others).
pub fn describe_metrics() {
    metrics::describe_gauge!(
        BREAKER_STATE_METRIC,
        "Circuit breaker state of a handler: 0 closed, 1 half-open (one probe), 2 open (its consumers do not fetch)."
    );
    metrics::describe_counter!(
        BREAKER_TRANSITIONS_METRIC,
        "Circuit breaker transitions of a handler, by the state moved to (closed, half_open, open)."
    );
    metrics::describe_gauge!(
        RATE_LIMIT_WAIT_METRIC,
        metrics::Unit::Seconds,
        "Seconds consumers of a handler waited for a rate-limit token (or for a Retry-After pause to end); only grows."
    );
    metrics::describe_gauge!(
        PAUSED_METRIC,
        "1 while an operator has paused the consumer (bosun pause, /admin/consumers/NAME/pause), else 0."
    );
}

/// The status of a handler's flow.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandlerStatus {
    /// `None` without a breaker.
    pub breaker: Option<&'static str>,
    /// Seconds until an open breaker lets its probe through.
    pub open_for_s: Option<u64>,
    /// Seconds until a `Retry-After` pause ends.
    pub throttled_for_s: Option<u64>,
    pub rate_limit_per_second: Option<f64>,
    pub paused: Option<PauseStatus>,
    /// Why its consumers do not fetch, if they do not.
    pub stopped: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PauseStatus {
    pub reason: String,
    /// Seconds left; `None` until resumed.
    pub remaining_s: Option<u64>,
    /// Unix seconds.
    pub since: u64,
}

impl PauseStatus {
    fn of(p: &Pause, now: Instant) -> Self {
        Self {
            reason: p.reason.clone(),
            remaining_s: p.until.map(|u| u.saturating_duration_since(now).as_secs()),
            since: p
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConsumerStatus {
    pub handler: String,
    /// `running` or `paused` (by an operator, a handler pause or an open breaker).
    pub state: &'static str,
    pub stopped: Option<String>,
    pub paused: Option<PauseStatus>,
    pub breaker: Option<&'static str>,
    /// Deliveries admitted and not yet handled.
    pub in_flight: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FlowStatus {
    pub consumers: BTreeMap<String, ConsumerStatus>,
    pub handlers: BTreeMap<String, HandlerStatus>,
}

/// One handler's breaker, limiter and pause, shared by every consumer and route calling it.
pub struct HandlerFlow {
    name: String,
    settings: FlowSettings,
    state: Mutex<FlowState>,
    /// The token bucket: lock-free, outside `state`.
    limiter: Option<Limiter>,
    /// True while nothing holds calls back: no pause, the breaker closed, no `Retry-After`
    /// pause. Written under `state`'s lock after every change to it ([`StateGuard`]), read
    /// without it: while calm, a call is admitted and finished without taking the lock.
    calm: AtomicBool,
    /// Calls that succeeded on a calm flow and are not yet in the breaker's window: counted
    /// here without the lock and moved into the window (`fold`) at least once a slice.
    successes: AtomicU32,
    /// Until when (nanoseconds since `base`) a success may be counted in `successes`; past
    /// it, the next call's end takes the lock and folds them in.
    fold_at: AtomicU64,
    base: Instant,
    shared: std::sync::Weak<Shared>,
    metrics: FlowMetrics,
    /// The value last set on the state gauge (f64 bits): the gauge itself is write-only.
    last_gauge: AtomicU64,
    /// With `scope = "global"`: where the tokens come from (the local bucket stands in when
    /// the store cannot be asked).
    budget: std::sync::OnceLock<Arc<dyn SharedBudget>>,
    /// When the store last failed to answer, so that the fallback is logged once a minute.
    budget_failed: Mutex<Option<Instant>>,
}

struct FlowState {
    breaker: Option<Breaker>,
    pause: Option<Pause>,
    /// When successes were last folded into the breaker's window: those counted since then
    /// happened within one slice after it.
    folded: Instant,
}

impl FlowState {
    fn calm(&mut self, limiter: Option<&Limiter>, now: Instant) -> bool {
        self.pause.as_ref().is_none_or(|p| !p.active(now))
            && self.breaker.as_mut().is_none_or(|b| b.closed(now))
            && limiter.is_none_or(|l| l.paused_until(now).is_none())
    }
}

/// The lock on a flow's state; dropping it (still under the lock) sets the flow's `calm`
/// flag from what the state has become, so every change is seen by the lock-free path.
struct StateGuard<'a> {
    flow: &'a HandlerFlow,
    state: MutexGuard<'a, FlowState>,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = FlowState;
    fn deref(&self) -> &FlowState {
        &self.state
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut FlowState {
        &mut self.state
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let calm = self.state.calm(self.flow.limiter.as_ref(), Instant::now());
        self.flow.calm.store(calm, Ordering::Release);
    }
}

struct FlowMetrics {
    state: metrics::Gauge,
    to_closed: metrics::Counter,
    to_half_open: metrics::Counter,
    to_open: metrics::Counter,
    waited: metrics::Gauge,
}

/// A probe permit held across an await: given back if the future holding it is dropped.
struct HeldProbe<'a> {
    flow: &'a HandlerFlow,
    probe: Option<bool>,
}

impl Drop for HeldProbe<'_> {
    fn drop(&mut self) {
        if let Some(probe) = self.probe.take() {
            self.flow.abandon(probe);
        }
    }
}

/// What a flow says to a call that wants to start.
enum Try {
    /// Go; `probe`: as the breaker's one probe.
    Go { probe: bool },
    /// Do not call it, nor fetch for it: `reason`, until about `retry_at`.
    Stop { reason: String, retry_at: Instant },
    /// Wait until `at` (a rate-limit token, or a probe in flight) and ask again.
    Wait { at: Instant, throttled: bool },
}

impl HandlerFlow {
    fn new(
        name: &str,
        settings: FlowSettings,
        pause: Option<Pause>,
        shared: std::sync::Weak<Shared>,
    ) -> Self {
        let now = Instant::now();
        let transitions = |to: &'static str| metrics::counter!(BREAKER_TRANSITIONS_METRIC, "handler" => name.to_owned(), "to" => to);
        let metrics = FlowMetrics {
            state: metrics::gauge!(BREAKER_STATE_METRIC, "handler" => name.to_owned()),
            to_closed: transitions("closed"),
            to_half_open: transitions("half_open"),
            to_open: transitions("open"),
            waited: metrics::gauge!(RATE_LIMIT_WAIT_METRIC, "handler" => name.to_owned()),
        };
        // Registered at 0 only where they can move, so `/metrics` lists what is configured.
        if settings.breaker.is_some() {
            metrics.state.set(0.0);
            metrics.to_closed.increment(0);
            metrics.to_half_open.increment(0);
            metrics.to_open.increment(0);
        }
        if settings.rate_limit.is_some() {
            metrics.waited.increment(0.0);
        }
        let calm = pause.as_ref().is_none_or(|p| !p.active(now));
        Self {
            name: name.to_owned(),
            state: Mutex::new(FlowState {
                breaker: settings.breaker.clone().map(Breaker::new),
                pause,
                folded: now,
            }),
            limiter: settings.rate_limit.clone().map(|s| Limiter::new(s, now)),
            calm: AtomicBool::new(calm),
            successes: AtomicU32::new(0),
            fold_at: AtomicU64::new(0),
            base: now,
            settings,
            shared,
            metrics,
            last_gauge: AtomicU64::new(0.0f64.to_bits()),
            budget: std::sync::OnceLock::new(),
            budget_failed: Mutex::new(None),
        }
    }

    /// Gives a `scope = "global"` flow its shared budget (once; later calls change nothing).
    pub fn attach_budget(&self, budget: Arc<dyn SharedBudget>) {
        let _ = self.budget.set(budget);
    }

    /// The shared budget this flow takes its tokens from, if it has one.
    fn shared_budget(&self) -> Option<(&Arc<dyn SharedBudget>, &RateLimitSettings)> {
        let settings = self.settings.rate_limit.as_ref()?;
        settings.global.as_ref()?;
        Some((self.budget.get()?, settings))
    }

    /// A token of the shared budget, or when to ask again. A token reserved ahead of its
    /// instant is kept in `reserved` and used when it is due. When the store cannot be
    /// asked, the local bucket (the whole rate, for this process alone) stands in.
    async fn take_shared(&self, reserved: &Reserved) -> Result<(), Instant> {
        let Some((budget, settings)) = self.shared_budget() else {
            return Ok(());
        };
        {
            let mut held = reserved.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = held.take() {
                let now = Instant::now();
                if at > now {
                    *held = Some(at);
                    return Err(at);
                }
                // Used at its instant, or a little late; one left over from before a stop is
                // not used, or it would add a call to those of its time's successors.
                let late = Duration::try_from_secs_f64(1.0 / settings.per_second)
                    .unwrap_or(Duration::MAX)
                    .max(STALE_RESERVATION);
                if now.saturating_duration_since(at) <= late {
                    return Ok(());
                }
            }
        }
        match budget
            .take(
                &budget_key(&self.name),
                settings.per_second,
                settings.burst,
                SHARED_HORIZON,
            )
            .await
        {
            Ok(Taken::Held(wait)) if wait.is_zero() => Ok(()),
            Ok(Taken::Held(wait)) => {
                let at = Instant::now() + wait;
                *reserved.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
                Err(at)
            }
            Ok(Taken::NotYet(wait)) => Err(Instant::now() + wait),
            Err(e) => {
                let now = Instant::now();
                {
                    let mut failed = self.budget_failed.lock().unwrap_or_else(|p| p.into_inner());
                    if failed.is_none_or(|at| {
                        now.saturating_duration_since(at) >= Duration::from_secs(60)
                    }) {
                        *failed = Some(now);
                        tracing::warn!(handler = %self.name, error = %crate::redact::text(&e), "the shared rate budget cannot be asked; this process limits itself to the whole rate meanwhile");
                    }
                }
                match self.limiter.as_ref() {
                    Some(limiter) => limiter.take(now),
                    None => Ok(()),
                }
            }
        }
    }

    fn state(&self) -> StateGuard<'_> {
        StateGuard {
            flow: self,
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Nothing holds calls back (see `calm`); may be a moment stale, like any answer
    /// given before a call starts.
    fn is_calm(&self) -> bool {
        self.calm.load(Ordering::Acquire)
    }

    /// The lock-free admission of a calm flow without a shared budget: a token of the
    /// bucket if there is one. `false`: ask [`start`](Self::start).
    fn start_calm(&self, now: Instant) -> bool {
        self.is_calm()
            && self.shared_budget().is_none()
            && self.limiter.as_ref().is_none_or(|l| l.take(now).is_ok())
    }

    /// Moves the successes counted without the lock into the breaker's window.
    fn fold(&self, state: &mut FlowState, now: Instant) {
        let Some(breaker) = state.breaker.as_mut() else {
            return;
        };
        let n = self.successes.swap(0, Ordering::AcqRel);
        breaker.successes(n, state.folded);
        state.folded = now;
        self.fold_at
            .store(self.nanos(now + breaker.slice()), Ordering::Release);
    }

    fn notify(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.notify();
        }
    }

    /// Why calls must not start at `now`, and until about when (a pause without end: an
    /// hour; a resume wakes the waiters anyway).
    fn stopped(&self, now: Instant) -> Option<(String, Instant)> {
        let mut state = self.state();
        let stopped = self.stopped_in(&mut state, now);
        let shown = state.breaker.as_mut().map(|b| b.state(now));
        drop(state);
        self.observe(shown);
        stopped
    }

    fn stopped_in(&self, state: &mut FlowState, now: Instant) -> Option<(String, Instant)> {
        if let Some(pause) = state.pause.as_ref().filter(|p| p.active(now)) {
            let until = pause.until.unwrap_or(now + Duration::from_secs(3600));
            return Some((
                format!(
                    "handler `{}` paused by an operator: {}",
                    self.name, pause.reason
                ),
                until,
            ));
        }
        let until = state.breaker.as_mut().and_then(|b| b.open_until(now))?;
        Some((
            format!("circuit breaker of handler `{}` is open", self.name),
            until,
        ))
    }

    /// [`try_start`](Self::try_start), then a token of the shared budget when there is one
    /// (`reserved`: see [`Reserved`]). Cancel-safe: dropped while asking the store, a probe
    /// permit goes back.
    async fn start(&self, now: Instant, reserved: &Reserved) -> Try {
        match self.try_start(now) {
            Try::Go { probe } => {
                let mut held = HeldProbe {
                    flow: self,
                    probe: Some(probe),
                };
                let taken = self.take_shared(reserved).await;
                let probe = held.probe.take().unwrap_or(false);
                match taken {
                    Ok(()) => Try::Go { probe },
                    Err(at) => {
                        self.abandon(probe);
                        Try::Wait {
                            at,
                            throttled: true,
                        }
                    }
                }
            }
            other => other,
        }
    }

    fn try_start(&self, now: Instant) -> Try {
        let mut state = self.state();
        let result = self.try_start_in(&mut state, now);
        let shown = state.breaker.as_mut().map(|b| b.state(now));
        drop(state);
        self.observe(shown);
        if matches!(result, Try::Go { probe: true }) {
            tracing::info!(handler = %self.name, "circuit breaker half-open: sending one probe");
        }
        result
    }

    fn try_start_in(&self, state: &mut FlowState, now: Instant) -> Try {
        if let Some((reason, retry_at)) = self.stopped_in(state, now) {
            return Try::Stop { reason, retry_at };
        }
        if let Some(breaker) = state.breaker.as_mut()
            && !breaker.admits(now)
        {
            // Half-open with the probe out: wait for its verdict.
            return Try::Wait {
                at: now + PROBE_POLL,
                throttled: false,
            };
        }
        // With a shared budget the token comes from it (`take_shared`); the local bucket
        // still holds a `Retry-After` pause.
        let shared = self.shared_budget().is_some();
        if let Some(limiter) = self.limiter.as_ref() {
            let taken = match limiter.paused_until(now) {
                Some(until) if shared => Err(until),
                _ if shared => Ok(()),
                _ => limiter.take(now),
            };
            if let Err(at) = taken {
                return Try::Wait {
                    at,
                    throttled: true,
                };
            }
        }
        match state.breaker.as_mut().map(|b| b.permit(now)) {
            None | Some(Permit::Call) => Try::Go { probe: false },
            Some(Permit::Probe) => Try::Go { probe: true },
            Some(Permit::Refused { retry_at }) => Try::Stop {
                reason: format!("circuit breaker of handler `{}` is open", self.name),
                retry_at,
            },
        }
    }

    /// Moves the state gauge to what the breaker shows (an open breaker turns half-open by
    /// time alone, with no call to record it).
    fn observe(&self, shown: Option<BreakerState>) {
        let Some(shown) = shown else { return };
        let bits = shown.gauge().to_bits();
        if self.last_gauge.swap(bits, Ordering::Relaxed) != bits {
            self.metrics.state.set(shown.gauge());
            if shown == BreakerState::HalfOpen {
                self.metrics.to_half_open.increment(1);
                tracing::info!(handler = %self.name, "circuit breaker half-open");
                self.notify();
            }
        }
    }

    /// Records a call's end; returns the outcome to settle with.
    fn finish(&self, probe: bool, outcome: Outcome) -> Outcome {
        let now = Instant::now();
        let verdict = Verdict::of(&outcome);
        let throttles =
            self.limiter.is_some() && matches!(outcome, Outcome::Retry { after: Some(_), .. });
        // The common end, without the lock: no failure, on a calm flow. A success is counted
        // for the breaker's window in `successes`, folded in within a slice.
        if !probe && !throttles && verdict != Verdict::Failure && self.is_calm() {
            if verdict == Verdict::Neutral || self.settings.breaker.is_none() {
                return outcome;
            }
            if self.nanos(now) < self.fold_at.load(Ordering::Acquire) {
                self.successes.fetch_add(1, Ordering::Relaxed);
                return outcome;
            }
        }
        let mut state = self.state();
        self.fold(&mut state, now);
        let moved = state
            .breaker
            .as_mut()
            .and_then(|b| b.finish(probe, verdict, now));
        if moved.is_some() {
            // Opened or closed: the window starts empty, as the breaker's own is.
            self.successes.store(0, Ordering::Relaxed);
        }
        let throttle = match (&outcome, self.limiter.as_ref()) {
            (
                Outcome::Retry {
                    after: Some(after),
                    reason,
                },
                Some(limiter),
            ) => Some((limiter.pause(*after, now), reason.clone())),
            _ => None,
        };
        drop(state);
        if let Some(to) = moved {
            self.transition(to);
        }
        match throttle {
            Some((pause, reason)) => {
                tracing::warn!(handler = %self.name, pause_s = pause.as_secs_f64(), "the downstream asked to wait (Retry-After): pausing the handler's rate limit");
                self.notify();
                Outcome::Defer {
                    after: pause.max(MIN_DEFER),
                    reason,
                }
            }
            None => outcome,
        }
    }

    fn abandon(&self, probe: bool) {
        if probe {
            if let Some(b) = self.state().breaker.as_mut() {
                b.abandon(true);
            }
            self.notify();
        }
    }

    fn transition(&self, to: BreakerState) {
        self.last_gauge
            .store(to.gauge().to_bits(), Ordering::Relaxed);
        self.metrics.state.set(to.gauge());
        match to {
            BreakerState::Closed => {
                self.metrics.to_closed.increment(1);
                tracing::info!(handler = %self.name, "circuit breaker closed: the probe succeeded");
            }
            BreakerState::Open => {
                self.metrics.to_open.increment(1);
                tracing::warn!(handler = %self.name, "circuit breaker opened: its consumers stop fetching");
            }
            BreakerState::HalfOpen => self.metrics.to_half_open.increment(1),
        }
        self.notify();
    }

    fn status(&self, now: Instant) -> HandlerStatus {
        let stopped = self.stopped(now).map(|(reason, _)| reason);
        let mut state = self.state();
        let breaker = state.breaker.as_mut().map(|b| b.state(now).as_str());
        let open_for_s = state
            .breaker
            .as_mut()
            .and_then(|b| b.open_until(now))
            .map(|u| u.saturating_duration_since(now).as_secs());
        let throttled_for_s = self
            .limiter
            .as_ref()
            .and_then(|l| l.paused_until(now))
            .map(|u| u.saturating_duration_since(now).as_secs());
        HandlerStatus {
            breaker,
            open_for_s,
            throttled_for_s,
            rate_limit_per_second: self.settings.rate_limit.as_ref().map(|r| r.per_second),
            paused: state
                .pause
                .as_ref()
                .filter(|p| p.active(now))
                .map(|p| PauseStatus::of(p, now)),
            stopped,
        }
    }
}

/// What a consumer asks before it takes a delivery: one interface for every broker.
pub struct Gate {
    consumer: String,
    /// The flow of the consumer's handler; `None` for a consumer without flow control (a
    /// dead-letter processor's).
    flow: Option<Arc<HandlerFlow>>,
    shared: Option<Arc<Shared>>,
    in_flight: Arc<AtomicUsize>,
    /// A shared-budget token reserved for this consumer's next delivery.
    reserved: Reserved,
}

/// The answer of [`Gate::admit`].
pub enum Admit {
    /// Take one delivery and run the handler on it; tell the admission how it went.
    Go(Admission),
    /// Stop fetching, hand back what is held unstarted, and wait for [`Gate::wait_open`].
    Stop(String),
}

impl Gate {
    /// A gate that always admits: for consumers outside flow control.
    pub fn open() -> Self {
        Self {
            consumer: String::new(),
            flow: None,
            shared: None,
            in_flight: Arc::new(AtomicUsize::new(0)),
            reserved: Mutex::new(None),
        }
    }

    /// Why the consumer must not fetch now (paused, its handler paused or its breaker
    /// open), or `None`.
    pub fn stopped(&self) -> Option<String> {
        if self.calm() {
            return None;
        }
        let now = Instant::now();
        if let Some(shared) = &self.shared
            && let Some(p) = shared
                .registry()
                .consumer_pauses
                .get(&self.consumer)
                .filter(|p| p.active(now))
        {
            return Some(format!("paused by an operator: {}", p.reason));
        }
        self.flow
            .as_ref()
            .and_then(|f| f.stopped(now))
            .map(|(reason, _)| reason)
    }

    /// True while the handler's breaker is half-open: fetch one delivery at a time.
    pub fn probing(&self) -> bool {
        if self.calm() {
            return false;
        }
        self.flow.as_ref().is_some_and(|f| {
            f.state()
                .breaker
                .as_mut()
                .is_some_and(|b| b.state(Instant::now()) == BreakerState::HalfOpen)
        })
    }

    /// When a consumer pause ends on its own.
    fn paused_until(&self, now: Instant) -> Option<Instant> {
        let shared = self.shared.as_ref()?;
        let registry = shared.registry();
        let pause = registry
            .consumer_pauses
            .get(&self.consumer)
            .filter(|p| p.active(now))?;
        Some(pause.until.unwrap_or(now + Duration::from_secs(3600)))
    }

    /// No consumer is paused and the handler's flow is calm: nothing to look up under a lock.
    fn calm(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| s.no_consumer_paused())
            && self.flow.as_ref().is_none_or(|f| f.is_calm())
    }

    fn subscribe(&self) -> Option<watch::Receiver<u64>> {
        self.shared.as_ref().map(|s| s.changed.subscribe())
    }

    /// Waits for one delivery's admission: a rate-limit token, or the probe of a half-open
    /// breaker. Cancel-safe: dropping it takes nothing.
    pub async fn admit(&self) -> Admit {
        let Some(flow) = &self.flow else {
            if let Some(reason) = self.stopped() {
                return Admit::Stop(reason);
            }
            return Admit::Go(self.admission(None, false));
        };
        // The common case, without a lock or a change subscription: nothing paused, the
        // breaker closed, a token in the bucket.
        if self.shared.as_ref().is_none_or(|s| s.no_consumer_paused())
            && flow.start_calm(Instant::now())
        {
            return Admit::Go(self.admission(Some(flow.clone()), false));
        }
        let mut changes = self.subscribe();
        let mut waited: Option<Instant> = None;
        loop {
            if let Some(changes) = changes.as_mut() {
                changes.mark_unchanged();
            }
            let now = Instant::now();
            if self.paused_until(now).is_some()
                && let Some(reason) = self.stopped()
            {
                return Admit::Stop(reason);
            }
            let (at, throttled) = match flow.start(now, &self.reserved).await {
                Try::Go { probe } => {
                    if let Some(since) = waited {
                        flow.metrics.waited.increment(since.elapsed().as_secs_f64());
                    }
                    return Admit::Go(self.admission(Some(flow.clone()), probe));
                }
                Try::Stop { reason, .. } => return Admit::Stop(reason),
                Try::Wait { at, throttled } => (at, throttled),
            };
            if throttled && waited.is_none() {
                waited = Some(now);
            }
            wait(at, changes.as_mut()).await;
        }
    }

    fn admission(&self, flow: Option<Arc<HandlerFlow>>, probe: bool) -> Admission {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Admission {
            flow,
            probe,
            in_flight: self.in_flight.clone(),
            finished: false,
        }
    }

    /// Waits until the consumer may fetch again (the pause is over, the breaker half-open).
    /// Cancel-safe.
    pub async fn wait_open(&self) {
        let mut changes = self.subscribe();
        loop {
            if let Some(changes) = changes.as_mut() {
                changes.mark_unchanged();
            }
            let now = Instant::now();
            if self.stopped().is_none() {
                return;
            }
            let flow_until = self.flow.as_ref().and_then(|f| f.stopped(now)).map(|s| s.1);
            let until = match (self.paused_until(now), flow_until) {
                (Some(a), Some(b)) => a.max(b),
                (a, b) => a.or(b).unwrap_or(now + Duration::from_secs(1)),
            };
            wait(until, changes.as_mut()).await;
        }
    }
}

/// Sleeps until `at`, or until a change is announced.
async fn wait(at: Instant, changes: Option<&mut watch::Receiver<u64>>) {
    let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(at));
    match changes {
        Some(changes) => {
            tokio::select! {
                _ = sleep => {}
                _ = changes.changed() => {}
            }
        }
        None => sleep.await,
    }
}

/// One admitted delivery: say how its handler call went with [`finish`](Self::finish). Dropped
/// unfinished (the delivery was handed back, the session ended), it gives back what it held.
pub struct Admission {
    flow: Option<Arc<HandlerFlow>>,
    probe: bool,
    in_flight: Arc<AtomicUsize>,
    finished: bool,
}

impl Admission {
    /// Why a delivery admitted earlier must not start after all (the breaker opened or a
    /// pause began while it waited); never for the probe, which is what may close it.
    pub fn revoked(&self, gate: &Gate) -> Option<String> {
        if self.probe {
            return None;
        }
        gate.stopped()
    }

    /// Records the outcome of the handler call; returns the outcome to settle with: a retry
    /// the downstream timed with `Retry-After`, on a handler with a rate limit, pauses the
    /// limiter and becomes a deferral that uses no attempt.
    pub fn finish(mut self, outcome: Outcome) -> Outcome {
        self.finished = true;
        match &self.flow {
            Some(flow) => flow.finish(self.probe, outcome),
            None => outcome,
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.finished
            && let Some(flow) = &self.flow
        {
            flow.abandon(self.probe);
        }
    }
}

/// A handler reached through a `route`: its breaker, limiter and pause apply to each call,
/// and a call that may not reach it is deferred instead, so the route's consumer goes on
/// with its other targets.
pub struct Guarded {
    flow: Arc<HandlerFlow>,
    inner: Arc<dyn Handler>,
}

#[async_trait]
impl Handler for Guarded {
    async fn handle(&self, message: &Message) -> Outcome {
        let reserved = Mutex::new(None);
        loop {
            let now = Instant::now();
            match self.flow.start(now, &reserved).await {
                Try::Go { probe } => {
                    // Dropped by a panic or a cancellation: the probe goes back.
                    let admission = Admission {
                        flow: Some(self.flow.clone()),
                        probe,
                        in_flight: Arc::new(AtomicUsize::new(1)),
                        finished: false,
                    };
                    let outcome = self.inner.handle(message).await;
                    return admission.finish(outcome);
                }
                Try::Stop { reason, retry_at } => {
                    return Outcome::Defer {
                        after: retry_at.saturating_duration_since(now).max(MIN_DEFER),
                        reason,
                    };
                }
                Try::Wait { at, .. } if at.saturating_duration_since(now) > MAX_HOLD => {
                    return Outcome::Defer {
                        after: at.saturating_duration_since(now).max(MIN_DEFER),
                        reason: format!("handler `{}` is rate-limited", self.flow.name),
                    };
                }
                Try::Wait { at, throttled } => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                    if throttled {
                        self.flow
                            .metrics
                            .waited
                            .increment(now.elapsed().as_secs_f64());
                    }
                }
            }
        }
    }

    fn takes_undecodable(&self) -> bool {
        self.inner.takes_undecodable()
    }
}

/// Builds every configured handler with its flow from `flows`: the handlers consumers call
/// directly (their gate applies the flow), while a handler another one calls (a route's
/// target) is reached through [`Guarded`].
pub fn build_handlers(
    handlers: &BTreeMap<String, HandlerConfig>,
    flows: &Flows,
) -> anyhow::Result<BTreeMap<String, Arc<dyn Handler>>> {
    let mut made = BTreeMap::new();
    for (name, config) in handlers {
        made.insert(name.clone(), flows.handler(name, &settings_of(config)));
    }
    crate::handler::build_all_with(handlers, &|name, handler| match made.get(name) {
        Some(flow) => Arc::new(Guarded {
            flow: flow.clone(),
            inner: handler,
        }),
        None => handler,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows_with(settings: FlowSettings) -> (Flows, Gate) {
        let flows = Flows::default();
        flows.handler("hook", &settings);
        let gate = flows.gate("orders", "hook");
        (flows, gate)
    }

    fn breaker(min_calls: u32) -> FlowSettings {
        FlowSettings {
            breaker: Some(BreakerSettings {
                failure_ratio: 0.5,
                min_calls,
                window: Duration::from_secs(30),
                consecutive_failures: 0,
                open_for: Duration::from_secs(30),
                max_open_for: Duration::from_secs(60),
            }),
            rate_limit: None,
        }
    }

    async fn call(gate: &Gate, outcome: Outcome) {
        match gate.admit().await {
            Admit::Go(admission) => {
                admission.finish(outcome);
            }
            Admit::Stop(reason) => panic!("stopped: {reason}"),
        }
    }

    #[tokio::test]
    async fn successes_counted_without_the_lock_still_weigh_in_the_failure_ratio() {
        let (_flows, gate) = flows_with(breaker(10));
        for _ in 0..20 {
            call(&gate, Outcome::Ack).await;
        }
        // 10 failures of 30 calls: a third, below the ratio.
        for _ in 0..10 {
            call(&gate, Outcome::retry("HTTP 503")).await;
        }
        assert!(gate.stopped().is_none());
        // 20 failures of 40: the ratio is reached, the breaker opens.
        for _ in 0..9 {
            call(&gate, Outcome::retry("HTTP 503")).await;
        }
        assert!(gate.stopped().is_none());
        call(&gate, Outcome::retry("HTTP 503")).await;
        let reason = gate.stopped().expect("open");
        assert!(reason.contains("circuit breaker"), "{reason}");
        assert!(matches!(gate.admit().await, Admit::Stop(_)));
    }

    #[tokio::test]
    async fn pauses_stop_the_fast_path_at_once_and_a_resume_opens_it() {
        let (flows, gate) = flows_with(FlowSettings {
            rate_limit: Some(RateLimitSettings {
                per_second: 1e7,
                burst: 10_000_000,
                max_retry_after: DEFAULT_MAX_RETRY_AFTER,
                global: None,
            }),
            ..breaker(20)
        });
        call(&gate, Outcome::Ack).await;
        flows.pause_handler("hook", None, "maintenance").unwrap();
        assert!(matches!(gate.admit().await, Admit::Stop(r) if r.contains("maintenance")));
        flows.resume_handler("hook").unwrap();
        call(&gate, Outcome::Ack).await;
        flows.pause_consumer("orders", None, "backfill").unwrap();
        assert!(matches!(gate.admit().await, Admit::Stop(r) if r.contains("backfill")));
        assert!(gate.stopped().is_some());
        flows.resume_consumer("orders").unwrap();
        assert!(gate.stopped().is_none());
        call(&gate, Outcome::Ack).await;
    }

    #[tokio::test]
    async fn a_retry_after_pauses_the_limiter_even_on_the_fast_path() {
        let (_flows, gate) = flows_with(FlowSettings {
            breaker: None,
            rate_limit: Some(RateLimitSettings {
                per_second: 1e7,
                burst: 100,
                max_retry_after: DEFAULT_MAX_RETRY_AFTER,
                global: None,
            }),
        });
        let Admit::Go(admission) = gate.admit().await else {
            panic!("admitted")
        };
        let settled = admission.finish(Outcome::Retry {
            after: Some(Duration::from_secs(30)),
            reason: "HTTP 429".into(),
        });
        assert!(matches!(settled, Outcome::Defer { .. }), "{settled:?}");
        // The next admission waits for the pause to end instead of going through.
        let waited = tokio::time::timeout(Duration::from_millis(200), gate.admit()).await;
        assert!(waited.is_err(), "admitted during a Retry-After pause");
    }
}
