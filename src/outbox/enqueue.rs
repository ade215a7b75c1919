//! The application's side of the outbox: one row inserted in the application's own
//! transaction, to be published now or at a time.
//!
//! ```no_run
//! # async fn order(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use bosun::outbox::{Message, enqueue};
//!
//! let mut tx = pool.begin().await?;
//! // ... the business rows, in the same transaction ...
//! let row = enqueue(
//!     &mut tx,
//!     &Message::new("order.created", br#"{"order":42}"#.to_vec())
//!         .destination("shop")
//!         .content_type("application/json")
//!         .deliver_in(std::time::Duration::from_secs(15 * 60)),
//! )
//! .await?;
//! tx.commit().await?;
//! println!("message {} goes out at {}", row.message_id, row.deliver_at);
//! # Ok(()) }
//! ```
//!
//! A scheduled row is an ordinary row whose `next_attempt_at` is its due time: every claim
//! asks for `next_attempt_at <= now()`, so no relay takes it earlier, and the relay sleeps
//! until the earliest due row of its table (see [`super::relay`]).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::OutboxError;
use crate::config::valid_sql_identifier;

/// The table `[outboxes.*]` reads when it names none.
pub const DEFAULT_TABLE: &str = "bosun_outbox";

/// One outbox row to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The outbox table (a plain, optionally schema-qualified, lowercase identifier).
    pub table: String,
    /// The stable id of the published message; a new UUID v7 when not set.
    pub message_id: uuid::Uuid,
    /// Exchange (amqp) or stream (redis); `None` means the outbox's configured default.
    pub destination: Option<String>,
    /// The routing key (amqp; ignored by redis).
    pub routing_key: String,
    /// Application headers (amqp) or entry fields (redis), as a JSON object.
    pub headers: serde_json::Map<String, serde_json::Value>,
    pub payload: Vec<u8>,
    pub content_type: Option<String>,
    /// With `ordering = "per_key"`, rows of one key go out one after another, in order. A
    /// scheduled row holds back the later rows of its key until it has gone out.
    pub partition_key: Option<String>,
    /// When to publish: `None` is as soon as the transaction commits (or after `delay`).
    pub deliver_at: Option<DateTime<Utc>>,
    /// Publish this long after the transaction's `now()`, by the database's clock (so a
    /// clock of this host that is off cannot make the message early or late); used when
    /// `deliver_at` is `None`.
    pub delay: Option<std::time::Duration>,
}

impl Message {
    /// A message for [`DEFAULT_TABLE`] with a fresh id, no headers, sent as soon as committed.
    pub fn new(routing_key: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            table: DEFAULT_TABLE.to_owned(),
            message_id: uuid::Uuid::now_v7(),
            destination: None,
            routing_key: routing_key.into(),
            headers: serde_json::Map::new(),
            payload: payload.into(),
            content_type: None,
            partition_key: None,
            deliver_at: None,
            delay: None,
        }
    }

    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    pub fn message_id(mut self, id: uuid::Uuid) -> Self {
        self.message_id = id;
        self
    }

    pub fn destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.partition_key = Some(key.into());
        self
    }

    /// Publish at `at`, not before.
    pub fn deliver_at(mut self, at: DateTime<Utc>) -> Self {
        self.deliver_at = Some(at);
        self.delay = None;
        self
    }

    /// Publish `delay` after the transaction's `now()` by the database's clock, not before.
    pub fn deliver_in(mut self, delay: std::time::Duration) -> Self {
        self.delay = Some(delay);
        self.deliver_at = None;
        self
    }
}

/// The row [`enqueue`] inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The row's `id`.
    pub id: i64,
    pub message_id: uuid::Uuid,
    /// When it becomes due (`now()` of the transaction for an immediate message, that plus
    /// the delay for a delayed one).
    pub deliver_at: DateTime<Utc>,
}

/// Inserts `message` on `conn`, normally the application's open transaction (`&mut tx`), so
/// the row commits or rolls back with the business rows. The table's insert trigger wakes
/// the relay at commit.
pub async fn enqueue(conn: &mut PgConnection, message: &Message) -> Result<Enqueued, OutboxError> {
    if !valid_sql_identifier(&message.table) {
        return Err(OutboxError::InvalidIdentifier(message.table.clone()));
    }
    let statement = format!(
        "INSERT INTO {} (message_id, destination, routing_key, headers, payload, content_type,
                         partition_key, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 coalesce($8, now() + make_interval(secs => $9), now()))
         RETURNING id, next_attempt_at",
        message.table
    );
    let (id, deliver_at): (i64, DateTime<Utc>) = sqlx::query_as(&statement)
        .bind(message.message_id)
        .bind(&message.destination)
        .bind(&message.routing_key)
        .bind(serde_json::Value::Object(message.headers.clone()))
        .bind(&message.payload)
        .bind(&message.content_type)
        .bind(&message.partition_key)
        .bind(message.deliver_at)
        .bind(message.delay.map(|d| d.as_secs_f64()))
        .fetch_one(conn)
        .await?;
    Ok(Enqueued {
        id,
        message_id: message.message_id,
        deliver_at,
    })
}
