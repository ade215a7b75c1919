//! The messages a dead-letter processor publishes: replay copies (back to the original queue
//! or stream) and forwarded copies (to another exchange or stream).

use std::collections::BTreeMap;

use super::DeadLetterError;
use super::archive::{Row, StoredJson};
use super::letter::{DeadLetter, Writer, headers_from_json, names, x_death};
use crate::config::BrokerConfig;
use crate::handler::HeaderValue;
use crate::publish::OutgoingMessage;

/// The broker kind a copy is built for: amqp replays go through the default exchange
/// straight to the original queue; redis replays are added to the original stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Amqp,
    Redis,
}

impl BrokerKind {
    pub fn of(broker: &BrokerConfig) -> Self {
        match broker {
            BrokerConfig::Amqp(_) => BrokerKind::Amqp,
            BrokerConfig::Redis(_) => BrokerKind::Redis,
        }
    }
}

/// Stream fields that carry the message itself; as headers they would be refused.
const STREAM_RESERVED: &[&str] = &[
    "payload",
    "message_id",
    "correlation_id",
    "content_type",
    names::TIMESTAMP_MS,
];

/// Headers RabbitMQ writes when it dead-letters or redelivers a message: the record of this
/// message's deaths, not part of it (RabbitMQ 3.13+ ignores them when a client sets them).
fn broker_owned(name: &str) -> bool {
    name == "x-death"
        || name == "x-delivery-count"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// Headers a publish may carry: every application header (`x-tenant-id` included), but not
/// the broker's dead-lettering record, and stream entries keep their reserved fields outside
/// the headers.
fn publishable(
    kind: BrokerKind,
    headers: &BTreeMap<String, HeaderValue>,
) -> BTreeMap<String, HeaderValue> {
    headers
        .iter()
        .filter(|(k, _)| match kind {
            BrokerKind::Amqp => !broker_owned(k),
            BrokerKind::Redis => !STREAM_RESERVED.contains(&k.as_str()),
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Checks that `letter` names a replay destination the processor serves. The destination
/// comes from headers anyone who can publish into the dead-letter queue or stream can set,
/// so it is only trusted when it is one of `allowed`.
pub fn check_destination(letter: &DeadLetter, allowed: &[String]) -> Result<(), DeadLetterError> {
    match &letter.original {
        None => Err(DeadLetterError::NoDestination),
        Some(original) if allowed.iter().any(|a| a == original) => Ok(()),
        Some(original) => Err(DeadLetterError::Invalid(format!(
            "replay destination `{original}` is not among the processor's originals (`replay_to`)"
        ))),
    }
}

/// A property of `letter` (`correlation_id`, `content_type`), else, on a stream, the header
/// of that name: a format that keeps properties among its headers (Watermill's metadata)
/// brings them there, and a stream copy cannot carry them as headers.
fn property(
    kind: BrokerKind,
    letter: &DeadLetter,
    own: &Option<String>,
    name: &str,
) -> Option<String> {
    own.clone().or_else(|| match kind {
        BrokerKind::Redis => letter.headers.get(name).and_then(|v| v.as_text()),
        BrokerKind::Amqp => None,
    })
}

fn message_id(letter: &DeadLetter) -> String {
    letter
        .message_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The copy that replays `letter` to its original queue or stream, which must be one of
/// `allowed`: same id, body, properties and application headers, failure headers removed
/// (a fresh round of attempts), `bosun-replay-count` raised (saturating).
pub fn replay_copy(
    kind: BrokerKind,
    letter: &DeadLetter,
    allowed: &[String],
) -> Result<OutgoingMessage, DeadLetterError> {
    check_destination(letter, allowed)?;
    let Some(original) = letter.original.clone() else {
        return Err(DeadLetterError::NoDestination);
    };
    let mut headers = publishable(kind, &letter.headers);
    headers.retain(|k, _| !names::FAILURE.contains(&k.as_str()));
    headers.insert(
        names::REPLAY_COUNT.to_owned(),
        HeaderValue::Int(i64::from(
            letter.replay_count.saturating_add(1).min(i32::MAX as u32),
        )),
    );
    let (destination, routing_key) = match kind {
        BrokerKind::Amqp => (String::new(), original),
        BrokerKind::Redis => (original, String::new()),
    };
    Ok(OutgoingMessage {
        destination,
        routing_key,
        message_id: message_id(letter),
        correlation_id: property(kind, letter, &letter.correlation_id, "correlation_id"),
        content_type: property(kind, letter, &letter.content_type, "content_type"),
        headers,
        body: letter.body.clone(),
        timestamp_ms: letter.timestamp_ms,
        // The archived message's trace ended with its dead letter; the replay is new work.
        trace: crate::publish::TraceLink::NewLinked,
    })
}

/// The copy that forwards `letter` elsewhere, failure headers included so the receiver
/// knows what happened.
pub fn forward_copy(
    kind: BrokerKind,
    letter: &DeadLetter,
    target: &str,
    routing_key: Option<&str>,
) -> OutgoingMessage {
    let routing_key = match kind {
        BrokerKind::Amqp => routing_key
            .map(str::to_owned)
            .or_else(|| letter.routing_key.clone())
            .unwrap_or_default(),
        BrokerKind::Redis => String::new(),
    };
    OutgoingMessage {
        destination: target.to_owned(),
        routing_key,
        message_id: message_id(letter),
        correlation_id: property(kind, letter, &letter.correlation_id, "correlation_id"),
        content_type: property(kind, letter, &letter.content_type, "content_type"),
        headers: publishable(kind, &letter.headers),
        body: letter.body.clone(),
        timestamp_ms: letter.timestamp_ms,
        trace: Default::default(),
    }
}

/// An archived row as the dead letter it was archived from, or why it cannot be one (for
/// this row alone).
pub fn letter_from_row(row: &Row) -> Result<DeadLetter, DeadLetterError> {
    let headers = match &row.headers {
        StoredJson::Value(value) => {
            headers_from_json(value).map_err(|e| DeadLetterError::Invalid(e.0))?
        }
        StoredJson::Undecodable(e) => return Err(DeadLetterError::Invalid(e.clone())),
    };
    let death = x_death(&headers);
    Ok(DeadLetter {
        message_id: row.text("message_id", &row.details.message_id),
        correlation_id: row.text("correlation_id", &row.details.correlation_id),
        content_type: row.text("content_type", &row.details.content_type),
        body: row.body.clone().unwrap_or_default().into(),
        error_kind: row
            .text("error_kind", &Some(row.details.failure.error_kind.clone()))
            .unwrap_or_default(),
        error: row.text("error", &row.details.failure.error),
        reason: row.text("reason", &row.details.failure.reason),
        original: row.text("original", &row.details.original),
        original_exchange: row.text("original_exchange", &row.details.original_exchange),
        routing_key: row.text("routing_key", &row.details.routing_key),
        attempts: u32::try_from(row.details.failure.attempts).unwrap_or(1),
        replay_count: u32::try_from(row.details.failure.replay_count).unwrap_or(0),
        first_failed_at: row.details.first_failed_at,
        source: row
            .text("source", &Some(row.details.source.clone()))
            .unwrap_or_default(),
        entry_id: row.text("source_entry_id", &row.details.source_entry_id),
        timestamp_ms: row.details.timestamp_ms.and_then(|t| u64::try_from(t).ok()),
        writer: Writer::of(&headers, death.as_ref()),
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn letter() -> DeadLetter {
        let headers = [
            ("bosun-attempt", HeaderValue::Int(5)),
            ("bosun-error", HeaderValue::String("boom".into())),
            ("bosun-error-kind", HeaderValue::String("exhausted".into())),
            ("bosun-original-queue", HeaderValue::String("orders".into())),
            ("bosun-replay-count", HeaderValue::Int(1)),
            ("x-death", HeaderValue::Json(serde_json::json!([]))),
            ("x-first-death-queue", HeaderValue::String("orders".into())),
            ("x-tenant-id", HeaderValue::String("t-9".into())),
            ("x-kind", HeaderValue::String("refund".into())),
            ("timestamp_ms", HeaderValue::String("17".into())),
            ("tenant", HeaderValue::String("acme".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        DeadLetter {
            message_id: Some("m-1".into()),
            correlation_id: Some("c-1".into()),
            content_type: Some("application/json".into()),
            headers,
            body: Bytes::from_static(b"{\"a\":1}"),
            error_kind: "exhausted".into(),
            error: Some("boom".into()),
            reason: None,
            original: Some("orders".into()),
            original_exchange: Some("shop".into()),
            routing_key: Some("order.created".into()),
            attempts: 5,
            replay_count: 1,
            first_failed_at: None,
            source: "orders.dlq".into(),
            entry_id: None,
            timestamp_ms: Some(17),
            writer: Writer::Bosun,
        }
    }

    fn allowed() -> Vec<String> {
        vec!["orders".to_owned()]
    }

    #[test]
    fn amqp_replay_goes_to_the_queue_with_a_fresh_round_of_attempts() {
        let copy = replay_copy(BrokerKind::Amqp, &letter(), &allowed()).expect("has an original");
        assert_eq!(copy.destination, "");
        assert_eq!(copy.routing_key, "orders");
        assert_eq!(copy.message_id, "m-1");
        assert_eq!(
            copy.headers.get("bosun-replay-count"),
            Some(&HeaderValue::Int(2))
        );
        for gone in [
            "bosun-attempt",
            "bosun-error",
            "bosun-error-kind",
            "x-death",
            "x-first-death-queue",
        ] {
            assert!(!copy.headers.contains_key(gone), "{gone} kept");
        }
        assert!(copy.headers.contains_key("tenant"));
        assert!(copy.headers.contains_key("bosun-original-queue"));
    }

    #[test]
    fn replay_keeps_every_application_header_including_x_ones() {
        let copy = replay_copy(BrokerKind::Amqp, &letter(), &allowed()).expect("allowed");
        assert_eq!(
            copy.headers.get("x-tenant-id"),
            Some(&HeaderValue::String("t-9".into()))
        );
        assert_eq!(
            copy.headers.get("x-kind"),
            Some(&HeaderValue::String("refund".into()))
        );
    }

    #[test]
    fn replay_count_saturates_instead_of_overflowing() {
        let l = DeadLetter {
            replay_count: u32::MAX,
            ..letter()
        };
        let copy = replay_copy(BrokerKind::Amqp, &l, &allowed()).expect("allowed");
        assert_eq!(
            copy.headers.get("bosun-replay-count"),
            Some(&HeaderValue::Int(i64::from(i32::MAX)))
        );
    }

    #[test]
    fn replay_to_a_destination_the_processor_does_not_serve_is_refused() {
        let l = DeadLetter {
            original: Some("payments".into()),
            ..letter()
        };
        assert!(matches!(
            replay_copy(BrokerKind::Amqp, &l, &allowed()),
            Err(DeadLetterError::Invalid(e)) if e.contains("`payments`")
        ));
    }

    #[test]
    fn redis_replay_goes_to_the_stream_without_reserved_fields() {
        let copy = replay_copy(BrokerKind::Redis, &letter(), &allowed()).expect("has an original");
        assert_eq!(copy.destination, "orders");
        assert!(!copy.headers.contains_key("timestamp_ms"));
        assert_eq!(copy.timestamp_ms, Some(17));
    }

    #[test]
    fn redis_replay_keeps_a_correlation_id_and_content_type_held_in_headers() {
        let mut l = DeadLetter {
            correlation_id: None,
            content_type: None,
            ..letter()
        };
        for (name, value) in [("correlation_id", "c-77"), ("content_type", "x")] {
            l.headers
                .insert(name.to_owned(), HeaderValue::String(value.into()));
        }
        let copy = replay_copy(BrokerKind::Redis, &l, &allowed()).expect("allowed");
        assert_eq!(copy.correlation_id.as_deref(), Some("c-77"));
        assert_eq!(copy.content_type.as_deref(), Some("x"));
        assert!(!copy.headers.contains_key("correlation_id"));
        assert_eq!(
            copy.headers.get("tenant"),
            Some(&HeaderValue::String("acme".into()))
        );
    }

    #[test]
    fn replay_without_an_original_is_refused() {
        let l = DeadLetter {
            original: None,
            ..letter()
        };
        assert!(matches!(
            replay_copy(BrokerKind::Amqp, &l, &allowed()),
            Err(DeadLetterError::NoDestination)
        ));
    }

    #[test]
    fn forward_keeps_failure_headers_and_the_routing_key() {
        let copy = forward_copy(BrokerKind::Amqp, &letter(), "parking", None);
        assert_eq!(copy.destination, "parking");
        assert_eq!(copy.routing_key, "order.created");
        assert!(copy.headers.contains_key("bosun-error"));
        assert_eq!(
            forward_copy(BrokerKind::Amqp, &letter(), "p", Some("k")).routing_key,
            "k"
        );
    }
}
