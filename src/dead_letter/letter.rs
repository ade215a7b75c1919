//! Reading a dead letter: what failed, where it came from, how often, and why.
//!
//! Two writers put dead letters where a processor reads them:
//! - bosun's own consumers, which add `bosun-*` failure headers (amqp) or fields (redis);
//! - RabbitMQ itself, when a queue's `x-dead-letter-exchange` catches a message that expired,
//!   overflowed (`maxlen`), hit a quorum queue's delivery limit or was rejected without
//!   requeue; it records that in the `x-death` header (and `x-first-death-*` /
//!   `x-last-death-*`).
//!
//! A dead letter that carries neither is still a dead letter: it gets kind `unknown` and is
//! handled (archived by default) like any other, never discarded.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, TimeZone as _, Utc};

use crate::handler::{HeaderValue, Message};

/// Header and field names bosun's consumers write; a compatibility boundary, listed in
/// README.md. Defined where the consumers write them; gathered here for the reader.
pub mod names {
    pub use crate::amqp::headers::{
        ATTEMPT, CONSUMER, ERROR, ERROR_KIND, FIRST_FAILURE_AT, HOST, LAST_FAILURE_AT,
        ORIGINAL_EXCHANGE, ORIGINAL_QUEUE, ORIGINAL_ROUTING_KEY, REPLAY_COUNT,
    };
    /// Redis Streams failure fields, and the producer's timestamp (a field of its own).
    pub use crate::redis_streams::fields::{
        DELIVERIES, FAILED_AT, GROUP, ORIG_ID, ORIG_STREAM, TIMESTAMP as TIMESTAMP_MS,
    };

    /// Failure bookkeeping that a replayed copy must not carry: the replay starts a fresh
    /// round of attempts, and the next failure writes its own.
    pub const FAILURE: &[&str] = &[
        ATTEMPT,
        FIRST_FAILURE_AT,
        LAST_FAILURE_AT,
        ERROR,
        ERROR_KIND,
        CONSUMER,
        HOST,
        REPLAY_COUNT,
        ORIG_STREAM,
        ORIG_ID,
        GROUP,
        DELIVERIES,
        FAILED_AT,
    ];
}

/// The error kinds bosun writes, plus `unknown` for dead letters that carry none.
pub const KINDS: &[&str] = &["transient", "permanent", "exhausted", "invalid", "unknown"];

/// A dead letter as the rules and the archive see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Kept on replay so handlers can deduplicate across the whole life of the message.
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    /// Every header as delivered, failure headers and `x-death` included (archived as is).
    pub headers: BTreeMap<String, HeaderValue>,
    pub body: Bytes,
    /// One of [`KINDS`].
    pub error_kind: String,
    /// The handler's (or the broker's) reason; `None` when the dead letter says nothing.
    pub error: Option<String>,
    /// The broker's reason from `x-death`: rejected, expired, maxlen, delivery_limit.
    pub reason: Option<String>,
    /// The queue (amqp) or stream (redis) the message failed on: where a replay goes.
    pub original: Option<String>,
    /// The exchange it was first published to (amqp), for the record.
    pub original_exchange: Option<String>,
    /// The routing key it was first published with (amqp).
    pub routing_key: Option<String>,
    /// The attempt that failed last.
    pub attempts: u32,
    /// Times this message was replayed already (`bosun-replay-count`).
    pub replay_count: u32,
    pub first_failed_at: Option<DateTime<Utc>>,
    /// The dead-letter queue or stream it was read from.
    pub source: String,
    /// The dead-letter stream entry id (redis).
    pub entry_id: Option<String>,
    /// The producer's timestamp, milliseconds since the epoch, when known.
    pub timestamp_ms: Option<u64>,
}

/// The most recent `x-death` entry: what RabbitMQ says about the last dead-lettering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct XDeath {
    pub queue: Option<String>,
    pub reason: Option<String>,
    pub count: Option<u32>,
    pub exchange: Option<String>,
    pub routing_keys: Vec<String>,
    /// Seconds since the epoch.
    pub time: Option<i64>,
}

