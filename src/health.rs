//! Readiness of every component and liveness of the supervisor loop, as `/readyz` and
//! `/healthz` report them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// One component's readiness.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ComponentHealth {
    pub ready: bool,
    /// Why it is not ready ("connecting to rabbit: connection refused"), or empty.
    pub reason: String,
    /// Unix seconds of the last change.
    pub since: u64,
}

/// The shared registry. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, ComponentHealth>>>,
    /// Milliseconds since `started` at the supervisor loop's last turn.
    heartbeat_ms: Arc<AtomicU64>,
    started: Instant,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            components: Arc::default(),
            heartbeat_ms: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
        }
    }
}

fn ready_gauge(component: &str) -> metrics::Gauge {
    metrics::gauge!("bosun_component_ready", "component" => component.to_owned())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ComponentHealth>> {
        // A panic while holding this lock cannot leave the map half-written (every write is
        // one insert), so a poisoned lock is still usable.
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a component, not ready until it says so. Its readiness is also the gauge
    /// `bosun_component_ready{component}`.
    pub fn register(&self, name: &str) -> HealthHandle {
        ready_gauge(name).set(0.0);
        self.lock().insert(
            name.to_owned(),
            ComponentHealth {
                ready: false,
                reason: "starting".into(),
                since: unix_now(),
            },
        );
        HealthHandle {
            name: name.to_owned(),
            health: self.clone(),
        }
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn set(&self, name: &str, ready: bool, reason: String) {
        let mut components = self.lock();
        if let Some(entry) = components.get_mut(name)
            && (entry.ready != ready || entry.reason != reason)
        {
            *entry = ComponentHealth {
                ready,
                reason,
                since: unix_now(),
            };
            ready_gauge(name).set(if ready { 1.0 } else { 0.0 });
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentHealth> {
        self.lock().clone()
    }

    /// Called by the supervisor loop on every turn.
    pub fn beat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the supervisor loop last turned.
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// A component's handle on its own readiness entry.
#[derive(Clone)]
pub struct HealthHandle {
    name: String,
    health: Health,
}

impl HealthHandle {
    pub fn set_ready(&self) {
        self.health.set(&self.name, true, String::new());
    }

    /// Not ready, and why; the reason is shown on `/readyz` and must hold no secrets.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.health.set(&self.name, false, reason.into());
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether another component of the same registry is ready; `None` when it is not
    /// registered. For a component that must start after another has done its part.
    pub fn is_ready(&self, component: &str) -> Option<bool> {
        self.health.lock().get(component).map(|c| c.ready)
    }

    /// A handle that reports into a private registry: for components run outside a
    /// supervisor (CLI commands, tests).
    pub fn detached(name: &str) -> Self {
        Health::default().register(name)
    }
}
