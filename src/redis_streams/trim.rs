//! Stream trimming: `trim = { maxlen = N }` or `trim = { max_age = "7d" }` on a redis
//! consumer (its stream) and on its `dead_letter` (the dead-letter stream). Off by default.
//!
//! Trimming never takes an entry some consumer group still needs: the bound is the lowest
//! of the limit's own bound, each group's oldest pending entry and the entry after each
//! group's last delivered one. So an entry is trimmed only once every group on the stream
//! has read and acknowledged it (a stream without groups, such as a dead-letter stream no
//! processor reads, is trimmed by the limit alone; a consumer's own stream is never trimmed
//! while its group does not exist yet). The trim is `XTRIM MINID` with an
//! exact id, at most [`MAX_PER_PASS`] entries a pass, so the server is never blocked long.
//! Every consumer of a group runs the same task; concurrent trims are harmless.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::streams::{StreamInfoGroupsReply, StreamPendingReply, StreamRangeReply};
use tokio_util::sync::CancellationToken;

use super::Ops;
use crate::config::{RedisConsumerConfig, Trim, TrimLimit};

/// Entries looked at (and at most trimmed) per stream per pass.
pub const MAX_PER_PASS: usize = 1000;

/// One stream to trim.
#[derive(Debug, Clone)]
pub struct Target {
    pub stream: String,
    pub trim: Trim,
    /// A group that must exist before anything is trimmed (the consumer's own).
    pub group: Option<String>,
}

/// The streams of `config` that have a `trim`, with their policy.
pub fn targets(config: &RedisConsumerConfig) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some(trim) = &config.trim.stream {
        out.push(Target {
            stream: config.stream.clone(),
            trim: trim.clone(),
            group: Some(config.group.clone()),
        });
    }
    if let Some(trim) = &config.trim.dead_letter {
        out.push(Target {
            stream: config.dead_letter_stream.clone(),
            trim: trim.clone(),
            group: None,
        });
    }
    out
}

/// Trims each target every `interval` until `stop`. Returns at once when there are none.
pub async fn run(consumer: String, ops: Ops, targets: Vec<Target>, stop: CancellationToken) {
    let Some(interval) = targets.iter().map(|t| t.trim.interval).min() else {
        return;
    };
    metrics::describe_counter!(
        "bosun_redis_trimmed_entries_total",
        "Stream entries removed by `trim` (only entries every group has acknowledged)."
    );
    loop {
        // The first pass waits too: the reader creates its group first.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        for Target {
            stream,
            trim,
            group,
        } in &targets
        {
            match trim_once(&ops, stream, trim.limit, group.as_deref()).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("bosun_redis_trimmed_entries_total", "stream" => stream.clone())
                        .increment(n);
                    tracing::debug!(consumer = %consumer, stream = %stream, trimmed = n, "stream trimmed");
                }
                Err(e) => {
                    tracing::warn!(consumer = %consumer, stream = %stream, error = %e, "cannot trim the stream; will try again")
                }
            }
        }
    }
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EntryId(u64, u64);

impl EntryId {
    fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }

    /// The smallest id after this one.
    fn next(self) -> Self {
        match self.1.checked_add(1) {
            Some(seq) => Self(self.0, seq),
            None => Self(self.0.saturating_add(1), 0),
        }
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One pass over `stream`: the number of entries removed. With `group`, nothing is trimmed
/// unless that group exists.
pub async fn trim_once(
    ops: &Ops,
    stream: &str,
    limit: TrimLimit,
    group: Option<&str>,
) -> redis::RedisResult<u64> {
    let len: u64 = ops.query(redis::cmd("XLEN").arg(stream)).await?;
    let wanted = match limit {
        TrimLimit::MaxLen(keep) => {
            let excess = len.saturating_sub(keep);
            if excess == 0 {
                return Ok(0);
            }
            usize::try_from(excess)
                .unwrap_or(MAX_PER_PASS)
                .min(MAX_PER_PASS)
        }
        TrimLimit::MaxAge(_) if len == 0 => return Ok(0),
        TrimLimit::MaxAge(_) => MAX_PER_PASS,
    };
    // The oldest entries, up to the pass's limit: the last one that may go sets the bound.
    let oldest: StreamRangeReply = ops
        .query(
            redis::cmd("XRANGE")
                .arg(stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(wanted),
        )
        .await?;
    let mut ids = oldest.ids.iter().filter_map(|e| EntryId::parse(&e.id));
    let last_to_go = match limit {
        TrimLimit::MaxLen(_) => ids.next_back(),
        TrimLimit::MaxAge(age) => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis();
            let cutoff = u64::try_from(now_ms.saturating_sub(age.as_millis())).unwrap_or(0);
            ids.take_while(|id| id.0 < cutoff).last()
        }
    };
    let Some(last_to_go) = last_to_go else {
        return Ok(0);
    };
    let mut bound = last_to_go.next();
    match group_bound(ops, stream, group).await? {
        GroupBound::MissingGroup => return Ok(0),
        GroupBound::Needed(needed) => bound = bound.min(needed),
        GroupBound::NoGroups => {}
    }
    ops.query(
        redis::cmd("XTRIM")
            .arg(stream)
            .arg("MINID")
            .arg("=")
            .arg(bound.to_string()),
    )
    .await
}

enum GroupBound {
    /// The lowest id some group still needs.
    Needed(EntryId),
    NoGroups,
    /// The group that must exist does not.
    MissingGroup,
}

/// The lowest id some group still needs: its oldest pending entry, or the entry after its
/// last delivered one.
async fn group_bound(
    ops: &Ops,
    stream: &str,
    required: Option<&str>,
) -> redis::RedisResult<GroupBound> {
    let groups: StreamInfoGroupsReply = ops
        .query(redis::cmd("XINFO").arg("GROUPS").arg(stream))
        .await?;
    if required.is_some_and(|r| !groups.groups.iter().any(|g| g.name == r)) {
        return Ok(GroupBound::MissingGroup);
    }
    let mut bound: Option<EntryId> = None;
    for group in &groups.groups {
        // An id that cannot be read keeps everything: trimming is never a guess.
        let mut needed = EntryId::parse(&group.last_delivered_id)
            .map(EntryId::next)
            .unwrap_or(EntryId(0, 0));
        if group.pending > 0 {
            let pending: StreamPendingReply = ops
                .query(redis::cmd("XPENDING").arg(stream).arg(&group.name))
                .await?;
            if let StreamPendingReply::Data(data) = pending {
                let oldest = EntryId::parse(&data.start_id).unwrap_or(EntryId(0, 0));
                needed = needed.min(oldest);
            }
        }
        bound = Some(bound.map_or(needed, |b| b.min(needed)));
    }
    Ok(bound.map_or(GroupBound::NoGroups, GroupBound::Needed))
}

#[cfg(test)]
mod tests {
    use super::EntryId;

    #[test]
    fn entry_ids_order_and_step_like_redis() {
        let a = EntryId::parse("1700000000000-5").unwrap();
        let b = EntryId::parse("1700000000001-0").unwrap();
        assert!(a < b);
        assert_eq!(a.next(), EntryId(1_700_000_000_000, 6));
        assert_eq!(EntryId(7, u64::MAX).next(), EntryId(8, 0));
        assert_eq!(EntryId::parse("42"), Some(EntryId(42, 0)));
        assert_eq!(EntryId::parse("x-1"), None);
        assert_eq!(a.to_string(), "1700000000000-5");
    }
}
