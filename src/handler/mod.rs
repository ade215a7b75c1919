//! The handler interface: what every consumer calls with a message, and what it answers.
//!
//! A handler is found by name from `[handlers.NAME]`; its `kind` picks a [`HandlerKind`],
//! which checks the table's options at load time and returns a [`HandlerFactory`]; the
//! runtime builds the [`Handler`] from it when the component starts. Built-in kinds live in
//! this module's children; a Rust program adds its own with
//! [`RuntimeBuilder::handler_kind`](crate::RuntimeBuilder::handler_kind).

mod builtin;
mod exec;
mod http;
mod outcome_map;
mod route;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;

pub use builtin::{LogHandler, NoopHandler};
pub use exec::ExecHandler;
pub use http::{HttpHandler, MESSAGE_HEADER_PREFIX};
pub use outcome_map::OutcomeName;
pub use route::RouteHandler;

/// A message as a handler sees it, whatever broker it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Stable id across retries and replays (AMQP `message_id`, else one derived from the
    /// delivery; a stream's `message_id` field, else the first entry id; or the outbox row's
    /// id). Handlers that must not repeat work deduplicate on it.
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    /// The message's own headers (AMQP headers, or a stream entry's non-body fields).
    pub headers: BTreeMap<String, HeaderValue>,
    pub content_type: Option<String>,
    /// The body, byte for byte as the broker delivered it.
    pub body: Bytes,
    /// 1 for the first delivery, raised by each retry.
    pub attempt: u32,
    /// Set when the broker says this may have been delivered before (e.g. after a crash).
    pub redelivered: bool,
    pub source: Source,
    /// The inbox claim the message is handled under, when its consumer has an inbox: a
    /// handler outside the process passes it to `bosun_inbox_complete` in its own
    /// transaction, so its effect and the record that it happened commit together.
    pub inbox: Option<InboxClaim>,
}

/// A consumer's claim on one key in its inbox, held while the handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxClaim {
    /// The `[consumers.*]` name: records are keyed by consumer and key.
    pub consumer: String,
    /// The message's key (`bosun-inbox-key`).
    pub key: String,
    /// This claim's token (`bosun-inbox-token`): completing the record needs it, so a claim
    /// taken over after its lease cannot be completed by the process that lost it.
    pub token: String,
}

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// The `[brokers.*]` name.
    pub broker: String,
    /// The `[consumers.*]` name.
    pub consumer: String,
    /// The queue or stream it was read from.
    pub queue: String,
    /// The exchange it was published to (amqp), if any.
    pub exchange: Option<String>,
    /// The routing key (amqp), if any.
    pub routing_key: Option<String>,
    /// The broker's own id for this delivery (a stream entry id), if any.
    pub entry_id: Option<String>,
}

/// A header value: brokers carry typed headers, streams carry bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    String(String),
    Bytes(Vec<u8>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Nested or otherwise structured values (AMQP tables and arrays), rendered as JSON.
    Json(serde_json::Value),
}

impl HeaderValue {
    /// The value as text: strings as they are, bytes when UTF-8 (else None), numbers and
    /// booleans formatted, structured values as JSON.
    pub fn as_text(&self) -> Option<String> {
        match self {
            HeaderValue::String(s) => Some(s.clone()),
            HeaderValue::Bytes(b) => String::from_utf8(b.clone()).ok(),
            HeaderValue::Int(i) => Some(i.to_string()),
            HeaderValue::Float(f) => Some(f.to_string()),
            HeaderValue::Bool(b) => Some(b.to_string()),
            HeaderValue::Json(v) => Some(v.to_string()),
        }
    }
}

/// Why a message was dead-lettered: the `bosun-error-kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A failure that may pass; used for retries.
    Transient,
    /// The handler says the message can never succeed.
    Permanent,
    /// Retries ran out.
    Exhausted,
    /// The message itself is malformed (cannot be decoded where decoding is required).
    Invalid,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
            FailureKind::Exhausted => "exhausted",
            FailureKind::Invalid => "invalid",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a handler decided. The consumer settles the message at its source only after the
/// outcome is durable (see ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: settle the message.
    Ack,
    /// Transient failure: try again later (after `after` if given, else by the retry policy).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Permanent failure: dead-letter now, no more attempts.
    DeadLetter { reason: String, kind: FailureKind },
    /// Discard on purpose: settle without dead-lettering, counted separately.
    Drop { reason: String },
    /// No outcome: hand the message back to its source unsettled, without using an attempt
    /// (amqp: nack with requeue; redis: it stays pending, read again at this consumer's next
    /// start or claimed by another after `claim_idle`). For a handler that must stop before
    /// it can decide, such as at shutdown; not a retry, which has a delay.
    Release { reason: String },
    /// Not tried: the handler's downstream is paused (its circuit breaker is open, it is
    /// paused by an operator, or it asked to wait with `Retry-After`). The message goes back
    /// through the retry path to come again after `after`, without using an attempt.
    Defer { after: Duration, reason: String },
}

