//! Dead-letter processors: read a dead-letter queue or stream, apply ordered rules (replay,
//! archive, drop, forward), and keep an archive in PostgreSQL that operators list, group,
//! replay and purge from the CLI and the admin HTTP API.
//!
//! - [`letter`] reads a dead letter: bosun's failure headers, RabbitMQ's `x-death`, the
//!   redis failure fields;
//! - [`rules`] picks the action (first match wins);
//! - [`group`] computes the failure group key;
//! - [`archive`] is the table: schema, insert, queries;
//! - [`copy`] builds replay and forward copies;
//! - [`processor`] is the [`Handler`](crate::Handler) that applies a decision and answers
//!   `Ack` only once its effect is durable, run by the ordinary amqp or redis consumer, plus
//!   the scheduler for delayed replays;
//! - [`ops`] is list / groups / show / replay / purge, shared by [`admin`] (HTTP) and
//!   `bosun dlq` (CLI);
//! - [`browse`] is the console's reading: filters, keyset pages, groups by any key;
//! - [`operations`] records replays and purges over a filter (rate, progress, cancel) and
//!   the audit trail, for the console, the admin API and the CLI alike.

pub mod admin;
pub mod archive;
pub mod browse;
pub mod copy;
pub mod group;
pub mod letter;
pub mod operations;
pub mod ops;
pub mod processor;
pub mod publishers;
pub mod rules;

#[cfg(test)]
mod live_tests;

use crate::publish::PublishError;

/// What can go wrong while handling or operating on dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The archive database failed; the dead letter stays at its source.
    #[error("archive database: {0}")]
    Database(#[from] sqlx::Error),
    /// A replay or forward copy was not confirmed.
    #[error("publish: {0}")]
    Publish(#[from] PublishError),
    /// The broker for a replay or forward cannot be used.
    #[error("broker `{broker}`: {message}")]
    Broker { broker: String, message: String },
    /// The inbox record of a replay's key could not be forgotten; the replay waits.
    #[error("inbox: {0}")]
    Inbox(#[from] crate::inbox::InboxError),
    /// A replay of a dead letter that names no original queue or stream.
    #[error("the dead letter names no original queue or stream to replay to")]
    NoDestination,

    /// No archived dead letter with this id (for the selected processors).
    #[error("no archived dead letter with id {0}")]
    NotFound(i64),
    /// The request cannot be served as asked (unknown processor, ambiguous archive).
    #[error("{0}")]
    Invalid(String),
}

impl DeadLetterError {
    /// Whether the same operation may succeed later without any change (a database or
    /// broker that is down), as opposed to one that never will (an unroutable target).
    pub fn is_transient(&self) -> bool {
        match self {
            DeadLetterError::Database(e) => !is_data_error(e),
            DeadLetterError::Broker { .. } | DeadLetterError::Inbox(_) => true,
            DeadLetterError::Publish(e) => e.is_transient(),
            DeadLetterError::NoDestination
            | DeadLetterError::NotFound(_)
            | DeadLetterError::Invalid(_) => false,
        }
    }
}

/// Whether PostgreSQL refused the data itself: SQLSTATE class 22 (data exception: a NUL in
/// text, a number out of range) or 23 (integrity constraint violation), or the value could
/// not be encoded. The same statement with the same data fails every time; anything else
/// (a connection lost, a table missing, a lock timeout) may pass later.
pub fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}

/// Metric names, listed in docs/metrics.md; described with the process-wide ones.
pub use crate::telemetry::dead_letter_metric as metric;
