//! Stream entry field conventions, shared by the producer and the consumer.
//!
//! An entry is a list of field/value pairs; in the default entry format (`payload`) bosun
//! reads and writes them as (the body and id fields can be renamed, `payload_field` and
//! `id_field`; the other formats are in [`formats`](super::formats)):
//! - `payload`: the message body, bytes untouched. Required: an entry without it is
//!   dead-lettered as `invalid`.
//! - `message_id`: the stable id across retries (the entry id of the first delivery when
//!   absent; retry copies carry it unless the entry has its id field, and never overwrite a
//!   producer's own `message_id` when the id field is another).
//! - `correlation_id`, `content_type`: as on the [`Message`].
//! - `bosun-attempt`: the attempt number a retry copy is for (1 when absent).
//! - every other field is a header; its value is a `String` header when it is UTF-8, else a
//!   `Bytes` header, so binary values pass through untouched.
//!
//! Dead-letter copies add the failure fields (`bosun-orig-stream`, `bosun-orig-id`,
//! `bosun-group`, `bosun-consumer`, `bosun-deliveries`, `bosun-error`, `bosun-error-kind`,
//! `bosun-failed-at`) to the original fields.
//!
//! An entry over the consumer's bounds ([`RedisEntryLimits`]) is never decoded nor copied
//! field by field: its dead-letter copy ([`oversized_fields`]) keeps `payload` and
//! `message_id` as fields and every other original field packed into one value,
//! `bosun-orig-fields`, so the copy has a fixed number of fields whatever the entry holds.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::config::{EntryFormat, RedisEntryLimits};
use crate::handler::{HeaderValue, Message, Source, UNDECODABLE};
use crate::publish::{OutgoingMessage, PublishError};

#[cfg(test)]
pub const BODY: &str = "payload";
pub const MESSAGE_ID: &str = "message_id";
pub const CORRELATION_ID: &str = "correlation_id";
pub const CONTENT_TYPE: &str = "content_type";
/// Producer's timestamp (milliseconds since the Unix epoch); a header to the consumer.
pub const TIMESTAMP: &str = "timestamp_ms";
use crate::failure_headers::error_text;
/// The failure names this broker writes, defined once for both brokers.
pub use crate::failure_headers::{
    ATTEMPT, CONSUMER, DELIVERIES, ERROR, ERROR_KIND, FAILED_AT, GROUP, ORIG_ID, ORIG_STREAM,
};

/// The original fields of an oversized entry, packed as netstrings (`<len>:<bytes>,`),
/// name then value, in their order.
pub const ORIG_FIELDS: &str = "bosun-orig-fields";

/// Fields a header may not be named after, besides the body and id fields: they carry the
/// message itself.
const RESERVED: &[&str] = &[CORRELATION_ID, CONTENT_TYPE, TIMESTAMP];

/// One entry as read from a stream, fields in their order.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(Bytes, Bytes)>,
}

impl Entry {
    pub fn field(&self, name: &str) -> Option<&Bytes> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_ref() == name.as_bytes())
            .map(|(_, v)| v)
    }
}

/// A header value as stream field bytes.
pub(super) fn header_bytes(value: &HeaderValue) -> Vec<u8> {
    match value {
        HeaderValue::String(s) => s.as_bytes().to_vec(),
        HeaderValue::Bytes(b) => b.clone(),
        HeaderValue::Int(i) => i.to_string().into_bytes(),
        HeaderValue::Float(f) => f.to_string().into_bytes(),
        HeaderValue::Bool(b) => b.to_string().into_bytes(),
        HeaderValue::Json(v) => v.to_string().into_bytes(),
    }
}

