//! RabbitMQ: the consumer, its retry topology, and the confirming publisher.
//!
//! - [`connection`] opens connections (TLS, heartbeat, a connection name per component);
//! - [`topology`] derives and declares a consumer's queues: `Q`, `Q.retry.<tier>`, `Q.dlq`;
//! - [`consumer`] is the supervised component that hands deliveries to a handler and settles
//!   each one only once its outcome is durable;
//! - [`publisher`] publishes with confirms awaited in a window, for retry copies, outbox
//!   relays, replay and `bosun publish`;
//! - [`headers`] converts AMQP header tables and builds the `bosun-*` failure headers.

pub mod connection;
pub mod consumer;
pub mod headers;
pub mod limits;
pub mod publisher;
pub mod topology;

#[cfg(test)]
mod live_tests;

pub use connection::connection_name;
pub use publisher::AmqpPublisher;
pub use topology::Topology;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::ShortString;

/// What can go wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker could not be reached or the connection broke.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// TLS material could not be read.
    #[error("cannot read TLS file {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    /// A queue (or exchange) exists with other arguments than the ones configured.
    #[error(
        "{what} `{name}` already exists with different arguments (PRECONDITION_FAILED): {detail}; delete it or change the configuration to match"
    )]
    PreconditionFailed {
        what: &'static str,
        name: String,
        detail: String,
    },
    /// `declare = false` and a queue or exchange the consumer needs is missing.
    #[error("{what} `{name}` does not exist and `declare = false`: {detail}")]
    Missing {
        what: &'static str,
        name: String,
        detail: String,
    },
    /// A name or value does not fit AMQP's 255-byte short strings.
    #[error("{what} is longer than 255 bytes: {value:?}")]
    TooLong { what: &'static str, value: String },
    /// Any other channel or protocol failure.
    #[error("{context}: {source}")]
    Channel {
        context: String,
        source: lapin::Error,
    },
}

impl AmqpError {
    /// Whether trying again with the same configuration can help (a broken connection can
    /// heal; a queue declared with other arguments cannot).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            AmqpError::PreconditionFailed { .. }
                | AmqpError::TooLong { .. }
                | AmqpError::TlsFile { .. }
        )
    }

    pub(crate) fn channel(context: impl Into<String>, source: lapin::Error) -> Self {
        AmqpError::Channel {
            context: context.into(),
            source,
        }
    }
}

/// The soft error code of a channel-closing protocol error (406, 404, ...), if that is what `e` is.
pub(crate) fn soft_error(e: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), amqp.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// A short string from outside input, refused (not truncated, not a panic) when too long.
pub(crate) fn short(what: &'static str, value: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(value).map_err(|_| AmqpError::TooLong {
        what,
        value: value.chars().take(64).collect(),
    })
}
