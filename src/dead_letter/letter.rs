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
/// docs/delivery-guarantees.md, defined in [`crate::failure_headers`].
pub mod names {
    pub use crate::failure_headers::{
        ATTEMPT, CONSUMER, DELIVERIES, ERROR, ERROR_KIND, FAILED_AT, FIRST_FAILURE_AT, GROUP, HOST,
        LAST_FAILURE_AT, ORIG_ID, ORIG_STREAM, ORIGINAL_EXCHANGE, ORIGINAL_QUEUE,
        ORIGINAL_ROUTING_KEY, REPLAY_COUNT,
    };
    /// The producer's timestamp (a Redis Streams field of its own).
    pub use crate::redis_streams::fields::TIMESTAMP as TIMESTAMP_MS;

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

/// Who put a dead letter where the processor reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// RabbitMQ's own dead-lettering (a queue's `x-dead-letter-exchange`): the message expired,
    /// overflowed, hit a delivery limit or was rejected in the queue it died in.
    Broker,
    /// A bosun consumer's dead-letter copy.
    Bosun,
    /// Neither says so (published straight into the dead-letter queue or stream).
    Unknown,
}

impl Writer {
    /// The value `when.source` matches on.
    pub fn as_str(self) -> &'static str {
        match self {
            Writer::Broker => "broker",
            Writer::Bosun => "bosun",
            Writer::Unknown => "unknown",
        }
    }

    /// Tells the broker's dead-lettering from bosun's copies. A message that went through a
    /// retry tier carries an `x-death` entry (`expired` from `Q.retry.<tier>`) although bosun
    /// dead-lettered it; the broker dead-lettered it only when the most recent death is in
    /// the queue bosun's headers name as its own (or bosun wrote no headers at all).
    pub fn of(headers: &BTreeMap<String, HeaderValue>, death: Option<&XDeath>) -> Self {
        let bosun_queue = text(headers, names::ORIGINAL_QUEUE);
        let died_in = death
            .and_then(|d| d.queue.clone())
            .or_else(|| text(headers, "x-last-death-queue"))
            .or_else(|| text(headers, "x-first-death-queue"));
        let broker_death = death.is_some()
            || text(headers, "x-first-death-reason").is_some()
            || text(headers, "x-last-death-reason").is_some();
        if broker_death && (bosun_queue.is_none() || (died_in.is_some() && died_in == bosun_queue))
        {
            return Writer::Broker;
        }
        let bosun = [names::ERROR_KIND, names::ERROR, names::ORIG_STREAM]
            .iter()
            .any(|name| headers.contains_key(*name));
        if bosun || bosun_queue.is_some() {
            Writer::Bosun
        } else {
            Writer::Unknown
        }
    }
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
    /// Who wrote the dead letter: the broker or bosun.
    pub writer: Writer,
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
        // A stream entry's original is the field the redis consumer writes; amqp headers
        // (and RabbitMQ's `x-death`) mean nothing there.
        let original = if message.source.entry_id.is_some() {
            text(h, names::ORIG_STREAM)
        } else {
            text(h, names::ORIGINAL_QUEUE)
                .or_else(|| death.as_ref().and_then(|d| d.queue.clone()))
                .or_else(|| text(h, "x-first-death-queue"))
        };
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
            writer: Writer::of(h, death.as_ref()),
        }
    }
}

/// JSON nesting the archive keeps as structure; a header nested deeper is stored as its
/// JSON text (`{"$json": "..."}`), so no row is too deep to store, list, show or replay.
pub const MAX_ARCHIVED_DEPTH: usize = 32;

/// Headers as archived JSON: strings, numbers and booleans as themselves, structured values
/// (`x-death`) as JSON, and bytes that are not UTF-8 as `{"$bytes": "<hex>"}`, so a replay
/// rebuilds them exactly. What `jsonb` cannot hold is stored losslessly as JSON text, marked:
/// a header whose value holds a NUL character or nests deeper than [`MAX_ARCHIVED_DEPTH`] as
/// `{"$json": "<its JSON>"}`, and a header set with a NUL in a name as
/// `{"$headers": "<the whole set's JSON>"}`.
pub fn headers_to_json(headers: &BTreeMap<String, HeaderValue>) -> serde_json::Value {
    use serde_json::Value;
    let object = Value::Object(
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
                let value = if storable(&value, MAX_ARCHIVED_DEPTH) {
                    value
                } else {
                    serde_json::json!({ "$json": value.to_string() })
                };
                (k.clone(), value)
            })
            .collect(),
    );
    if headers.keys().any(|k| k.contains('\0')) {
        return serde_json::json!({ "$headers": object.to_string() });
    }
    object
}

/// Whether `jsonb` can hold `value` as it is: no NUL character in any string or key, and no
/// deeper than `depth` levels.
fn storable(value: &serde_json::Value, depth: usize) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => !s.contains('\0'),
        Value::Array(items) => depth > 0 && items.iter().all(|v| storable(v, depth - 1)),
        Value::Object(map) => {
            depth > 0
                && map
                    .iter()
                    .all(|(k, v)| !k.contains('\0') && storable(v, depth - 1))
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
    }
}

/// The inverse of [`headers_to_json`]. Fails (for this dead letter alone) when an escaped
/// value cannot be read back, e.g. one nested deeper than the JSON reader allows.
pub fn headers_from_json(
    value: &serde_json::Value,
) -> Result<BTreeMap<String, HeaderValue>, UnreadableHeaders> {
    use serde_json::Value;
    let Some(map) = value.as_object() else {
        return Ok(BTreeMap::new());
    };
    if map.len() == 1
        && let Some(Value::String(text)) = map.get("$headers")
    {
        let inner: Value = serde_json::from_str(text)
            .map_err(|e| UnreadableHeaders(format!("archived headers cannot be read: {e}")))?;
        return headers_from_json(&inner);
    }
    map.iter()
        .map(|(k, v)| Ok((k.clone(), header_from_json(k, v)?)))
        .collect()
}