impl Outcome {
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            after: None,
            reason: reason.into(),
        }
    }
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter {
            reason: reason.into(),
            kind: FailureKind::Permanent,
        }
    }
    pub fn invalid(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter {
            reason: reason.into(),
            kind: FailureKind::Invalid,
        }
    }
    /// The metric label for this outcome as the handler gave it.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Retry { .. } => "retry",
            Outcome::DeadLetter { .. } => "dead_letter",
            Outcome::Drop { .. } => "drop",
            Outcome::Release { .. } => "release",
            Outcome::Defer { .. } => "defer",
        }
    }
}

/// Handles one message. Implementations must be cancel-safe: at shutdown, a handler still
/// running after the grace period is dropped, and the message is redelivered later.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, message: &Message) -> Outcome;

    /// Whether input the consumer cannot turn into a message (a stream entry without a
    /// body, a field that is not UTF-8) is handed to this handler as it is, with the
    /// reason in the [`UNDECODABLE`] header, instead of being dead-lettered as `invalid`.
    /// Dead-letter processors ask for it: their input has nowhere further to go.
    fn takes_undecodable(&self) -> bool {
        false
    }
}

/// The header that carries why the consumer could not decode the input it hands to a
/// handler that [takes undecodable input](Handler::takes_undecodable).
pub const UNDECODABLE: &str = "bosun-undecodable";

/// An error in a handler's options, at a path relative to its `[handlers.NAME]` table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", path.join("."))]
pub struct OptionError {
    pub path: Vec<String>,
    pub message: String,
}

impl OptionError {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            message: message.into(),
        }
    }
}

/// A handler's `timeout` option: a duration longer than zero; `default` when unset.
pub(crate) fn timeout_option(
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, OptionError> {
    duration_option(&["timeout"], value, default)
}

/// A duration option at `path`: longer than zero; `default` when unset.
pub(crate) fn duration_option(
    path: &[&str],
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, OptionError> {
    let Some(text) = value else {
        return Ok(default);
    };
    match crate::units::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(OptionError::new(path, "must be longer than zero")),
        Err(e) => Err(OptionError::new(
            path,
            format!("invalid duration {text:?}: {e} (expected e.g. \"500ms\", \"30s\")"),
        )),
    }
}

/// A handler's `max_concurrency` option: at least 1; `default` when unset.
pub(crate) fn max_concurrency_option(
    value: Option<usize>,
    default: usize,
) -> Result<usize, OptionError> {
    match value.unwrap_or(default) {
        0 => Err(OptionError::new(&["max_concurrency"], "must be at least 1")),
        n => Ok(n),
    }
}

/// Deserializes a handler's options (everything in its table but `kind`) into `T`, with the
/// failing key's path. Give `T` `#[serde(deny_unknown_fields)]`.
pub fn parse_options<T: DeserializeOwned>(options: &toml::Table) -> Result<T, OptionError> {
    serde_path_to_error::deserialize(toml::Value::Table(options.clone())).map_err(|e| {
        let mut path: Vec<String> = e
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let message = e.inner().message().trim().to_owned();
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some(end) = rest.find('`')
            && path.last().map(String::as_str) != Some(&rest[..end])
        {
            path.push(rest[..end].to_owned());
        }
        OptionError { path, message }
    })
}

/// A handler kind: checks a `[handlers.NAME]` table at load time.
pub trait HandlerKind: Send + Sync + 'static {
    fn parse(
        &self,
        name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError>;
}

/// Validated handler options, ready to build a handler when a component starts.
pub trait HandlerFactory: Send + Sync + 'static {
    /// Names of other handlers this one calls (a route's targets); checked at load time.
    fn dependencies(&self) -> Vec<String> {
        Vec::new()
    }
    fn build(&self, ctx: &BuildContext<'_>) -> anyhow::Result<Arc<dyn Handler>>;
}

/// What a factory may use while building.
pub struct BuildContext<'a> {
    /// The handler's own name (`[handlers.NAME]`), for metrics and logs.
    pub name: &'a str,
    /// Handlers built so far, including every dependency of this one.
    pub handlers: &'a BTreeMap<String, Arc<dyn Handler>>,
}

/// A factory that hands out one prebuilt handler: for kinds whose handler is cheap to build.
struct Prebuilt(Arc<dyn Handler>);

impl HandlerFactory for Prebuilt {
    fn build(&self, _: &BuildContext<'_>) -> anyhow::Result<Arc<dyn Handler>> {
        Ok(self.0.clone())
    }
}

