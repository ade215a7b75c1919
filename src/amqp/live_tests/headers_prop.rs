//! AMQP header tables from outside, at random: deep, wide, with names that are not UTF-8 and
//! every field type. Each is encoded as it would arrive in a content header frame, parsed by
//! the frame parser lapin uses (the vendored `amq-protocol-types`), then read the way the amqp
//! consumer reads it (`limits::check`, `headers::from_table`, `limits::kept`). Nothing may
//! panic or overflow the stack, and what comes out is bounded.

use bosun::amqp::{headers, limits};
use bosun::config::DeliveryLimits;
use bosun::handler::HeaderValue;
use lapin::BasicProperties;
use lapin::types::parsing::{MAX_NESTING_DEPTH, parse_field_table};
use lapin::types::{AMQPValue, FieldTable};
use proptest::prelude::*;

/// A field value as bytes on the wire may hold it: names are raw bytes, not strings.
#[derive(Debug, Clone)]
enum Raw {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal(u8, u32),
    LongString(Vec<u8>),
    Timestamp(u64),
    Bytes(Vec<u8>),
    Void,
    Array(Vec<Raw>),
    Table(Vec<(Vec<u8>, Raw)>),
}

fn encode_value(value: &Raw, out: &mut Vec<u8>) {
    match value {
        Raw::Bool(b) => out.extend([b't', u8::from(*b)]),
        Raw::I8(i) => out.extend([b'b', *i as u8]),
        Raw::U8(i) => out.extend([b'B', *i]),
        Raw::I16(i) => tagged(out, b's', i.to_be_bytes()),
        Raw::U16(i) => tagged(out, b'u', i.to_be_bytes()),
        Raw::I32(i) => tagged(out, b'I', i.to_be_bytes()),
        Raw::U32(i) => tagged(out, b'i', i.to_be_bytes()),
        Raw::I64(i) => tagged(out, b'l', i.to_be_bytes()),
        Raw::F32(f) => tagged(out, b'f', f.to_be_bytes()),
        Raw::F64(f) => tagged(out, b'd', f.to_be_bytes()),
        Raw::Decimal(scale, value) => {
            out.extend([b'D', *scale]);
            out.extend(value.to_be_bytes());
        }
        Raw::LongString(s) => tagged_long(out, b'S', s),
        Raw::Timestamp(t) => tagged(out, b'T', t.to_be_bytes()),
        Raw::Bytes(b) => tagged_long(out, b'x', b),
        Raw::Void => out.push(b'V'),
        Raw::Array(items) => {
            let mut inner = Vec::new();
            for item in items {
                encode_value(item, &mut inner);
            }
            tagged_long(out, b'A', &inner);
        }
        Raw::Table(entries) => {
            out.push(b'F');
            out.extend(encode_table(entries));
        }
    }
}

/// Most values are a type tag, then the value in big-endian bytes of a fixed width.
fn tagged<const N: usize>(out: &mut Vec<u8>, tag: u8, bytes: [u8; N]) {
    out.push(tag);
    out.extend(bytes);
}

/// Long strings, byte arrays and arrays are a type tag, a 32-bit length, then the bytes.
fn tagged_long(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend((bytes.len() as u32).to_be_bytes());
    out.extend(bytes);
}

/// A field table as it appears in a frame: its byte length, then name/value pairs.
fn encode_table(entries: &[(Vec<u8>, Raw)]) -> Vec<u8> {
    let mut inner = Vec::new();
    for (name, value) in entries {
        inner.push(name.len() as u8);
        inner.extend(name);
        encode_value(value, &mut inner);
    }
    let mut out = (inner.len() as u32).to_be_bytes().to_vec();
    out.extend(inner);
    out
}

/// Levels of tables and arrays, the header table itself being level 1.
fn raw_depth(entries: &[(Vec<u8>, Raw)]) -> usize {
    fn value(v: &Raw) -> usize {
        match v {
            Raw::Array(items) => 1 + items.iter().map(value).max().unwrap_or(0),
            Raw::Table(entries) => raw_depth(entries),
            _ => 0,
        }
    }
    1 + entries.iter().map(|(_, v)| value(v)).max().unwrap_or(0)
}

fn raw_names_are_utf8(entries: &[(Vec<u8>, Raw)]) -> bool {
    fn value(v: &Raw) -> bool {
        match v {
            Raw::Array(items) => items.iter().all(value),
            Raw::Table(entries) => raw_names_are_utf8(entries),
            _ => true,
        }
    }
    entries.iter().all(|(name, v)| {
        std::str::from_utf8(name).is_ok_and(|s| !s.contains(char::REPLACEMENT_CHARACTER))
            && value(v)
    })
}

/// Levels of tables and arrays in a parsed table (bounded: it came from the parser).
fn depth(table: &FieldTable) -> usize {
    fn value(v: &AMQPValue) -> usize {
        match v {
            AMQPValue::FieldArray(items) => {
                1 + items.as_slice().iter().map(value).max().unwrap_or(0)
            }
            AMQPValue::FieldTable(t) => depth(t),
            _ => 0,
        }
    }
    1 + table.inner().values().map(value).max().unwrap_or(0)
}

fn json_depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(items) => 1 + items.iter().map(json_depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The name the parser gives `name`: lossy UTF-8 cut to 255 bytes.
fn parsed_name(name: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(name).into_owned();
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

/// Keeps the last entry of each parsed name, as a parsed table does.
fn dedup(entries: Vec<(Vec<u8>, Raw)>) -> Vec<(Vec<u8>, Raw)> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out: Vec<_> = entries
        .into_iter()
        .rev()
        .filter(|(name, _)| seen.insert(parsed_name(name)))
        .collect();
    out.reverse();
    out
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z-]{1,12}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..=255),
    ]
}