/// Why an archived dead letter's headers cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnreadableHeaders(pub String);

fn header_from_json(name: &str, v: &serde_json::Value) -> Result<HeaderValue, UnreadableHeaders> {
    use serde_json::Value;
    Ok(match v {
        Value::String(s) => HeaderValue::String(s.clone()),
        Value::Bool(b) => HeaderValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => HeaderValue::Int(i),
            None => HeaderValue::Float(n.as_f64().unwrap_or_default()),
        },
        Value::Object(o) if o.len() == 1 => {
            if let Some(h) = o.get("$bytes").and_then(Value::as_str) {
                match hex::decode(h) {
                    Ok(bytes) => HeaderValue::Bytes(bytes),
                    Err(_) => HeaderValue::Json(v.clone()),
                }
            } else if let Some(text) = o.get("$json").and_then(Value::as_str) {
                let inner: Value = serde_json::from_str(text).map_err(|e| {
                    UnreadableHeaders(format!("archived header `{name}` cannot be read: {e}"))
                })?;
                header_from_json(name, &inner)?
            } else {
                HeaderValue::Json(v.clone())
            }
        }
        other => HeaderValue::Json(other.clone()),
    })
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
            inbox: None,
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
            ("bosun-original-queue", s("set-by-a-producer")),
        ]);
        m.attempt = 3;
        m.source.entry_id = Some("1-0".into());
        let d = DeadLetter::from_message(&m);
        assert_eq!(d.original.as_deref(), Some("events"));
        assert_eq!(d.attempts, 3);
        assert_eq!(d.timestamp_ms, Some(1_700_000_000_000));
        assert!(d.first_failed_at.is_some());
    }

    #[test]
    fn retry_hops_are_told_from_the_broker_s_own_dead_lettering() {
        let death = |queue: &str, reason: &str| {
            HeaderValue::Json(serde_json::json!([{
                "queue": queue, "reason": reason, "count": 1, "exchange": "",
                "routing-keys": [queue], "time": 1_700_000_000
            }]))
        };
        // Exhausted by bosun after going through a retry tier: x-death says `expired`.
        let exhausted = DeadLetter::from_message(&message(&[
            ("bosun-error-kind", s("exhausted")),
            ("bosun-original-queue", s("orders")),
            ("x-death", death("orders.retry.1s", "expired")),
        ]));
        assert_eq!(exhausted.writer, Writer::Bosun);
        assert_eq!(exhausted.reason.as_deref(), Some("expired"));
        // Expired in the queue itself: the broker's, with or without bosun headers from an
        // earlier retry.
        let expired =
            DeadLetter::from_message(&message(&[("x-death", death("orders", "expired"))]));
        assert_eq!(expired.writer, Writer::Broker);
        let retried_then_expired = DeadLetter::from_message(&message(&[
            ("bosun-error-kind", s("transient")),
            ("bosun-original-queue", s("orders")),
            ("x-death", death("orders", "maxlen")),
        ]));
        assert_eq!(retried_then_expired.writer, Writer::Broker);
        let plain = DeadLetter::from_message(&message(&[("bosun-error-kind", s("permanent"))]));
        assert_eq!(plain.writer, Writer::Bosun);
        assert_eq!(
            DeadLetter::from_message(&message(&[])).writer,
            Writer::Unknown
        );
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
        assert_eq!(headers_from_json(&headers_to_json(&headers)), Ok(headers));
    }

    fn contains_nul(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(contains_nul),
            serde_json::Value::Object(map) => {
                map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v))
            }
            _ => false,
        }
    }

    fn depth(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn nul_characters_and_deep_nesting_are_archived_losslessly() {
        let mut deep = serde_json::json!("bottom");
        for _ in 0..100 {
            deep = serde_json::json!([deep]);
        }
        let headers: BTreeMap<String, HeaderValue> = [
            ("bosun-error".to_owned(), s("stderr: \0 tail")),
            (
                "x-death".to_owned(),
                HeaderValue::Json(serde_json::json!([{"queue": "q\0"}])),
            ),
            ("deep".to_owned(), HeaderValue::Json(deep)),
            ("plain".to_owned(), s("kept as is")),
        ]
        .into_iter()
        .collect();
        let stored = headers_to_json(&headers);
        assert!(!contains_nul(&stored), "{stored}");
        assert!(
            depth(&stored) <= MAX_ARCHIVED_DEPTH + 1,
            "{}",
            depth(&stored)
        );
        assert_eq!(stored["plain"], "kept as is");
        assert_eq!(headers_from_json(&stored), Ok(headers.clone()));

        let mut named = headers;
        named.insert("bad\0name".to_owned(), s("v"));
        let stored = headers_to_json(&named);
        assert!(!contains_nul(&stored), "{stored}");
        assert_eq!(headers_from_json(&stored), Ok(named));
    }

    #[test]
    fn an_unreadable_escaped_header_fails_alone() {
        let mut text = String::new();
        for _ in 0..500 {
            text.push('[');
        }
        for _ in 0..500 {
            text.push(']');
        }
        let stored = serde_json::json!({ "deep": { "$json": text } });
        assert!(headers_from_json(&stored).is_err_and(|e| e.0.contains("deep")));
    }
}
