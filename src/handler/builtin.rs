//! The two built-in handler kinds that need no outside service: `noop` and `log`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    Handler, HandlerFactory, HandlerKind, Message, OptionError, Outcome, Prebuilt, parse_options,
};

/// `kind = "noop"`: acknowledges at once. For draining a queue and for benchmarks.
pub struct NoopHandler;

#[async_trait]
impl Handler for NoopHandler {
    async fn handle(&self, _message: &Message) -> Outcome {
        Outcome::Ack
    }
}

pub(super) struct NoopKind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoopOptions {}

impl HandlerKind for NoopKind {
    fn parse(
        &self,
        _name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError> {
        let NoopOptions {} = parse_options(options)?;
        Ok(Arc::new(Prebuilt(Arc::new(NoopHandler))))
    }
}

/// `kind = "log"`: logs a one-line summary of each message at info level, then acknowledges.
/// The body is never logged: it may hold personal data.
pub struct LogHandler {
    name: String,
}

#[async_trait]
impl Handler for LogHandler {
    async fn handle(&self, message: &Message) -> Outcome {
        tracing::info!(
            handler = %self.name,
            consumer = %message.source.consumer,
            queue = %message.source.queue,
            routing_key = message.source.routing_key.as_deref().unwrap_or(""),
            message_id = message.message_id.as_deref().unwrap_or(""),
            correlation_id = message.correlation_id.as_deref().unwrap_or(""),
            content_type = message.content_type.as_deref().unwrap_or(""),
            attempt = message.attempt,
            body_bytes = message.body.len(),
            headers = message.headers.len(),
            "message received"
        );
        Outcome::Ack
    }
}

pub(super) struct LogKind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogOptions {}

impl HandlerKind for LogKind {
    fn parse(
        &self,
        name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError> {
        let LogOptions {} = parse_options(options)?;
        Ok(Arc::new(Prebuilt(Arc::new(LogHandler {
            name: name.to_owned(),
        }))))
    }
}
