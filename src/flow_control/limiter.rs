//! The rate limiter of one handler: a token bucket shared by every consumer of the process
//! that calls it, which a downstream's `Retry-After` can pause outright.
//!
//! Driven with explicit instants like the breaker: [`Limiter::take`] either takes a token or
//! says when one will be there. The bucket is kept as GCRA (generic cell rate algorithm)
//! state in atomics: the theoretical arrival time of the next call, moved by one emission
//! interval per token taken. A full bucket is a theoretical arrival time at or before now
//! less the burst tolerance, so taking a token is one compare-and-swap and no lock: the
//! consumers of a handler with a limit set far above its rate pay next to nothing for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `rate_limit = { ... }` on a `[handlers.NAME]` table, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSettings {
    /// Tokens added per second: the sustained rate of calls.
    pub per_second: f64,
    /// Tokens the bucket holds: calls allowed at once after a quiet spell.
    pub burst: u32,
    /// The longest pause a `Retry-After` (an http 429 or 503) may impose.
    pub max_retry_after: Duration,
    /// `scope = "global"`: the redis broker whose budget every replica shares; `None`: this
    /// process's own.
    pub global: Option<String>,
}

/// The default `max_retry_after`: a downstream cannot stop a consumer for longer than this
/// with one answer.
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub struct Limiter {
    settings: RateLimitSettings,
    /// Every instant below is kept as nanoseconds since this one.
    base: Instant,
    /// Nanoseconds between two tokens.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: `interval` x (`burst` - 1).
    tolerance: u64,
    /// The theoretical arrival time of the next call.
    tat: AtomicU64,
    /// Set by a `Retry-After`: no token before then (stored plus one; 0: no pause).
    paused_until: AtomicU64,
}

impl Limiter {
    pub fn new(settings: RateLimitSettings, now: Instant) -> Self {
        let interval = (1e9 / settings.per_second)
            .round()
            .clamp(1.0, u64::MAX as f64) as u64;
        let tolerance = interval.saturating_mul(u64::from(settings.burst.max(1) - 1));
        Self {
            settings,
            base: now,
            interval,
            tolerance,
            tat: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.base + Duration::from_nanos(nanos)
    }

    /// Takes a token at `now`, or says when to ask again.
    pub fn take(&self, now: Instant) -> Result<(), Instant> {
        let t = self.nanos(now);
        let paused = self.paused_until.load(Ordering::Acquire);
        if paused != 0 {
            let until = paused - 1;
            if t < until {
                return Err(self.instant(until));
            }
            // The downstream asked for a pause, not for a burst at its end: one token at
            // `until`, the rate after it.
            if self
                .paused_until
                .compare_exchange(paused, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.tat
                    .fetch_max(until.saturating_add(self.tolerance), Ordering::AcqRel);
            }
        }
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let allowed_at = tat.saturating_sub(self.tolerance);
            if t < allowed_at {
                return Err(self.instant(allowed_at));
            }
            let next = tat.max(t).saturating_add(self.interval);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    /// Pauses the limiter for `after` (cut to `max_retry_after`) from `now`; returns the
    /// pause applied. A later pause never shortens an earlier one.
    pub fn pause(&self, after: Duration, now: Instant) -> Duration {
        let after = after.min(self.settings.max_retry_after);
        let until = self.nanos(now + after);
        self.paused_until
            .fetch_max(until.saturating_add(1), Ordering::AcqRel);
        after
    }

    /// The end of a pause in force at `now`.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        let paused = self.paused_until.load(Ordering::Acquire);
        let until = paused.checked_sub(1)?;
        (until > self.nanos(now)).then(|| self.instant(until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32, now: Instant) -> Limiter {
        Limiter::new(
            RateLimitSettings {
                per_second,
                burst,
                max_retry_after: Duration::from_secs(60),
                global: None,
            },
            now,
        )
    }

    #[test]
    fn a_full_bucket_gives_its_burst_then_the_rate() {
        let now = Instant::now();
        let l = limiter(10.0, 3, now);
        for _ in 0..3 {
            assert_eq!(l.take(now), Ok(()));
        }
        let next = l.take(now).unwrap_err();
        assert_eq!(next - now, Duration::from_millis(100));
        assert_eq!(l.take(next), Ok(()));
        assert!(l.take(next).is_err());
    }

    #[test]
    fn retry_after_pauses_it_within_the_cap() {
        let now = Instant::now();
        let l = limiter(1000.0, 100, now);
        assert_eq!(l.pause(Duration::from_secs(5), now), Duration::from_secs(5));
        assert_eq!(l.take(now), Err(now + Duration::from_secs(5)));
        // A shorter pause does not shorten it; a longer one is cut to max_retry_after.
        l.pause(Duration::from_secs(1), now);
        assert_eq!(l.paused_until(now), Some(now + Duration::from_secs(5)));
        assert_eq!(
            l.pause(Duration::from_secs(3600), now),
            Duration::from_secs(60)
        );
        let end = now + Duration::from_secs(60);
        assert_eq!(l.take(end), Ok(()));
        // No burst at the end of a pause.
        assert!(l.take(end).is_err());
    }

    #[test]
    fn threads_taking_at_once_share_the_burst_exactly() {
        let now = Instant::now();
        let l = std::sync::Arc::new(limiter(0.001, 1000, now));
        let taken = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        if l.take(now).is_ok() {
                            taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.into_inner(), 1000);
    }
}
