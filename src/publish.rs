//! The publishing interface shared by outbox relays, dead-letter replay and `bosun publish`:
//! a batch of messages goes out, and each gets its own confirmed-or-failed result.
//!
//! Implementations: the amqp publisher (confirms awaited in a window, `mandatory`, a returned
//! message is an error) and the redis producer (XADD with approximate MAXLEN).

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;

use crate::handler::HeaderValue;
use crate::trace_context::{self, Produced, System};

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// Exchange (amqp; "" is the default exchange) or stream (redis).
    pub destination: String,
    /// Routing key (amqp); ignored by redis.
    pub routing_key: String,
    /// Stable id; a UUID v7 is generated when the caller has none.
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    pub headers: BTreeMap<String, HeaderValue>,
    pub body: Bytes,
    /// Milliseconds since the Unix epoch; publishers stamp "now" when `None`.
    pub timestamp_ms: Option<u64>,
    /// How the message's PRODUCER span relates to the trace context its headers carry.
    pub trace: TraceLink,
}

/// How a message's PRODUCER span relates to the `traceparent` its headers carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TraceLink {
    /// A child of it (an outbox row's, written by the application; a forwarded message's),
    /// else of the current span: the trace goes on.
    #[default]
    Continue,
    /// A new trace linked to it: a replay is new work about an old message.
    NewLinked,
}

/// Opens each message's PRODUCER span (`send <destination>`) and puts the span's own
/// `traceparent`/`tracestate` on the message in place of what it carried, so the consumer's
/// span is the span's child. The spans end when dropped: after the confirms. While tracing is
/// off the messages are returned as they are and no span is opened.
pub fn traced(
    messages: &[OutgoingMessage],
    system: System,
) -> (std::borrow::Cow<'_, [OutgoingMessage]>, Vec<tracing::Span>) {
    if !trace_context::enabled() {
        return (std::borrow::Cow::Borrowed(messages), Vec::new());
    }
    let mut messages = messages.to_vec();
    let spans = messages
        .iter_mut()
        .map(|message| {
            let carried = trace_context::extract(|name| {
                message.headers.get(name).and_then(HeaderValue::as_text)
            });
            let (parent, link, root) = match message.trace {
                TraceLink::Continue => (carried, None, false),
                TraceLink::NewLinked => (None, carried, true),
            };
            let span = trace_context::producer_span(Produced {
                system,
                // The default exchange routes by queue name: that is where it goes.
                destination: if message.destination.is_empty() {
                    &message.routing_key
                } else {
                    &message.destination
                },
                message_id: Some(&message.message_id),
                parent,
                link,
                root,
            });
            let own = trace_context::headers_of(&span);
            if !own.is_empty() {
                message
                    .headers
                    .retain(|name, _| !trace_context::is_trace_header(name));
                for (name, value) in own {
                    message
                        .headers
                        .insert(name.to_owned(), HeaderValue::String(value));
                }
            }
            span
        })
        .collect();
    (std::borrow::Cow::Owned(messages), spans)
}

impl OutgoingMessage {
    /// A message with a fresh UUID v7 id and no headers.
    pub fn new(
        destination: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            destination: destination.into(),
            routing_key: routing_key.into(),
            message_id: uuid::Uuid::now_v7().to_string(),
            correlation_id: None,
            content_type: None,
            headers: BTreeMap::new(),
            body: body.into(),
            timestamp_ms: None,
            trace: TraceLink::Continue,
        }
    }
}

/// Why one message was not confirmed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    /// The broker could not route it (amqp `mandatory` return, unknown exchange).
    #[error("unroutable: {0}")]
    Unroutable(String),
    /// The broker refused it (message too large, wrong type, access refused).
    #[error("rejected by the broker: {0}")]
    Rejected(String),
    /// The broker nacked it: it took the message but cannot keep it for now (a full queue
    /// with `x-overflow = reject-publish`, a quorum queue without a quorum). The same
    /// publish may succeed later: transient, but unlike a connection failure it is known
    /// not to have arrived, so a relay counts it as an attempt.
    #[error("nacked by the broker (e.g. a full queue with reject-publish): {0}")]
    Nacked(String),
    /// The body is over the broker's maximum message size: no retry can succeed until the
    /// broker's limit is raised.
    #[error("message body of {size} bytes is over the broker's max message size of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    /// The message can never be published as it is, whatever the broker's state: its
    /// headers do not fit one frame, or a name is longer than the protocol allows.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The connection failed or timed out (the message may or may not have arrived), or the
    /// broker cannot take it for now (redis `OOM`, `LOADING`, `READONLY`, `BUSY`...): sent
    /// again later without using up an attempt.
    #[error("connection failed: {0}")]
    Connection(String),
}

impl PublishError {
    /// Whether the same publish may succeed later without any change.
    pub fn is_transient(&self) -> bool {
        matches!(self, PublishError::Connection(_) | PublishError::Nacked(_))
    }
}

/// Publishes batches with confirmation.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `messages` in order, pipelined, and returns one result per message once the
    /// broker has confirmed (or refused) each. `Ok` means durable at the broker.
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>>;

    /// Publishes one message.
    async fn publish(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        self.publish_batch(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(PublishError::Connection(
                    "publisher returned no result".into(),
                ))
            })
    }
}
