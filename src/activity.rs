//! Whether each consumer reads or stands by: `bosun_consumer_active{consumer}` (1 while it
//! reads, 0 otherwise) and, for a `single_active` consumer waiting for its turn, the entry
//! `/healthz?verbose` lists under `standby_consumers` with why.
//!
//! The registry is process-wide, like the metrics recorder: consumer names are unique in a
//! configuration.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use metrics::Gauge;

static STANDBY: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

fn standby_map() -> MutexGuard<'static, BTreeMap<String, String>> {
    // Every write is one insert or remove: a poisoned lock is still usable.
    STANDBY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The consumers standing by, with why.
pub fn standbys() -> BTreeMap<String, String> {
    standby_map().clone()
}

/// One consumer's reading state.
pub struct Activity {
    consumer: String,
    gauge: Gauge,
}

impl Activity {
    pub fn new(consumer: &str) -> Self {
        let gauge = metrics::gauge!("bosun_consumer_active", "consumer" => consumer.to_owned());
        gauge.set(0.0);
        Self {
            consumer: consumer.to_owned(),
            gauge,
        }
    }

    /// It reads.
    pub fn active(&self) {
        self.gauge.set(1.0);
        standby_map().remove(&self.consumer);
    }

    /// It waits for another process to stop reading.
    pub fn standby(&self, why: impl Into<String>) {
        self.gauge.set(0.0);
        standby_map().insert(self.consumer.clone(), why.into());
    }

    /// It does not read (disconnected, stopping), and is not standing by either.
    pub fn idle(&self) {
        self.gauge.set(0.0);
        standby_map().remove(&self.consumer);
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.idle();
    }
}
