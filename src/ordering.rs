//! Ordering lanes: a consumer with `ordering = { key, lanes }` hashes each message's key to
//! one of `lanes` lanes and runs one message per lane at a time, in the order the messages
//! arrived. Messages of one key always share a lane, so their order holds, while messages of
//! other keys run in the other lanes at the same time.
//!
//! A lane is a chain of turns: each message entering a lane gets a [`Turn`] that waits for
//! the turn of the message before it in that lane to end (to be dropped). Entering is
//! synchronous and done in arrival order by the one task that reads the broker, so the chain
//! is the arrival order; nothing else needs a lock or a queue per lane.
//!
//! Architecture Invariant: a turn ends only when its message is settled or handed back (the
//! [`Turn`] lives in the message's future), so the next message of a lane never starts
//! while the one before it may still run.

use std::hash::{Hash as _, Hasher as _};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{InboxKey, OrderingKey};
use crate::flow_control::{Admission, Admit, Gate};
use crate::handler::HeaderValue;

/// The lanes of one consumer.
pub(crate) struct Lanes {
    /// Per lane, what the last message that entered it signals when its turn ends.
    tails: Vec<Option<oneshot::Receiver<()>>>,
}

/// One message's place in its lane: it may start once [`ready`](Turn::ready) returns, and
/// the next message of the lane may start once this is dropped.
pub(crate) struct Turn {
    /// The turn before this one in the lane, if it had not ended when this one entered.
    before: Option<oneshot::Receiver<()>>,
    /// Dropped with the turn: that is what wakes the next message of the lane.
    _end: oneshot::Sender<()>,
}

impl Lanes {
    pub(crate) fn new(lanes: usize) -> Self {
        Self {
            tails: (0..lanes.max(1)).map(|_| None).collect(),
        }
    }

    /// The lane `key` hashes to.
    pub(crate) fn lane_of(&self, key: &[u8]) -> usize {
        // SipHash with fixed keys: the same key always lands in the same lane, in every
        // process of this build.
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        (hasher.finish() % self.tails.len() as u64) as usize
    }

    /// Puts a message with `key` at the end of its lane.
    pub(crate) fn enter(&mut self, key: &[u8]) -> Turn {
        let lane = self.lane_of(key);
        let (end, next) = oneshot::channel();
        let before = self.tails[lane].replace(next);
        Turn { before, _end: end }
    }
}

impl Turn {
    /// Waits until every message that entered this lane before this one has ended its turn.
    pub(crate) async fn ready(&mut self) {
        if let Some(before) = self.before.as_mut() {
            // Sent or dropped, the turn before has ended either way.
            let _ = before.await;
            self.before = None;
        }
    }
}

/// A message's ordering key from its parts, or why it has none (the message then fails
/// alone: it is dead-lettered as `invalid`). `routing_key` is the one the message was first
/// published with. A key is read exactly as an inbox key is.
pub(crate) fn key_of(
    source: &OrderingKey,
    message_id: Option<&str>,
    routing_key: Option<&str>,
    headers: &std::collections::BTreeMap<String, HeaderValue>,
    body: &[u8],
) -> Result<String, String> {
    match source {
        OrderingKey::RoutingKey => routing_key
            .map(str::to_owned)
            .ok_or_else(|| "the message has no routing key".to_owned()),
        OrderingKey::Inbox(key) => crate::inbox::key::of_parts(key, message_id, headers, body)
            .map_err(|e| format!("no ordering key: {e}")),
    }
}

/// Whether reading the key needs the message's headers converted (amqp skips that work for
/// a key from the body or routing key).
pub(crate) fn needs_headers(source: &OrderingKey) -> bool {
    matches!(source, OrderingKey::Inbox(InboxKey::Header(_)))
}

