//! A publish request as the API takes it, in either form, checked before anything is sent:
//!
//! - **raw**: the body is the message; the query string names the target (`broker`,
//!   `exchange` or `stream`, `routing_key`, `message_id`, `correlation_id`, `deliver_at` or
//!   `delay`), `Content-Type` is the message's content type, and each `Header-NAME: value`
//!   request header is the message header `name`;
//! - **envelope**: no query string; the body is a JSON object with the same fields, the
//!   message body base64-encoded in `body`, and `headers` a JSON object.
//!
//! Headers named `bosun-*` are refused in both forms: they are bosun's failure information,
//! which consumers and dead-letter processors trust.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Datelike as _, Utc};
use serde::{Deserialize, Serialize};

use crate::handler::HeaderValue;

/// The prefix of a request header that carries a message header in the raw form.
pub const HEADER_PREFIX: &str = "header-";

/// Longest message id, correlation id, routing key or destination: an AMQP short string.
const MAX_NAME_BYTES: usize = 255;

/// How far in the past a `deliver_at` may be and still be taken as "due now": clocks of
/// clients and server differ a little. Further back is refused (400), since a time that
/// long gone is more likely a mistake (a wrong time zone, a stale job) than a wish.
pub const PAST_TOLERANCE: Duration = Duration::from_secs(5);

/// Why a request is refused before anything is sent.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// Malformed or contradictory (400).
    #[error("{0}")]
    Invalid(String),
    /// The body is over `max_body_size` (413).
    #[error("the message body is {size} bytes, over the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
}

/// When the message goes out.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    Now,
    /// `deliver_at`.
    At(DateTime<Utc>),
    /// `delay`, as given (so a repeated request is recognised whenever it comes).
    In(String),
}

/// A checked publish request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PublishRequest {
    pub broker: String,
    /// Exchange (amqp) or stream (redis).
    pub destination: String,
    /// Whether `destination` was given as a stream (redis) rather than an exchange.
    pub stream: bool,
    pub routing_key: String,
    /// The headers as JSON (what a scheduled row stores), checked within the outbox bounds.
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    /// `None`: a new UUID v7 is given and returned.
    pub message_id: Option<String>,
    #[serde(with = "body_digest")]
    pub body: Bytes,
    pub when: When,
}

/// A request's body is part of its fingerprint by digest only.
mod body_digest {
    use sha2::Digest as _;

    pub fn serialize<S: serde::Serializer>(body: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(sha2::Sha256::digest(body)))
    }
}

impl PublishRequest {
    /// The headers as the publishers take them.
    pub fn header_values(&self) -> Result<BTreeMap<String, HeaderValue>, RequestError> {
        checked_headers(&self.headers)
    }

    /// The digest of everything the request asks for but its message id: a repeated id with
    /// another fingerprint is a different request, refused rather than answered as the first.
    pub fn fingerprint(&self) -> Vec<u8> {
        use sha2::Digest as _;
        let mut copy = self.clone();
        copy.message_id = None;
        let text = serde_json::to_vec(&copy).unwrap_or_default();
        sha2::Sha256::digest(&text).to_vec()
    }

    /// When a scheduled send is due, `None` to send now. A delay is kept as a duration, to
    /// be added to the database's `now()` where the row is stored: the relay compares due
    /// times with the database's clock, so this host's clock plays no part.
    pub fn schedule(&self) -> Result<Option<Schedule>, RequestError> {
        match &self.when {
            When::Now => Ok(None),
            When::At(at) => Ok(Some(Schedule::At(*at))),
            When::In(text) => {
                let delay = crate::units::parse_duration(text).map_err(|e| {
                    RequestError::Invalid(format!("invalid delay {text:?}: {e} (e.g. \"15m\")"))
                })?;
                // A bound only (the database adds the delay to its own clock): a delay that
                // takes a time past what a timestamp can hold is a mistake.
                chrono::Duration::from_std(delay)
                    .ok()
                    .and_then(|d| Utc::now().checked_add_signed(d))
                    .filter(|at| at.year() < 100_000)
                    .ok_or_else(|| RequestError::Invalid(format!("delay {text:?} is too long")))?;
                Ok(Some(Schedule::In(delay)))
            }
        }
    }
}

