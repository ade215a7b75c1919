//! The `bosun-*` failure headers: the names bosun's consumers write on retry and dead-letter
//! copies (AMQP headers, Redis Streams fields) and its dead-letter processors read back.
//!
//! A compatibility boundary (dead-letter processors and people read them): keep them stable
//! and documented in docs/delivery-guarantees.md. Both brokers and the dead-letter code take them from here,
//! so no broker module imports another.

/// The attempt the delivery is on (1 for the first). Counted by bosun, never from `x-death`;
/// an amqp consumer's `attempt_header` is read only when this is absent.
pub const ATTEMPT: &str = "bosun-attempt";
/// RFC 3339 time of the first failure, kept across retries.
pub const FIRST_FAILURE_AT: &str = "bosun-first-failure-at";
/// RFC 3339 time of the latest failure.
pub const LAST_FAILURE_AT: &str = "bosun-last-failure-at";
/// The handler's reason, truncated to [`MAX_ERROR_BYTES`].
pub const ERROR: &str = "bosun-error";
/// `transient`, `permanent`, `exhausted` or `invalid`.
pub const ERROR_KIND: &str = "bosun-error-kind";
/// Exchange of the first delivery (retries come back through the default exchange).
pub const ORIGINAL_EXCHANGE: &str = "bosun-original-exchange";
/// Routing key of the first delivery.
pub const ORIGINAL_ROUTING_KEY: &str = "bosun-original-routing-key";
/// The queue the consumer read it from.
pub const ORIGINAL_QUEUE: &str = "bosun-original-queue";
/// The `[consumers.*]` name.
pub const CONSUMER: &str = "bosun-consumer";
/// Host name of the daemon that handled it.
pub const HOST: &str = "bosun-host";
/// Times a dead letter has been replayed.
pub const REPLAY_COUNT: &str = "bosun-replay-count";
/// On an `invalid` dead letter: what its copy left out (`headers`, `body`, comma-separated).
pub const TRUNCATED: &str = "bosun-truncated";
/// On an `invalid` dead letter whose body was left out: the body's size in bytes.
pub const BODY_SIZE: &str = "bosun-body-size";
/// The original's `expiration` property (per-message TTL, milliseconds as text). Copies never
/// carry `expiration` themselves: a dead letter must not expire in the dead-letter queue.
pub const ORIG_EXPIRATION: &str = "bosun-orig-expiration";
/// On a copy whose headers could not all fit one frame: how many of the original's headers
/// were left out.
pub const HEADERS_TRUNCATED: &str = "bosun-headers-truncated";

/// `bosun-error` is cut to this many bytes, by both brokers: all headers must fit one AMQP
/// frame, and a dead letter's fields stay small.
pub const MAX_ERROR_BYTES: usize = 2048;

/// `error` as `bosun-error` carries it: cut to [`MAX_ERROR_BYTES`] on a character boundary.
pub fn error_text(error: &str) -> &str {
    crate::text::truncate(error, MAX_ERROR_BYTES)
}

/// Redis Streams only: the stream a dead-lettered entry was read from.
pub const ORIG_STREAM: &str = "bosun-orig-stream";
/// Redis Streams only: the entry id it had there.
pub const ORIG_ID: &str = "bosun-orig-id";
/// Redis Streams only: the consumer group that failed it.
pub const GROUP: &str = "bosun-group";
/// Redis Streams only: how many times it was delivered.
pub const DELIVERIES: &str = "bosun-deliveries";
/// Redis Streams only: when it failed for the last time.
pub const FAILED_AT: &str = "bosun-failed-at";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_truncated_on_char_boundaries() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = error_text(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES && cut.len() >= MAX_ERROR_BYTES - 1);
    }
}
