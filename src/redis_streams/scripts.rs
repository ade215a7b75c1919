//! Lua scripts that make a settlement and its XACK one atomic step, so a crash between the
//! two can neither lose an entry nor leave it both copied and pending.
//!
//! All three read the clock with `TIME` on the server, so due times do not depend on the
//! clocks of the hosts running bosun. Values are binary-safe (Lua strings and `cmsgpack`).
//! The keys of one script are different keys: on Redis Cluster, give the stream a hash tag
//! (`{orders}`) so `<stream>:retry` and `<stream>:dlq` share its slot.

/// Schedules a retry: XACK the entry and, only if it was still pending, store its new fields
/// in the retry set with score = server time + delay.
///
/// KEYS: stream, retry set. ARGV: group, entry id, delay in ms, then field/value pairs.
/// Returns 1 when scheduled, 0 when the entry was no longer pending (settled elsewhere).
pub const RETRY: &str = r#"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry = { ARGV[2] }
for i = 4, #ARGV do
  entry[#entry + 1] = ARGV[i]
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), cmsgpack.pack(entry))
return 1
"#;

/// Dead-letters an entry: XACK it and, only if it was still pending, XADD the copy to the
/// dead-letter stream.
///
/// KEYS: stream, dead-letter stream. ARGV: group, entry id, then field/value pairs.
/// Returns the dead-letter entry id, or nil when the entry was no longer pending.
pub const DEAD_LETTER: &str = r#"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return false
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
return redis.call('XADD', KEYS[2], '*', unpack(fields))
"#;

/// Moves due retries back onto the stream: each is re-added and removed from the set in the
/// same script, so it is neither lost nor added twice.
///
/// KEYS: retry set, stream. ARGV: most entries to move.
/// Returns how many were moved.
pub const MOVE_DUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local entry = cmsgpack.unpack(member)
  local fields = {}
  for i = 2, #entry do
    fields[#fields + 1] = entry[i]
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"#;

/// A script and its SHA1, for EVALSHA inside pipelines.
pub struct Lua {
    pub code: &'static str,
    pub hash: String,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Self {
            code,
            hash: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// An EVALSHA of this script with its keys; add the arguments to the returned command.
    pub fn call(&self, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(keys.len());
        for key in keys {
            cmd.arg(*key);
        }
        cmd
    }
}

/// The three scripts, hashed once.
pub struct Scripts {
    pub retry: Lua,
    pub dead_letter: Lua,
    pub move_due: Lua,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            retry: Lua::new(RETRY),
            dead_letter: Lua::new(DEAD_LETTER),
            move_due: Lua::new(MOVE_DUE),
        }
    }
}

impl Scripts {
    /// Loads every script into the server's cache: at start, and after a `NOSCRIPT` (a
    /// restarted server has an empty cache).
    pub async fn load(&self, ops: &super::Ops) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for script in [&self.retry, &self.dead_letter, &self.move_due] {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script.code).ignore();
        }
        ops.query_pipe::<()>(&pipe).await
    }
}
