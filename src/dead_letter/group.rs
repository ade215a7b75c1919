//! Group keys: dead letters that failed "the same way" share one key, so operators see one
//! line per failure mode instead of one per message.
//!
//! The key hashes the error kind and the error text with its variable parts masked: quoted
//! values, UUIDs, hex ids and numbers. "timeout after 3012 ms" and "timeout after 87 ms"
//! become "timeout after <n> ms" and share a key.

use std::sync::LazyLock;

use regex::Regex;
use sha2::{Digest, Sha256};

/// The masks, applied in order: quoted values first (they may hold anything), then ids
/// before plain numbers (a UUID is full of digits).
static MASKS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        (r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`"#, "<q>"),
        (
            r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
            "<uuid>",
        ),
        (r"(?i)\b0x[0-9a-f]+\b", "<hex>"),
        // Hex ids (commit hashes, object ids): long runs of hex digits with at least one
        // digit and one letter, so ordinary words and plain numbers are left to other rules.
        (
            r"(?i)\b(?:[0-9a-f]*[0-9][0-9a-f]*[a-f][0-9a-f]*|[0-9a-f]*[a-f][0-9a-f]*[0-9][0-9a-f]*)\b",
            "<hex>",
        ),
        (r"[-+]?\d+(?:\.\d+)?", "<n>"),
        (r"\s+", " "),
    ]
    .into_iter()
    .filter_map(|(pattern, replacement)| Some((Regex::new(pattern).ok()?, replacement)))
    .collect()
});

/// Hex runs shorter than this are kept (a short token like `a1` is more likely a name).
const MIN_HEX_ID: usize = 6;

/// The error text with its variable parts masked.
pub fn normalize(error: &str) -> String {
    let mut text = error.trim().to_owned();
    for (i, (re, replacement)) in MASKS.iter().enumerate() {
        // The mixed-hex rule only masks runs long enough to be ids.
        text = if i == 3 {
            re.replace_all(&text, |caps: &regex::Captures<'_>| {
                if caps[0].len() >= MIN_HEX_ID {
                    (*replacement).to_owned()
                } else {
                    caps[0].to_owned()
                }
            })
            .into_owned()
        } else {
            re.replace_all(&text, *replacement).into_owned()
        };
    }
    text
}

/// The group key of a failure: 16 hex digits of SHA-256 over the kind and normalized text.
pub fn group_key(error_kind: &str, error: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(error_kind.as_bytes());
    hasher.update([0u8]);
    hasher.update(normalize(error).as_bytes());
    let digest = hasher.finalize();
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_of_different_lengths_group_together() {
        assert_eq!(
            group_key("transient", "timeout after 3012 ms"),
            group_key("transient", "timeout after 87 ms")
        );
        assert_eq!(normalize("timeout after 3012 ms"), "timeout after <n> ms");
    }

    #[test]
    fn kind_and_wording_separate_groups() {
        assert_ne!(
            group_key("transient", "timeout after 1 ms"),
            group_key("permanent", "timeout after 1 ms")
        );
        assert_ne!(
            group_key("permanent", "timeout after 1 ms"),
            group_key("permanent", "refused after 1 ms")
        );
    }

    #[test]
    fn ids_and_quoted_values_are_masked() {
        assert_eq!(
            normalize("order 3f2504e0-4f89-11d3-9a0c-0305e82c3301 not found"),
            "order <uuid> not found"
        );
        assert_eq!(
            normalize("customer 'Ann' rejected"),
            normalize("customer 'Bob Smith' rejected")
        );
        assert_eq!(normalize(r#"field "email" invalid"#), "field <q> invalid");
        assert_eq!(
            normalize("object 5f1d7c9ab2 missing"),
            "object <hex> missing"
        );
        assert_eq!(normalize("bad pointer 0xDEADBEEF"), "bad pointer <hex>");
        assert_eq!(normalize("cafe facade"), "cafe facade");
        assert_eq!(
            normalize("HTTP  503\n from upstream"),
            "HTTP <n> from upstream"
        );
    }

    #[test]
    fn keys_are_short_and_stable() {
        let key = group_key("unknown", "");
        assert_eq!(key.len(), 16);
        assert_eq!(key, group_key("unknown", "  "));
    }
}
