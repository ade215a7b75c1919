//! Opening connections to RabbitMQ.
//!
//! Each component opens its own connection, named `<name>/<component>` (the broker's
//! `connection_name`, else the service name), so the management UI and `rabbitmqctl` show
//! which part of which daemon holds it.

use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::LongString;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use super::AmqpError;
use crate::config::AmqpBrokerConfig;

/// How long opening a connection (TCP, TLS and the AMQP handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The connection name a component shows to the broker.
pub fn connection_name(broker: &AmqpBrokerConfig, service: &str, component: &str) -> String {
    let base = broker.connection_name.as_deref().unwrap_or(service);
    format!("{base}/{component}")
}

/// Opens a connection to `broker` under `name`, to the first of its addresses (`urls`, in a
/// fresh shuffled order each time) that answers.
pub async fn connect(broker: &AmqpBrokerConfig, name: &str) -> Result<Connection, AmqpError> {
    connect_node(broker, None, name).await.map(|(c, _)| c)
}

/// [`connect`] for the `[brokers.NAME]` `broker_name`: the node it reached is logged and
/// exported as `bosun_broker_node{broker, node}` (1 for that node, 0 for the broker's
/// others).
pub async fn connect_for(
    broker: &AmqpBrokerConfig,
    broker_name: &str,
    name: &str,
) -> Result<Connection, AmqpError> {
    connect_node(broker, Some(broker_name), name)
        .await
        .map(|(c, _)| c)
}

/// `host:port` of an address: the `node` label, without credentials or virtual host.
pub fn node_label(url: &url::Url) -> String {
    let port = url
        .port()
        .unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
    format!("{}:{port}", url.host_str().unwrap_or(""))
}

async fn connect_node(
    broker: &AmqpBrokerConfig,
    broker_name: Option<&str>,
    name: &str,
) -> Result<(Connection, String), AmqpError> {
    let mut order: Vec<&crate::secret::SecretUrl> = if broker.urls.is_empty() {
        vec![&broker.url]
    } else {
        broker.urls.iter().collect()
    };
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rand::rng());
    let mut failures = Vec::new();
    for url in &order {
        let node = node_label(url.url());
        match connect_url(broker, url, name).await {
            Ok(connection) => {
                if order.len() > 1 {
                    tracing::info!(broker = broker_name.unwrap_or(""), node = %node, connection = %name, "connected to RabbitMQ node");
                }
                if let Some(broker_name) = broker_name {
                    for other in &order {
                        let label = node_label(other.url());
                        let value = if label == node { 1.0 } else { 0.0 };
                        metrics::gauge!("bosun_broker_node", "broker" => broker_name.to_owned(), "node" => label).set(value);
                    }
                }
                return Ok((connection, node));
            }
            Err(e) => {
                if order.len() > 1 {
                    tracing::warn!(broker = broker_name.unwrap_or(""), node = %node, error = %e, "cannot connect to RabbitMQ node; trying the next");
                }
                failures.push(e);
            }
        }
    }
    match failures.len() {
        1 => Err(failures.remove(0)),
        _ => Err(AmqpError::Connect {
            url: order
                .iter()
                .map(|u| u.redacted())
                .collect::<Vec<_>>()
                .join(", "),
            reason: failures
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// Opens a connection to the one address `url` of `broker`.
async fn connect_url(
    broker: &AmqpBrokerConfig,
    url: &crate::secret::SecretUrl,
    name: &str,
) -> Result<Connection, AmqpError> {
    let redacted = url.redacted();
    let mut uri: AMQPUri = url
        .expose()
        .parse()
        .map_err(|e: String| AmqpError::Connect {
            url: redacted.clone(),
            reason: format!("invalid URL: {e}"),
        })?;
    if let Some(heartbeat) = broker.heartbeat {
        uri.query.heartbeat = Some(heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(CONNECT_TIMEOUT.as_millis() as u64);
    }
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(name.as_bytes().to_vec()));
    let mut builder = DefaultConnectionBuilder::new()
        .map_err(|e| AmqpError::Connect {
            url: redacted.clone(),
            reason: e.to_string(),
        })?
        .with_uri(uri)
        .with_properties(properties);
    if let Some(tls) = tls_config(broker).await? {
        builder = builder.with_tls_config(tls);
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, builder.connect()).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(AmqpError::Connect {
            url: redacted,
            reason: e.to_string(),
        }),
        Err(_) => Err(AmqpError::Connect {
            url: redacted,
            reason: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

async fn read(path: &std::path::Path) -> Result<Vec<u8>, AmqpError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| AmqpError::TlsFile {
            path: path.display().to_string(),
            source,
        })
}

async fn tls_config(broker: &AmqpBrokerConfig) -> Result<Option<OwnedTLSConfig>, AmqpError> {
    let Some(tls) = &broker.tls else {
        return Ok(None);
    };
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(String::from_utf8_lossy(&read(path).await?).into_owned()),
        None => None,
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert).await?,
            key: read(key).await?,
        }),
        _ => None,
    };
    Ok(Some(OwnedTLSConfig {
        identity,
        cert_chain,
    }))
}
