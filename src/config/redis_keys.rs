//! The keys bosun derives from a stream's name, and the Redis Cluster hash slot of a key.
//!
//! On a cluster, a script may only touch keys of one slot, and a pipeline is sent to one
//! node. So every key bosun keeps next to a stream (`:retry`, `:dlq`, the name locks) must
//! hash like the stream: when the stream's name has a hash tag (`{orders}.events`) the
//! suffixed names share it already; when it has none, the derived names put the whole stream
//! name inside one (`{orders}:retry`), which hashes exactly like `orders`. Off a cluster the
//! names stay as they always were (`orders:retry`).

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, or of the whole key, mod 16384),
/// as Redis Cluster computes it.
pub fn hash_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % 16384
}

/// The part between the first `{` and the next `}`, when not empty.
pub fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let len = key[open + 1..].iter().position(|b| *b == b'}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// The prefix of every key derived from `stream`: the stream's name as it is when it has a
/// hash tag or the broker is not a cluster, else the name in braces.
pub fn derived_prefix(stream: &str, cluster: bool) -> String {
    if cluster && hash_tag(stream.as_bytes()).is_none() {
        format!("{{{stream}}}")
    } else {
        stream.to_owned()
    }
}

/// `<prefix>:<suffix>`, in `stream`'s slot on a cluster.
pub fn derived_key(stream: &str, suffix: &str, cluster: bool) -> String {
    format!("{}:{suffix}", derived_prefix(stream, cluster))
}

/// Whether the derived keys of `stream` are renamed on a cluster (it has no hash tag).
pub fn needs_tag(stream: &str) -> bool {
    hash_tag(stream.as_bytes()).is_none()
}

/// Whether `stream`'s derived keys can share its slot: a name without a hash tag that holds
/// a `}` cannot be put inside one.
pub fn can_derive(stream: &str) -> bool {
    !needs_tag(stream) || !stream.contains('}')
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in data {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_cluster_specification() {
        // The specification's reference value, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"{user1000}.following"), hash_slot(b"user1000"));
        assert_eq!(hash_slot(b"foo{}{bar}"), hash_slot(b"foo{}{bar}"));
        assert_ne!(hash_slot(b"foo{}{bar}"), hash_slot(b"bar"));
    }

    #[test]
    fn derived_keys_share_the_stream_slot_on_a_cluster() {
        for stream in ["orders", "orders.v1", "{orders}.events", "a{b"] {
            for suffix in ["retry", "dlq", "lock:g:c1"] {
                let key = derived_key(stream, suffix, true);
                assert_eq!(
                    hash_slot(key.as_bytes()),
                    hash_slot(stream.as_bytes()),
                    "{key} and {stream}"
                );
            }
        }
        assert_eq!(derived_key("orders", "retry", true), "{orders}:retry");
        assert_eq!(derived_key("{orders}.x", "retry", true), "{orders}.x:retry");
        assert_eq!(derived_key("orders", "retry", false), "orders:retry");
    }
}