/// Appends `message` as field/value arguments of an XADD with its body in one field
/// (`format.payload_field`): bosun's own layout, which `dapr` and `redpanda` share
/// ([`super::formats::write`] picks the writer for each layout).
pub fn write_payload(
    cmd: &mut redis::Cmd,
    message: &OutgoingMessage,
    format: &EntryFormat,
) -> Result<(), PublishError> {
    if let Some(name) = message.headers.keys().find(|k| {
        RESERVED.contains(&k.as_str()) || **k == format.payload_field || **k == format.id_field
    }) {
        return Err(PublishError::Rejected(format!(
            "header `{name}` would overwrite the stream field of the same name"
        )));
    }
    cmd.arg(&format.payload_field).arg(message.body.as_ref());
    cmd.arg(&format.id_field).arg(&message.message_id);
    if let Some(id) = &message.correlation_id {
        cmd.arg(CORRELATION_ID).arg(id);
    }
    if let Some(ct) = &message.content_type {
        cmd.arg(CONTENT_TYPE).arg(ct);
    }
    cmd.arg(TIMESTAMP)
        .arg(message.timestamp_ms.unwrap_or_else(super::now_ms));
    for (name, value) in &message.headers {
        cmd.arg(name).arg(header_bytes(value));
    }
    Ok(())
}

pub(super) fn text(name: &str, value: &Bytes) -> Result<String, InvalidEntry> {
    String::from_utf8(value.to_vec())
        .map_err(|_| InvalidEntry(format!("field `{name}` is not UTF-8")))
}

/// Why an entry cannot become a message: it is dead-lettered as `invalid` with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidEntry(pub String);

/// A field value as a header: a `String` when it is UTF-8, else `Bytes`.
pub(super) fn header_value(value: &Bytes) -> HeaderValue {
    match std::str::from_utf8(value) {
        Ok(s) => HeaderValue::String(s.to_owned()),
        Err(_) => HeaderValue::Bytes(value.to_vec()),
    }
}

/// The attempt number in a `bosun-attempt` field.
pub(super) fn attempt(value: &Bytes) -> Result<u32, InvalidEntry> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| InvalidEntry(format!("field `{ATTEMPT}` is not a positive integer")))
}

