//! The confirming publisher: the [`Publisher`] for amqp brokers.
//!
//! Every publish is `mandatory` and persistent on a channel in confirm mode. A batch is
//! pipelined: up to [`AmqpPublisher::window`] confirms are outstanding at once, so a batch
//! costs about one round trip, never one per message. A message the broker returns
//! (no queue bound) is [`PublishError::Unroutable`], a nack is [`PublishError::Nacked`] (transient),
//! and a broken connection is [`PublishError::Connection`]; the next batch reconnects.
//!
//! RabbitMQ answers a publish to a missing exchange, or of a body over its maximum message
//! size, by closing the whole channel: every publish still pending on it fails too, and
//! must be sent again. So a batch is checked first: a body over the configured
//! `max_message_size` is refused without being sent, and an exchange not seen lately is
//! checked with a passive declare on a channel of its own. When the broker closes the
//! channel anyway, its error is charged to the message it names (by exchange or by size);
//! the others are reported as a connection failure, to be published again. A message whose
//! properties and headers would not fit one frame of the connection's `frame_max` is refused
//! as [`PublishError::Invalid`] before it is sent: the broker would close the whole
//! connection with FRAME_ERROR.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex as SyncMutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::{FuturesOrdered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::Mutex;

use super::{AmqpError, connection, headers, short, soft_error};
use crate::config::AmqpBrokerConfig;
use crate::publish::{OutgoingMessage, PublishError, Publisher};

/// Confirms outstanding at once by default.
pub const DEFAULT_WINDOW: usize = 1024;

/// AMQP delivery mode 2: written to disk by the broker.
pub const PERSISTENT: u8 = 2;

/// A content header frame around its properties: frame type, channel, size and end octet
/// (8), class, weight and body size (12).
const HEADER_FRAME_OVERHEAD: u64 = 20;

/// How long an exchange seen to exist is trusted before a batch checks it again.
const EXCHANGE_CHECK_TTL: Duration = Duration::from_secs(60);

/// Exchanges remembered at most; past this the memory starts over.
const EXCHANGE_CACHE_LIMIT: usize = 10_000;

/// Publishes to one amqp broker with confirms. Cheap to share behind an `Arc`; concurrent
/// batches share one channel.
pub struct AmqpPublisher {
    /// The `[brokers.*]` name, for logs.
    broker: String,
    config: AmqpBrokerConfig,
    /// Shown to the broker, so operators can tell publishers from consumers.
    connection_name: String,
    /// Confirms outstanding at once within a batch.
    window: usize,
    /// The open connection and confirm-mode channel; `None` until the first publish and
    /// after a failure, so a lost connection is re-opened lazily by the next batch.
    session: Mutex<Option<Session>>,
    /// Exchanges seen to exist, and when they were checked.
    exchanges: SyncMutex<HashMap<String, Instant>>,
}

struct Session {
    /// Kept so the connection lives as long as the channel and can be closed.
    connection: Connection,
    channel: Channel,
}

impl AmqpPublisher {
    pub fn new(
        broker: impl Into<String>,
        config: AmqpBrokerConfig,
        connection_name: impl Into<String>,
    ) -> Self {
        Self {
            broker: broker.into(),
            config,
            connection_name: connection_name.into(),
            window: DEFAULT_WINDOW,
            session: Mutex::new(None),
            exchanges: SyncMutex::new(HashMap::new()),
        }
    }

    /// Sets the number of confirms outstanding at once (at least 1).
    #[cfg(test)]
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// Opens the connection now rather than at the first publish, to report a bad URL early.
    pub async fn connect(&self) -> Result<(), AmqpError> {
        self.channel().await.map(|_| ())
    }

