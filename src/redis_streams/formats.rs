//! Entry formats besides bosun's own: flat entries (`fields`) and the shapes Dapr, Redpanda
//! Connect and Watermill write. See docs/configuration/brokers.md, "Entry formats".
//!
//! - `fields`: the body is a JSON object of every field but bosun's own (`message_id`,
//!   `bosun-*`, the id field), in entry order; a UTF-8 value is a JSON string, any other value
//!   is `{"$base64": "..."}`; a UTF-8 `correlation_id` field is the correlation id. Writing does the reverse: one field per key of a JSON object
//!   body, refusing keys that would override the message's own id, attempt count or
//!   correlation id.
//! - `dapr`: the body is the `data` field and must be JSON, read or written.
//! - `redpanda`: the body is the `body` field.
//! - `watermill`: the body is `payload`, the id `_watermill_message_uuid`, and the keys of the
//!   `metadata` field (a MessagePack map, as Watermill writes it, or a JSON object) are
//!   headers.
//!
//! Retry and dead-letter copies are made from the entry's fields, never from the decoded
//! message, so they keep what the producer wrote whatever the format.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};

use super::fields::{self, ATTEMPT, CORRELATION_ID, Entry, InvalidEntry, MESSAGE_ID};
use crate::config::{EntryFormat, EntryLayout};
use crate::handler::{HeaderValue, Message, Source};
use crate::publish::{OutgoingMessage, PublishError};

/// The key of the JSON object that stands for a value that is not UTF-8 (`fields`).
pub const BASE64_MARKER: &str = "$base64";
/// The content type of a `fields` body (and of a `dapr` one without its own).
pub const JSON: &str = "application/json";
/// Watermill's field of headers.
pub const WATERMILL_METADATA: &str = "metadata";

/// The message a handler sees for `entry` read as `format`, or why the entry cannot be one
/// (dead-lettered as `invalid`). `max_fields` bounds the headers a Watermill `metadata` field
/// may hold, as it bounds the entry's own fields.
pub fn decode(
    entry: &Entry,
    format: &EntryFormat,
    max_fields: usize,
    source: Source,
    redelivered: bool,
) -> Result<Message, InvalidEntry> {
    let body_field = format.payload_field.as_str();
    let id_field = format.id_field.as_str();
    match format.layout {
        EntryLayout::Payload | EntryLayout::Redpanda => {
            fields::decode_as(entry, body_field, id_field, source, redelivered)
        }
        EntryLayout::Fields => decode_flat(entry, id_field, source, redelivered),
        EntryLayout::Dapr => {
            let mut message = fields::decode_as(entry, body_field, id_field, source, redelivered)?;
            if let Some(e) = not_json(&message.body) {
                return Err(InvalidEntry(format!(
                    "field `{body_field}` is not JSON: {e}"
                )));
            }
            message.content_type.get_or_insert_with(|| JSON.to_owned());
            Ok(message)
        }
        EntryLayout::Watermill => {
            let mut message = fields::decode_as(entry, body_field, id_field, source, redelivered)?;
            let metadata = match message.headers.remove(WATERMILL_METADATA) {
                Some(HeaderValue::String(s)) => s.into_bytes(),
                Some(HeaderValue::Bytes(b)) => b,
                _ => Vec::new(),
            };
            for (name, value) in watermill_metadata(&metadata, max_fields)? {
                message
                    .headers
                    .entry(name)
                    .or_insert(HeaderValue::String(value));
            }
            Ok(message)
        }
    }
}

/// Why `body` is not JSON (a Dapr body must be), if it is not.
fn not_json(body: &[u8]) -> Option<serde_json::Error> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).err()
}

