//! The `single_active` lease of a redis consumer: one process of all those running the
//! consumer reads its stream (and claims from it) at a time; the others stand by.
//!
//! The lease is the key `<stream>:active:<group>`, taken with `SET NX PX` (inside a script,
//! after reading it) and renewed every [`LEASE_RENEW`] while held. Its value starts with a
//! fencing token, a number from `INCR <stream>:active:<group>:fence` at each take: every new
//! holder has a larger token than any before it, which the logs show. A holder that cannot
//! renew within [`LEASE_TTL`] stops reading before its lease may have passed to another
//! process.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::scripts::Scripts;
use super::{Ops, RedisStreamsError};
use crate::config::RedisConsumerConfig;

/// How long a lease lives without renewal: how long standbys wait after a holder was killed.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often the holder renews, and a standby tries to take it.
pub(crate) const LEASE_RENEW: Duration = Duration::from_millis(2500);

/// This process's lease on one consumer.
pub(crate) struct Lease {
    key: String,
    fence_key: String,
    /// This process: host, pid and a random part.
    holder: String,
    /// The value held (`<fence>:<holder>`) and when it was last taken or renewed.
    held: Mutex<Option<(String, Instant)>>,
}

impl Lease {
    /// On a cluster the keys are put in the stream's slot, like its other derived keys.
    pub(crate) fn new(config: &RedisConsumerConfig, cluster: bool) -> Self {
        let key = crate::config::redis_keys::derived_key(
            &config.stream,
            &format!("active:{}", config.group),
            cluster,
        );
        Self {
            fence_key: format!("{key}:fence"),
            key,
            holder: format!(
                "{}/{}/{}",
                crate::config::default_consumer_name(),
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
            held: Mutex::new(None),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<(String, Instant)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes or renews the lease: its fencing token when held, `None` when another process
    /// holds it.
    pub(crate) async fn take(
        &self,
        scripts: &Scripts,
        ops: &Ops,
    ) -> Result<Option<u64>, RedisStreamsError> {
        let ours = self.state().as_ref().map(|(v, _)| v.clone());
        let cmd = scripts
            .lease
            .call(&[&self.key, &self.fence_key])
            .arg(&self.holder)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(ours.as_deref().unwrap_or(""))
            .to_owned();
        let value: Option<String> = scripts
            .run(ops, &cmd)
            .await
            .map_err(RedisStreamsError::command("single-active lease"))?;
        let mut state = self.state();
        match value {
            Some(value) => {
                let fence = value
                    .split_once(':')
                    .and_then(|(f, _)| f.parse().ok())
                    .unwrap_or(0);
                *state = Some((value, Instant::now()));
                Ok(Some(fence))
            }
            None => {
                *state = None;
                Ok(None)
            }
        }
    }

    /// Whether the lease is held and was renewed recently enough that no other process can
    /// have taken it yet.
    pub(crate) fn is_fresh(&self) -> bool {
        self.state()
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < LEASE_TTL - LEASE_RENEW)
    }

    /// Who holds the lease now (for a standby's reason).
    pub(crate) async fn holder(&self, ops: &Ops) -> Option<String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(&self.key);
        ops.query::<Option<String>>(&cmd).await.ok().flatten()
    }

    /// Gives the lease up at a clean stop, so a standby takes it at once.
    pub(crate) async fn release(&self, scripts: &Scripts, ops: &Ops) {
        let Some((value, _)) = self.state().take() else {
            return;
        };
        let cmd = scripts.unlock.call(&[&self.key]).arg(&value).to_owned();
        if let Err(e) = scripts.run::<i64>(ops, &cmd).await {
            tracing::debug!(lease = %self.key, error = %e, "cannot give the lease up; it expires by itself");
        }
    }
}
