//! Retry schedules: how long a failed message waits before its next attempt, and when it has
//! had enough attempts.
//!
//! Shared by the amqp consumer (which maps delays onto fixed delay-queue tiers), the redis
//! consumer (which schedules exact due times) and the outbox relay.

use std::time::Duration;

/// A validated retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first; a message whose attempt `max_attempts` fails is
    /// dead-lettered as `exhausted`.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// Fraction of the delay added or removed at random, in 0.0..=1.0.
    pub jitter: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    Exponential {
        initial: Duration,
        max: Duration,
        multiplier: f64,
    },
    Fixed(Duration),
    /// Attempt N waits `tiers[N-1]`; the last tier repeats.
    Tiers(Vec<Duration>),
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff: Backoff::Exponential {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
                multiplier: 2.0,
            },
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// Whether a message whose attempt number `attempt` (1-based) just failed may be tried again.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let n = attempt.max(1);
        match &self.backoff {
            Backoff::Fixed(delay) => *delay,
            Backoff::Tiers(tiers) => tiers
                .get((n - 1) as usize)
                .or(tiers.last())
                .copied()
                .unwrap_or_default(),
            Backoff::Exponential {
                initial,
                max,
                multiplier,
            } => {
                let factor = multiplier.powi((n - 1).min(64) as i32);
                let secs = initial.as_secs_f64() * factor;
                if !secs.is_finite() || secs >= max.as_secs_f64() {
                    *max
                } else {
                    Duration::from_secs_f64(secs)
                }
            }
        }
    }

    /// The delay after failed attempt `attempt`, with jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        apply_jitter(self.base_delay(attempt), self.jitter)
    }

    /// The longest delay this policy asks for, before jitter: the cap on delays a handler
    /// supplies (`Retry-After`, a status body's `retry_after`).
    pub fn max_delay(&self) -> Duration {
        match &self.backoff {
            Backoff::Fixed(delay) => *delay,
            Backoff::Tiers(tiers) => tiers.iter().max().copied().unwrap_or_default(),
            Backoff::Exponential { initial, max, .. } => (*initial).max(*max),
        }
    }

    /// The delay before the attempt after failed attempt `attempt`: the handler's `after`
    /// when it gave one, cut to [`max_delay`](Self::max_delay) (a peer's `Retry-After` must
    /// not park a message for years), else the policy's own delay.
    pub fn next_delay(&self, attempt: u32, after: Option<Duration>) -> Duration {
        match after {
            Some(after) => after.min(self.max_delay()),
            None => self.delay(attempt),
        }
    }

    /// The distinct delays this policy can ask for, ascending: the amqp consumer declares one
    /// delay queue per tier, since a queue's TTL only expires messages at its head.
    pub fn tiers(&self) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = match &self.backoff {
            Backoff::Tiers(tiers) => tiers.clone(),
            _ => (1..self.max_attempts.max(2))
                .map(|attempt| round_to_tier(self.base_delay(attempt)))
                .collect(),
        };
        tiers.sort();
        tiers.dedup();
        tiers
    }

    /// The tier to use for `delay`: the smallest tier not shorter than it, else the longest.
    pub fn tier_for(&self, delay: Duration, tiers: &[Duration]) -> Option<Duration> {
        tiers
            .iter()
            .copied()
            .find(|tier| *tier >= delay)
            .or_else(|| tiers.last().copied())
    }
}

/// The waits between tries of something that keeps failing (a reconnect, a component's
/// restart, an effect tried again): `initial`, doubled after each failure up to `max`, each
/// lengthened at random by up to [`RECONNECT_JITTER`] of itself so that many clients that
/// lost the same server do not come back in step. Jitter only lengthens a wait: the
/// documented delays are the shortest ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExponentialBackoff {
    pub initial: Duration,
    pub max: Duration,
    /// Fraction of a wait added at random, in 0.0..=1.0.
    pub jitter: f64,
    /// Failures since the last [`reset`](Self::reset): what [`failed`](Self::failed) doubles by.
    failures: u32,
}

/// The fraction of a reconnect or restart wait added at random.
pub const RECONNECT_JITTER: f64 = 0.2;

impl ExponentialBackoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: RECONNECT_JITTER,
            failures: 0,
        }
    }

    /// The same waits with `jitter` (a fraction of each wait added at random).
    pub const fn with_jitter(self, jitter: f64) -> Self {
        Self { jitter, ..self }
    }

    /// The same waits without jitter: for a path whose total wait is budgeted.
    pub const fn without_jitter(self) -> Self {
        Self {
            jitter: 0.0,
            ..self
        }
    }

    /// The wait after `failures` failures in a row (1-based), before jitter.
    pub fn base(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.initial
            .saturating_mul(1u32 << doublings)
            .min(self.max.max(self.initial))
    }

    /// The wait after `failures` failures in a row (1-based), with jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let base = self.base(failures);
        if self.jitter <= 0.0 {
            return base;
        }
        // Checked: a huge `initial` (an embedder's setting) saturates instead of panicking.
        Duration::try_from_secs_f64(
            base.as_secs_f64() * (1.0 + self.jitter.min(1.0) * rand::random::<f64>()),
        )
        .unwrap_or(Duration::MAX)
    }

    /// Counts one more failure and returns the wait before the next try.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.delay(self.failures)
    }

    /// Starts again from `initial`: the thing came back.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Sleeps `delay` unless `token` is cancelled first; true when cancelled: the wait of every