/// `entry` as it is, for a handler that takes undecodable input: the first body field
/// (`format.payload_field`, if any) as the body, the first UTF-8 id field (`format.id_field`,
/// else `message_id`) as the id, every other field as a header (a repeated or lossily
/// decoded name gets a `#N` suffix, so no field is lost), and `reason` in [`UNDECODABLE`].
pub fn undecodable(entry: &Entry, format: &EntryFormat, source: Source, reason: &str) -> Message {
    let utf8 = |name: &str| {
        entry
            .field(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    };
    let (id_name, message_id) = match utf8(&format.id_field) {
        Some(id) => (format.id_field.as_str(), Some(id)),
        None => (MESSAGE_ID, utf8(MESSAGE_ID)),
    };
    let mut body = None;
    let mut id_taken = message_id.is_none();
    let mut headers = BTreeMap::new();
    for (name, value) in &entry.fields {
        if body.is_none() && name.as_ref() == format.payload_field.as_bytes() {
            body = Some(value.clone());
            continue;
        }
        if !id_taken && name.as_ref() == id_name.as_bytes() {
            id_taken = true;
            continue;
        }
        let base = String::from_utf8_lossy(name).into_owned();
        let mut key = base.clone();
        let mut n = 2;
        while headers.contains_key(&key) {
            key = format!("{base}#{n}");
            n += 1;
        }
        headers.insert(key, header_value(value));
    }
    headers.insert(
        UNDECODABLE.to_owned(),
        HeaderValue::String(reason.to_owned()),
    );
    Message {
        message_id,
        correlation_id: utf8(CORRELATION_ID),
        headers,
        content_type: utf8(CONTENT_TYPE),
        body: body.unwrap_or_default(),
        attempt: 1,
        redelivered: false,
        inbox: None,
        source,
    }
}

/// The message a handler sees for `entry`, or why the entry cannot be one (dead-lettered
/// as `invalid`).
#[cfg(test)]
pub fn decode(entry: &Entry, source: Source, redelivered: bool) -> Result<Message, InvalidEntry> {
    decode_as(entry, BODY, MESSAGE_ID, source, redelivered)
}

/// [`decode`] with the body in `body_field` and the stable id in `id_field` (else in
/// `message_id`, else the entry id).
pub fn decode_as(
    entry: &Entry,
    body_field: &str,
    id_field: &str,
    source: Source,
    redelivered: bool,
) -> Result<Message, InvalidEntry> {
    let mut body = None;
    let mut id = None;
    let mut message_id = None;
    let mut correlation_id = None;
    let mut content_type = None;
    let mut attempt = 1;
    let mut headers = BTreeMap::new();
    for (name, value) in &entry.fields {
        let Ok(name) = std::str::from_utf8(name) else {
            return Err(InvalidEntry("a field name is not UTF-8".into()));
        };
        match name {
            _ if name == body_field => {
                if body.replace(value.clone()).is_some() {
                    return Err(InvalidEntry(format!(
                        "entry has more than one `{body_field}` field"
                    )));
                }
            }
            _ if name == id_field => id = Some(text(name, value)?),
            MESSAGE_ID => message_id = Some(text(name, value)?),
            CORRELATION_ID => correlation_id = Some(text(name, value)?),
            CONTENT_TYPE => content_type = Some(text(name, value)?),
            ATTEMPT => attempt = self::attempt(value)?,
            _ => {
                headers.insert(name.to_owned(), header_value(value));
            }
        }
    }
    let Some(body) = body else {
        return Err(InvalidEntry(format!(
            "entry has no `{body_field}` field (the body)"
        )));
    };
    Ok(Message {
        message_id: Some(id.or(message_id).unwrap_or_else(|| entry.id.clone())),
        correlation_id,
        headers,
        content_type,
        body,
        attempt,
        inbox: None,
        redelivered,
        source,
    })
}

/// The stable id of an entry: its `id_field` field, else its `message_id` field (which
/// retry copies carry), else its entry id.
pub fn stable_id(entry: &Entry, id_field: &str) -> Bytes {
    entry
        .field(id_field)
        .or_else(|| entry.field(MESSAGE_ID))
        .cloned()
        .unwrap_or_else(|| Bytes::copy_from_slice(entry.id.as_bytes()))
}

/// How many failure fields there are: the margin [`over_limits`] allows for them.
const FAILURE_FIELDS: usize = 10;

fn is_failure_field(name: &[u8]) -> bool {
    [
        ORIG_STREAM,
        ORIG_ID,
        GROUP,
        CONSUMER,
        DELIVERIES,
        ERROR,
        ERROR_KIND,
        FAILED_AT,
        ATTEMPT,
        MESSAGE_ID,
    ]
    .iter()
    .any(|f| f.as_bytes() == name)
}

/// The fields of `entry` a copy keeps as they are, in their order: every field but the
/// failure fields bosun replaces. `message_id` is bosun's own only when it is the id field;
/// with the id elsewhere, a `message_id` is the producer's and stays where it was.
fn own_fields(entry: &Entry, id_field: &str) -> Vec<(Bytes, Bytes)> {
    entry
        .fields
        .iter()
        .filter(|(k, _)| {
            !is_failure_field(k) || (k.as_ref() == MESSAGE_ID.as_bytes() && id_field != MESSAGE_ID)
        })
        .cloned()
        .collect()
}

/// The stable id a copy of `entry` must add as `message_id`, or `None` when `kept` (the
/// fields the copy keeps) already carries it: in the id field, or in a producer's own
/// `message_id`, which is never overwritten.
fn missing_id(kept: &[(Bytes, Bytes)], entry: &Entry, id_field: &str) -> Option<Bytes> {
    let carried = kept
        .iter()
        .any(|(k, _)| k.as_ref() == id_field.as_bytes() || k.as_ref() == MESSAGE_ID.as_bytes());
    (!carried).then(|| stable_id(entry, id_field))
}

/// The fields of the copy that a retry re-adds: the original's, with the stable id, the next
/// attempt number and the last error.
pub fn retry_fields(
    entry: &Entry,
    id_field: &str,
    next_attempt: u32,
    error: &str,
) -> Vec<(Bytes, Bytes)> {
    let mut fields = own_fields(entry, id_field);
    if let Some(id) = missing_id(&fields, entry, id_field) {
        fields.push((Bytes::from_static(MESSAGE_ID.as_bytes()), id));
    }
    fields.push((
        Bytes::from_static(ATTEMPT.as_bytes()),
        Bytes::from(next_attempt.to_string()),
    ));
    fields.push((
        Bytes::from_static(ERROR.as_bytes()),
        Bytes::copy_from_slice(error_text(error).as_bytes()),
    ));
    fields
}

/// What a dead-letter copy records about the failure.
pub struct Failure<'a> {
    pub stream: &'a str,
    pub group: &'a str,
    pub consumer: &'a str,
    pub deliveries: u64,
    pub attempt: u32,
    pub error: &'a str,
    pub kind: crate::handler::FailureKind,
    /// How the entry is read: where its body and stable id are.
    pub format: &'a EntryFormat,
}