fn text(headers: &BTreeMap<String, HeaderValue>, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(HeaderValue::as_text)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn number(headers: &BTreeMap<String, HeaderValue>, name: &str) -> Option<u32> {
    match headers.get(name)? {
        HeaderValue::Int(i) => u32::try_from(*i).ok(),
        other => other.as_text()?.trim().parse().ok(),
    }
}

fn time(headers: &BTreeMap<String, HeaderValue>, name: &str) -> Option<DateTime<Utc>> {
    match headers.get(name)? {
        HeaderValue::Int(secs) => Utc.timestamp_opt(*secs, 0).single(),
        other => DateTime::parse_from_rfc3339(other.as_text()?.trim())
            .ok()
            .map(|t| t.with_timezone(&Utc)),
    }
}

/// The first (most recent) entry of an `x-death` header, if it has one.
pub fn x_death(headers: &BTreeMap<String, HeaderValue>) -> Option<XDeath> {
    let HeaderValue::Json(serde_json::Value::Array(entries)) = headers.get("x-death")? else {
        return None;
    };
    let entry = entries.first()?.as_object()?;
    let field = |k: &str| {
        entry
            .get(k)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    Some(XDeath {
        queue: field("queue"),
        reason: field("reason"),
        count: entry
            .get("count")
            .and_then(serde_json::Value::as_u64)
            .and_then(|c| u32::try_from(c).ok()),
        exchange: field("exchange"),
        routing_keys: entry
            .get("routing-keys")
            .and_then(serde_json::Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        time: entry.get("time").and_then(serde_json::Value::as_i64),
    })
}

impl DeadLetter {
    /// Reads a dead letter delivered by a consumer. Never fails: whatever is missing stays
    /// empty and the kind falls back to `unknown`.
    pub fn from_message(message: &Message) -> Self {
        let h = &message.headers;
        let death = x_death(h);
        let reason = text(h, "x-last-death-reason")
            .or_else(|| death.as_ref().and_then(|d| d.reason.clone()))
            .or_else(|| text(h, "x-first-death-reason"));
        let original = text(h, names::ORIGINAL_QUEUE)
            .or_else(|| text(h, names::ORIG_STREAM))
            .or_else(|| death.as_ref().and_then(|d| d.queue.clone()))
            .or_else(|| text(h, "x-first-death-queue"));
        let original_exchange = text(h, names::ORIGINAL_EXCHANGE)
            .or_else(|| death.as_ref().and_then(|d| d.exchange.clone()))
            .or_else(|| text(h, "x-first-death-exchange"));
        let routing_key = text(h, names::ORIGINAL_ROUTING_KEY)
            .or_else(|| death.as_ref().and_then(|d| d.routing_keys.first().cloned()));
        let error_kind = match text(h, names::ERROR_KIND) {
            Some(kind) if KINDS.contains(&kind.as_str()) => kind,
            _ => "unknown".to_owned(),
        };
        let error = text(h, names::ERROR).or_else(|| {
            reason.as_ref().map(|r| match &original {
                Some(q) => format!("dead-lettered by the broker ({r}) from queue {q}"),
                None => format!("dead-lettered by the broker ({r})"),
            })
        });
        // Redis consumers move `bosun-attempt` into `Message::attempt`; amqp ones keep the
        // header. Broker dead letters count in `x-death` instead.
        let attempts = number(h, names::ATTEMPT)
            .or_else(|| (message.attempt > 1).then_some(message.attempt))
            .or_else(|| death.as_ref().and_then(|d| d.count))
            .unwrap_or(message.attempt)
            .max(1);
        let first_failed_at = time(h, names::FIRST_FAILURE_AT)
            .or_else(|| time(h, names::FAILED_AT))
            .or_else(|| {
                death
                    .as_ref()
                    .and_then(|d| d.time)
                    .and_then(|t| Utc.timestamp_opt(t, 0).single())
            });
        Self {
            message_id: message.message_id.clone(),
            correlation_id: message.correlation_id.clone(),
            content_type: message.content_type.clone(),
            headers: h.clone(),
            body: message.body.clone(),
            error_kind,
            error,
            reason,
            original,
            original_exchange,
            routing_key,
            attempts,
            replay_count: number(h, names::REPLAY_COUNT).unwrap_or(0),
            first_failed_at,
            source: message.source.queue.clone(),
            entry_id: message.source.entry_id.clone(),
            timestamp_ms: number(h, names::TIMESTAMP_MS)
                .map(u64::from)
                .or_else(|| text(h, names::TIMESTAMP_MS).and_then(|t| t.parse().ok())),
        }
    }
}

/// Headers as archived JSON: strings, numbers and booleans as themselves, structured values
/// (`x-death`) as JSON, and bytes that are not UTF-8 as `{"$bytes": "<hex>"}`, so a replay
/// rebuilds them exactly.
pub fn headers_to_json(headers: &BTreeMap<String, HeaderValue>) -> serde_json::Value {
    use serde_json::Value;
    Value::Object(
        headers
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    HeaderValue::String(s) => Value::String(s.clone()),
                    HeaderValue::Bytes(b) => match std::str::from_utf8(b) {
                        Ok(s) => Value::String(s.to_owned()),
                        Err(_) => serde_json::json!({ "$bytes": hex::encode(b) }),
                    },
                    HeaderValue::Int(i) => Value::from(*i),
                    HeaderValue::Float(f) => Value::from(*f),
                    HeaderValue::Bool(b) => Value::Bool(*b),
                    HeaderValue::Json(j) => j.clone(),
                };
                (k.clone(), value)
            })
            .collect(),
    )
}