/// A flat entry as a message: the body is a JSON object of its fields.
fn decode_flat(
    entry: &Entry,
    id_field: &str,
    source: Source,
    redelivered: bool,
) -> Result<Message, InvalidEntry> {
    let mut body = String::from("{");
    let mut keys = HashSet::new();
    let mut id = None;
    let mut fallback_id = None;
    let mut correlation_id = None;
    let mut attempt = 1;
    let mut headers = BTreeMap::new();
    for (name, value) in &entry.fields {
        let Ok(name) = std::str::from_utf8(name) else {
            return Err(InvalidEntry("a field name is not UTF-8".into()));
        };
        if name == id_field {
            id = Some(fields::text(name, value)?);
        } else if name == MESSAGE_ID {
            fallback_id = Some(fields::text(name, value)?);
        } else if name == ATTEMPT {
            attempt = fields::attempt(value)?;
        } else if name == CORRELATION_ID
            && correlation_id.is_none()
            && let Ok(text) = std::str::from_utf8(value)
        {
            correlation_id = Some(text.to_owned());
        } else if name.starts_with("bosun-") {
            headers.insert(name.to_owned(), fields::header_value(value));
        } else {
            if !keys.insert(name) {
                return Err(InvalidEntry(format!(
                    "field `{name}` appears more than once"
                )));
            }
            if body.len() > 1 {
                body.push(',');
            }
            body.push_str(&serde_json::Value::from(name).to_string());
            body.push(':');
            match std::str::from_utf8(value) {
                Ok(text) => body.push_str(&serde_json::Value::from(text).to_string()),
                Err(_) => {
                    let mut marker = serde_json::Map::new();
                    marker.insert(BASE64_MARKER.into(), STANDARD.encode(value).into());
                    body.push_str(&serde_json::Value::Object(marker).to_string());
                }
            }
        }
    }
    body.push('}');
    Ok(Message {
        message_id: Some(id.or(fallback_id).unwrap_or_else(|| entry.id.clone())),
        correlation_id,
        headers,
        content_type: Some(JSON.to_owned()),
        body: Bytes::from(body),
        attempt,
        redelivered,
        inbox: None,
        source,
    })
}

/// Reads a JSON object's members in their order (serde_json's own map sorts them), failing
/// past `max` of them before holding more; `over` records that this was the reason.
struct MembersVisitor<'a> {
    max: usize,
    over: &'a Cell<bool>,
}

impl<'de> Visitor<'de> for MembersVisitor<'_> {
    type Value = Vec<(String, serde_json::Value)>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(member) = map.next_entry()? {
            if members.len() == self.max {
                self.over.set(true);
                return Err(A::Error::custom(format!("more than {} members", self.max)));
            }
            members.push(member);
        }
        Ok(members)
    }
}

/// The members of the JSON object `raw`, in their order; `over` is set when there are more
/// than `max` of them (and the result is an error).
fn members(
    raw: &[u8],
    max: usize,
    over: &Cell<bool>,
) -> serde_json::Result<Vec<(String, serde_json::Value)>> {
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    let members = deserializer.deserialize_map(MembersVisitor { max, over })?;
    deserializer.end()?;
    Ok(members)
}

/// The fields a JSON object body stands for, in its order: a string as its text,
/// `{"$base64": "..."}` as the bytes it encodes, anything else as its JSON text. Why not,
/// when the body is not a JSON object.
pub fn object_fields(body: &[u8]) -> Result<Vec<(String, Vec<u8>)>, InvalidEntry> {
    let members = members(body, usize::MAX, &Cell::new(false)).map_err(|e| {
        InvalidEntry(format!(
            "entry_format \"fields\" needs a JSON object body: {e}"
        ))
    })?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(members.len());
    for (name, value) in members {
        if !seen.insert(name.clone()) {
            return Err(InvalidEntry(format!(
                "key `{name}` appears more than once in the body"
            )));
        }
        let bytes = match value {
            serde_json::Value::String(s) => s.into_bytes(),
            serde_json::Value::Object(marker) if marker.len() == 1 => {
                match marker.get(BASE64_MARKER) {
                    Some(serde_json::Value::String(encoded)) => {
                        STANDARD.decode(encoded).map_err(|e| {
                            InvalidEntry(format!(
                                "key `{name}`: `{BASE64_MARKER}` is not base64: {e}"
                            ))
                        })?
                    }
                    _ => serde_json::Value::Object(marker).to_string().into_bytes(),
                }
            }
            other => other.to_string().into_bytes(),
        };
        out.push((name, bytes));
    }
    Ok(out)
}

/// Appends `message` as field/value arguments of an XADD, laid out as `format` says.
pub fn write(
    cmd: &mut redis::Cmd,
    message: &OutgoingMessage,
    format: &EntryFormat,
) -> Result<(), PublishError> {
    match format.layout {
        EntryLayout::Fields => write_flat(cmd, message, &format.id_field),
        EntryLayout::Watermill => write_watermill(cmd, message, format),
        EntryLayout::Dapr => {
            not_json(&message.body).map_or(Ok(()), |e| {
                Err(PublishError::Invalid(format!(
                    "entry_format \"dapr\" needs a JSON body: {e}"
                )))
            })?;
            fields::write_payload(cmd, message, format)
        }
        EntryLayout::Payload | EntryLayout::Redpanda => fields::write_payload(cmd, message, format),
    }
}