fn leaf() -> impl Strategy<Value = Raw> {
    prop_oneof![
        any::<bool>().prop_map(Raw::Bool),
        any::<i8>().prop_map(Raw::I8),
        any::<u8>().prop_map(Raw::U8),
        any::<i16>().prop_map(Raw::I16),
        any::<u16>().prop_map(Raw::U16),
        any::<i32>().prop_map(Raw::I32),
        any::<u32>().prop_map(Raw::U32),
        any::<i64>().prop_map(Raw::I64),
        any::<f32>().prop_map(Raw::F32),
        any::<f64>().prop_map(Raw::F64),
        (any::<u8>(), any::<u32>()).prop_map(|(s, v)| Raw::Decimal(s, v)),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Raw::LongString),
        any::<u64>().prop_map(Raw::Timestamp),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Raw::Bytes),
        Just(Raw::Void),
    ]
}

/// Random trees: wide and moderately deep.
fn tree() -> impl Strategy<Value = Raw> {
    leaf().prop_recursive(8, 256, 12, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..12).prop_map(Raw::Array),
            prop::collection::vec((name(), inner), 0..12).prop_map(|e| Raw::Table(dedup(e))),
        ]
    })
}

/// A chain `levels` deep of tables and arrays (picked by `arrays`), ending in `leaf`, built
/// without recursion.
fn chain(levels: usize, arrays: &[bool], leaf: Raw) -> Raw {
    let mut value = leaf;
    for level in 0..levels {
        value = if arrays
            .get(level % arrays.len().max(1))
            .copied()
            .unwrap_or(false)
        {
            Raw::Array(vec![value])
        } else {
            Raw::Table(vec![(b"a".to_vec(), value)])
        };
    }
    value
}

fn headers_table() -> impl Strategy<Value = Vec<(Vec<u8>, Raw)>> {
    let deep = (
        0..400usize,
        prop::collection::vec(any::<bool>(), 1..8),
        leaf(),
        name(),
    )
        .prop_map(|(levels, arrays, leaf, name)| (name, chain(levels, &arrays, leaf)));
    prop::collection::vec(prop_oneof![3 => (name(), tree()), 1 => deep], 0..16).prop_map(dedup)
}

fn check_table(entries: &[(Vec<u8>, Raw)]) -> Result<(), TestCaseError> {
    let bytes = encode_table(entries);
    let (rest, table) = parse_field_table(&bytes[..])
        .map_err(|e| TestCaseError::fail(format!("a well-formed table failed to parse: {e:?}")))?;
    prop_assert!(rest.is_empty());
    prop_assert!(depth(&table) <= MAX_NESTING_DEPTH);

    // What handlers see is bounded too.
    for value in headers::from_table(Some(&table)).values() {
        if let HeaderValue::Json(v) = value {
            prop_assert!(json_depth(v) <= limits::MAX_HEADER_DEPTH);
        }
    }

    let properties = BasicProperties::default().with_headers(table);
    let verdict = limits::check(&properties, 10, &DeliveryLimits::default());
    let raw = raw_depth(entries);
    if raw > limits::MAX_HEADER_DEPTH {
        prop_assert!(verdict.is_some(), "{raw} levels were accepted");
    } else if raw_names_are_utf8(entries) {
        prop_assert_eq!(verdict, None);
    }

    // The dead-letter copy of a refused delivery passes the checks it failed.
    let (kept, body) = limits::kept(&properties, bytes::Bytes::from_static(b"body"), None);
    prop_assert_eq!(&body[..], b"body");
    let kept_table = kept.headers().clone().unwrap_or_default();
    prop_assert!(depth(&kept_table) <= limits::MAX_HEADER_DEPTH);
    let trimmed = headers::from_table(Some(&kept_table)).contains_key(headers::TRUNCATED);
    prop_assert_eq!(trimmed, raw > limits::MAX_HEADER_DEPTH);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_header_tables_parse_and_convert_within_bounds(entries in headers_table()) {
        check_table(&entries)?;
    }

    #[test]
    fn random_bytes_never_panic_the_parser(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((_, table)) = parse_field_table(&bytes[..]) {
            prop_assert!(depth(&table) <= MAX_NESTING_DEPTH);
            let _ = headers::from_table(Some(&table));
        }
    }
}

#[test]
fn a_table_nested_twenty_thousand_levels_parses_on_a_one_mib_stack() {
    let handle = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(|| {
            // The encoder above recurses; build the bytes level by level instead.
            let mut bytes = vec![0, 0, 0, 0];
            for _ in 0..20_000 {
                let mut outer = ((bytes.len() + 3) as u32).to_be_bytes().to_vec();
                outer.extend([1, b'a', b'F']);
                outer.extend(bytes);
                bytes = outer;
            }
            let (rest, table) = parse_field_table(&bytes[..]).expect("parses");
            assert!(rest.is_empty());
            assert_eq!(depth(&table), MAX_NESTING_DEPTH);
            let properties = BasicProperties::default().with_headers(table);
            let verdict = limits::check(&properties, 0, &DeliveryLimits::default());
            assert!(verdict.is_some_and(|v| v.reason.contains("nested deeper")));
        })
        .expect("spawn");
    handle.join().expect("no stack overflow");
}
