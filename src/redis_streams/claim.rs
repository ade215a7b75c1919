//! The claim loop: every `claim_interval`, XAUTOCLAIM takes over entries that have been
//! pending longer than `claim_idle` (a consumer died or lost its connection mid-batch) and
//! hands them to this consumer's handlers.
//!
//! XAUTOCLAIM runs with `JUSTID`, which moves entries to this consumer without counting a
//! delivery; the ones not in flight here are then XCLAIMed, which counts the delivery and
//! returns the entry only if it is still pending, so an entry settled meanwhile is not
//! handed out again. Entries of this consumer still in flight are claimed too (their idle
//! time restarts, so nobody else takes them) but not delivered.
//!
//! XAUTOCLAIM also reports pending IDs whose stream entry was deleted; Redis drops those
//! from the pending list itself, and they are counted here. Each round also refreshes
//! `bosun_redis_pending_messages` and removes consumers of the group that are idle longer
//! than `forget_idle` with nothing pending.

use std::sync::Arc;

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::Ops;
use super::dispatch::{Dispatcher, Inner};
use crate::retry::sleep_or_cancel;

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
        // While another process holds the name, claiming under it would hand entries to
        // that process's pending list.
        if !inner.name_lock.is_held() {
            continue;
        }
        // Stopped by the gate: claiming would only take entries to release again.
        if inner.gate.stopped().is_some() {
            continue;
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
) -> Result<(), super::RedisStreamsError> {
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
            .arg("JUSTID")
            .to_owned();
        let reply: Value = ops
            .query(&cmd)
            .await
            .map_err(super::RedisStreamsError::command("XAUTOCLAIM"))?;
        let Value::Array(parts) = reply else {
            return Err(super::RedisStreamsError::Reply {
                command: "XAUTOCLAIM",
                detail: format!("{reply:?}"),
            });
        };
        let mut parts = parts.into_iter();
        let (Some(next), Some(claimed)) = (parts.next(), parts.next()) else {
            return Err(super::RedisStreamsError::Reply {
                command: "XAUTOCLAIM",
                detail: "short reply".into(),
            });
        };
        let ids: Vec<String> = match claimed {
            Value::Array(ids) => ids
                .into_iter()
                .filter_map(|v| match v {
                    Value::BulkString(b) => String::from_utf8(b).ok(),
                    Value::SimpleString(s) => Some(s),
                    _ => None,
                })
                .collect(),
            other => {
                return Err(super::RedisStreamsError::Reply {
                    command: "XAUTOCLAIM",
                    detail: format!("{other:?}"),
                });
            }
        };
        let mut deleted: Vec<String> = Vec::new();
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
        let free: Vec<(String, u64)> = dispatcher
            .reserve(ids)
            .into_iter()
            .map(|id| (id, 0))
            .collect();
        let entries = inner.claim_reserved(ops, dispatcher, &free).await?;
        if !entries.is_empty() {
            inner.metrics.claimed.increment(entries.len() as u64);
            tracing::info!(consumer = %inner.name, count = entries.len(), "claimed entries left pending by another consumer");
            let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
            let deliveries = match inner.with_counts(ops, entries).await {
                Ok(deliveries) => deliveries,
                Err(e) => {
                    // Claimed but not handed out: they stay pending here and come back in
                    // a later round, so they must not stay marked in flight.
                    dispatcher.unreserve(ids.iter().map(String::as_str));
                    return Err(e);
                }
            };
            dispatcher.dispatch_reserved(deliveries).await;
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
        .map_err(super::RedisStreamsError::command("XPENDING"))?;
    let mut pending = None;
    if let Value::Array(parts) = summary
        && let Some(Value::Int(count)) = parts.first()
    {
        inner.metrics.pending.set(*count as f64);
        pending = Some(*count);
    }
    if let Some(pending) = pending {
        sample_backlog(inner, ops, pending).await;
    }
    forget_idle_consumers(inner, ops).await;
    Ok(())
}

/// Sets `bosun_consumer_backlog`: what the group has still to do. Entries not yet read by
/// the group (`lag` of XINFO GROUPS), entries read and not acknowledged (`pending`) and
/// retries waiting in `<stream>:retry`. A failure leaves the last value (logged at debug):
/// the gauge is a scaling hint, never a reason to stop claiming.
async fn sample_backlog(inner: &Inner, ops: &Ops, pending: i64) {
    let groups: Result<Value, _> = ops
        .query(redis::cmd("XINFO").arg("GROUPS").arg(&inner.config.stream))
        .await;
    let scheduled: Result<i64, _> = ops.query(redis::cmd("ZCARD").arg(&inner.retry_key)).await;
    match (groups, scheduled) {
        (Ok(groups), Ok(scheduled)) => {
            // `lag` is nil when Redis cannot tell (entries deleted past the group's last
            // read): the stream's length then bounds it from above.
            let lag = group_lag(&groups, &inner.config.group).unwrap_or(0);
            inner
                .metrics
                .backlog
                .set((lag.max(0) + pending.max(0) + scheduled.max(0)) as f64);
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(consumer = %inner.name, error = %e, "cannot sample the backlog");
        }
    }
}

/// The `lag` XINFO GROUPS reports for `group` (RESP2 flat arrays or RESP3 maps).
fn group_lag(groups: &Value, group: &str) -> Option<i64> {
    let Value::Array(groups) = groups else {
        return None;
    };
    groups.iter().find_map(|info| {
        let pairs: Vec<(&Value, &Value)> = match info {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|c| Some((c.first()?, c.get(1)?)))
                .collect(),
            Value::Map(map) => map.iter().map(|(k, v)| (k, v)).collect(),
            _ => return None,
        };
        let text = |v: &Value| match v {
            Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| text(k).as_deref() == Some(name))
                .map(|(_, v)| *v)
        };
        if field("name").and_then(text).as_deref() != Some(group) {
            return None;
        }
        match field("lag")? {
            Value::Int(lag) => Some(*lag),
            _ => None,
        }
    })
}

/// Removes consumers idle longer than `forget_idle` with nothing pending and no live holder
/// of their name, so names of processes gone for good do not pile up in the group.
async fn forget_idle_consumers(inner: &Inner, ops: &Ops) {
    let config = &inner.config;
    let cmd = inner
        .scripts
        .forget
        .call(&[&config.stream])
        .arg(&config.group)
        .arg(u64::try_from(config.forget_idle.as_millis()).unwrap_or(u64::MAX))
        .arg(&inner.lock_prefix)
        .arg(&config.consumer)
        .to_owned();
    match inner.scripts.run::<i64>(ops, &cmd).await {
        Ok(0) => {}
        Ok(removed) => {
            tracing::info!(consumer = %inner.name, removed, forget_idle_s = config.forget_idle.as_secs(), "removed idle consumers with nothing pending from the group")
        }
        Err(e) => {
            tracing::debug!(consumer = %inner.name, error = %e, "cannot remove idle consumers")
        }
    }
}
