//! The retry mover: re-adds due entries from `<stream>:retry` to the stream.
//!
//! A failed entry is scheduled in the sorted set (score = due time in ms) by the settler,
//! atomically with its XACK. This loop moves every due entry back with one script call,
//! which re-adds and removes each in one step. A member that cannot be re-added (over the
//! entry bounds, not decodable) is dead-lettered as `invalid` by the same script, so it
//! never blocks the members behind it. Every consumer of the stream runs a mover; the
//! script makes concurrent movers safe.

use std::time::Duration;

use metrics::Counter;
use tokio_util::sync::CancellationToken;

use super::Ops;
use super::scripts::Scripts;
use crate::config::RedisConsumerConfig;
use crate::retry::sleep_or_cancel;

/// How often due retries are looked for: the precision of retry delays.
pub const MOVE_INTERVAL: Duration = Duration::from_millis(200);
/// Most entries moved by one script call, so the server is never blocked for long.
const MOVE_BATCH: i64 = 500;
/// What a scheduled copy adds to the entry it was made from: the retry fields
/// (`message_id`, `bosun-attempt`, `bosun-error`)...
const COPY_EXTRA_FIELDS: usize = 3;
/// ...and the bytes of those fields and the packing around them.
const COPY_EXTRA_BYTES: u64 = 64 << 10;

/// What the mover needs of its consumer.
pub(crate) struct Mover {
    /// The `[consumers.NAME]` name, for logs.
    pub(crate) name: String,
    pub(crate) config: RedisConsumerConfig,
    /// `<stream>:retry`: the sorted set of scheduled retries.
    pub(crate) retry_key: String,
    /// When the dead-letter stream is in another slot of a cluster: the stream of the
    /// stream's slot (`{<stream>}:invalid`) the script parks invalid members in, copied to
    /// the dead-letter stream by the mover with commands of their own.
    pub(crate) parked_key: Option<String>,
    pub(crate) scripts: Scripts,
    /// `bosun_redis_invalid_retries_total` of the consumer.
    pub(crate) invalid_retries: Counter,
}

pub(crate) async fn run(mover: Mover, ops: Ops, stop: CancellationToken) {
    let config = &mover.config;
    let max_fields = config.limits.max_fields + COPY_EXTRA_FIELDS;
    let max_bytes = config.limits.max_bytes.saturating_add(COPY_EXTRA_BYTES);
    loop {
        if sleep_or_cancel(MOVE_INTERVAL, &stop).await {
            return;
        }
        loop {
            let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let cmd = mover
                .scripts
                .move_due
                .call(&[
                    &mover.retry_key,
                    &config.stream,
                    mover
                        .parked_key
                        .as_deref()
                        .unwrap_or(&config.dead_letter_stream),
                ])
                .arg(MOVE_BATCH)
                .arg(max_fields)
                .arg(max_bytes)
                .arg(failed_at)
                .arg(&config.group)
                .arg(&config.consumer)
                .to_owned();
            match ops.query::<(i64, i64)>(&cmd).await {
                Ok((handled, invalid)) => {
                    if let Some(parked) = &mover.parked_key
                        && let Err(e) = unpark(&ops, parked, &config.dead_letter_stream).await
                    {
                        tracing::warn!(consumer = %mover.name, error = %e, "cannot copy parked invalid retries to the dead-letter stream; trying again");
                    }
                    if invalid > 0 {
                        mover.invalid_retries.increment(invalid as u64);
                        tracing::warn!(consumer = %mover.name, invalid, dead_letter_stream = %config.dead_letter_stream, "scheduled retries that cannot be re-added were dead-lettered as invalid");
                    }
                    if handled > invalid {
                        tracing::debug!(consumer = %mover.name, moved = handled - invalid, "due retries re-added to the stream");
                    }
                    if handled < MOVE_BATCH || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    if let Err(e) = mover.scripts.load(&ops).await {
                        tracing::warn!(consumer = %mover.name, error = %e, "cannot load scripts");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(consumer = %mover.name, error = %e, "cannot move due retries");
                    break;
                }
            }
        }
    }
}

/// Copies the invalid retries parked in `parked` (a stream of the stream's slot) to the
/// dead-letter stream, in another slot: each is added there, then deleted from `parked`, two
/// commands (a crash between them copies it twice, never loses it).
/// An entry as XRANGE answers it: its id and its field-value pairs.
type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

async fn unpark(ops: &Ops, parked: &str, dead_letter_stream: &str) -> redis::RedisResult<()> {
    loop {
        let entries: Vec<RawEntry> = ops
            .query(
                redis::cmd("XRANGE")
                    .arg(parked)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(100),
            )
            .await?;
        if entries.is_empty() {
            return Ok(());
        }
        for (id, fields) in entries {
            let mut xadd = redis::cmd("XADD");
            xadd.arg(dead_letter_stream).arg("*");
            for (k, v) in &fields {
                xadd.arg(k).arg(v);
            }
            ops.query::<redis::Value>(&xadd).await?;
            ops.query::<i64>(redis::cmd("XDEL").arg(parked).arg(&id))
                .await?;
        }
    }
}