    /// A usable confirm-mode channel, (re)opening what is broken.
    async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut session = self.session.lock().await;
        if let Some(s) = session.as_mut() {
            if s.channel.status().connected() {
                return Ok(s.channel.clone());
            }
            if s.connection.status().connected() {
                // The broker closed only the channel (e.g. a publish to a missing exchange).
                s.channel = confirm_channel(&s.connection).await?;
                return Ok(s.channel.clone());
            }
            tracing::warn!(broker = %self.broker, "publisher connection lost; reconnecting");
            metrics::counter!("bosun_broker_reconnects_total", "broker" => self.broker.clone())
                .increment(1);
        }
        let connection =
            connection::connect_for(&self.config, &self.broker, &self.connection_name).await?;
        let channel = confirm_channel(&connection).await?;
        tracing::info!(broker = %self.broker, connection = %self.connection_name, "publisher connected");
        *session = Some(Session {
            connection,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// The exchanges among `names` that do not exist, checked with passive declares on a
    /// channel of their own (a missing exchange closes that channel, not the publishing one).
    /// Names checked within [`EXCHANGE_CHECK_TTL`] are not checked again; a check that fails
    /// for another reason leaves the name to the publish itself.
    async fn missing_exchanges(&self, names: HashSet<&str>) -> HashSet<String> {
        let now = Instant::now();
        let unchecked: Vec<&str> = match self.exchanges.lock() {
            Ok(seen) => names
                .into_iter()
                .filter(|name| {
                    !name.is_empty()
                        && seen
                            .get(*name)
                            .is_none_or(|at| now.duration_since(*at) > EXCHANGE_CHECK_TTL)
                })
                .collect(),
            Err(_) => return HashSet::new(),
        };
        let mut missing = HashSet::new();
        let mut probe: Option<Channel> = None;
        for name in unchecked {
            let channel = match &probe {
                Some(channel) if channel.status().connected() => channel.clone(),
                _ => match self.side_channel().await {
                    Some(channel) => {
                        probe = Some(channel.clone());
                        channel
                    }
                    None => break,
                },
            };
            let Ok(exchange) = short("exchange", name) else {
                continue;
            };
            let options = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .exchange_declare(
                    exchange,
                    ExchangeKind::Direct,
                    options,
                    FieldTable::default(),
                )
                .await
            {
                Ok(()) => {
                    if let Ok(mut seen) = self.exchanges.lock() {
                        if seen.len() >= EXCHANGE_CACHE_LIMIT {
                            seen.clear();
                        }
                        seen.insert(name.to_owned(), Instant::now());
                    }
                }
                Err(e) => {
                    if let Some((AMQPSoftError::NOTFOUND, _)) = soft_error(&e) {
                        missing.insert(name.to_owned());
                    }
                }
            }
        }
        if let Some(channel) = probe
            && channel.status().connected()
        {
            let _ = channel.close(200, "checked".into()).await;
        }
        missing
    }

    /// Whether `message` passes the checks a publish makes before sending (body within
    /// `max_message_size`, names within AMQP short strings, properties and headers within
    /// one frame of the connection's `frame_max` once connected), without sending it: for
    /// a message stored now and published later, so that what would be refused then is
    /// refused now.
    pub async fn check(&self, message: &OutgoingMessage) -> Result<(), PublishError> {
        if let Some(max) = self.config.max_message_size {
            let size = message.body.len() as u64;
            if size > max {
                return Err(PublishError::TooLarge { size, max });
            }
        }
        names(message).map_err(|e| PublishError::Invalid(e.to_string()))?;
        let props = properties(message).map_err(|e| PublishError::Invalid(e.to_string()))?;
        // Known once connected; the API's bounds on headers keep them well within the
        // smallest frame_max RabbitMQ accepts before that.
        let size = header_frame_size(&props);
        if let Some(max) = self.frame_max().await.filter(|max| *max > 0)
            && size > max
        {
            return Err(PublishError::Invalid(format!(
                "its properties and headers take {size} bytes, over the connection's frame_max of {max}"
            )));
        }
        Ok(())
    }

    /// The frame size negotiated on the publishing connection.
    async fn frame_max(&self) -> Option<u64> {
        let session = self.session.lock().await;
        let s = session.as_ref()?;
        Some(u64::from(s.connection.configuration().frame_max()))
    }

    /// A fresh plain channel on the publishing connection, for checks.
    async fn side_channel(&self) -> Option<Channel> {
        let session = self.session.lock().await;
        let s = session.as_ref()?;
        s.connection.create_channel().await.ok()
    }

    /// Closes the channel and connection, after every outstanding confirm has arrived.
    pub async fn close(&self) {
        if let Some(s) = self.session.lock().await.take() {
            let _ = s.channel.wait_for_confirms().await;
            let _ = s.channel.close(200, "bye".into()).await;
            let _ = s.connection.close(200, "bye".into()).await;
        }
    }
}

pub(crate) async fn confirm_channel(connection: &Connection) -> Result<Channel, AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| AmqpError::channel("cannot open a channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| AmqpError::channel("cannot enable publisher confirms", e))?;
    Ok(channel)
}

/// The AMQP properties of an outgoing message: persistent, with its id, correlation id,
/// content type, headers and timestamp ("now" when unset).
pub fn properties(message: &OutgoingMessage) -> Result<BasicProperties, AmqpError> {
    let message_id = if message.message_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        message.message_id.clone()
    };
    let timestamp = match message.timestamp_ms {
        Some(ms) => ms / 1000,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let mut props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_message_id(short("message_id", &message_id)?)
        .with_timestamp(timestamp);
    if let Some(id) = &message.correlation_id {
        props = props.with_correlation_id(short("correlation_id", id)?);
    }
    if let Some(ct) = &message.content_type {
        props = props.with_content_type(short("content_type", ct)?);
    }
    if !message.headers.is_empty() {
        props = props.with_headers(headers::to_table(&message.headers)?);
    }
    Ok(props)
}

/// Bytes the content header frame of a message with `props` takes on the wire.
fn header_frame_size(props: &BasicProperties) -> u64 {
    let generate = lapin::protocol::basic::gen_properties(props);
    match generate(Vec::new().into()) {
        Ok(written) => written.position.saturating_add(HEADER_FRAME_OVERHEAD),
        Err(_) => u64::MAX,
    }
}

/// Maps the broker's answer to one publish of a `size`-byte body.
pub fn confirmation(
    result: Result<Confirmation, lapin::Error>,
    exchange: &str,
    routing_key: &str,
    size: usize,
) -> Result<(), PublishError> {
    match result {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
            Err(PublishError::Unroutable(format!(
                "exchange {exchange:?} routing key {routing_key:?}: {} {}",
                returned.reply_code, returned.reply_text
            )))
        }
        Ok(Confirmation::Nack(None)) => Err(PublishError::Nacked(format!(
            "exchange {exchange:?} routing key {routing_key:?}"
        ))),
        Err(e) => Err(publish_error(&e, exchange, size)),
    }
}

/// Classifies a failed publish of a `size`-byte body to `exchange`.
///
/// The broker closes the whole channel for one bad publish, and every confirmation still
/// pending on it fails with that same error. The error is charged to the message it names:
/// a missing exchange makes that message unroutable, a refused exchange rejected, a size over
/// the broker's limit too large. The other messages may or may not have arrived: a connection
/// failure, published again. A channel error that names no message is a refusal, and anything
/// else a connection failure.
pub fn publish_error(e: &lapin::Error, exchange: &str, size: usize) -> PublishError {
    let Some((code, text)) = soft_error(e) else {
        return PublishError::Connection(e.to_string());
    };
    let names_exchange = text.contains(&format!("'{exchange}'"));
    let another = || {
        PublishError::Connection(format!(
            "the channel was closed by another message's error: {text}"
        ))
    };
    match code {
        AMQPSoftError::NOTFOUND if names_exchange => {
            PublishError::Unroutable(format!("exchange {exchange:?}: {text}"))
        }
        AMQPSoftError::NOTFOUND => another(),
        AMQPSoftError::ACCESSREFUSED if text.contains("exchange") && !names_exchange => another(),
        AMQPSoftError::PRECONDITIONFAILED => match oversize(&text) {
            Some((over, max)) if over == size as u64 => PublishError::TooLarge { size: over, max },
            Some(_) => another(),
            None => PublishError::Rejected(text),
        },
        _ => PublishError::Rejected(text),
    }
}

/// The sizes in RabbitMQ's "message size N is larger than [configured ]max size M".
fn oversize(text: &str) -> Option<(u64, u64)> {
    let rest = text.split("message size ").nth(1)?;
    let (size, rest) = rest.split_once(' ')?;
    let max = rest.split("max size ").nth(1)?;
    let max: String = max.chars().take_while(char::is_ascii_digit).collect();
    Some((size.parse().ok()?, max.parse().ok()?))
}

fn names(message: &OutgoingMessage) -> Result<(ShortString, ShortString), AmqpError> {
    Ok((
        short("exchange", &message.destination)?,
        short("routing key", &message.routing_key)?,
    ))
}

/// Publishes sent at once: each is queued for the connection's writer together with the
/// others, rather than each waiting for the writer to take the one before it.
const SEND_CHUNK: usize = 256;

/// Runs `sends` (publishes on one channel) side by side and returns their results in order.
/// Each is first polled in order, which assigns its delivery tag and queues its frames, so
/// the messages reach the broker in the order given; then they are polled until the writer
/// has taken them all.
async fn send_chunk<F, T>(sends: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let mut sends: Vec<_> = sends.map(Box::pin).collect();
    let mut done: Vec<Option<T>> = sends.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (send, slot) in sends.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match send.as_mut().poll(cx) {
                    std::task::Poll::Ready(result) => *slot = Some(result),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>> {
        let (messages, _spans) =
            crate::publish::traced(messages, crate::trace_context::System::RabbitMq);
        let messages = messages.as_ref();
        let mut results: Vec<Option<Result<(), PublishError>>> = vec![None; messages.len()];
        if messages.is_empty() {
            return Vec::new();
        }
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(e) => {
                tracing::warn!(broker = %self.broker, error = %e, "publisher cannot connect");
                return messages
                    .iter()
                    .map(|_| Err(PublishError::Connection(e.to_string())))
                    .collect();
            }
        };
        // Refused before sending: bodies over the configured limit, and exchanges that do
        // not exist; either would close the channel under the rest of the batch.
        if let Some(max) = self.config.max_message_size {
            for (index, message) in messages.iter().enumerate() {
                let size = message.body.len() as u64;
                if size > max {
                    results[index] = Some(Err(PublishError::TooLarge { size, max }));
                }
            }
        }
        let destinations: HashSet<&str> = messages
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(m, _)| m.destination.as_str())
            .collect();
        let missing = self.missing_exchanges(destinations).await;
        for (index, message) in messages.iter().enumerate() {
            if results[index].is_none() && missing.contains(&message.destination) {
                results[index] = Some(Err(PublishError::Unroutable(format!(
                    "exchange {:?} does not exist",
                    message.destination
                ))));
            }
        }

        let frame_max = self.frame_max().await;
        // Everything a publish checks before sending, for every message first: what is left
        // goes out in chunks whose frames are queued together (see `send_chunk`).
        let mut ready = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            if results[index].is_some() {
                continue;
            }
            let prepared = names(message)
                .and_then(|(exchange, key)| Ok((exchange, key, properties(message)?)));
            let (exchange, key, props) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    results[index] = Some(Err(PublishError::Invalid(e.to_string())));
                    continue;
                }
            };
            if let Some(max) = frame_max {
                let size = header_frame_size(&props);
                if size > max {
                    results[index] = Some(Err(PublishError::Invalid(format!(
                        "its properties and headers take {size} bytes, over the connection's frame_max of {max}"
                    ))));
                    continue;
                }
            }
            ready.push((index, exchange, key, props));
        }

        let mut pending = FuturesOrdered::new();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let mut broken: Option<String> = None;
        let chunk = SEND_CHUNK.min(self.window);
        let mut ready = ready.into_iter().peekable();
        while ready.peek().is_some() {
            let sends: Vec<_> = ready.by_ref().take(chunk).collect();
            while !pending.is_empty() && pending.len() + sends.len() > self.window {
                if let Some((i, result)) = pending.next().await {
                    results[i] = Some(result);
                }
            }
            if let Some(reason) = &broken {
                for (index, ..) in sends {
                    results[index] = Some(Err(PublishError::Connection(reason.clone())));
                }
                continue;
            }
            let indexes: Vec<usize> = sends.iter().map(|(index, ..)| *index).collect();
            let sent = send_chunk(sends.into_iter().map(|(index, exchange, key, props)| {
                channel.basic_publish(exchange, key, options, &messages[index].body, props)
            }))
            .await;
            for (index, result) in indexes.into_iter().zip(sent) {
                let message = &messages[index];
                match result {
                    Ok(confirm) => pending.push_back(async move {
                        (
                            index,
                            confirmation(
                                confirm.await,
                                &message.destination,
                                &message.routing_key,
                                message.body.len(),
                            ),
                        )
                    }),
                    Err(e) => {
                        let error = publish_error(&e, &message.destination, message.body.len());
                        if let PublishError::Connection(reason) = &error {
                            broken = Some(reason.clone());
                        }
                        results[index] = Some(Err(error));
                    }
                }
            }
        }
        while let Some((i, result)) = pending.next().await {
            results[i] = Some(result);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(PublishError::Connection("no confirmation arrived".into())))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::oversize;

    #[test]
    fn reads_both_sizes_of_the_brokers_size_error() {
        assert_eq!(
            oversize(
                "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728"
            ),
            Some((134_217_729, 134_217_728))
        );
        assert_eq!(
            oversize("PRECONDITION_FAILED - message size 10 is larger than max size 5"),
            Some((10, 5))
        );
        assert_eq!(
            oversize("PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"),
            None
        );
    }
}