/// Why `entry` is over `limits` (too many fields, too many bytes), if it is. The failure
/// fields bosun itself adds to a retry copy do not count, within a margin: copies replace
/// them, so they never pile up.
pub fn over_limits(entry: &Entry, limits: &RedisEntryLimits) -> Option<String> {
    let own = entry
        .fields
        .iter()
        .filter(|(k, _)| !is_failure_field(k))
        .count();
    if own > limits.max_fields || entry.fields.len() > limits.max_fields + FAILURE_FIELDS {
        return Some(format!(
            "entry has {} fields, over the limit of {} (max_fields)",
            entry.fields.len(),
            limits.max_fields
        ));
    }
    let size: u64 = entry
        .fields
        .iter()
        .map(|(k, v)| (k.len() + v.len()) as u64)
        .sum();
    (size > limits.max_bytes).then(|| {
        format!(
            "entry has {size} bytes, over the limit of {} (max_entry_size)",
            limits.max_bytes
        )
    })
}

/// The fields of a dead-letter copy: the original's plus the failure fields.
pub fn dead_letter_fields(entry: &Entry, failure: &Failure<'_>) -> Vec<(Bytes, Bytes)> {
    with_failure(own_fields(entry, &failure.format.id_field), entry, failure)
}

/// The dead-letter copy of an entry over its bounds: a fixed number of fields whatever the
/// entry holds (the first body field, the stable `message_id` when it is short, every other
/// original field packed into [`ORIG_FIELDS`], and the failure fields), so the copy always
/// fits one script call and nothing of the original is lost.
pub fn oversized_fields(entry: &Entry, failure: &Failure<'_>) -> Vec<(Bytes, Bytes)> {
    let body_at = entry
        .fields
        .iter()
        .position(|(k, _)| k.as_ref() == failure.format.payload_field.as_bytes());
    let mut packed = Vec::new();
    for (i, (k, v)) in entry.fields.iter().enumerate() {
        if Some(i) == body_at {
            continue;
        }
        for part in [k, v] {
            packed.extend_from_slice(part.len().to_string().as_bytes());
            packed.push(b':');
            packed.extend_from_slice(part);
            packed.push(b',');
        }
    }
    let mut fields = Vec::with_capacity(2);
    if let Some((k, v)) = body_at.and_then(|i| entry.fields.get(i)) {
        fields.push((k.clone(), v.clone()));
    }
    fields.push((
        Bytes::from_static(ORIG_FIELDS.as_bytes()),
        Bytes::from(packed),
    ));
    let mut copy = with_failure(fields, entry, failure);
    // A stable id longer than this is not an id anyone can use: the entry id stands in.
    if let Some((_, id)) = copy
        .iter_mut()
        .find(|(k, _)| k.as_ref() == MESSAGE_ID.as_bytes())
        && id.len() > 1024
    {
        *id = Bytes::copy_from_slice(entry.id.as_bytes());
    }
    copy
}

