//! Lua scripts that make a settlement and its XACK one atomic step, so a crash between the
//! two can neither lose an entry nor leave it both copied and pending.
//!
//! Every script does what can fail before its first write, writes the copy next and XACKs
//! (or removes) the original last: a script that fails part-way leaves the entry pending,
//! never acknowledged without its copy. No script unpacks a list whose length the input
//! decides beyond the bounds the consumer checks first (Lua's `unpack` stops near 8,000
//! values); see [`RedisEntryLimits`](crate::config::RedisEntryLimits).
//!
//! The scripts read the clock with `TIME` on the server, so due times do not depend on the
//! clocks of the hosts running bosun. Values are binary-safe (Lua strings and `cmsgpack`).
//! The keys of one script share one slot on Redis Cluster: the retry set, the default
//! dead-letter stream and the name locks are named after the stream inside its hash tag
//! ([`crate::config::redis_keys`]). A configured dead-letter stream in another slot is
//! never written by a script with the stream: the consumer writes it with a command of its
//! own ([`super::consumer`]), and [`MOVE_DUE`] parks what it cannot re-add in a stream of
//! the stream's slot that the mover then copies over.

/// Schedules a retry: only if the entry is still pending, store its new fields in the retry
/// set with score = server time + delay, then XACK it.
///
/// KEYS: stream, retry set. ARGV: group, entry id, delay in ms, then field/value pairs.
/// Returns 1 when scheduled, 0 when the entry was no longer pending (settled elsewhere).
pub const RETRY: &str = r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entry = { ARGV[2] }
for i = 4, #ARGV do
  entry[#entry + 1] = ARGV[i]
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), cmsgpack.pack(entry))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Dead-letters an entry: only if it is still pending, XADD the copy to the dead-letter
/// stream, then XACK the original.
///
/// KEYS: stream, dead-letter stream. ARGV: group, entry id, then field/value pairs.
/// Returns the dead-letter entry id, or nil when the entry was no longer pending.
pub const DEAD_LETTER: &str = r#"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
"#;

/// Hands a delivery back unsettled: the entry stays pending with this consumer, its idle
/// time as it was, and its delivery count one lower, so a release does not count as a
/// delivery toward `max_deliveries`.
///
/// KEYS: stream. ARGV: group, entry id, consumer.
/// Returns 1 when given back, 0 when the entry is no longer pending with this consumer.
pub const RELEASE: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
if #p == 0 then
  return 0
end
local count = tonumber(p[1][4])
if count > 0 then
  count = count - 1
end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', p[1][3], 'RETRYCOUNT', count, 'JUSTID')
return 1
"#;

/// Moves due retries back onto the stream: each is re-added and removed from the set in the
/// same script, so it is neither lost nor added twice. A member that cannot be re-added
/// (over the size or field bounds, not decodable, not field/value pairs) is added to the
/// dead-letter stream as `invalid` instead, its raw bytes as the payload, so one bad member
/// never blocks the ones behind it.
///
/// KEYS: retry set, stream, dead-letter stream. ARGV: most entries to move, most fields,
/// most bytes, failed-at time, group, consumer.
/// Returns { members handled, members dead-lettered }.
pub const MOVE_DUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local max_fields = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local invalid = 0
for _, member in ipairs(due) do
  local why = nil
  local entry = nil
  if #member > max_bytes then
    why = 'scheduled retry of ' .. #member .. ' bytes is over the limit of ' .. max_bytes
  else
    local ok, decoded = pcall(cmsgpack.unpack, member)
    if not ok or type(decoded) ~= 'table' then
      why = 'scheduled retry cannot be decoded'
    else
      local n = #decoded - 1
      if n < 2 or n % 2 ~= 0 then
        why = 'scheduled retry holds no field/value pairs'
      elseif n / 2 > max_fields then
        why = 'scheduled retry has ' .. (n / 2) .. ' fields, over the limit of ' .. max_fields
      else
        for i = 1, #decoded do
          local kind = type(decoded[i])
          if kind ~= 'string' and kind ~= 'number' then
            why = 'scheduled retry holds a value that is not a string'
            break
          end
        end
      end
      entry = decoded
    end
  end
  if why then
    redis.call('XADD', KEYS[3], '*', 'payload', member,
      'bosun-orig-stream', KEYS[2], 'bosun-group', ARGV[5], 'bosun-consumer', ARGV[6],
      'bosun-error', why, 'bosun-error-kind', 'invalid', 'bosun-failed-at', ARGV[4])
    invalid = invalid + 1
  else
    redis.call('XADD', KEYS[2], '*', unpack(entry, 2))
  end
  redis.call('ZREM', KEYS[1], member)
