//! The rate limiter of one handler: a token bucket shared by every consumer of the process
//! that calls it, which a downstream's `Retry-After` can pause outright.
//!
//! Pure, driven with explicit instants like the breaker: [`Limiter::take`] either takes a
//! token or says when one will be there.

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
    tokens: f64,
    refilled: Instant,
    /// Set by a `Retry-After`: no token before then.
    paused_until: Option<Instant>,
}

impl Limiter {
    pub fn new(settings: RateLimitSettings, now: Instant) -> Self {
        Self {
            tokens: f64::from(settings.burst.max(1)),
            settings,
            refilled: now,
            paused_until: None,
        }
    }

    /// Takes a token at `now`, or says when to ask again.
    pub fn take(&mut self, now: Instant) -> Result<(), Instant> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Err(until);
            }
            self.paused_until = None;
            // The downstream asked for a pause, not for a burst at its end.
            self.tokens = self.tokens.min(1.0);
            self.refilled = until;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        let burst = f64::from(self.settings.burst.max(1));
        self.tokens = (self.tokens + elapsed * self.settings.per_second).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let missing = (1.0 - self.tokens) / self.settings.per_second;
            Err(now + Duration::try_from_secs_f64(missing).unwrap_or(Duration::from_secs(1)))
        }
    }

    /// Pauses the limiter for `after` (cut to `max_retry_after`) from `now`; returns the
    /// pause applied. A later pause never shortens an earlier one.
    pub fn pause(&mut self, after: Duration, now: Instant) -> Duration {
        let after = after.min(self.settings.max_retry_after);
        let until = now + after;
        if self.paused_until.is_none_or(|current| current < until) {
            self.paused_until = Some(until);
        }
        after
    }

    /// The end of a pause in force at `now`.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|until| *until > now)
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
        let mut l = limiter(10.0, 3, now);
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
        let mut l = limiter(1000.0, 100, now);
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
}