/// The inverse of [`headers_to_json`].
pub fn headers_from_json(value: &serde_json::Value) -> BTreeMap<String, HeaderValue> {
    use serde_json::Value;
    let Some(map) = value.as_object() else {
        return BTreeMap::new();
    };
    map.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => HeaderValue::String(s.clone()),
                Value::Bool(b) => HeaderValue::Bool(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => HeaderValue::Int(i),
                    None => HeaderValue::Float(n.as_f64().unwrap_or_default()),
                },
                Value::Object(o) if o.len() == 1 => match o.get("$bytes").and_then(Value::as_str) {
                    Some(h) => match hex::decode(h) {
                        Ok(bytes) => HeaderValue::Bytes(bytes),
                        Err(_) => HeaderValue::Json(v.clone()),
                    },
                    None => HeaderValue::Json(v.clone()),
                },
                other => HeaderValue::Json(other.clone()),
            };
            (k.clone(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Source;

    fn message(headers: &[(&str, HeaderValue)]) -> Message {
        Message {
            message_id: Some("m1".into()),
            correlation_id: None,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            content_type: None,
            body: Bytes::from_static(b"{}"),
            attempt: 1,
            redelivered: false,
            source: Source {
                queue: "orders.dlq".into(),
                ..Source::default()
            },
        }
    }

    fn s(v: &str) -> HeaderValue {
        HeaderValue::String(v.into())
    }

    #[test]
    fn bosun_headers_are_read() {
        let d = DeadLetter::from_message(&message(&[
            ("bosun-error-kind", s("exhausted")),
            ("bosun-error", s("timeout after 30 ms")),
            ("bosun-attempt", HeaderValue::Int(5)),
            ("bosun-original-queue", s("orders")),
            ("bosun-original-exchange", s("shop")),
            ("bosun-original-routing-key", s("order.created")),
            ("bosun-first-failure-at", s("2026-01-02T03:04:05Z")),
            ("bosun-replay-count", s("2")),
        ]));
        assert_eq!(d.error_kind, "exhausted");
        assert_eq!(d.error.as_deref(), Some("timeout after 30 ms"));
        assert_eq!(d.attempts, 5);
        assert_eq!(d.original.as_deref(), Some("orders"));
        assert_eq!(d.original_exchange.as_deref(), Some("shop"));
        assert_eq!(d.routing_key.as_deref(), Some("order.created"));
        assert_eq!(d.replay_count, 2);
        assert_eq!(d.reason, None);
        assert!(d.first_failed_at.is_some());
    }

    #[test]
    fn x_death_is_read_from_the_headers() {
        let death = serde_json::json!([{
            "queue": "orders", "reason": "expired", "count": 2, "exchange": "shop",
            "routing-keys": ["order.created"], "time": 1_700_000_000
        }]);
        let d = DeadLetter::from_message(&message(&[("x-death", HeaderValue::Json(death))]));
        assert_eq!(d.reason.as_deref(), Some("expired"));
        assert_eq!(d.original.as_deref(), Some("orders"));
        assert_eq!(d.routing_key.as_deref(), Some("order.created"));
        assert_eq!(d.attempts, 2);
        assert_eq!(d.error_kind, "unknown");
        assert!(d.error.as_deref().is_some_and(|e| e.contains("expired")));
    }

    #[test]
    fn redis_failure_fields_are_read() {
        let mut m = message(&[
            ("bosun-orig-stream", s("events")),
            ("bosun-error-kind", s("permanent")),
            ("bosun-error", s("bad")),
            ("bosun-failed-at", s("2026-01-02T03:04:05.123Z")),
            ("timestamp_ms", s("1700000000000")),
        ]);
        m.attempt = 3;
        let d = DeadLetter::from_message(&m);
        assert_eq!(d.original.as_deref(), Some("events"));
        assert_eq!(d.attempts, 3);
        assert_eq!(d.timestamp_ms, Some(1_700_000_000_000));
        assert!(d.first_failed_at.is_some());
    }

    #[test]
    fn a_bare_message_is_unknown() {
        let d = DeadLetter::from_message(&message(&[("bosun-error-kind", s("weird"))]));
        assert_eq!(d.error_kind, "unknown");
        assert_eq!(d.error, None);
        assert_eq!(d.original, None);
        assert_eq!(d.attempts, 1);
    }

    #[test]
    fn headers_round_trip_through_json() {
        let headers: BTreeMap<String, HeaderValue> = [
            ("a".to_owned(), s("x")),
            ("b".to_owned(), HeaderValue::Bytes(vec![0xff, 0])),
            ("c".to_owned(), HeaderValue::Int(-3)),
            ("d".to_owned(), HeaderValue::Float(1.5)),
            ("e".to_owned(), HeaderValue::Bool(true)),
            (
                "f".to_owned(),
                HeaderValue::Json(serde_json::json!([{"q": 1}])),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(headers_from_json(&headers_to_json(&headers)), headers);
    }
}
