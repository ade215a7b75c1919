//! The confirming publisher: the [`Publisher`] for amqp brokers.
//!
//! Every publish is `mandatory` and persistent on a channel in confirm mode. A batch is
//! pipelined: up to [`AmqpPublisher::window`] confirms are outstanding at once, so a batch
//! costs about one round trip, never one per message. A message the broker returns
//! (no queue bound) is [`PublishError::Unroutable`], a nack is [`PublishError::Rejected`],
//! and a broken connection is [`PublishError::Connection`]; the next batch reconnects.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::stream::{FuturesOrdered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPSoftError;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use super::{AmqpError, connection, headers, short, soft_error};
use crate::config::AmqpBrokerConfig;
use crate::publish::{OutgoingMessage, PublishError, Publisher};

/// Confirms outstanding at once by default.
pub const DEFAULT_WINDOW: usize = 1024;

/// AMQP delivery mode 2: written to disk by the broker.
pub const PERSISTENT: u8 = 2;

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
        }
    }

    /// Sets the number of confirms outstanding at once (at least 1).
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    pub fn window(&self) -> usize {
        self.window
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
        let connection = connection::connect(&self.config, &self.connection_name).await?;
        let channel = confirm_channel(&connection).await?;
        tracing::info!(broker = %self.broker, connection = %self.connection_name, "publisher connected");
        *session = Some(Session {
            connection,
            channel: channel.clone(),
        });
        Ok(channel)
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

async fn confirm_channel(connection: &Connection) -> Result<Channel, AmqpError> {
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

/// Maps the broker's answer to one publish.
pub fn confirmation(
    result: Result<Confirmation, lapin::Error>,
    exchange: &str,
    routing_key: &str,
) -> Result<(), PublishError> {
    match result {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) | Ok(Confirmation::Nack(Some(returned))) => {
            Err(PublishError::Unroutable(format!(
                "exchange {exchange:?} routing key {routing_key:?}: {} {}",
                returned.reply_code, returned.reply_text
            )))
        }
        Ok(Confirmation::Nack(None)) => Err(PublishError::Rejected(format!(
            "exchange {exchange:?} routing key {routing_key:?}: nacked by the broker"
        ))),
        Err(e) => Err(publish_error(&e, exchange)),
    }
}

/// Classifies a failed publish: a missing exchange is unroutable, other channel errors are
/// refusals, and anything else is a connection failure (the message may have arrived).
pub fn publish_error(e: &lapin::Error, exchange: &str) -> PublishError {
    match soft_error(e) {
        // The broker closes the whole channel for one publish to a missing exchange, and every
        // confirmation still pending on it fails with that same error. Only the message whose
        // exchange the error names is unroutable; the others may or may not have arrived.
        Some((AMQPSoftError::NOTFOUND, text)) if text.contains(&format!("'{exchange}'")) => {
            PublishError::Unroutable(format!("exchange {exchange:?}: {text}"))
        }
        Some((AMQPSoftError::NOTFOUND, text)) => PublishError::Connection(format!(
            "the channel was closed by another message's error: {text}"
        )),
        Some((_, text)) => PublishError::Rejected(text),
        None => PublishError::Connection(e.to_string()),
    }
}

fn names(message: &OutgoingMessage) -> Result<(ShortString, ShortString), AmqpError> {
    Ok((
        short("exchange", &message.destination)?,
        short("routing key", &message.routing_key)?,
    ))
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>> {
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
        let mut pending = FuturesOrdered::new();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let mut broken: Option<String> = None;
        for (index, message) in messages.iter().enumerate() {
            while pending.len() >= self.window {
                if let Some((i, result)) = pending.next().await {
                    results[i] = Some(result);
                }
            }
            if let Some(reason) = &broken {
                results[index] = Some(Err(PublishError::Connection(reason.clone())));
                continue;
            }
            let prepared = names(message)
                .and_then(|(exchange, key)| Ok((exchange, key, properties(message)?)));
            let (exchange, key, props) = match prepared {
                Ok(p) => p,
                Err(e) => {
                    results[index] = Some(Err(PublishError::Rejected(e.to_string())));
                    continue;
                }
            };
            match channel
                .basic_publish(exchange, key, options, &message.body, props)
                .await
            {
                Ok(confirm) => pending.push_back(async move {
                    (
                        index,
                        confirmation(confirm.await, &message.destination, &message.routing_key),
                    )
                }),
                Err(e) => {
                    let error = publish_error(&e, &message.destination);
                    if let PublishError::Connection(reason) = &error {
                        broken = Some(reason.clone());
                    }
                    results[index] = Some(Err(error));
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