/// Appends `message` as flat fields: one per key of its JSON object body, then the id field
/// (unless the body has it), `correlation_id` when set, and the headers.
pub fn write_flat(
    cmd: &mut redis::Cmd,
    message: &OutgoingMessage,
    id_field: &str,
) -> Result<(), PublishError> {
    let members = object_fields(&message.body).map_err(|e| PublishError::Invalid(e.0))?;
    for (name, value) in &members {
        own_field_kept(message, id_field, name, value).map_err(|why| {
            PublishError::Invalid(format!("body key `{name}` would override {why}"))
        })?;
    }
    let has = |name: &str| members.iter().any(|(k, _)| k == name);
    if let Some(name) = message
        .headers
        .keys()
        .find(|k| has(k) || k.as_str() == id_field)
    {
        return Err(PublishError::Invalid(format!(
            "header `{name}` would overwrite the field of the same name"
        )));
    }
    for (name, value) in &members {
        cmd.arg(name).arg(value.as_slice());
    }
    if !has(id_field) {
        cmd.arg(id_field).arg(&message.message_id);
    }
    if let Some(id) = &message.correlation_id
        && !has(CORRELATION_ID)
        && !message.headers.contains_key(CORRELATION_ID)
    {
        cmd.arg(CORRELATION_ID).arg(id);
    }
    for (name, value) in &message.headers {
        cmd.arg(name).arg(fields::header_bytes(value));
    }
    Ok(())
}

/// Why a body key `name` of `value` cannot be a field of `message`'s flat entry: a reader
/// would take it for bosun's own field (the message's id, attempt count or correlation id)
/// and so see another message than the one written. A key that says the same as the message
/// is allowed.
fn own_field_kept(
    message: &OutgoingMessage,
    id_field: &str,
    name: &str,
    value: &[u8],
) -> Result<(), &'static str> {
    if name.starts_with("bosun-") {
        Err("one of bosun's own fields (`bosun-*`)")
    } else if (name == id_field || name == MESSAGE_ID) && value != message.message_id.as_bytes() {
        Err("the message's id with another")
    } else if name == CORRELATION_ID
        && message
            .correlation_id
            .as_ref()
            .is_some_and(|id| id.as_bytes() != value)
    {
        Err("the message's correlation id with another")
    } else {
        Ok(())
    }
}

/// Appends `message` the way Watermill writes one: id, `payload`, and the headers as a
/// MessagePack map of strings in `metadata`, with the correlation id and content type under
/// their field names (`correlation_id` is also Watermill's own key for it) unless a header
/// has the name already.
pub fn write_watermill(
    cmd: &mut redis::Cmd,
    message: &OutgoingMessage,
    format: &EntryFormat,
) -> Result<(), PublishError> {
    let mut entries: Vec<(&str, String)> = Vec::with_capacity(message.headers.len() + 2);
    for (name, value) in [
        (CORRELATION_ID, &message.correlation_id),
        (fields::CONTENT_TYPE, &message.content_type),
    ] {
        if let Some(value) = value
            && !message.headers.contains_key(name)
        {
            entries.push((name, value.clone()));
        }
    }
    for (name, value) in &message.headers {
        let value = String::from_utf8(fields::header_bytes(value)).map_err(|_| {
            PublishError::Invalid(format!(
                "header `{name}` is not UTF-8: Watermill metadata holds strings"
            ))
        })?;
        entries.push((name, value));
    }
    let mut metadata = Vec::new();
    if !entries.is_empty() {
        msgpack_len(&mut metadata, entries.len(), [0x80, 0xde, 0xdf]);
        for (name, value) in &entries {
            msgpack_str(&mut metadata, name);
            msgpack_str(&mut metadata, value);
        }
    }
    cmd.arg(&format.id_field).arg(&message.message_id);
    cmd.arg(&format.payload_field).arg(message.body.as_ref());
    cmd.arg(WATERMILL_METADATA).arg(metadata);
    Ok(())
}

