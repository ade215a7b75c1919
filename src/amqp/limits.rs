//! What a delivery may hold before a handler sees it, and how much a consumer holds at once.
//!
//! A delivery that breaks a limit never reaches the handler: the consumer dead-letters it as
//! `invalid`, alone, with what could be kept ([`kept`]). The frame parser (the vendored
//! `amq-protocol-types`) already bounds what it decodes: header tables deeper than its
//! `MAX_NESTING_DEPTH` (64) stay undecoded, and short strings that are not UTF-8 are decoded
//! with U+FFFD. [`MAX_HEADER_DEPTH`] is below the parser's limit, so a level the parser left
//! undecoded is always caught here.
//!
//! Memory: lapin receives and buffers every delivery the broker sends ahead (`prefetch`), and
//! nothing can hand a prefetched delivery back unread. So the byte budget is enforced where
//! the broker is asked for deliveries: [`prefetch`] cuts the prefetch count to
//! `max_in_flight_bytes / max_message_size`.

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use super::headers;
use crate::config::DeliveryLimits;

/// How deep header tables may nest, and the marker for what lies deeper: defined with the
/// header conversion, which bounds its recursion by them.
pub use super::headers::{MAX_HEADER_DEPTH, REMOVED};

/// The prefetch count asked of the broker: the configured one, cut so that `prefetch` bodies
/// of `max_message_size` fit `max_in_flight_bytes` (at least 1). A budget of `u64::MAX` cuts
/// nothing.
pub fn prefetch(configured: u16, limits: &DeliveryLimits) -> u16 {
    if limits.max_in_flight_bytes == u64::MAX {
        return configured.max(1);
    }
    let by_bytes = (limits.max_in_flight_bytes / limits.max_message_size.max(1)).max(1);
    u16::try_from(by_bytes)
        .unwrap_or(u16::MAX)
        .min(configured)
        .max(1)
}

/// Why a delivery is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// `bosun-error` of the dead letter.
    pub reason: String,
}

/// The first limit a delivery breaks, if any.
pub fn check(
    properties: &BasicProperties,
    body_len: usize,
    limits: &DeliveryLimits,
) -> Option<Invalid> {
    if !limits.refuse_invalid {
        return None;
    }
    let invalid = |reason: String| Some(Invalid { reason });
    if body_len as u64 > limits.max_message_size {
        return invalid(format!(
            "body of {body_len} bytes is over max_message_size ({} bytes)",
            limits.max_message_size
        ));
    }
    if let Some(table) = properties.headers() {
        let mut found = Found::default();
        walk_table(table, 1, &mut found);
        if found.too_deep {
            return invalid(format!(
                "headers are nested deeper than {MAX_HEADER_DEPTH} levels"
            ));
        }
        if found.lossy_name {
            return invalid("a header name is not valid UTF-8".to_owned());
        }
    }
    for (name, value) in string_properties(properties) {
        if value.is_some_and(|v| v.as_str().contains(char::REPLACEMENT_CHARACTER)) {
            return invalid(format!("property `{name}` is not valid UTF-8"));
        }
    }
    None
}

