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

/// Opens a connection to `broker` under `name`.
pub async fn connect(broker: &AmqpBrokerConfig, name: &str) -> Result<Connection, AmqpError> {
    let redacted = broker.url.redacted();
    let mut uri: AMQPUri = broker
        .url
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
