//! A message's inbox key, read from where the consumer's `key` says.

use sha2::Digest as _;

use std::collections::BTreeMap;

use crate::config::InboxKey;
use crate::handler::{HeaderValue, Message};

/// Keys longer than this are stored as `sha256:<hex>` of themselves: a record's key stays
/// small whatever a producer puts in a header or body field.
const MAX_KEY_BYTES: usize = 200;

/// Whether `key` is stored as it is: short, and free of control characters. A NUL cannot be
/// stored in a PostgreSQL `text` column (every claim of such a key would fail, and its
/// message would come back forever), and no control character can travel in the
/// `bosun-inbox-key` http header or the `BOSUN_INBOX_KEY` variable unchanged; hashed, the key
/// stays one per value and reaches the handler exactly as it is stored.
fn storable(key: &str) -> bool {
    key.len() <= MAX_KEY_BYTES && !key.chars().any(char::is_control)
}

/// The key of `message`, or why it has none.
pub fn of(source: &InboxKey, message: &Message) -> Result<String, String> {
    of_parts(
        source,
        message.message_id.as_deref(),
        &message.headers,
        &message.body,
    )
}

/// The key read from a message's parts (its id, headers and body), or why it has none: what
/// [`of`] reads, for a caller that has not built a [`Message`] yet.
pub fn of_parts(
    source: &InboxKey,
    message_id: Option<&str>,
    headers: &BTreeMap<String, HeaderValue>,
    body: &[u8],
) -> Result<String, String> {
    let key = match source {
        InboxKey::MessageId => message_id
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| "the message has no message id".to_owned())?,
        InboxKey::Header(name) => headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("header `{name}` is missing"))?
            .1
            .as_text()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("header `{name}` is empty or not text"))?,
        InboxKey::Json(pointer) => {
            let body: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
            match body.pointer(pointer) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(_) => return Err(format!("`{pointer}` is not a string or a number")),
                None => return Err(format!("the body has no `{pointer}`")),
            }
        }
        InboxKey::Sha256Body => hex::encode(sha2::Sha256::digest(body)),
    };
    Ok(if !storable(&key) {
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(key.as_bytes()))
        )
    } else {
        key
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> Message {
        Message {
            message_id: Some("m-1".into()),
            correlation_id: None,
            headers: [(
                "X-Idempotency-Key".to_owned(),
                HeaderValue::String("k-7".into()),
            )]
            .into_iter()
            .collect(),
            content_type: None,
            body: bytes::Bytes::from(body.to_owned()),
            attempt: 1,
            redelivered: false,
            source: Default::default(),
            inbox: None,
        }
    }

    #[test]
    fn keys_come_from_the_id_a_header_a_json_pointer_or_the_body_hash() {
        let m = message(r#"{"order":{"id":42,"ref":"r-9"}}"#);
        assert_eq!(of(&InboxKey::MessageId, &m).unwrap(), "m-1");
        assert_eq!(
            of(&InboxKey::Header("x-idempotency-key".into()), &m).unwrap(),
            "k-7"
        );
        assert_eq!(of(&InboxKey::Json("/order/id".into()), &m).unwrap(), "42");
        assert_eq!(of(&InboxKey::Json("/order/ref".into()), &m).unwrap(), "r-9");
        let hash = of(&InboxKey::Sha256Body, &m).unwrap();
        assert_eq!(hash.len(), 64);
        assert_ne!(hash, of(&InboxKey::Sha256Body, &message("{}")).unwrap());
    }

    #[test]
    fn a_missing_field_is_an_error_that_names_it() {
        let m = message(r#"{"order":{"id":null}}"#);
        assert!(
            of(&InboxKey::Header("x-other".into()), &m)
                .unwrap_err()
                .contains("x-other")
        );
        assert!(
            of(&InboxKey::Json("/order/id".into()), &m)
                .unwrap_err()
                .contains("not a string")
        );
        assert!(
            of(&InboxKey::Json("/missing".into()), &m)
                .unwrap_err()
                .contains("/missing")
        );
        assert!(
            of(&InboxKey::Json("/a".into()), &message("not json"))
                .unwrap_err()
                .contains("not JSON")
        );
        let mut no_id = message("{}");
        no_id.message_id = None;
        assert!(of(&InboxKey::MessageId, &no_id).is_err());
    }

    #[test]
    fn keys_with_control_characters_are_hashed() {
        for value in [
            "a\u{0}b",
            "line\nbreak",
            "tab\there",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            let m = message(&serde_json::json!({ "id": value }).to_string());
            let key = of(&InboxKey::Json("/id".into()), &m).unwrap();
            assert_eq!(
                key,
                format!(
                    "sha256:{}",
                    hex::encode(sha2::Sha256::digest(value.as_bytes()))
                )
            );
        }
        let m = message(r#"{"id":"caf\u00e9 \u2713"}"#);
        assert_eq!(of(&InboxKey::Json("/id".into()), &m).unwrap(), "café ✓");
    }

    #[test]
    fn hostile_bodies_and_headers_are_errors_that_say_why() {
        let pointer = InboxKey::Json("/id".into());
        let mut m = message("");
        for (body, why) in [
            (&b"\xff\xfe{\"id\":1}"[..], "not JSON"),
            (br#"{"id":"\ud800"}"#, "not JSON"),
            (br#"{"id":1e400}"#, "not JSON"),
        ] {
            m.body = bytes::Bytes::from(body.to_vec());
            assert!(of(&pointer, &m).unwrap_err().contains(why), "{body:?}");
        }
        m.body = bytes::Bytes::from(format!(
            r#"{{"id":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ));
        assert!(of(&pointer, &m).unwrap_err().contains("not JSON"));
        m.headers
            .insert("x-bin".into(), HeaderValue::Bytes(vec![0xff, 0xfe, 0x00]));
        assert!(
            of(&InboxKey::Header("x-bin".into()), &m)
                .unwrap_err()
                .contains("not text")
        );
    }

    #[test]
    fn long_keys_are_hashed() {
        let long = "k".repeat(500);
        let m = message(&format!(r#"{{"id":"{long}"}}"#));
        let key = of(&InboxKey::Json("/id".into()), &m).unwrap();
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64);
    }
}