/// Wraps a closure `(name, options) -> handler` as a [`HandlerKind`].
pub struct FnKind<F>(pub F);

impl<F> HandlerKind for FnKind<F>
where
    F: Fn(&str, &toml::Table) -> Result<Arc<dyn Handler>, OptionError> + Send + Sync + 'static,
{
    fn parse(
        &self,
        name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError> {
        Ok(Arc::new(Prebuilt((self.0)(name, options)?)))
    }
}

/// The registry of handler kinds by name.
#[derive(Clone)]
pub struct HandlerKinds {
    kinds: BTreeMap<String, Arc<dyn HandlerKind>>,
}

impl HandlerKinds {
    /// The built-in kinds.
    pub fn builtin() -> Self {
        let mut kinds = Self {
            kinds: BTreeMap::new(),
        };
        kinds.register("noop", builtin::NoopKind);
        kinds.register("log", builtin::LogKind);
        kinds.register("http", http::HttpKind);
        kinds.register("exec", exec::ExecKind);
        kinds.register("route", route::RouteKind);
        kinds
    }

    pub fn register(&mut self, name: impl Into<String>, kind: impl HandlerKind) {
        self.kinds.insert(name.into(), Arc::new(kind));
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn HandlerKind>> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.kinds.keys().map(String::as_str).collect()
    }
}

impl Default for HandlerKinds {
    fn default() -> Self {
        Self::builtin()
    }
}

/// A handler entry: its kind, its options as written (for diffing) and the factory the kind
/// parsed them into.
#[derive(Clone)]
pub struct HandlerConfig {
    pub kind: String,
    pub options: toml::Table,
    pub factory: Arc<dyn HandlerFactory>,
}

impl PartialEq for HandlerConfig {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.options == other.options
    }
}

impl fmt::Debug for HandlerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerConfig")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Builds every configured handler, dependencies first.
pub fn build_all(
    handlers: &BTreeMap<String, HandlerConfig>,
) -> anyhow::Result<BTreeMap<String, Arc<dyn Handler>>> {
    build_all_with(handlers, &|_, handler| handler)
}

/// How [`build_all_with`] presents a handler `name` to the handlers that call it.
pub type Wrap<'a> = dyn Fn(&str, Arc<dyn Handler>) -> Arc<dyn Handler> + 'a;

/// Builds every configured handler, dependencies first; a handler that calls others (a
/// route) is given each of them as `wrap(name, handler)` returns it, while the map returned
/// holds them unwrapped (bosun wraps a route's targets in their circuit breaker this way).
pub fn build_all_with(
    handlers: &BTreeMap<String, HandlerConfig>,
    wrap: &Wrap<'_>,
) -> anyhow::Result<BTreeMap<String, Arc<dyn Handler>>> {
    let mut built: BTreeMap<String, Arc<dyn Handler>> = BTreeMap::new();
    let mut wrapped: BTreeMap<String, Arc<dyn Handler>> = BTreeMap::new();
    // Validation rejected cycles and dangling references, so repeated passes terminate.
    while built.len() < handlers.len() {
        let before = built.len();
        for (name, config) in handlers {
            if built.contains_key(name)
                || !config
                    .factory
                    .dependencies()
                    .iter()
                    .all(|d| built.contains_key(d))
            {
                continue;
            }
            let handler = config
                .factory
                .build(&BuildContext {
                    name,
                    handlers: &wrapped,
                })
                .map_err(|e| e.context(format!("cannot build handler `{name}`")))?;
            wrapped.insert(name.clone(), wrap(name, handler.clone()));
            built.insert(name.clone(), handler);
        }
        if built.len() == before {
            anyhow::bail!("handlers refer to each other in a cycle or to a missing handler");
        }
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_and_concurrency_options_are_checked() {
        let default = Duration::from_secs(30);
        assert_eq!(timeout_option(None, default), Ok(default));
        assert_eq!(
            timeout_option(Some("250ms"), default),
            Ok(Duration::from_millis(250))
        );
        let zero = timeout_option(Some("0"), default).unwrap_err();
        assert_eq!(
            (zero.path, zero.message.as_str()),
            (vec!["timeout".to_owned()], "must be longer than zero")
        );
        assert!(
            timeout_option(Some("soon"), default)
                .unwrap_err()
                .message
                .contains("invalid duration \"soon\"")
        );
        assert_eq!(max_concurrency_option(None, 8), Ok(8));
        assert_eq!(max_concurrency_option(Some(3), 8), Ok(3));
        assert_eq!(
            max_concurrency_option(Some(0), 8).unwrap_err().path,
            vec!["max_concurrency".to_owned()]
        );
    }
}
