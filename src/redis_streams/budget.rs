//! The shared rate budget of `rate_limit = { scope = "global", broker = "..." }`: one GCRA
//! (generic cell rate algorithm) key per handler in Redis, so every replica of bosun draws on
//! the same budget. One script call per token; the clock is the server's.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::Ops;
use super::scripts::Lua;
use crate::config::RedisBrokerConfig;
use crate::flow_control::{SharedBudget, Taken};

/// Takes one token, reserving it when it is not there yet: KEYS: the budget's key. ARGV: the
/// emission interval, the burst tolerance (interval x (burst - 1)) and the horizon, in µs.
/// Returns `{1, wait}` when a token was taken, to be used `wait` µs from now (0: at once),
/// or `{0, wait}` when the next token is further away than the horizon: nothing taken, ask
/// again in `wait` µs. The key holds the theoretical arrival time and expires once idle.
///
/// A token is handed out ahead of its instant (up to the horizon) so that callers queue on
/// the budget rather than each asking again after a wait: a token nobody asked for at its
/// instant would be lost, and the replicas together would stay below the rate (with
/// `burst = 1`, by the round trip and the timer's lateness, every time).
pub const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local wait = tat - tolerance - now
if wait > horizon then
  return {0, wait - horizon}
end
if wait < 0 then
  wait = 0
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.floor((new - now) / 1000) + 1000)
return {1, wait}
"#;

/// A budget in the redis broker `broker`, connected at its first use.
pub struct RedisBudget {
    broker: RedisBrokerConfig,
    ops: OnceCell<Ops>,
    script: Lua,
}

impl RedisBudget {
    pub fn new(broker: &RedisBrokerConfig) -> Self {
        Self {
            broker: broker.clone(),
            ops: OnceCell::new(),
            script: Lua::new(GCRA),
        }
    }
}

#[async_trait]
impl SharedBudget for RedisBudget {
    async fn take(
        &self,
        key: &str,
        per_second: f64,
        burst: u32,
        horizon: Duration,
    ) -> Result<Taken, String> {
        let ops = self
            .ops
            .get_or_try_init(|| Ops::connect(&self.broker, "bosun:ratelimit"))
            .await
            .map_err(|e| e.to_string())?;
        let interval = (1_000_000.0 / per_second).max(1.0).round() as u64;
        let tolerance = interval.saturating_mul(u64::from(burst.max(1) - 1));
        let mut cmd = self.script.call(&[key]);
        let horizon = u64::try_from(horizon.as_micros()).unwrap_or(u64::MAX);
        cmd.arg(interval).arg(tolerance).arg(horizon);
        let (taken, wait): (i64, i64) = match ops.query(&cmd).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                let load = redis::cmd("SCRIPT").arg("LOAD").arg(GCRA).to_owned();
                ops.query::<String>(&load)
                    .await
                    .map_err(|e| e.to_string())?;
                ops.query(&cmd).await.map_err(|e| e.to_string())?
            }
            other => other.map_err(|e| e.to_string())?,
        };
        let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
        Ok(if taken == 1 {
            Taken::Held(wait)
        } else {
            Taken::NotYet(wait)
        })
    }
}