/// loop that must stop at shutdown.
pub async fn sleep_or_cancel(delay: Duration, token: &tokio_util::sync::CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// `delay` in whole milliseconds, saturating at `u64::MAX` instead of wrapping.
pub fn saturating_millis(delay: Duration) -> u64 {
    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
}

/// Spreads a delay by up to ±`jitter` of itself, so retries of a burst do not land together.
pub fn apply_jitter(delay: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || delay.is_zero() {
        return delay;
    }
    let spread = rand::random::<f64>() * 2.0 - 1.0;
    let secs = delay.as_secs_f64() * (1.0 + jitter.min(1.0) * spread);
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

/// Rounds a derived delay to a whole number of seconds (or milliseconds below one second) so
/// that tier queue names stay short and stable.
fn round_to_tier(delay: Duration) -> Duration {
    if delay >= Duration::from_secs(1) {
        Duration::from_secs(delay.as_secs_f64().round() as u64)
    } else {
        Duration::from_millis(delay.as_millis() as u64)
    }
}

/// Formats a duration compactly for queue names and logs: `500ms`, `1s`, `1m30s`, `2h`.
pub fn format_compact(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = delay.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn exponential_grows_and_caps() {
        let policy = RetryPolicy {
            max_attempts: 20,
            backoff: Backoff::Exponential {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(10),
                multiplier: 3.0,
            },
            jitter: 0.0,
        };
        assert_eq!(policy.base_delay(1), Duration::from_secs(1));
        assert_eq!(policy.base_delay(2), Duration::from_secs(3));
        assert_eq!(policy.base_delay(3), Duration::from_secs(9));
        assert_eq!(policy.base_delay(4), Duration::from_secs(10));
        assert_eq!(policy.base_delay(200), Duration::from_secs(10));
    }

    #[test]
    fn attempts_are_counted_from_one() {
        let policy = exp(3);
        assert!(policy.should_retry(1));
        assert!(policy.should_retry(2));
        assert!(!policy.should_retry(3));
        assert!(!exp(1).should_retry(1));
    }

    #[test]
    fn tiers_are_derived_and_chosen() {
        let policy = exp(5);
        let tiers = policy.tiers();
        assert_eq!(
            tiers,
            vec![1, 2, 4, 8]
                .into_iter()
                .map(Duration::from_secs)
                .collect::<Vec<_>>()
        );
        assert_eq!(
            policy.tier_for(Duration::from_millis(1500), &tiers),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            policy.tier_for(Duration::from_secs(60), &tiers),
            Some(Duration::from_secs(8))
        );
        let explicit = RetryPolicy {
            backoff: Backoff::Tiers(vec![Duration::from_secs(10), Duration::from_secs(1)]),
            ..exp(9)
        };
        assert_eq!(
            explicit.tiers(),
            vec![Duration::from_secs(1), Duration::from_secs(10)]
        );
        assert_eq!(explicit.base_delay(1), Duration::from_secs(10));
        assert_eq!(explicit.base_delay(7), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        for _ in 0..1000 {
            let d = apply_jitter(Duration::from_secs(10), 0.2);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
        assert_eq!(
            apply_jitter(Duration::from_secs(3), 0.0),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn handler_delays_are_capped_at_the_largest_configured_delay() {
        let policy = exp(5);
        let huge = Duration::from_secs(99_999_999_999);
        assert_eq!(
            policy.next_delay(1, Some(huge)),
            Duration::from_secs(300),
            "capped at `max`"
        );
        assert_eq!(
            policy.next_delay(1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        let tiers = RetryPolicy {
            backoff: Backoff::Tiers(vec![Duration::from_secs(10), Duration::from_secs(60)]),
            ..exp(3)
        };
        assert_eq!(
            tiers.next_delay(1, Some(Duration::MAX)),
            Duration::from_secs(60)
        );
        assert_eq!(saturating_millis(Duration::MAX), u64::MAX);
        assert_eq!(
            saturating_millis(Duration::from_secs(18_446_744_073_709_552)),
            u64::MAX,
            "saturates instead of wrapping to a few milliseconds"
        );
    }

    #[test]
    fn backoff_jitter_only_lengthens_and_reset_starts_again() {
        let mut backoff = ExponentialBackoff::new(Duration::from_secs(1), Duration::from_secs(4));
        for expected in [1, 2, 4, 4] {
            let wait = backoff.failed();
            let base = Duration::from_secs(expected);
            assert!(wait >= base && wait <= base.mul_f64(1.2), "{wait:?}");
        }
        let huge = ExponentialBackoff::new(Duration::MAX, Duration::MAX);
        for failures in [1, 2, 40] {
            assert!(huge.delay(failures) >= Duration::from_secs(u64::MAX / 2));
        }
        assert_eq!(backoff.base(u32::MAX), Duration::from_secs(4));
        backoff.reset();
        assert!(backoff.failed() <= Duration::from_millis(1200));
        let mut exact = backoff.without_jitter();
        exact.reset();
        assert_eq!(exact.failed(), Duration::from_secs(1));
        assert_eq!(exact.failed(), Duration::from_secs(2));
    }

    #[test]
    fn compact_names() {
        assert_eq!(format_compact(Duration::from_millis(500)), "500ms");
        assert_eq!(format_compact(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_compact(Duration::from_secs(3600)), "1h");
        assert_eq!(format_compact(Duration::ZERO), "0s");
    }
}