end
return { #due, invalid }
"#;

/// Takes or renews a consumer-name lock: set when free or already ours, with a fresh TTL.
///
/// KEYS: lock key. ARGV: token, TTL in ms. Returns 1 when held, 0 when another holds it.
pub const LOCK: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Drops a consumer-name lock if it is still ours.
///
/// KEYS: lock key. ARGV: token. Returns 1 when dropped.
pub const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Removes consumers of the group that have nothing pending, have been idle at least the
/// given time and hold no name lock (no live process uses the name). Checked and removed in
/// one step, so a consumer that reads meanwhile is never removed with entries pending.
///
/// KEYS: stream. ARGV: group, idle threshold in ms, lock key prefix, own consumer name.
/// Returns how many were removed.
pub const FORGET: &str = r#"
local removed = 0
local threshold = tonumber(ARGV[2])
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do
    f[c[i]] = c[i + 1]
  end
  if f['name'] ~= ARGV[4] and tonumber(f['pending']) == 0 and tonumber(f['idle']) >= threshold
    and redis.call('EXISTS', ARGV[3] .. f['name']) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
"#;

/// A script and its SHA1, for EVALSHA inside pipelines.
#[derive(Clone)]
pub struct Lua {
    pub code: &'static str,
    pub hash: String,
}

impl Lua {
    pub fn new(code: &'static str) -> Self {
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

/// The single-active lease ([`super::lease`]): takes it when free, renews it when ours.
///
/// KEYS: lease, fence counter. ARGV: holder id, TTL in ms, the value we hold ("" if none).
/// Returns the lease's value when held (`<fence>:<holder>`), nil when another holds it.
pub const LEASE: &str = r#"
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[3] ~= '' and current == ARGV[3] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return current
  end
  return false
end
local value = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
if redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2]) then
  return value
end
return false
"#;

/// The scripts, hashed once.
#[derive(Clone)]
pub struct Scripts {
    pub retry: Lua,
    pub dead_letter: Lua,
    pub release: Lua,
    pub move_due: Lua,
    pub lock: Lua,
    pub unlock: Lua,
    pub forget: Lua,
    pub lease: Lua,
}

impl Default for Scripts {
    fn default() -> Self {
        Self {
            retry: Lua::new(RETRY),
            dead_letter: Lua::new(DEAD_LETTER),
            release: Lua::new(RELEASE),
            move_due: Lua::new(MOVE_DUE),
            lock: Lua::new(LOCK),
            unlock: Lua::new(UNLOCK),
            forget: Lua::new(FORGET),
            lease: Lua::new(LEASE),
        }
    }
}

impl Scripts {
    /// Loads every script into the server's cache: at start, and after a `NOSCRIPT` (a
    /// restarted server, or a replica promoted on a cluster, has an empty cache). One command
    /// per script: on a cluster, `SCRIPT LOAD` goes to every node, a pipeline to one.
    pub async fn load(&self, ops: &super::Ops) -> redis::RedisResult<()> {
        for script in [
            &self.retry,
            &self.dead_letter,
            &self.release,
            &self.move_due,
            &self.lock,
            &self.unlock,
            &self.forget,
            &self.lease,
        ] {
            ops.query::<redis::Value>(redis::cmd("SCRIPT").arg("LOAD").arg(script.code))
                .await?;
        }
        Ok(())
    }

    /// Runs `script` with EVALSHA, loading the scripts first when the server lost them.
    pub async fn run<T: redis::FromRedisValue>(
        &self,
        ops: &super::Ops,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match ops.query(cmd).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                self.load(ops).await?;
                ops.query(cmd).await
            }
            other => other,
        }
    }
}