/// `fields` followed by the failure fields of `failure`.
fn with_failure(
    mut fields: Vec<(Bytes, Bytes)>,
    entry: &Entry,
    failure: &Failure<'_>,
) -> Vec<(Bytes, Bytes)> {
    let id = missing_id(&fields, entry, &failure.format.id_field);
    let mut push = |name: &'static str, value: Bytes| {
        fields.push((Bytes::from_static(name.as_bytes()), value))
    };
    if let Some(id) = id {
        push(MESSAGE_ID, id);
    }
    push(ATTEMPT, Bytes::from(failure.attempt.to_string()));
    push(
        ORIG_STREAM,
        Bytes::copy_from_slice(failure.stream.as_bytes()),
    );
    push(ORIG_ID, Bytes::copy_from_slice(entry.id.as_bytes()));
    push(GROUP, Bytes::copy_from_slice(failure.group.as_bytes()));
    push(
        CONSUMER,
        Bytes::copy_from_slice(failure.consumer.as_bytes()),
    );
    push(DELIVERIES, Bytes::from(failure.deliveries.to_string()));
    push(
        ERROR,
        Bytes::copy_from_slice(error_text(failure.error).as_bytes()),
    );
    push(
        ERROR_KIND,
        Bytes::from_static(failure.kind.as_str().as_bytes()),
    );
    push(
        FAILED_AT,
        Bytes::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    fields
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::redis_streams) fn entry(fields: &[(&str, &[u8])]) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        Bytes::copy_from_slice(k.as_bytes()),
                        Bytes::copy_from_slice(v),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn decode_maps_body_id_and_headers() {
        let m = decode(
            &entry(&[
                ("payload", b"\xff\x00body"),
                ("message_id", b"m1"),
                ("bosun-attempt", b"3"),
                ("k", b"v"),
                ("bin", b"\xfe"),
            ]),
            Source::default(),
            false,
        )
        .expect("valid entry");
        assert_eq!(m.body.as_ref(), b"\xff\x00body");
        assert_eq!(m.message_id.as_deref(), Some("m1"));
        assert_eq!(m.attempt, 3);
        assert_eq!(m.headers.get("k"), Some(&HeaderValue::String("v".into())));
        assert_eq!(m.headers.get("bin"), Some(&HeaderValue::Bytes(vec![0xfe])));
        assert!(!m.headers.contains_key("bosun-attempt"));
    }

    #[test]
    fn decode_rejects_missing_body_and_bad_attempt() {
        assert!(
            decode(&entry(&[("k", b"v")]), Source::default(), false)
                .is_err_and(|e| e.0.contains("payload"))
        );
        assert!(
            decode(
                &entry(&[("payload", b"x"), ("bosun-attempt", b"zero")]),
                Source::default(),
                false
            )
            .is_err()
        );
        let m = decode(&entry(&[("payload", b"x")]), Source::default(), false).expect("valid");
        assert_eq!(
            m.message_id.as_deref(),
            Some("1-0"),
            "entry id stands in for a missing message_id"
        );
    }

    #[test]
    fn retry_copy_keeps_id_and_counts_attempts() {
        let e = entry(&[
            ("payload", b"x"),
            ("bosun-attempt", b"2"),
            ("bosun-error", b"old"),
        ]);
        let copy = Entry {
            id: "2-0".into(),
            fields: retry_fields(&e, MESSAGE_ID, 3, "new"),
        };
        assert_eq!(
            copy.field("message_id").map(|b| b.as_ref()),
            Some(&b"1-0"[..])
        );
        assert_eq!(
            copy.field("bosun-attempt").map(|b| b.as_ref()),
            Some(&b"3"[..])
        );
        assert_eq!(
            copy.fields
                .iter()
                .filter(|(k, _)| k.as_ref() == b"bosun-error")
                .count(),
            1
        );
    }

    #[test]
    fn copies_keep_a_producers_message_id_when_the_id_field_is_another() {
        let e = entry(&[
            ("order_id", b"O-1"),
            ("message_id", b"M-producer"),
            ("amount", b"5"),
        ]);
        let format = EntryFormat {
            id_field: "order_id".into(),
            ..EntryFormat::default()
        };
        let failure = Failure {
            stream: "s",
            group: "g",
            consumer: "c",
            deliveries: 2,
            attempt: 2,
            error: "boom",
            kind: crate::handler::FailureKind::Exhausted,
            format: &format,
        };
        let retry = retry_fields(&e, "order_id", 2, "boom");
        let again = retry_fields(
            &Entry {
                id: "2-0".into(),
                fields: retry.clone(),
            },
            "order_id",
            3,
            "boom",
        );
        for copy in [retry, again, dead_letter_fields(&e, &failure)] {
            assert_eq!(copy[..3], e.fields[..], "{copy:?}");
            assert!(
                copy[3..].iter().all(|(k, _)| k.starts_with(b"bosun-")),
                "{copy:?}"
            );
        }
        // Without the id field or a `message_id`, the copy records the entry id.
        let bare = retry_fields(&entry(&[("amount", b"5")]), "order_id", 2, "boom");
        assert_eq!(
            bare[1],
            (
                Bytes::from_static(b"message_id"),
                Bytes::from_static(b"1-0")
            )
        );
    }

    #[test]
    fn undecodable_entries_keep_the_body_and_id_of_their_format() {
        let e = entry(&[
            ("order_id", b"O-1"),
            ("data", b"not json"),
            ("tenant", b"t1"),
        ]);
        let format = EntryFormat {
            id_field: "order_id".into(),
            ..EntryFormat::of(crate::config::EntryLayout::Dapr)
        };
        let m = undecodable(&e, &format, Source::default(), "field `data` is not JSON");
        assert_eq!(m.body.as_ref(), b"not json");
        assert_eq!(m.message_id.as_deref(), Some("O-1"));
        assert!(!m.headers.contains_key("data"), "{:?}", m.headers);
        assert!(!m.headers.contains_key("order_id"), "{:?}", m.headers);
        assert_eq!(
            m.headers.get("tenant"),
            Some(&HeaderValue::String("t1".into()))
        );
        assert!(m.headers.contains_key(UNDECODABLE));
    }

    #[test]
    fn oversized_entries_are_copied_in_a_fixed_number_of_fields() {
        let mut e = entry(&[("payload", b"body"), ("message_id", b"m1")]);
        for i in 0..5000 {
            e.fields
                .push((Bytes::from(format!("f{i}")), Bytes::from_static(b"v")));
        }
        let limits = RedisEntryLimits::default();
        let why = over_limits(&e, &limits).expect("over the field bound");
        assert!(why.contains("5002 fields"), "{why}");
        let failure = Failure {
            stream: "s",
            group: "g",
            consumer: "c",
            deliveries: 1,
            attempt: 1,
            error: &why,
            kind: crate::handler::FailureKind::Invalid,
            format: &EntryFormat::default(),
        };
        let copy = Entry {
            id: "9-0".into(),
            fields: oversized_fields(&e, &failure),
        };
        assert!(copy.fields.len() <= 14, "{} fields", copy.fields.len());
        assert_eq!(
            copy.field("payload").map(|b| b.as_ref()),
            Some(&b"body"[..])
        );
        assert_eq!(
            copy.field("message_id").map(|b| b.as_ref()),
            Some(&b"m1"[..])
        );
        let packed = copy.field(ORIG_FIELDS).expect("packed fields");
        assert!(packed.starts_with(b"10:message_id,2:m1,2:f0,1:v,"));
        assert_eq!(
            copy.field("bosun-error-kind").map(|b| b.as_ref()),
            Some(&b"invalid"[..])
        );
        let big = entry(&[("payload", &vec![b'x'; 100][..])]);
        let small = RedisEntryLimits {
            max_fields: 10,
            max_bytes: 50,
        };
        assert!(over_limits(&big, &small).is_some_and(|w| w.contains("107 bytes")));
        assert!(over_limits(&big, &limits).is_none());
    }
}
