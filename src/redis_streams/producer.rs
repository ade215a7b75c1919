//! The producer: XADD, with `MAXLEN ~ N` when a cap is configured, pipelined per batch.

use async_trait::async_trait;
use redis::Value;

use super::{Ops, RedisStreamsError, client_name};
use crate::config::{EntryFormat, RedisBrokerConfig};
use crate::publish::{OutgoingMessage, PublishError, Publisher};

/// Publishes [`OutgoingMessage`]s as stream entries (see [`fields`] for the layout).
#[derive(Clone)]
pub struct RedisPublisher {
    ops: Ops,
    /// Approximate cap on each target stream's length; `None` lets streams grow.
    maxlen: Option<usize>,
    /// How messages are laid out as entries: the broker's `entry_format`.
    format: EntryFormat,
}

impl RedisPublisher {
    /// Connects to `broker`; `name` labels the connection in `CLIENT LIST`.
    pub async fn connect(
        broker: &RedisBrokerConfig,
        name: &str,
        maxlen: Option<usize>,
    ) -> Result<Self, RedisStreamsError> {
        let ops = Ops::connect(broker, &client_name(name, "publish")).await?;
        Ok(Self {
            ops,
            maxlen,
            format: broker.format.clone(),
        })
    }
}

/// Starts an XADD to `stream`, trimming approximately when `maxlen` is set.
fn xadd(stream: &str, maxlen: Option<usize>) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*");
    cmd
}

/// A failed XADD as a [`PublishError`]: lost connections and the server's "not now" answers
/// are [`PublishError::Connection`] (the caller keeps the message and tries again without
/// using an attempt); anything else is a refusal of this message.
pub(crate) fn publish_error(e: &redis::RedisError) -> PublishError {
    if super::is_transient(e) {
        PublishError::Connection(e.to_string())
    } else {
        PublishError::Rejected(e.to_string())
    }
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>> {
        let (messages, _spans) =
            crate::publish::traced(messages, crate::trace_context::System::Redis);
        let messages = messages.as_ref();
        let mut results: Vec<Result<(), PublishError>> = Vec::with_capacity(messages.len());
        // Each XADD with its stream: on a cluster, one pipeline per slot.
        let mut commands = Vec::with_capacity(messages.len());
        // Positions in `results` of the messages that went into the pipeline.
        let mut sent = Vec::with_capacity(messages.len());
        for message in messages {
            if message.destination.is_empty() {
                results.push(Err(PublishError::Unroutable("no stream given".into())));
                continue;
            }
            let mut cmd = xadd(&message.destination, self.maxlen);
            match super::formats::write(&mut cmd, message, &self.format) {
                Ok(()) => {
                    commands.push((message.destination.clone(), cmd));
                    sent.push(results.len());
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if sent.is_empty() {
            return results;
        }
        let replies = self.ops.query_each(commands).await;
        for (slot, reply) in sent.iter().zip(replies) {
            results[*slot] = match reply {
                Ok(Value::BulkString(_) | Value::SimpleString(_)) => Ok(()),
                Ok(other) => Err(PublishError::Rejected(format!(
                    "unexpected XADD reply {other:?}"
                ))),
                Err(e) => Err(publish_error(&e)),
            };
        }
        results
    }
}

/// Adds one entry with the given fields to `stream` and returns its id: `bosun publish` for
/// redis brokers. The broker's id field (`message_id` by default) is added with a UUID v7
/// when `fields` has none, so the entry has a stable id like every other message bosun sends.
pub async fn publish_fields(
    broker: &RedisBrokerConfig,
    stream: &str,
    entry_fields: &[(String, Vec<u8>)],
    maxlen: Option<usize>,
) -> Result<String, RedisStreamsError> {
    if entry_fields.is_empty() {
        return Err(RedisStreamsError::Reply {
            command: "XADD",
            detail: "an entry needs at least one field".into(),
        });
    }
    let ops = Ops::connect(broker, &client_name("cli", "publish")).await?;
    let mut cmd = xadd(stream, maxlen);
    for (name, value) in entry_fields {
        cmd.arg(name).arg(value.as_slice());
    }
    let id_field = &broker.format.id_field;
    if !entry_fields.iter().any(|(name, _)| name == id_field) {
        cmd.arg(id_field).arg(uuid::Uuid::now_v7().to_string());
    }
    ops.query::<String>(&cmd)
        .await
        .map_err(RedisStreamsError::command("XADD"))
}
