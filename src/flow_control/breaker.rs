//! The circuit breaker of one handler: a pure state machine over the outcomes of its calls,
//! driven with explicit instants so every transition is tested here without waiting.
//!
//! Closed: calls go through; the breaker trips when `consecutive_failures` transient failures
//! come in a row, or when at least `min_calls` calls in the last `window` failed at
//! `failure_ratio` or more. Open: no call goes through until `open_for` (with jitter) has
//! passed. Half-open: exactly one call, the probe, goes through; its success closes the
//! breaker, its failure opens it again for twice as long, up to `max_open_for`.
//!
//! Only transient failures count ([`Verdict`]): a downstream that answers "no" (4xx, a
//! dead letter, an invalid message) is up, and pausing would not help it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::handler::Outcome;
use crate::retry::ExponentialBackoff;

/// `circuit_breaker = { ... }` on a `[handlers.NAME]` table, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Share of failed calls in `window` (0 < r <= 1) that opens the breaker.
    pub failure_ratio: f64,
    /// Calls in `window` needed before `failure_ratio` is looked at.
    pub min_calls: u32,
    /// How far back `failure_ratio` looks.
    pub window: Duration,
    /// Transient failures in a row that open the breaker whatever the ratio (0: off).
    pub consecutive_failures: u32,
    /// How long the breaker stays open the first time, before one probe is let through.
    pub open_for: Duration,
    /// The longest `open_for` grows to as probes keep failing.
    pub max_open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            min_calls: 20,
            window: Duration::from_secs(30),
            consecutive_failures: 10,
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(600),
        }
    }
}

/// Fraction of `open_for` added at random, so that replicas whose breakers opened together
/// do not all probe at the same instant.
const OPEN_JITTER: f64 = 0.1;
/// The window is kept in this many slices: memory stays fixed whatever the call rate.
const SLICES: u32 = 10;

/// What a finished call says about the downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered (ack, drop, dead letter, a 4xx): up.
    Success,
    /// A transient failure: a timeout, a refused connection, a 5xx, a retry exit.
    Failure,
    /// Nothing learnt (the call was released or deferred without reaching it).
    Neutral,
}

impl Verdict {
    /// The verdict a handler's outcome gives. A retry with a `Retry-After` is the downstream
    /// asking to be called later, not failing: the limiter honours it, the breaker ignores it.
    pub fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Ack | Outcome::Drop { .. } | Outcome::DeadLetter { .. } => Verdict::Success,
            Outcome::Retry { after: None, .. } => Verdict::Failure,
            Outcome::Retry { after: Some(_), .. } => Verdict::Neutral,
            Outcome::Release { .. } | Outcome::Defer { .. } => Verdict::Neutral,
        }
    }
}

/// The state a breaker shows: the `bosun_breaker_state` gauge's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing`: the one probe call is out.
    HalfOpen {
        probing: bool,
    },
}

/// May a call start now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: go.
    Call,
    /// Half-open: go, as the one probe; its verdict decides.
    Probe,
    /// Open, or half-open with the probe out: not before `retry_at` (for a probe out, a guess:
    /// when it may be back).
    Refused { retry_at: Instant },
}

