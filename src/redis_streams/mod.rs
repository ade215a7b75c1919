//! Redis Streams: the consumer-group consumer and the producer.
//!
//! - [`fields`]: how a stream entry maps to a [`Message`](crate::Message) and back (the body
//!   is the `payload` field, other fields are headers).
//! - [`formats`]: the other entry formats (`entry_format`): flat entries and the shapes
//!   Dapr, Redpanda Connect and Watermill write.
//! - [`producer`]: XADD with approximate MAXLEN, pipelined per batch; the
//!   [`Publisher`](crate::publish::Publisher) for outbox relays and `bosun publish`.
//! - [`consumer`]: the consumer-group component: reads its own pending entries, then new
//!   ones; runs handlers concurrently; settles with batched XACK, or schedules a retry or
//!   dead-letters atomically with the XACK ([`scripts`]).
//! - [`claim`]: takes over entries another consumer left pending too long (XAUTOCLAIM).
//! - [`retry`]: the mover that re-adds due retries from `<stream>:retry` to the stream.
//!
//! Connections ([`connection`]: one server, a cluster or sentinel): the blocking XREADGROUP
//! has a connection of its own whose response timeout is longer than `block`; every other
//! command goes through one shared connection ([`Ops`]) that reconnects by itself. Both carry
//! a client name (`CLIENT SETNAME`) so an operator can find them in `CLIENT LIST`.

pub mod budget;
pub mod claim;
pub mod connection;
pub mod consumer;
pub mod dispatch;
pub mod fields;
pub mod formats;
pub(crate) mod lease;
pub mod producer;
pub mod retry;
pub mod scripts;
pub mod trim;

#[cfg(test)]
mod live_tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::{Cmd, FromRedisValue, Pipeline, RedisError};

use crate::config::RedisBrokerConfig;

pub use connection::{Conn, Purpose};
pub use consumer::{RedisConsumer, RedisConsumerSpec};
pub use producer::RedisPublisher;

/// Errors of the Redis module.
#[derive(Debug, thiserror::Error)]
pub enum RedisStreamsError {
    /// The URL cannot be used (bad scheme, unusable TLS material); the URL is shown redacted.
    #[error("invalid redis broker URL {url}: {source}")]
    Url { url: String, source: RedisError },
    /// A TLS file (`ca_file`, `cert_file`, `key_file`) cannot be read.
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to redis at {url}: {source}")]
    Connect { url: String, source: RedisError },
    /// A command failed (connection lost, timeout, server error).
    #[error("redis {command} failed: {source}")]
    Command {
        command: &'static str,
        source: RedisError,
    },
    /// The server answered something this module does not understand.
    #[error("unexpected redis reply to {command}: {detail}")]
    Reply {
        command: &'static str,
        detail: String,
    },
    /// Another live process holds this consumer name in the group (its name lock is held
    /// and renewed): reading under the same name would mix up both processes' pending
    /// entries.
    #[error(
        "consumer name `{consumer}` is in use by another live process in group `{group}` of stream `{stream}`; give each process its own name (`consumer`, or $BOSUN_CONSUMER_NAME)"
    )]
    NameInUse {
        consumer: String,
        group: String,
        stream: String,
    },
    /// `single_active`: the lease could not be renewed in time, or another process took it.
    #[error("lost the single-active lease of group `{group}` on stream `{stream}`; standing by")]
    LeaseLost { group: String, stream: String },
}

impl RedisStreamsError {
    pub(crate) fn command(command: &'static str) -> impl FnOnce(RedisError) -> RedisStreamsError {
        move |source| RedisStreamsError::Command { command, source }
    }
}

/// How long the managed connection waits for a reply: generous, since a settlement pipeline
/// can carry thousands of commands, but bounded so a dead server is noticed.
pub const OPS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client name Redis accepts (no spaces or newlines), identifying bosun's role.
pub fn client_name(consumer: &str, role: &str) -> String {
    let clean: String = consumer
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    format!("bosun:{clean}:{role}")
}

/// A client for `broker`'s one server (`url`). `rediss://` connects with TLS: the server is
/// verified against `tls.ca_file` when given (else the system's roots), and
/// `tls.cert_file`/`tls.key_file` are presented as the client certificate when the server
/// asks for one.
pub fn client(broker: &RedisBrokerConfig) -> Result<redis::Client, RedisStreamsError> {
    let url_error = |source| RedisStreamsError::Url {
        url: broker.url.redacted(),
        source,
    };
    match tls_certificates(broker)? {
        None => redis::Client::open(broker.url.expose()).map_err(url_error),
        Some(certs) => redis::Client::build_with_tls(broker.url.expose(), certs).map_err(url_error),
    }
}

