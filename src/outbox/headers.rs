//! An outbox row's `headers` column, read as JSON text and turned into message headers
//! within fixed bounds.
//!
//! The column is written by applications, so nothing about it is trusted: the text is
//! measured, its nesting depth counted without recursion, and only then parsed; the parsed
//! value is checked for how many values it holds and how long its names are. A row that
//! breaks a bound fails alone with the reason (see [`super::relay`]), and every other row of
//! its batch is published.

use std::collections::BTreeMap;

use crate::handler::HeaderValue;

/// Longest `headers` text accepted, in bytes. Every header must fit one AMQP frame
/// (128 KiB by default), next to the message's other properties.
pub const MAX_BYTES: usize = 64 * 1024;

/// Deepest nesting of objects and arrays accepted, counting the top-level object as 1.
pub const MAX_DEPTH: usize = 32;

/// Most values accepted, counting every nested value and array item.
pub const MAX_VALUES: usize = 4096;

/// Longest header or nested field name: AMQP field names are short strings.
pub const MAX_NAME_BYTES: usize = 255;

/// Why a row's `headers` cannot become a message's headers: which bound was broken, for the
/// row's `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidHeaders(pub String);

/// The headers in `text` (the column's JSON text): strings, integers, floats and booleans
/// keep their type; anything nested travels as JSON. `null` means no headers. The error
/// says which bound was broken, for the row's `last_error`.
#[cfg(test)]
pub fn parse(text: &str) -> Result<BTreeMap<String, HeaderValue>, InvalidHeaders> {
    parse_sized(text, text.len())
}

/// [`parse`] for a text that may have been cut: `full_len` is the length of the whole of it.
pub fn parse_sized(
    text: &str,
    full_len: usize,
) -> Result<BTreeMap<String, HeaderValue>, InvalidHeaders> {
    let len = full_len.max(text.len());
    if len > MAX_BYTES {
        return Err(InvalidHeaders(format!(
            "invalid row: headers take {len} bytes, over the limit of {MAX_BYTES}"
        )));
    }
    let depth = nesting_depth(text);
    if depth > MAX_DEPTH {
        return Err(InvalidHeaders(format!(
            "invalid row: headers nest {depth} levels deep, over the limit of {MAX_DEPTH}"
        )));
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| InvalidHeaders(format!("invalid row: headers are not usable JSON: {e}")))?;
    let object = match value {
        serde_json::Value::Object(object) => object,
        serde_json::Value::Null => return Ok(BTreeMap::new()),
        other => {
            return Err(InvalidHeaders(format!(
                "invalid row: headers must be a JSON object, found {}",
                json_kind(&other)
            )));
        }
    };
    let mut values = 0usize;
    check(&object, &mut values)?;
    Ok(object
        .into_iter()
        .map(|(k, v)| {
            let header = match v {
                serde_json::Value::String(s) => HeaderValue::String(s),
                serde_json::Value::Bool(b) => HeaderValue::Bool(b),
                serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => HeaderValue::Int(i),
                    (None, Some(f)) => HeaderValue::Float(f),
                    (None, None) => HeaderValue::Json(serde_json::Value::Number(n)),
                },
                other => HeaderValue::Json(other),
            };
            (k, header)
        })
        .collect())
}