/// One breaker's state. Not synchronised: its owner holds it under a lock.
#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    state: State,
    /// (slice start, calls, failures), oldest first.
    slices: VecDeque<(Instant, u32, u32)>,
    consecutive: u32,
    /// How long the next opening lasts: `open_for`, doubled by each failed probe.
    backoff: ExponentialBackoff,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        let backoff = ExponentialBackoff::new(settings.open_for, settings.max_open_for)
            .with_jitter(OPEN_JITTER);
        Self {
            settings,
            state: State::Closed,
            slices: VecDeque::new(),
            consecutive: 0,
            backoff,
        }
    }

    /// The state at `now`: an open breaker whose time is up shows half-open.
    pub fn state(&mut self, now: Instant) -> BreakerState {
        self.tick(now);
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When an open breaker lets its probe through; `None` unless open.
    pub fn open_until(&mut self, now: Instant) -> Option<Instant> {
        self.tick(now);
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    fn tick(&mut self, now: Instant) {
        if let State::Open { until } = self.state
            && now >= until
        {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// Asks to start a call at `now`. A [`Permit::Probe`] must be answered with
    /// [`finish`](Self::finish) (or [`abandon`](Self::abandon)) or no other call goes through.
    pub fn permit(&mut self, now: Instant) -> Permit {
        self.tick(now);
        match self.state {
            State::Closed => Permit::Call,
            State::Open { until } => Permit::Refused { retry_at: until },
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Permit::Probe
            }
            State::HalfOpen { probing: true } => Permit::Refused {
                retry_at: now + self.settings.open_for.min(Duration::from_secs(1)),
            },
        }
    }

    /// Whether a call would be let through at `now`, without taking the probe.
    pub fn admits(&mut self, now: Instant) -> bool {
        self.tick(now);
        matches!(
            self.state,
            State::Closed | State::HalfOpen { probing: false }
        )
    }

    /// Records a finished call (`probe`: it held the probe permit). Returns the state it
    /// moved to, if it moved.
    pub fn finish(&mut self, probe: bool, verdict: Verdict, now: Instant) -> Option<BreakerState> {
        self.tick(now);
        if probe {
            return match verdict {
                Verdict::Success => {
                    self.close();
                    Some(BreakerState::Closed)
                }
                Verdict::Failure => {
                    self.open(now);
                    Some(BreakerState::Open)
                }
                Verdict::Neutral => {
                    self.abandon(true);
                    None
                }
            };
        }
        // A call that started while closed and ended after the breaker opened tells nothing
        // new: the opening already counted its kind.
        if !matches!(self.state, State::Closed) || verdict == Verdict::Neutral {
            return None;
        }
        let failed = verdict == Verdict::Failure;
        self.count(now, failed);
        self.consecutive = if failed { self.consecutive + 1 } else { 0 };
        // Only a failure can trip it: a success never makes things worse.
        if failed && self.tripped() {
            self.open(now);
            return Some(BreakerState::Open);
        }
        None
    }

    /// Records `n` calls that succeeded while the breaker was closed, the latest at `at`
    /// (counted in a batch by the owner's lock-free path; see `HandlerFlow::finish`).
    pub fn successes(&mut self, n: u32, at: Instant) {
        if n == 0 || !matches!(self.state, State::Closed) {
            return;
        }
        self.add(at, n, 0);
        self.consecutive = 0;
    }

    /// Whether the breaker is closed at `now`.
    pub fn closed(&mut self, now: Instant) -> bool {
        self.tick(now);
        matches!(self.state, State::Closed)
    }

    /// The length of one slice of the window: successes counted in a batch are at most this
    /// late.
    pub fn slice(&self) -> Duration {
        (self.settings.window / SLICES).max(Duration::from_millis(1))
    }

    /// A call given up before it reached the downstream: a probe permit goes back.
    pub fn abandon(&mut self, probe: bool) {
        if probe && let State::HalfOpen { probing: true } = self.state {
            self.state = State::HalfOpen { probing: false };
        }
    }

    fn tripped(&self) -> bool {
        let threshold = self.settings.consecutive_failures;
        if threshold > 0 && self.consecutive >= threshold {
            return true;
        }
        let (calls, failures) = self
            .slices
            .iter()
            .fold((0u64, 0u64), |(c, f), (_, sc, sf)| {
                (c + u64::from(*sc), f + u64::from(*sf))
            });
        calls >= u64::from(self.settings.min_calls.max(1))
            && failures as f64 >= self.settings.failure_ratio * calls as f64
    }

    fn count(&mut self, now: Instant, failed: bool) {
        self.add(now, 1, u32::from(failed));
    }

    fn add(&mut self, now: Instant, calls: u32, failed: u32) {
        let window = self.settings.window;
        while let Some((start, _, _)) = self.slices.front() {
            if now.saturating_duration_since(*start) >= window {
                self.slices.pop_front();
            } else {
                break;
            }
        }
        let slice = self.slice();
        match self.slices.back_mut() {
            Some((start, c, f)) if now.saturating_duration_since(*start) < slice => {
                *c = c.saturating_add(calls);
                *f = f.saturating_add(failed);
            }
            _ => self.slices.push_back((now, calls, failed)),
        }
    }

    fn open(&mut self, now: Instant) {
        let open_for = self.backoff.failed();
        self.state = State::Open {
            until: now + open_for,
        };
        self.slices.clear();
        self.consecutive = 0;
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.backoff.reset();
        self.slices.clear();
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            failure_ratio: 0.5,
            min_calls: 10,
            window: Duration::from_secs(30),
            consecutive_failures: 5,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(25),
        }
    }

    fn call(b: &mut Breaker, verdict: Verdict, now: Instant) -> Option<BreakerState> {
        assert_eq!(b.permit(now), Permit::Call);
        b.finish(false, verdict, now)
    }

    #[test]
    fn only_transient_failures_count() {
        let dead = Outcome::dead_letter("HTTP 404");
        let invalid = Outcome::invalid("not json");
        for outcome in [Outcome::Ack, dead, invalid] {
            assert_eq!(Verdict::of(&outcome), Verdict::Success, "{outcome:?}");
        }
        assert_eq!(Verdict::of(&Outcome::retry("HTTP 503")), Verdict::Failure);
        let throttled = Outcome::Retry {
            after: Some(Duration::from_secs(3)),
            reason: "HTTP 429".into(),
        };
        assert_eq!(Verdict::of(&throttled), Verdict::Neutral);
    }

    #[test]
    fn a_storm_of_answers_that_are_not_transient_never_opens_it() {
        let mut b = Breaker::new(settings());
        let now = Instant::now();
        for i in 0..1000 {
            let at = now + Duration::from_millis(i);
            assert_eq!(call(&mut b, Verdict::Success, at), None);
        }
        assert_eq!(b.state(now + Duration::from_secs(1)), BreakerState::Closed);
    }

    #[test]
    fn consecutive_failures_open_it() {
        let mut b = Breaker::new(settings());
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(call(&mut b, Verdict::Failure, now), None);
        }
        assert_eq!(
            call(&mut b, Verdict::Failure, now),
            Some(BreakerState::Open)
        );
        assert!(matches!(b.permit(now), Permit::Refused { .. }));
    }

    #[test]
    fn the_failure_ratio_opens_it_only_past_min_calls() {
        let mut b = Breaker::new(BreakerSettings {
            consecutive_failures: 0,
            ..settings()
        });
        let now = Instant::now();
        // Alternating: 50 % failures, never 5 in a row.
        for i in 0..9 {
            let verdict = if i % 2 == 0 {
                Verdict::Failure
            } else {
                Verdict::Success
            };
            assert_eq!(call(&mut b, verdict, now), None, "call {i}");
        }
        assert_eq!(call(&mut b, Verdict::Success, now), None);
        assert_eq!(
            call(&mut b, Verdict::Failure, now),
            Some(BreakerState::Open)
        );
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let mut b = Breaker::new(BreakerSettings {
            consecutive_failures: 0,
            ..settings()
        });
        let now = Instant::now();
        for _ in 0..9 {
            call(&mut b, Verdict::Failure, now);
        }
        let later = now + Duration::from_secs(31);
        assert_eq!(call(&mut b, Verdict::Failure, later), None);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let mut b = Breaker::new(settings());
        let now = Instant::now();
        for _ in 0..5 {
            call(&mut b, Verdict::Failure, now);
        }
        let until = b.open_until(now).expect("open");
        // Jitter only lengthens the wait.
        assert!(until >= now + Duration::from_secs(10));
        assert!(until <= now + Duration::from_secs(11));
        assert!(matches!(
            b.permit(until - Duration::from_millis(1)),
            Permit::Refused { .. }
        ));
        assert_eq!(b.state(until), BreakerState::HalfOpen);
        assert_eq!(b.permit(until), Permit::Probe);
        for _ in 0..10 {
            assert!(matches!(b.permit(until), Permit::Refused { .. }));
        }
        assert!(!b.admits(until));
        assert_eq!(
            b.finish(true, Verdict::Success, until),
            Some(BreakerState::Closed)
        );
        assert_eq!(b.permit(until), Permit::Call);
    }

    #[test]
    fn a_failed_probe_reopens_for_twice_as_long_up_to_the_cap() {
        let mut b = Breaker::new(settings());
        let mut now = Instant::now();
        for _ in 0..5 {
            call(&mut b, Verdict::Failure, now);
        }
        let mut lengths = Vec::new();
        for _ in 0..3 {
            let until = b.open_until(now).expect("open");
            lengths.push((until - now).as_secs());
            now = until;
            assert_eq!(b.permit(now), Permit::Probe);
            assert_eq!(
                b.finish(true, Verdict::Failure, now),
                Some(BreakerState::Open)
            );
        }
        let until = b.open_until(now).expect("open");
        lengths.push((until - now).as_secs());
        // 10 s, 20 s, then capped at 25 s (whole seconds: jitter adds up to 10 %).
        assert_eq!(lengths[0], 10);
        assert!((20..=22).contains(&lengths[1]), "{lengths:?}");
        assert!((25..=27).contains(&lengths[2]), "{lengths:?}");
        assert!((25..=27).contains(&lengths[3]), "{lengths:?}");
        // A success resets it: the next opening is `open_for` again.
        assert_eq!(b.permit(until), Permit::Probe);
        b.finish(true, Verdict::Success, until);
        for _ in 0..5 {
            call(&mut b, Verdict::Failure, until);
        }
        let again = b.open_until(until).expect("open");
        assert_eq!((again - until).as_secs(), 10);
    }

    #[test]
    fn an_abandoned_probe_gives_the_probe_back() {
        let mut b = Breaker::new(settings());
        let now = Instant::now();
        for _ in 0..5 {
            call(&mut b, Verdict::Failure, now);
        }
        let until = b.open_until(now).expect("open");
        assert_eq!(b.permit(until), Permit::Probe);
        b.abandon(true);
        assert_eq!(b.permit(until), Permit::Probe);
        assert_eq!(b.finish(true, Verdict::Neutral, until), None);
        assert_eq!(b.permit(until), Permit::Probe);
    }
}