/// The short-string properties, by their AMQP names. The parser decodes bytes that are not
/// UTF-8 as U+FFFD; a property holding it cannot be trusted (two different ids may decode to
/// one), so the delivery is refused.
fn string_properties(p: &BasicProperties) -> [(&'static str, Option<&ShortString>); 10] {
    [
        ("message_id", p.message_id().as_ref()),
        ("content_type", p.content_type().as_ref()),
        ("content_encoding", p.content_encoding().as_ref()),
        ("correlation_id", p.correlation_id().as_ref()),
        ("reply_to", p.reply_to().as_ref()),
        ("expiration", p.expiration().as_ref()),
        ("type", p.kind().as_ref()),
        ("user_id", p.user_id().as_ref()),
        ("app_id", p.app_id().as_ref()),
        ("cluster_id", p.cluster_id().as_ref()),
    ]
}

#[derive(Default)]
struct Found {
    too_deep: bool,
    lossy_name: bool,
}

/// Walks `table`, at nesting `level`, never deeper than one level past the limit: the walk's
/// own recursion is bounded whatever the input.
fn walk_table(table: &FieldTable, level: usize, found: &mut Found) {
    if level > MAX_HEADER_DEPTH {
        found.too_deep = true;
        return;
    }
    for (name, value) in table.inner() {
        if name.as_str().contains(char::REPLACEMENT_CHARACTER) {
            found.lossy_name = true;
        }
        walk_value(value, level + 1, found);
    }
}

fn walk_value(value: &AMQPValue, level: usize, found: &mut Found) {
    match value {
        AMQPValue::FieldTable(table) => walk_table(table, level, found),
        AMQPValue::FieldArray(_) if level > MAX_HEADER_DEPTH => found.too_deep = true,
        AMQPValue::FieldArray(items) => {
            for item in items.as_slice() {
                walk_value(item, level + 1, found);
            }
        }
        _ => {}
    }
}

/// The properties and body of an invalid delivery's dead-letter copy: every property as
/// received, the headers cut at [`MAX_HEADER_DEPTH`] (deeper values replaced by [`REMOVED`]),
/// and the body unless it is over the broker's `max_message_size`. What was cut is named in
/// `bosun-truncated` (`headers`, `body`), and an omitted body's size in `bosun-body-size`.
pub fn kept(
    properties: &BasicProperties,
    body: Bytes,
    broker_max_message_size: Option<u64>,
) -> (BasicProperties, Bytes) {
    let mut cut = Vec::new();
    let mut table = match properties.headers() {
        Some(table) => {
            let mut trimmed = false;
            let table = trim_table(table, 1, &mut trimmed);
            if trimmed {
                cut.push("headers");
            }
            table
        }
        None => FieldTable::default(),
    };
    let body = if broker_max_message_size.is_some_and(|max| body.len() as u64 > max) {
        cut.push("body");
        table.insert(
            headers::BODY_SIZE.into(),
            AMQPValue::LongLongInt(i64::try_from(body.len()).unwrap_or(i64::MAX)),
        );
        Bytes::new()
    } else {
        body
    };
    if !cut.is_empty() {
        table.insert(
            headers::TRUNCATED.into(),
            AMQPValue::LongString(LongString::from(cut.join(",").into_bytes())),
        );
    }
    (properties.clone().with_headers(table), body)
}

fn trim_table(table: &FieldTable, level: usize, trimmed: &mut bool) -> FieldTable {
    let mut out = FieldTable::default();
    for (name, value) in table.inner() {
        out.insert(name.clone(), trim_value(value, level + 1, trimmed));
    }
    out
}

fn trim_value(value: &AMQPValue, level: usize, trimmed: &mut bool) -> AMQPValue {
    match value {
        AMQPValue::FieldTable(_) | AMQPValue::FieldArray(_) if level > MAX_HEADER_DEPTH => {
            *trimmed = true;
            AMQPValue::LongString(LongString::from(REMOVED.as_bytes().to_vec()))
        }
        AMQPValue::FieldTable(table) => AMQPValue::FieldTable(trim_table(table, level, trimmed)),
        AMQPValue::FieldArray(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .as_slice()
                .iter()
                .map(|v| trim_value(v, level + 1, trimmed))
                .collect::<Vec<_>>(),
        )),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_message_size: u64, max_in_flight_bytes: u64) -> DeliveryLimits {
        DeliveryLimits {
            max_message_size,
            max_in_flight_bytes,
            refuse_invalid: true,
        }
    }

    #[test]
    fn prefetch_is_cut_to_the_byte_budget() {
        assert_eq!(prefetch(1000, &DeliveryLimits::default()), 64);
        assert_eq!(prefetch(10, &DeliveryLimits::default()), 10);
        // A message larger than the budget is still received, one at a time.
        assert_eq!(prefetch(100, &limits(128 << 20, 64 << 20)), 1);
        assert_eq!(prefetch(100, &DeliveryLimits::unchecked()), 100);
        assert_eq!(prefetch(u16::MAX, &limits(1, u64::MAX)), u16::MAX);
    }

    #[test]
    fn dead_letter_processors_refuse_nothing() {
        let properties = BasicProperties::default().with_message_id("\u{fffd}".into());
        assert!(check(&properties, 0, &DeliveryLimits::default()).is_some());
        assert_eq!(
            check(&properties, usize::MAX, &DeliveryLimits::unchecked()),
            None
        );
    }

    #[test]
    fn an_omitted_body_is_named_with_its_size() {
        let (kept, body) = kept(
            &BasicProperties::default(),
            Bytes::from(vec![0u8; 10]),
            Some(4),
        );
        assert!(body.is_empty());
        let headers = headers::from_table(kept.headers().as_ref());
        assert_eq!(
            headers.get(headers::TRUNCATED),
            Some(&crate::handler::HeaderValue::String("body".into()))
        );
        assert_eq!(
            headers.get(headers::BODY_SIZE),
            Some(&crate::handler::HeaderValue::Int(10))
        );
    }
}
