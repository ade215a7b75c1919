//! The claim loop: every `claim_interval`, XAUTOCLAIM takes over entries that have been
//! pending longer than `claim_idle` (a consumer died or lost its connection mid-batch) and
//! hands them to this consumer's handlers.
//!
//! XAUTOCLAIM also reports pending IDs whose stream entry was deleted; Redis drops those
//! from the pending list itself, and they are counted here. Each round also refreshes
//! `bosun_redis_pending_messages`.

use std::sync::Arc;

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::Ops;
use super::consumer::{Dispatcher, Inner, parse_entries, sleep_or_cancel};
use super::fields::Entry;

pub(crate) async fn run(
    inner: Arc<Inner>,
    ops: Ops,
    dispatcher: Dispatcher,
    stop: CancellationToken,
) {
    loop {
        if sleep_or_cancel(inner.config.claim_interval, &stop).await {
            return;
        }
        if let Err(e) = round(&inner, &ops, &dispatcher, &stop).await {
            // NOGROUP lands here while the stream is re-created; the reader logs that.
            tracing::debug!(consumer = %inner.name, error = %e, "claim round failed");
        }
    }
}

/// One pass over the whole pending list.
async fn round(
    inner: &Inner,
    ops: &Ops,
    dispatcher: &Dispatcher,
    stop: &CancellationToken,
) -> Result<(), super::Error> {
    let config = &inner.config;
    let mut cursor = String::from("0-0");
    loop {
        let cmd = redis::cmd("XAUTOCLAIM")
            .arg(&config.stream)
            .arg(&config.group)
            .arg(&config.consumer)
            .arg(config.claim_idle.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(config.batch)
            .to_owned();
        let reply: Value = ops
            .query(&cmd)
            .await
            .map_err(super::Error::command("XAUTOCLAIM"))?;
        let Value::Array(parts) = reply else {
            return Err(super::Error::Reply {
                command: "XAUTOCLAIM",
                detail: format!("{reply:?}"),
            });
        };
        let mut parts = parts.into_iter();
        let (Some(next), Some(claimed)) = (parts.next(), parts.next()) else {
            return Err(super::Error::Reply {
                command: "XAUTOCLAIM",
                detail: "short reply".into(),
            });
        };
        let mut entries = Vec::new();
        let mut deleted = Vec::new();
        parse_entries(claimed, &mut entries, &mut deleted, "XAUTOCLAIM")?;
        if let Some(Value::Array(gone)) = parts.next() {
            deleted.extend(gone.into_iter().filter_map(|v| match v {
                Value::BulkString(b) => String::from_utf8(b).ok(),
                _ => None,
            }));
        }
        if !deleted.is_empty() {
            inner.metrics.deleted.increment(deleted.len() as u64);
            tracing::info!(consumer = %inner.name, count = deleted.len(), "claimed entries were deleted from the stream; dropped from the pending list");
        }
        // Our own slow entries come back too once idle long enough: they are still running.
        let entries: Vec<Entry> = entries
            .into_iter()
            .filter(|e| !dispatcher.is_inflight(&e.id))
            .collect();
        if !entries.is_empty() {
            inner.metrics.claimed.increment(entries.len() as u64);
            tracing::info!(consumer = %inner.name, count = entries.len(), "claimed entries left pending by another consumer");
            let deliveries = inner.with_counts(ops, entries).await?;
            dispatcher.dispatch(deliveries, true).await;
        }
        cursor = match next {
            Value::BulkString(b) => String::from_utf8(b).unwrap_or_else(|_| "0-0".into()),
            Value::SimpleString(s) => s,
            _ => "0-0".into(),
        };
        if cursor == "0-0" || stop.is_cancelled() {
            break;
        }
    }
    let summary: Value = ops
        .query(
            redis::cmd("XPENDING")
                .arg(&config.stream)
                .arg(&config.group),
        )
        .await
        .map_err(super::Error::command("XPENDING"))?;
    if let Value::Array(parts) = summary
        && let Some(Value::Int(count)) = parts.first()
    {
        inner.metrics.pending.set(*count as f64);
    }
    Ok(())
}