/// The TLS material of `broker`'s `tls` section, when it has one.
pub(crate) fn tls_certificates(
    broker: &RedisBrokerConfig,
) -> Result<Option<redis::TlsCertificates>, RedisStreamsError> {
    let Some(tls) = &broker.tls else {
        return Ok(None);
    };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| RedisStreamsError::TlsFile {
            path: path.display().to_string(),
            source,
        })
    };
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    let root_cert = tls.ca_file.as_deref().map(read).transpose()?;
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The shared connection for everything but the blocking read. It reconnects by itself;
/// the client name is set again on the first command after a connection error, since a
/// fresh socket starts unnamed.
#[derive(Clone)]
pub struct Ops {
    conn: Conn,
    name: Arc<str>,
    /// Set when the last command failed on the connection: the next one renames it first.
    rename: Arc<AtomicBool>,
}

impl Ops {
    pub async fn connect(
        broker: &RedisBrokerConfig,
        name: &str,
    ) -> Result<Self, RedisStreamsError> {
        let conn = connection::connect(
            broker,
            Purpose::Ops {
                response_timeout: OPS_RESPONSE_TIMEOUT,
            },
        )
        .await?;
        let ops = Self {
            conn,
            name: name.into(),
            rename: Arc::new(AtomicBool::new(true)),
        };
        ops.ensure_name()
            .await
            .map_err(connection::connect_error(broker))?;
        Ok(ops)
    }

    /// The connection itself, for commands that must reach a given node
    /// ([`Conn::query_on_node_of`]).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    async fn ensure_name(&self) -> redis::RedisResult<()> {
        if self.rename.load(Ordering::Relaxed) {
            let mut conn = self.conn.clone();
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(&*self.name)
                .exec_async(&mut conn)
                .await
                .inspect_err(|e| self.note(e))?;
            self.rename.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    fn note(&self, e: &RedisError) {
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_unrecoverable_error()
        {
            self.rename.store(true, Ordering::Relaxed);
        }
    }

    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> redis::RedisResult<T> {
        self.ensure_name().await?;
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .inspect_err(|e| self.note(e))
    }

    /// Sends `commands`, each with the key that places it, pipelined; each command's own
    /// result, in order (a failed pipeline fails each of its commands). On a cluster a
    /// pipeline goes to one node, so there is one per hash slot, sent at once.
    pub async fn query_each(
        &self,
        commands: Vec<(String, Cmd)>,
    ) -> Vec<redis::RedisResult<redis::Value>> {
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (i, (key, _)) in commands.iter().enumerate() {
            let slot = if matches!(self.conn, Conn::Cluster(_)) {
                crate::config::redis_keys::hash_slot(key.as_bytes())
            } else {
                0
            };
            match groups.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, members)) => members.push(i),
                None => groups.push((slot, vec![i])),
            }
        }
        let sends = groups.iter().map(|(_, members)| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for i in members {
                pipe.add_command(commands[*i].1.clone());
            }
            async move {
                self.query_pipe::<Vec<redis::RedisResult<redis::Value>>>(&pipe)
                    .await
            }
        });
        let replies = futures::future::join_all(sends).await;
        let mut results: Vec<Option<redis::RedisResult<redis::Value>>> =
            (0..commands.len()).map(|_| None).collect();
        for ((_, members), reply) in groups.iter().zip(replies) {
            match reply {
                Ok(values) => {
                    let mut values = values.into_iter();
                    for i in members {
                        results[*i] = values.next();
                    }
                }
                Err(e) => {
                    for i in members {
                        results[*i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(RedisError::from((
                        redis::ErrorKind::Io,
                        "no reply for this command",
                    )))
                })
            })
            .collect()
    }

    pub async fn query_pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> redis::RedisResult<T> {
        self.ensure_name().await?;
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn)
            .await
            .inspect_err(|e| self.note(e))
    }
}

/// A connection of its own for blocking reads: its response timeout exceeds `block`, and
/// nothing else queues behind a read that waits.
pub async fn connect_reader(
    broker: &RedisBrokerConfig,
    name: &str,
    block: Duration,
) -> Result<Conn, RedisStreamsError> {
    let mut conn = connection::connect(broker, Purpose::Reader { block }).await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .exec_async(&mut conn)
        .await
        .map_err(connection::connect_error(broker))?;
    Ok(conn)
}

/// Server error codes that mean "not now" rather than "never": out of memory
/// (`maxmemory`), loading its dataset, a replica or a demoted primary, a busy script, a
/// primary or cluster that is down or resharding, a primary refusing writes because it
/// cannot persist (`MISCONF`) or has too few replicas (`NOREPLICAS`).
const TRANSIENT_CODES: &[&str] = &[
    "MISCONF",
    "NOREPLICAS",
    "OOM",
    "LOADING",
    "READONLY",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
];

/// Whether the same command may succeed later unchanged: the connection failed, or the
/// server answered with one of [`TRANSIENT_CODES`].
pub fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.code().is_some_and(|code| TRANSIENT_CODES.contains(&code))
}

/// Milliseconds since the Unix epoch by the local clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