/// The deepest nesting of `[` and `{` outside strings, without parsing (so without
/// recursion). Exact for valid JSON; for invalid text the parser reports the error.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Counts the values under `object` and checks their names, iteratively.
fn check(
    object: &serde_json::Map<String, serde_json::Value>,
    values: &mut usize,
) -> Result<(), InvalidHeaders> {
    let mut stack: Vec<&serde_json::Value> = Vec::new();
    visit_object(object, &mut stack)?;
    while let Some(value) = stack.pop() {
        *values += 1;
        if *values > MAX_VALUES {
            return Err(InvalidHeaders(format!(
                "invalid row: headers hold more than {MAX_VALUES} values"
            )));
        }
        match value {
            serde_json::Value::Object(inner) => visit_object(inner, &mut stack)?,
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    Ok(())
}

/// Checks the names of `object` and queues its values.
fn visit_object<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    stack: &mut Vec<&'a serde_json::Value>,
) -> Result<(), InvalidHeaders> {
    if let Some(name) = object.keys().find(|name| name.len() > MAX_NAME_BYTES) {
        return Err(InvalidHeaders(format!(
            "invalid row: a header name takes {} bytes, over the limit of {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    stack.extend(object.values());
    Ok(())
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn headers_keep_their_types() {
        let text = r#"{"s": "x", "i": 3, "f": 1.5, "b": true, "n": {"a": [1]}}"#;
        let headers = parse(text).unwrap();
        assert_eq!(headers["s"], HeaderValue::String("x".into()));
        assert_eq!(headers["i"], HeaderValue::Int(3));
        assert_eq!(headers["f"], HeaderValue::Float(1.5));
        assert_eq!(headers["b"], HeaderValue::Bool(true));
        assert_eq!(
            headers["n"],
            HeaderValue::Json(serde_json::json!({"a": [1]}))
        );
    }

    #[test]
    fn headers_that_are_not_an_object_are_invalid() {
        let error = parse("[1, 2]").unwrap_err();
        assert!(
            error.0.contains("must be a JSON object, found an array"),
            "{error}"
        );
        assert!(parse("null").unwrap().is_empty());
    }

    #[test]
    fn deep_nesting_is_refused_with_its_depth() {
        let text = format!("{{\"a\": {}1{}}}", "[".repeat(199), "]".repeat(199));
        let error = parse(&text).unwrap_err();
        assert!(error.0.contains("200 levels deep"), "{error}");
        let ok = format!("{{\"a\": {}1{}}}", "[".repeat(31), "]".repeat(31));
        assert!(parse(&ok).is_ok());
        // Brackets inside strings are not nesting.
        assert!(parse(&format!("{{\"a\": \"{}\"}}", "[".repeat(500))).is_ok());
    }

    #[test]
    fn numbers_beyond_a_double_are_refused() {
        // What PostgreSQL prints for a jsonb 1e400.
        let text = format!("{{\"n\": 1{}}}", "0".repeat(400));
        let error = parse(&text).unwrap_err();
        assert!(error.0.contains("number out of range"), "{error}");
        assert!(parse(r#"{"n": 1e400}"#).is_err());
    }

    #[test]
    fn size_count_and_name_bounds_hold() {
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(200 * 1024));
        assert!(
            parse(&big)
                .unwrap_err()
                .0
                .contains("over the limit of 65536")
        );
        let wide = format!("{{\"a\": [{}0]}}", "0,".repeat(MAX_VALUES));
        assert!(
            parse(&wide)
                .unwrap_err()
                .0
                .contains("more than 4096 values")
        );
        let long_name = format!("{{\"{}\": 1}}", "k".repeat(256));
        assert!(parse(&long_name).unwrap_err().0.contains("header name"));
        let nested_name = format!("{{\"a\": {{\"{}\": 1}}}}", "k".repeat(256));
        assert!(parse(&nested_name).unwrap_err().0.contains("header name"));
    }

    /// Random JSON-ish text: nested containers, huge numbers, NUL and lone-surrogate
    /// escapes, raw bytes that are not UTF-8 (as lossy text), long names.
    fn hostile_text() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            any::<i64>().prop_map(|i| i.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
            (1usize..500).prop_map(|n| format!("1{}", "0".repeat(n))),
            (0i32..1000).prop_map(|e| format!("1e{e}")),
            Just("\"\\u0000\"".to_owned()),
            Just("\"\\ud800\"".to_owned()),
            Just("\"\\udc00\\ud800\"".to_owned()),
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| serde_json::to_string(&String::from_utf8_lossy(&b)).unwrap()),
            "[a-z]{0,300}".prop_map(|s| format!("\"{s}\"")),
        ];
        leaf.prop_recursive(48, 4096, 12, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..12)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec(("[a-z]{0,300}", inner), 0..12).prop_map(|fields| {
                    let body: Vec<String> =
                        fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", body.join(","))
                }),
                // A deep chain built directly, past any recursion the parser could take.
                (1usize..3000).prop_map(|n| format!("{}0{}", "[".repeat(n), "]".repeat(n))),
                // A wide array, past the count bound.
                (1usize..6000).prop_map(|n| format!("[{}0]", "0,".repeat(n))),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_headers_text_is_handled_within_bounds(inner in hostile_text(), truncate in any::<bool>()) {
            let mut text = format!("{{\"h\":{inner}}}");
            if truncate {
                text = crate::text::truncate(&text, text.len() / 2).to_owned();
            }
            match parse(&text) {
                Ok(headers) => {
                    prop_assert!(text.len() <= MAX_BYTES);
                    prop_assert!(nesting_depth(&text) <= MAX_DEPTH);
                    prop_assert!(headers.len() <= MAX_VALUES);
                }
                Err(reason) => prop_assert!(reason.0.starts_with("invalid row: headers")
                    || reason.0.starts_with("invalid row: a header name")),
            }
        }
    }
}
