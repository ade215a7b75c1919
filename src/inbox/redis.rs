//! The redis inbox: one key per (consumer, key) on a redis server, in two phases.
//!
//! A claim sets `c:<token>` with the lease as its TTL, only where no value is (a script that
//! also tells a done value from a live claim); done replaces it with `d:<token>` and the
//! window as TTL; a retry or release deletes it only while it still holds the same token. A
//! claim whose holder died simply expires after its lease, and the next claim takes the key
//! (counted as a new claim: the expired one left nothing to count). The out-of-process
//! completion (`bosun_inbox_complete`) is postgres only.

use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use redis::Script;
use redis::aio::ConnectionLike;
use tokio::sync::OnceCell;

use super::{Claimed, InboxError, Record, Store};

const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  return 'new'
end
if string.sub(v, 1, 2) == 'd:' then return 'done' end
return 'busy'
";

// Done also where the claim expired and no one took the key since: the handler's effect
// happened, so a repeat must be a duplicate.
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and v ~= 'c:' .. ARGV[1] and v ~= 'd:' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'd:' .. ARGV[1], 'PX', ARGV[2])
return 1
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Opens the store's connection (to one server, a cluster or the primary sentinels name):
/// every key of a call is one key, so any topology serves.
pub type Connect<C> = Box<dyn Fn() -> BoxFuture<'static, Result<C, InboxError>> + Send + Sync>;

/// The redis [`Store`], over a connection that reconnects by itself.
pub struct RedisStore<C> {
    connect: Connect<C>,
    conn: OnceCell<C>,
    /// `bosun:inbox:<inbox>:`: the prefix of every key of this inbox.
    prefix: String,
    lease: Duration,
    window: Duration,
    claim: Script,
    complete: Script,
    release: Script,
}

impl<C: ConnectionLike + Clone + Send + Sync> RedisStore<C> {
    /// A store on the connection `connect` opens; it is opened on first use.
    pub fn new(connect: Connect<C>, inbox: &str, lease: Duration, window: Duration) -> Self {
        Self {
            connect,
            conn: OnceCell::new(),
            prefix: format!("bosun:inbox:{inbox}:"),
            lease,
            window,
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        }
    }

    /// The record's key: the consumer's name is length-prefixed, so no consumer and key pair
    /// can spell another's.
    pub fn key(&self, consumer: &str, key: &str) -> String {
        format!("{}{}:{consumer}:{key}", self.prefix, consumer.len())
    }

    async fn conn(&self) -> Result<C, InboxError> {
        Ok(self
            .conn
            .get_or_try_init(|| (self.connect)())
            .await?
            .clone())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl<C: ConnectionLike + Clone + Send + Sync + 'static> Store for RedisStore<C> {
    async fn claim(&self, consumer: &str, key: &str, token: &str) -> Result<Claimed, InboxError> {
        let mut conn = self.conn().await?;
        let state: String = self
            .claim
            .key(self.key(consumer, key))
            .arg(token)
            .arg(millis(self.lease))
            .invoke_async(&mut conn)
            .await?;
        Ok(match state.as_str() {
            "new" => Claimed::New,
            "done" => Claimed::Done,
            _ => Claimed::Busy,
        })
    }

    async fn complete(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError> {
        let mut conn = self.conn().await?;
        let done: i64 = self
            .complete
            .key(self.key(consumer, key))
            .arg(token)
            .arg(millis(self.window))
            .invoke_async(&mut conn)
            .await?;
        if done == 0 {
            return Err(InboxError::NotHeld {
                consumer: consumer.to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(())
    }

    async fn release(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError> {
        let mut conn = self.conn().await?;
        let _: i64 = self
            .release
            .key(self.key(consumer, key))
            .arg(token)
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn show(&self, consumer: &str, key: &str) -> Result<Option<Record>, InboxError> {
        let mut conn = self.conn().await?;
        let value: Option<String> = redis::cmd("GET")
            .arg(self.key(consumer, key))
            .query_async(&mut conn)
            .await?;
        Ok(value.map(|v| {
            let (status, token) = match v.split_once(':') {
                Some(("d", token)) => ("done", token),
                Some((_, token)) => ("claimed", token),
                None => ("claimed", v.as_str()),
            };
            Record {
                status: status.into(),
                token: token.into(),
                claimed_at: "-".into(),
                done_at: None,
                takeovers: 0,
            }
        }))
    }

    async fn forget(&self, consumer: &str, key: &str) -> Result<bool, InboxError> {
        let mut conn = self.conn().await?;
        let gone: i64 = redis::cmd("DEL")
            .arg(self.key(consumer, key))
            .query_async(&mut conn)
            .await?;
        Ok(gone > 0)
    }
}