/// When a scheduled send is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// `deliver_at`: checked against the database's clock with [`not_past`].
    At(DateTime<Utc>),
    /// `delay`: after the database's `now()`.
    In(Duration),
}

/// `at` as the due time given the database's `now`: up to [`PAST_TOLERANCE`] in the past is
/// due now; further back is refused.
pub fn not_past(at: DateTime<Utc>, now: DateTime<Utc>) -> Result<DateTime<Utc>, RequestError> {
    let tolerance = chrono::Duration::from_std(PAST_TOLERANCE).unwrap_or_default();
    if at < now - tolerance {
        return Err(RequestError::Invalid(format!(
            "deliver_at {} is in the past (database time {}); leave it out to send now",
            at.to_rfc3339(),
            now.to_rfc3339()
        )));
    }
    Ok(at.max(now))
}

/// The target and options, from the query string (raw) or the envelope.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    broker: Option<String>,
    exchange: Option<String>,
    stream: Option<String>,
    routing_key: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    deliver_at: Option<String>,
    delay: Option<String>,
}

/// The envelope's fields beside the target's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    #[serde(default)]
    headers: serde_json::Map<String, serde_json::Value>,
    content_type: Option<String>,
    /// Base64 (standard alphabet, padded).
    #[serde(default)]
    body: String,
}

/// A raw request: `query` is the query string, `body` the message.
pub fn from_raw(
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
    max_body: u64,
) -> Result<PublishRequest, RequestError> {
    let target: Target = serde_urlencoded_query(query)?;
    let mut message_headers = serde_json::Map::new();
    for (name, value) in headers {
        let Some(header) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let value = value.to_str().map_err(|_| {
            RequestError::Invalid(format!("request header `{name}` is not visible ASCII"))
        })?;
        if message_headers
            .insert(
                header.to_owned(),
                serde_json::Value::String(value.to_owned()),
            )
            .is_some()
        {
            return Err(RequestError::Invalid(format!(
                "request header `{name}` is given twice; a message header has one value"
            )));
        }
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| RequestError::Invalid("Content-Type is not visible ASCII".into()))
        })
        .transpose()?;
    build(target, message_headers, content_type, body, max_body)
}