/// A message's place in its consumer's lanes; the default is no place (no `ordering`).
#[derive(Default)]
pub(crate) struct Place {
    /// Its turn in its lane.
    pub(crate) turn: Option<Turn>,
    /// Why it has no ordering key: it is dead-lettered as `invalid` instead of handled.
    pub(crate) bad_key: Option<String>,
    /// Its retries wait in its lane (`retry = "hold"`).
    pub(crate) hold: bool,
    /// The consumer's shutdown: a message still waiting for its turn is handed back.
    pub(crate) shutdown: CancellationToken,
}

impl Place {
    /// Waits for the message's turn; false when shutdown began first, so the message is
    /// handed back unstarted.
    pub(crate) async fn wait(&mut self) -> bool {
        let Some(turn) = self.turn.as_mut() else {
            return true;
        };
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = turn.ready() => true,
        }
    }
}

/// What became of a retry held in its lane.
pub(crate) enum Held {
    /// The delay passed and the gate let it run again.
    Again(Admission),
    /// The gate shut meanwhile (a pause, an open breaker): hand the message back unstarted.
    Stopped(String),
    /// Shutdown began meanwhile: settle the retry the ordinary way (a durable retry copy).
    ShuttingDown,
}

/// Shortest wait of a held retry, so a handler that defers with no delay does not spin.
const MIN_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

/// Waits out a held retry's `delay` and asks the gate again, as for a new message.
pub(crate) async fn hold(
    delay: std::time::Duration,
    gate: &Gate,
    shutdown: &CancellationToken,
) -> Held {
    if crate::retry::sleep_or_cancel(delay.max(MIN_HOLD), shutdown).await {
        return Held::ShuttingDown;
    }
    tokio::select! {
        admit = gate.admit() => match admit {
            Admit::Go(admission) => Held::Again(admission),
            Admit::Stop(reason) => Held::Stopped(reason),
        },
        _ = shutdown.cancelled() => Held::ShuttingDown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_turn_waits_for_the_one_before_it_in_its_lane_only() {
        let mut lanes = Lanes::new(8);
        let mut first = lanes.enter(b"k1");
        let mut second = lanes.enter(b"k1");
        first.ready().await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), second.ready()).await;
        assert!(waiting.is_err(), "the second turn of a lane waited");
        // Another key in another lane goes at once.
        let other = (0..100u32)
            .map(|i| format!("other-{i}"))
            .find(|k| lanes.lane_of(k.as_bytes()) != lanes.lane_of(b"k1"))
            .unwrap();
        let mut third = lanes.enter(other.as_bytes());
        tokio::time::timeout(Duration::from_millis(50), third.ready())
            .await
            .unwrap();
        drop(first);
        tokio::time::timeout(Duration::from_millis(50), second.ready())
            .await
            .unwrap();
    }

    #[test]
    fn keys_spread_over_the_lanes_and_stay_put() {
        let lanes = Lanes::new(64);
        let used: std::collections::HashSet<usize> = (0..10_000)
            .map(|i| lanes.lane_of(format!("customer-{i}").as_bytes()))
            .collect();
        assert_eq!(used.len(), 64);
        assert_eq!(lanes.lane_of(b"c-1"), Lanes::new(64).lane_of(b"c-1"));
        // Hostile keys hash like any other.
        let huge = vec![0xffu8; 1 << 20];
        assert!(lanes.lane_of(&huge) < 64);
        assert!(lanes.lane_of(b"\0\0") < 64);
    }

    #[test]
    fn a_routing_key_or_an_inbox_key_is_read() {
        let headers = [("X-Order-Key".to_owned(), HeaderValue::String("c-9".into()))]
            .into_iter()
            .collect();
        assert_eq!(
            key_of(
                &OrderingKey::RoutingKey,
                None,
                Some("order.eu"),
                &headers,
                b""
            )
            .unwrap(),
            "order.eu"
        );
        let header = OrderingKey::Inbox(InboxKey::Header("x-order-key".into()));
        assert_eq!(key_of(&header, None, None, &headers, b"").unwrap(), "c-9");
        let json = OrderingKey::Inbox(InboxKey::Json("/customer_id".into()));
        assert!(
            key_of(&json, None, None, &headers, b"{}")
                .unwrap_err()
                .contains("/customer_id")
        );
    }
}