/// A MessagePack length prefix: `heads` are the fix, 16-bit and 32-bit markers.
fn msgpack_len(out: &mut Vec<u8>, n: usize, heads: [u8; 3]) {
    let fix_max = if heads[0] == 0xa0 { 31 } else { 15 };
    if n <= fix_max {
        out.push(heads[0] | n as u8);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(heads[1]);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(heads[2]);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

fn msgpack_str(out: &mut Vec<u8>, s: &str) {
    msgpack_len(out, s.len(), [0xa0, 0xda, 0xdb]);
    out.extend_from_slice(s.as_bytes());
}

/// Watermill's `metadata` field as headers: empty, a MessagePack map of strings (what its
/// default marshaller writes) or a JSON object (string values as they are, others as JSON).
/// More than `max` headers make it invalid, found before any is held.
pub fn watermill_metadata(raw: &[u8], max: usize) -> Result<Vec<(String, String)>, InvalidEntry> {
    let invalid = || {
        InvalidEntry(format!(
            "field `{WATERMILL_METADATA}` is neither a MessagePack map of strings nor a JSON object"
        ))
    };
    let too_many = |n: &dyn std::fmt::Display| {
        InvalidEntry(format!(
            "field `{WATERMILL_METADATA}` holds {n} headers, over the limit of {max} (max_fields)"
        ))
    };
    if raw.is_empty() {
        return Ok(Vec::new());
    }
    if raw[0] == b'{' {
        let over = Cell::new(false);
        let members = members(raw, max, &over).map_err(|_| {
            if over.get() {
                too_many(&format_args!("more than {max}"))
            } else {
                invalid()
            }
        })?;
        return Ok(members
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect());
    }
    let mut reader = MsgpackReader { raw, at: 0 };
    let n = reader.map_len().ok_or_else(invalid)?;
    if n > max {
        return Err(too_many(&n));
    }
    // Each pair takes at least two bytes: a count beyond that is a lie.
    if n > raw.len() / 2 {
        return Err(invalid());
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = reader.string().ok_or_else(invalid)?;
        let value = reader.string().ok_or_else(invalid)?;
        out.push((name, value));
    }
    if reader.at != raw.len() {
        return Err(invalid());
    }
    Ok(out)
}

/// Just enough MessagePack to read a map of strings.
struct MsgpackReader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl MsgpackReader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let bytes = self.raw.get(self.at..end)?;
        self.at = end;
        Some(bytes)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn be(&mut self, width: usize) -> Option<usize> {
        let bytes = self.take(width)?;
        Some(bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
    }

    fn map_len(&mut self) -> Option<usize> {
        match self.byte()? {
            b @ 0x80..=0x8f => Some(usize::from(b & 0x0f)),
            0xde => self.be(2),
            0xdf => self.be(4),
            _ => None,
        }
    }

    /// A str, bin (when UTF-8) or nil (as "").
    fn string(&mut self) -> Option<String> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 | 0xc4 => self.be(1)?,
            0xda | 0xc5 => self.be(2)?,
            0xdb | 0xc6 => self.be(4)?,
            0xc0 => 0,
            _ => return None,
        };
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fields::tests::entry;
    use super::*;

    #[test]
    fn flat_entries_become_an_ordered_object_and_back() {
        let e = entry(&[
            ("z", b"1"),
            ("a", b"\xff\x00"),
            ("message_id", b"m1"),
            ("bosun-attempt", b"2"),
            ("bosun-error", b"boom"),
        ]);
        let m = decode(
            &e,
            &EntryFormat::of(EntryLayout::Fields),
            100,
            Source::default(),
            false,
        )
        .expect("valid");
        assert_eq!(m.body.as_ref(), br#"{"z":"1","a":{"$base64":"/wA="}}"#);
        assert_eq!(m.message_id.as_deref(), Some("m1"));
        assert_eq!(m.attempt, 2);
        assert_eq!(m.content_type.as_deref(), Some(JSON));
        assert!(m.headers.contains_key("bosun-error"));
        let back = object_fields(&m.body).expect("object");
        assert_eq!(
            back,
            vec![("z".into(), b"1".to_vec()), ("a".into(), vec![0xff, 0x00])]
        );
        assert!(object_fields(b"[1]").is_err());
        assert!(object_fields(br#"{"a":{"$base64":"!!"}}"#).is_err());
    }

    /// The arguments `cmd` was given.
    fn args(cmd: &redis::Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect()
    }

    /// The `metadata` Watermill entry `message` is written as, read back.
    fn written_metadata(message: &OutgoingMessage) -> Vec<(String, String)> {
        let mut cmd = redis::cmd("XADD");
        write_watermill(&mut cmd, message, &EntryFormat::of(EntryLayout::Watermill))
            .expect("writes");
        watermill_metadata(args(&cmd).last().expect("metadata"), usize::MAX).expect("reads")
    }

    #[test]
    fn flat_entries_read_back_the_correlation_id_they_are_written_with() {
        let mut message = OutgoingMessage::new("s", "", &br#"{"k":"v"}"#[..]);
        message.correlation_id = Some("corr-1".into());
        let format = EntryFormat::of(EntryLayout::Fields);
        let mut cmd = redis::Cmd::new();
        write(&mut cmd, &message, &format).expect("writes");
        let args = args(&cmd);
        let pairs: Vec<(&str, &[u8])> = args
            .chunks(2)
            .map(|p| (std::str::from_utf8(&p[0]).expect("name"), p[1].as_slice()))
            .collect();
        let m = decode(&entry(&pairs), &format, 100, Source::default(), false).expect("valid");
        assert_eq!(m.body.as_ref(), br#"{"k":"v"}"#);
        assert_eq!(m.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(m.message_id.as_deref(), Some(message.message_id.as_str()));
    }

    #[test]
    fn watermill_metadata_reads_what_it_writes() {
        let message = OutgoingMessage {
            headers: [
                ("k".to_owned(), HeaderValue::String("v".into())),
                ("long".to_owned(), HeaderValue::String("x".repeat(40))),
            ]
            .into(),
            ..OutgoingMessage::new("s", "", "body")
        };
        assert_eq!(
            written_metadata(&message),
            vec![("k".into(), "v".into()), ("long".into(), "x".repeat(40))]
        );
        assert_eq!(
            watermill_metadata(br#"{"a":"b","n":1}"#, 2).expect("json"),
            vec![("a".into(), "b".into()), ("n".into(), "1".into())]
        );
        assert!(watermill_metadata(&[0xdf, 0xff, 0xff, 0xff, 0xff], usize::MAX).is_err());
    }

    #[test]
    fn watermill_metadata_over_max_fields_is_invalid_before_it_is_held() {
        // A count of 2^31 - 1 empty pairs in five bytes: refused for its count, not its size.
        let why = watermill_metadata(&[0xdf, 0x7f, 0xff, 0xff, 0xff], 1_000)
            .expect_err("huge")
            .0;
        assert!(
            why.contains("2147483647 headers, over the limit of 1000 (max_fields)"),
            "{why}"
        );
        // Real maps of empty strings, at and just over the limit.
        let map = |n: usize| {
            let mut raw = Vec::new();
            msgpack_len(&mut raw, n, [0x80, 0xde, 0xdf]);
            raw.extend(std::iter::repeat_n([0xa0, 0xa0], n).flatten());
            raw
        };
        assert_eq!(watermill_metadata(&map(20), 20).map(|h| h.len()), Ok(20));
        let why = watermill_metadata(&map(21), 20).expect_err("over").0;
        assert!(why.contains("21 headers, over the limit of 20"), "{why}");
        // The JSON form has the same bound.
        let object = |n: usize| {
            let members: Vec<String> = (0..n).map(|i| format!("\"h{i}\":\"\"")).collect();
            format!("{{{}}}", members.join(","))
        };
        assert_eq!(
            watermill_metadata(object(20).as_bytes(), 20).map(|h| h.len()),
            Ok(20)
        );
        let why = watermill_metadata(object(21).as_bytes(), 20)
            .expect_err("over")
            .0;
        assert!(why.contains("over the limit of 20 (max_fields)"), "{why}");
    }

    #[test]
    fn watermill_writes_the_correlation_id_and_content_type_into_metadata() {
        let message = OutgoingMessage {
            correlation_id: Some("c-77".into()),
            content_type: Some("x".into()),
            headers: [("tenant".to_owned(), HeaderValue::String("t1".into()))].into(),
            ..OutgoingMessage::new("s", "", "body")
        };
        assert_eq!(
            written_metadata(&message),
            vec![
                ("correlation_id".into(), "c-77".into()),
                ("content_type".into(), "x".into()),
                ("tenant".into(), "t1".into()),
            ]
        );
    }
}