/// An envelope request: `body` is the JSON object.
pub fn from_envelope(body: &[u8], max_body: u64) -> Result<PublishRequest, RequestError> {
    let invalid =
        |e: serde_json::Error| RequestError::Invalid(format!("invalid JSON envelope: {e}"));
    let mut fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(invalid)?;
    // The target's fields and the content's, each checked for unknown keys on its own.
    let mut content = serde_json::Map::new();
    for key in ["headers", "content_type", "body"] {
        if let Some(value) = fields.remove(key) {
            content.insert(key.to_owned(), value);
        }
    }
    let target: Target =
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(invalid)?;
    let envelope: Content =
        serde_json::from_value(serde_json::Value::Object(content)).map_err(invalid)?;
    // Checked before decoding, so an oversized body is never held twice.
    let encoded = envelope.body.len() as u64;
    if encoded / 4 * 3 > max_body.saturating_add(3) {
        return Err(RequestError::TooLarge {
            size: encoded / 4 * 3,
            max: max_body,
        });
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(envelope.body.as_bytes())
        .map_err(|e| RequestError::Invalid(format!("`body` is not base64: {e}")))?;
    build(
        target,
        envelope.headers,
        envelope.content_type,
        Bytes::from(decoded),
        max_body,
    )
}

fn serde_urlencoded_query(query: &str) -> Result<Target, RequestError> {
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let mut object = serde_json::Map::new();
    // The decoder replaces bytes that are not UTF-8 with U+FFFD: a name or id silently
    // changed. Refused instead (a client that means U+FFFD sends it encoded).
    let encoded_replacement = query.to_ascii_uppercase().contains("%EF%BF%BD");
    for (key, value) in pairs {
        if !encoded_replacement && (key.contains('\u{FFFD}') || value.contains('\u{FFFD}')) {
            return Err(RequestError::Invalid(format!(
                "query parameter `{key}` is not UTF-8 once percent-decoded"
            )));
        }
        if object
            .insert(key.clone(), serde_json::Value::String(value))
            .is_some()
        {
            return Err(RequestError::Invalid(format!(
                "query parameter `{key}` is given twice"
            )));
        }
    }
    serde_json::from_value(serde_json::Value::Object(object))
        .map_err(|e| RequestError::Invalid(format!("invalid query string: {e}")))
}

fn build(
    target: Target,
    headers: serde_json::Map<String, serde_json::Value>,
    content_type: Option<String>,
    body: Bytes,
    max_body: u64,
) -> Result<PublishRequest, RequestError> {
    if body.len() as u64 > max_body {
        return Err(RequestError::TooLarge {
            size: body.len() as u64,
            max: max_body,
        });
    }
    let broker = target
        .broker
        .ok_or_else(|| RequestError::Invalid("`broker` is required".into()))?;
    let (destination, stream) = match (target.exchange, target.stream) {
        (Some(exchange), None) => (exchange, false),
        (None, Some(stream)) if !stream.is_empty() => (stream, true),
        (None, Some(_)) => return Err(RequestError::Invalid("`stream` is empty".into())),
        _ => {
            return Err(RequestError::Invalid(
                "give one of `exchange` (amqp; \"\" is the default exchange) or `stream` (redis)"
                    .into(),
            ));
        }
    };
    let when = match (target.deliver_at, target.delay) {
        (None, None) => When::Now,
        (Some(at), None) => When::At(
            DateTime::parse_from_rfc3339(at.trim())
                .map_err(|e| {
                    RequestError::Invalid(format!(
                        "deliver_at {at:?} is not an RFC 3339 time ({e}), e.g. \"2026-11-29T18:00:00Z\""
                    ))
                })?
                .with_timezone(&Utc),
        ),
        (None, Some(delay)) => When::In(delay),
        (Some(_), Some(_)) => {
            return Err(RequestError::Invalid(
                "give `deliver_at` or `delay`, not both".into(),
            ));
        }
    };
    let routing_key = target.routing_key.unwrap_or_default();
    for (what, value) in [
        ("broker", Some(&broker)),
        ("exchange or stream", Some(&destination)),
        ("routing_key", Some(&routing_key)),
        ("message_id", target.message_id.as_ref()),
        ("correlation_id", target.correlation_id.as_ref()),
        ("content type", content_type.as_ref()),
    ] {
        if let Some(value) = value
            && value.len() > MAX_NAME_BYTES
        {
            return Err(RequestError::Invalid(format!(
                "{what} is {} bytes long; at most {MAX_NAME_BYTES}",
                value.len()
            )));
        }
    }
    if target.message_id.as_deref() == Some("") {
        return Err(RequestError::Invalid(
            "`message_id` is empty; leave it out to have one generated".into(),
        ));
    }
    checked_headers(&headers)?;
    Ok(PublishRequest {
        broker,
        destination,
        stream,
        routing_key,
        headers,
        content_type,
        correlation_id: target.correlation_id,
        message_id: target.message_id,
        body,
        when,
    })
}

/// The headers as message headers, within the bounds an outbox row's headers have (a
/// scheduled message is one), with no `bosun-*` name.
fn checked_headers(
    headers: &serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, HeaderValue>, RequestError> {
    if let Some(name) = headers
        .keys()
        .find(|name| name.to_ascii_lowercase().starts_with("bosun-"))
    {
        return Err(RequestError::Invalid(format!(
            "header `{name}`: names starting with `bosun-` are bosun's own failure information and cannot be set"
        )));
    }
    let text = serde_json::Value::Object(headers.clone()).to_string();
    crate::outbox::headers::parse_sized(&text, text.len())
        .map_err(|e| RequestError::Invalid(format!("headers: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(json: serde_json::Value) -> Result<PublishRequest, RequestError> {
        from_envelope(json.to_string().as_bytes(), 1024)
    }

    #[test]
    fn envelope_and_raw_forms_make_the_same_request() {
        let from_json = envelope(serde_json::json!({
            "broker": "rabbit", "exchange": "shop", "routing_key": "order.created",
            "headers": {"tenant": "acme"}, "content_type": "text/plain",
            "message_id": "m-1", "body": "aGVsbG8=", "delay": "15m"
        }))
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("header-tenant", "acme".parse().unwrap());
        headers.insert("content-type", "text/plain".parse().unwrap());
        headers.insert("user-agent", "curl".parse().unwrap());
        let from_query = from_raw(
            "broker=rabbit&exchange=shop&routing_key=order.created&message_id=m-1&delay=15m",
            &headers,
            Bytes::from_static(b"hello"),
            1024,
        )
        .unwrap();
        assert_eq!(from_json, from_query);
        assert_eq!(from_json.fingerprint(), from_query.fingerprint());
    }

    #[test]
    fn a_raw_query_that_is_not_utf8_or_a_repeated_header_is_refused() {
        let refused = from_raw(
            "broker=rabbit&exchange=&routing_key=a%FFb",
            &HeaderMap::new(),
            Bytes::new(),
            1024,
        );
        assert!(matches!(refused, Err(RequestError::Invalid(m)) if m.contains("UTF-8")));
        let mut headers = HeaderMap::new();
        headers.append("header-tenant", "acme".parse().unwrap());
        headers.append("header-tenant", "other".parse().unwrap());
        let refused = from_raw("broker=rabbit&exchange=", &headers, Bytes::new(), 1024);
        assert!(matches!(refused, Err(RequestError::Invalid(m)) if m.contains("twice")));
    }

    #[test]
    fn bosun_headers_are_refused_in_both_forms() {
        let refused = envelope(serde_json::json!({
            "broker": "rabbit", "exchange": "", "headers": {"Bosun-Attempt": 3}
        }));
        assert!(matches!(refused, Err(RequestError::Invalid(m)) if m.contains("bosun-")));
        let mut headers = HeaderMap::new();
        headers.insert("header-bosun-error-kind", "permanent".parse().unwrap());
        let refused = from_raw("broker=rabbit&exchange=", &headers, Bytes::new(), 1024);
        assert!(matches!(refused, Err(RequestError::Invalid(m)) if m.contains("bosun-")));
    }

    #[test]
    fn contradictions_and_oversized_bodies_are_refused() {
        for bad in [
            serde_json::json!({"exchange": ""}),
            serde_json::json!({"broker": "b"}),
            serde_json::json!({"broker": "b", "exchange": "", "stream": "s"}),
            serde_json::json!({"broker": "b", "exchange": "", "delay": "1s", "deliver_at": "2030-01-01T00:00:00Z"}),
            serde_json::json!({"broker": "b", "exchange": "", "deliver_at": "tomorrow"}),
            serde_json::json!({"broker": "b", "exchange": "", "body": "not base64!"}),
            serde_json::json!({"broker": "b", "exchange": "", "unknown": 1}),
        ] {
            assert!(
                matches!(envelope(bad.clone()), Err(RequestError::Invalid(_))),
                "{bad}"
            );
        }
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 2048]);
        assert!(matches!(
            envelope(serde_json::json!({"broker": "b", "exchange": "", "body": big})),
            Err(RequestError::TooLarge { max: 1024, .. })
        ));
    }

    #[test]
    fn a_past_time_is_refused_beyond_the_tolerance_and_due_now_within_it() {
        let now = Utc::now();
        assert!(not_past(now - chrono::Duration::seconds(60), now).is_err());
        assert_eq!(
            not_past(now - chrono::Duration::seconds(1), now).unwrap(),
            now
        );
        let later = now + chrono::Duration::seconds(60);
        assert_eq!(not_past(later, now).unwrap(), later);
    }

    #[test]
    fn a_delay_stays_a_duration_for_the_database_to_add() {
        let delayed = |text: &str| PublishRequest {
            when: When::In(text.to_owned()),
            ..envelope(serde_json::json!({"broker": "b", "exchange": ""})).unwrap()
        };
        assert_eq!(
            delayed("15m").schedule().unwrap(),
            Some(Schedule::In(Duration::from_secs(900)))
        );
        assert!(delayed("soon").schedule().is_err());
        assert!(delayed("100000000d").schedule().is_err());
    }
}
