//! One connection type for every topology a redis broker can have: a single server, a Redis
//! Cluster, or a primary found through Sentinel.
//!
//! Consumers, producers, relays, the dead-letter path, the shared rate budget and the redis
//! inbox all talk through a [`Conn`], so none of them cares where the keys live:
//!
//! - a single server: a managed connection that reconnects by itself;
//! - a cluster: the `redis` crate's cluster client, which follows `MOVED`/`ASK`, refreshes
//!   its slot map after a failover or resharding, and retries meanwhile. Every script and
//!   pipeline bosun sends touches keys of one slot (see [`crate::config::redis_keys`]);
//! - sentinel: a connection to the primary the sentinels name; when it fails, or the node
//!   answers `READONLY` (it was demoted), the sentinels are asked again on the next command.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value,
};

use super::RedisStreamsError;
use crate::config::{RedisBrokerConfig, RedisTopology, redis_keys};

/// How long to wait for a TCP connection to a node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to a redis broker, whatever its topology. Cloning is cheap and shares the
/// underlying connection.
#[derive(Clone)]
pub enum Conn {
    /// A single server through a connection that reconnects by itself.
    Managed(ConnectionManager),
    /// A single server on a plain multiplexed connection (blocking reads: the caller
    /// reconnects).
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
    Sentinel(SentinelConn),
}

/// What a connection is for: its response timeout, and whether it may be shared.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// Every command but blocking reads: shared, reconnecting by itself.
    Ops { response_timeout: Duration },
    /// Blocking reads that wait up to `block`: a connection of its own.
    Reader { block: Duration },
}

impl Purpose {
    fn response_timeout(self) -> Duration {
        match self {
            Purpose::Ops { response_timeout } => response_timeout,
            Purpose::Reader { block } => block + Duration::from_secs(5),
        }
    }
}

/// Opens a connection to `broker` for `purpose`.
pub async fn connect(
    broker: &RedisBrokerConfig,
    purpose: Purpose,
) -> Result<Conn, RedisStreamsError> {
    let timeout = purpose.response_timeout();
    match &broker.topology {
        RedisTopology::Single => {
            let client = super::client(broker)?;
            match purpose {
                Purpose::Ops { .. } => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(2)
                        .set_max_delay(Duration::from_secs(2));
                    client
                        .get_connection_manager_with_config(config)
                        .await
                        .map(Conn::Managed)
                        .map_err(connect_error(broker))
                }
                Purpose::Reader { .. } => {
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(timeout));
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map(Conn::Plain)
                        .map_err(connect_error(broker))
                }
            }
        }
        RedisTopology::Cluster { nodes } => {
            let mut builder = redis::cluster::ClusterClientBuilder::new(
                nodes.iter().map(|n| n.expose().to_owned()),
            )
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(timeout)
            // A failover takes the cluster a few seconds (node timeout, then the vote):
            // commands wait for it rather than fail at once.
            .retries(8)
            .min_retry_wait(100)
            .max_retry_wait(2_000);
            if let Some(certs) = super::tls_certificates(broker)? {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(|source| RedisStreamsError::Url {
                url: broker.url.redacted(),
                source,
            })?;
            client
                .get_async_connection()
                .await
                .map(Conn::Cluster)
                .map_err(connect_error(broker))
        }
        RedisTopology::Sentinel { master, nodes } => {
            let conn = SentinelConn::new(broker, master, nodes, timeout)?;
            conn.current().await.map_err(connect_error(broker))?;
            Ok(Conn::Sentinel(conn))
        }
    }
}

/// Turns a failure to connect into an error that names the server without its credentials.
pub(crate) fn connect_error(
    broker: &RedisBrokerConfig,
) -> impl FnOnce(RedisError) -> RedisStreamsError {
    let url = broker.url.redacted();
    move |source| RedisStreamsError::Connect { url, source }
}

impl Conn {
    /// Runs `cmd` on the node that holds `key`'s slot (its primary): for commands about a
    /// connection (`CLIENT ID`, `CLIENT UNBLOCK`) that must reach the node a stream lives
    /// on. Off a cluster, the one server.
    pub async fn query_on_node_of<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Cluster(conn) => {
                let slot = redis_keys::hash_slot(key.as_bytes());
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                let value = conn.route_command(cmd.clone(), routing).await?;
                T::from_redis_value(value).map_err(Into::into)
            }
            other => cmd.query_async(other).await,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Managed(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => Box::pin(c.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Managed(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => Box::pin(c.commands(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Managed(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(_) => 0,
            Conn::Sentinel(c) => c.db,
        }
    }
}

/// A connection to the primary the sentinels name, asked for again after the connection
/// failed or the node said it is a replica now.
#[derive(Clone)]
pub struct SentinelConn {
    sentinel: Arc<tokio::sync::Mutex<SentinelClient>>,
    /// The connection to the current primary; `None` until connected, and after a failure.
    primary: Arc<Mutex<Option<MultiplexedConnection>>>,
    config: AsyncConnectionConfig,
    db: i64,
}

impl SentinelConn {
    fn new(
        broker: &RedisBrokerConfig,
        master: &str,
        nodes: &[crate::secret::SecretUrl],
        response_timeout: Duration,
    ) -> Result<Self, RedisStreamsError> {
        let url_error = |source| RedisStreamsError::Url {
            url: broker.url.redacted(),
            source,
        };
        let infos = nodes
            .iter()
            .map(|n| n.expose().into_connection_info())
            .collect::<Result<Vec<_>, _>>()
            .map_err(url_error)?;
        // The primary is reached with the sentinels' credentials and database.
        let first = infos.first().cloned().ok_or_else(|| {
            url_error(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no sentinel node",
            )))
        })?;
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(first.redis_settings().clone());
        if broker.url.url().scheme() == "rediss" {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        let db = first.redis_settings().db();
        let sentinel = SentinelClient::build(infos, master, Some(node), SentinelServerType::Master)
            .map_err(url_error)?;
        Ok(Self {
            sentinel: Arc::new(tokio::sync::Mutex::new(sentinel)),
            primary: Arc::new(Mutex::new(None)),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(response_timeout)),
            db,
        })
    }

    /// The connection to the primary, asking the sentinels for it when there is none.
    async fn current(&self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(conn) = self.lock().clone() {
            return Ok(conn);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another caller may have connected while this one waited.
        if let Some(conn) = self.lock().clone() {
            return Ok(conn);
        }
        let client = sentinel.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        tracing::info!(primary = %client.get_connection_info().addr(), "redis sentinel named the primary; connected");
        *self.lock() = Some(conn.clone());
        Ok(conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.primary.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the primary after an error that says it is gone or demoted.
    fn note<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_unrecoverable_error()
                || e.code() == Some("READONLY"))
        {
            *self.lock() = None;
        }
        result
    }

    async fn command(&self, cmd: &Cmd) -> redis::RedisResult<Value> {
        let mut conn = self.current().await?;
        self.note(conn.req_packed_command(cmd).await)
    }

    async fn commands(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let mut conn = self.current().await?;
        let result = conn.req_packed_commands(pipeline, offset, count).await;
        // A pipeline's server errors are in its values: READONLY shows up there.
        if let Ok(values) = &result
            && values
                .iter()
                .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY"))
        {
            *self.lock() = None;
        }
        self.note(result)
    }
}
