//! The messages a dead-letter processor publishes: replay copies (back to the original queue
//! or stream) and forwarded copies (to another exchange or stream).

use std::collections::BTreeMap;

use super::DeadLetterError;
use super::archive::Row;
use super::letter::{DeadLetter, headers_from_json, names};
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

/// Headers a publish may carry: RabbitMQ owns `x-` headers (it ignores `x-death` set by
/// clients), and stream entries keep their reserved fields outside the headers.
fn publishable(
    kind: BrokerKind,
    headers: &BTreeMap<String, HeaderValue>,
) -> BTreeMap<String, HeaderValue> {
    headers
        .iter()
        .filter(|(k, _)| match kind {
            BrokerKind::Amqp => !k.starts_with("x-"),
            BrokerKind::Redis => !STREAM_RESERVED.contains(&k.as_str()),
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn message_id(letter: &DeadLetter) -> String {
    letter
        .message_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The copy that replays `letter` to its original queue or stream: same id, body and
/// properties, failure headers removed (a fresh round of attempts), `bosun-replay-count`
/// raised.
pub fn replay_copy(
    kind: BrokerKind,
    letter: &DeadLetter,
) -> Result<OutgoingMessage, DeadLetterError> {
    let Some(original) = letter.original.clone() else {
        return Err(DeadLetterError::NoDestination);
    };
    let mut headers = publishable(kind, &letter.headers);
    headers.retain(|k, _| !names::FAILURE.contains(&k.as_str()));
    headers.insert(
        names::REPLAY_COUNT.to_owned(),
        HeaderValue::Int(i64::from(letter.replay_count) + 1),
    );
    let (destination, routing_key) = match kind {
        BrokerKind::Amqp => (String::new(), original),
        BrokerKind::Redis => (original, String::new()),
    };
    Ok(OutgoingMessage {
        destination,
        routing_key,
        message_id: message_id(letter),
        correlation_id: letter.correlation_id.clone(),
        content_type: letter.content_type.clone(),
        headers,
        body: letter.body.clone(),
        timestamp_ms: letter.timestamp_ms,
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
        correlation_id: letter.correlation_id.clone(),
        content_type: letter.content_type.clone(),
        headers: publishable(kind, &letter.headers),
        body: letter.body.clone(),
        timestamp_ms: letter.timestamp_ms,
    }
}

/// An archived row as the dead letter it was archived from.
pub fn letter_from_row(row: &Row) -> DeadLetter {
    DeadLetter {
        message_id: row.message_id.clone(),
        correlation_id: row.correlation_id.clone(),
        content_type: row.content_type.clone(),
        headers: headers_from_json(&row.headers),
        body: row.body.clone().unwrap_or_default().into(),
        error_kind: row.error_kind.clone(),
        error: row.error.clone(),
        reason: row.reason.clone(),
        original: row.original.clone(),
        original_exchange: row.original_exchange.clone(),
        routing_key: row.routing_key.clone(),
        attempts: u32::try_from(row.attempts).unwrap_or(1),
        replay_count: u32::try_from(row.replay_count).unwrap_or(0),
        first_failed_at: row.first_failed_at,
        source: row.source.clone(),
        entry_id: row.source_entry_id.clone(),
        timestamp_ms: row.timestamp_ms.and_then(|t| u64::try_from(t).ok()),
    }
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
        }
    }

    #[test]
    fn amqp_replay_goes_to_the_queue_with_a_fresh_round_of_attempts() {
        let copy = replay_copy(BrokerKind::Amqp, &letter()).expect("has an original");
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
        ] {
            assert!(!copy.headers.contains_key(gone), "{gone} kept");
        }
        assert!(copy.headers.contains_key("tenant"));
        assert!(copy.headers.contains_key("bosun-original-queue"));
    }

    #[test]
    fn redis_replay_goes_to_the_stream_without_reserved_fields() {
        let copy = replay_copy(BrokerKind::Redis, &letter()).expect("has an original");
        assert_eq!(copy.destination, "orders");
        assert!(!copy.headers.contains_key("timestamp_ms"));
        assert_eq!(copy.timestamp_ms, Some(17));
    }

    #[test]
    fn replay_without_an_original_is_refused() {
        let l = DeadLetter {
            original: None,
            ..letter()
        };
        assert!(matches!(
            replay_copy(BrokerKind::Amqp, &l),
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
