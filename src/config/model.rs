//! The validated configuration: what the runtime works from.
//!
//! Every value here was parsed and cross-checked at load time. All types compare by value so
//! a reload can diff old and new per named component.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::handler::HandlerConfig;
use crate::retry::RetryPolicy;
pub use crate::roles::Role;
pub use crate::secret::{Secret, SecretUrl};
pub use crate::trace_context::TraceMode;

/// A validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the file came from, for messages and reloads.
    pub origin: String,
    pub service: ServiceConfig,
    pub http: HttpConfig,
    pub tracing: TracingConfig,
    pub brokers: BTreeMap<String, BrokerConfig>,
    pub databases: BTreeMap<String, DatabaseConfig>,
    pub handlers: BTreeMap<String, HandlerConfig>,
    pub consumers: BTreeMap<String, ConsumerConfig>,
    pub outboxes: BTreeMap<String, OutboxConfig>,
    pub dead_letters: BTreeMap<String, DeadLetterConfig>,
    /// `[publish_api]`; `None` keeps `/v1/publish` off.
    pub publish_api: Option<PublishApiConfig>,
    /// `[inboxes.*]`: where consumers with an inbox record the keys they handled.
    pub inboxes: BTreeMap<String, InboxConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// `[tracing]`: OpenTelemetry span export. Unset values fall back to `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TracingConfig {
    pub enabled: bool,
    /// The full OTLP/HTTP traces URL (`.../v1/traces`).
    pub endpoint: Option<String>,
    /// Export headers: their values are secrets.
    pub headers: Vec<(String, Secret)>,
    pub timeout: Option<Duration>,
    /// `parentbased_traceidratio` with this ratio; `None` leaves the sampler to
    /// `OTEL_TRACES_SAMPLER` (default: parent-based, always on).
    pub sample_ratio: Option<f64>,
    /// `service.name`; `None` takes `OTEL_SERVICE_NAME`, else `[service].name`.
    pub service_name: Option<String>,
    pub resource: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// The bearer token of `[http.admin]`, which has every role ([`Role::Admin`]).
    pub admin_token: Option<Secret>,
    /// `[http.admin.tokens.NAME]`: more tokens, each with its roles. The admin API is on when
    /// this or `admin_token` holds a token.
    pub tokens: BTreeMap<String, AccessToken>,
    /// Where the admin API listens, apart from `/metrics` (used only with a token).
    pub admin_listen: SocketAddr,
    /// How the admin listener identifies callers, and the console's options.
    pub console: super::ConsoleConfig,
}

impl HttpConfig {
    /// Every token and its roles: `[http.admin]`'s own as `admin`, then the named ones.
    pub fn access_tokens(&self) -> Vec<AccessToken> {
        let mut out: Vec<AccessToken> = self
            .admin_token
            .iter()
            .map(|token| AccessToken {
                token: token.clone(),
                roles: vec![Role::Admin],
            })
            .collect();
        out.extend(self.tokens.values().cloned());
        out
    }

    /// Whether the admin API runs: some token is configured, or callers are identified
    /// another way (`auth = "trusted_header"` or `"none"`).
    pub fn admin_enabled(&self) -> bool {
        self.admin_token.is_some()
            || !self.tokens.is_empty()
            || !matches!(self.console.auth, super::AdminAuth::Tokens)
    }
}

/// A bearer token of the admin API and what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessToken {
    pub token: Secret,
    /// Never empty.
    pub roles: Vec<Role>,
}

/// `[publish_api]`: `POST /v1/publish` and scheduled sends, served on the admin listener.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishApiConfig {
    /// The `[databases.*]` entry of the idempotency records and the scheduled outboxes.
    pub database: String,
    /// The brokers requests may name.
    pub brokers: Vec<String>,
    /// The outbox storing scheduled sends for each broker that has one, by broker name.
    pub scheduled: BTreeMap<String, String>,
    /// Largest message body accepted (413 beyond).
    pub max_body_size: u64,
    /// How long an immediate send waits for the broker's confirm before answering 503.
    pub publish_timeout: Duration,
    /// How long a message id is remembered with its first answer.
    pub idempotency_window: Duration,
    /// The idempotency records' table (a validated identifier).
    pub idempotency_table: String,
    /// Create the idempotency table at start.
    pub migrate: bool,
}

/// The admin API's listener when `[http.admin].listen` is not given: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9091";

/// Admin tokens shorter than this are refused: a short token can be guessed.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BrokerConfig {
    Amqp(AmqpBrokerConfig),
    Redis(RedisBrokerConfig),
}

impl BrokerConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerConfig::Amqp(_) => "amqp",
            BrokerConfig::Redis(_) => "redis",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AmqpBrokerConfig {
    /// The first address (`url`, or the first of `urls`).
    pub url: SecretUrl,
    /// Every address of the broker (one for `url`): each (re)connect tries them in a
    /// shuffled order.
    pub urls: Vec<SecretUrl>,
    pub connection_name: Option<String>,
    pub heartbeat: Option<Duration>,
    /// The broker's maximum message body size, when configured: larger publishes are refused
    /// before they are sent (the broker would close the channel, failing every publish
    /// pending on it).
    pub max_message_size: Option<u64>,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisBrokerConfig {
    /// The server (a single server), the first seed node (cluster) or the first sentinel.
    pub url: SecretUrl,
    /// How the servers are found: one server, a cluster, or a primary behind sentinels.
    pub topology: RedisTopology,
    pub tls: Option<TlsConfig>,
    /// How bosun writes entries to this broker's streams (outbox relays, `bosun publish`,
    /// forwards), and how its consumers and dead-letter processors read them unless they
    /// set a format of their own.
    pub format: EntryFormat,
}

impl RedisBrokerConfig {
    /// Whether the broker is a Redis Cluster, whose keys must be placed by hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, RedisTopology::Cluster { .. })
    }
}

/// How a redis broker's servers are found.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RedisTopology {
    /// One server at `url`.
    #[default]
    Single,
    /// A Redis Cluster: these seed nodes, the rest discovered (`CLUSTER SLOTS`).
    Cluster { nodes: Vec<SecretUrl> },
    /// The primary the sentinels know as `master`.
    Sentinel {
        master: String,
        nodes: Vec<SecretUrl>,
    },
}

/// How a stream entry maps to a message and back (`entry_format`, `payload_field`,
/// `id_field`; docs/configuration/brokers.md, "Entry formats").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFormat {
    pub layout: EntryLayout,
    /// The field holding the body (every layout but `fields`).
    pub payload_field: String,
    /// The field holding the stable message id; the entry id stands in when it is absent.
    pub id_field: String,
}

/// The entry layouts bosun reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryLayout {
    /// The body is one field (`payload`); every other field is a header.
    Payload,
    /// The body is a JSON object of the entry's fields (flat entries, as written by
    /// `XADD stream * key value ...`).
    Fields,
    /// Dapr's pub/sub: the body is the `data` field and must be JSON.
    Dapr,
    /// Redpanda Connect (Benthos): the body is the `body` field (its default `body_key`).
    Redpanda,
    /// Watermill: the body is `payload`; the `metadata` field's keys become headers.
    Watermill,
}

impl EntryLayout {
    pub const NAMES: &'static [&'static str] =
        &["payload", "fields", "dapr", "redpanda", "watermill"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Payload => "payload",
            Self::Fields => "fields",
            Self::Dapr => "dapr",
            Self::Redpanda => "redpanda",
            Self::Watermill => "watermill",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "payload" => Self::Payload,
            "fields" => Self::Fields,
            "dapr" => Self::Dapr,
            "redpanda" => Self::Redpanda,
            "watermill" => Self::Watermill,
            _ => return None,
        })
    }

    /// The body field when `payload_field` is not given.
    pub fn default_payload_field(self) -> &'static str {
        match self {
            Self::Payload | Self::Fields | Self::Watermill => "payload",
            Self::Dapr => "data",
            Self::Redpanda => "body",
        }
    }

    /// The id field when `id_field` is not given.
    pub fn default_id_field(self) -> &'static str {
        match self {
            Self::Watermill => "_watermill_message_uuid",
            _ => "message_id",
        }
    }
}

impl EntryFormat {
    /// `layout` with its default field names.
    pub fn of(layout: EntryLayout) -> Self {
        Self {
            layout,
            payload_field: layout.default_payload_field().to_owned(),
            id_field: layout.default_id_field().to_owned(),
        }
    }
}

impl fmt::Display for EntryFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "entry format {}", self.layout.as_str())?;
        if self.layout != EntryLayout::Fields {
            write!(f, ", body in {}", self.payload_field)?;
        }
        write!(f, ", id in {}", self.id_field)
    }
}

impl Default for EntryFormat {
    fn default() -> Self {
        Self::of(EntryLayout::Payload)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseConfig {
    pub url: SecretUrl,
    pub max_connections: u32,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    /// Name of the broker it reads from.
    pub source: String,
    /// Name of the handler it calls.
    pub handler: String,
    /// Handlers in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// What each message's span does with the producer's trace context.
    pub trace: TraceMode,
    pub kind: ConsumerKind,
    /// The inbox the consumer claims each message's key in before its handler runs.
    pub inbox: Option<ConsumerInbox>,
    /// Per-key order: messages of one key are handled one at a time, in arrival order.
    pub ordering: Option<ConsumerOrdering>,
    /// One reader at a time across processes (amqp: `x-single-active-consumer`; redis: a
    /// lease); the others stand by.
    pub single_active: bool,
}

/// A consumer's `ordering = { ... }`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerOrdering {
    /// Where a message's ordering key comes from.
    pub key: OrderingKey,
    /// How many lanes keys are hashed to: at most this many handlers run at once.
    pub lanes: usize,
    /// What a retry does to its lane.
    pub retry: LaneRetry,
}

/// Where a message's ordering key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderingKey {
    /// As an inbox key is read (a header, a JSON field, the message id, the body's hash).
    Inbox(InboxKey),
    /// The routing key the message was first published with (amqp).
    RoutingKey,
}

impl std::fmt::Display for OrderingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OrderingKey::Inbox(key) => key.fmt(f),
            OrderingKey::RoutingKey => f.write_str("routing_key"),
        }
    }
}

/// What a retry does to its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LaneRetry {
    /// The message keeps its lane: it waits out its backoff in hand and runs again, so no
    /// later message of its lane overtakes it (nor of its key).
    #[default]
    Hold,
    /// The message goes through the retry topology as without ordering and frees its lane:
    /// later messages of its key may run before its retry.
    Release,
}

/// `[inboxes.NAME]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxConfig {
    pub store: InboxStore,
    /// How long a done record is kept: a repeat later than this runs again.
    pub window: Duration,
    /// How long an in-progress claim holds: a claim older than this belongs to a process
    /// that died or hangs, and another may take it over.
    pub lease: Duration,
}

/// Where an inbox keeps its records.
#[derive(Debug, Clone, PartialEq)]
pub enum InboxStore {
    /// A table in a `[databases.*]` database.
    Postgres {
        database: String,
        /// A validated SQL identifier, optionally schema-qualified.
        table: String,
        /// Create the table and its function at start.
        migrate: bool,
    },
    /// Keys in a redis `[brokers.*]` server.
    Redis { broker: String },
}

/// A consumer's `inbox = { ... }` and `on_duplicate`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerInbox {
    /// The `[inboxes.*]` name.
    pub store: String,
    pub key: InboxKey,
    pub on_duplicate: OnDuplicate,
}

/// Where a message's inbox key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxKey {
    /// The message id.
    MessageId,
    /// A message header (its text value), named in lower case as written.
    Header(String),
    /// A JSON pointer into the body (RFC 6901): a string or number there.
    Json(String),
    /// The SHA-256 of the body, in hex.
    Sha256Body,
}

impl std::fmt::Display for InboxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InboxKey::MessageId => f.write_str("message_id"),
            InboxKey::Header(name) => write!(f, "header:{name}"),
            InboxKey::Json(pointer) => write!(f, "json:{pointer}"),
            InboxKey::Sha256Body => f.write_str("sha256:body"),
        }
    }
}

/// What becomes of a message whose key is already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDuplicate {
    /// Settle it as handled.
    Ack,
    /// Settle it as dropped (counted as a drop).
    Drop,
    /// Copy it to the dead-letter destination (kind `permanent`), then settle it.
    DeadLetter,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerKind {
    Amqp(AmqpConsumerConfig),
    Redis(RedisConsumerConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AmqpConsumerConfig {
    pub queue: String,
    pub queue_type: QueueType,
    pub bindings: Vec<Binding>,
    /// false: only passive checks, nothing is declared.
    pub declare: bool,
    pub prefetch: u16,
    pub dead_letter: AmqpDeadLetter,
    pub limits: DeliveryLimits,
    /// A header an earlier consumer counted retries in (e.g. `x-retry-count`): read as the
    /// retries already made when `bosun-attempt` is absent.
    pub attempt_header: Option<String>,
    /// How often the backlog gauge is sampled (passive declares); zero: never.
    pub backlog_interval: Duration,
}

/// `backlog_interval` when the file gives none.
pub const DEFAULT_BACKLOG_INTERVAL: Duration = Duration::from_secs(15);

/// What a delivery may hold before a handler sees it, and how much a consumer holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryLimits {
    /// A body over this is dead-lettered as `invalid` without reaching the handler.
    pub max_message_size: u64,
    /// Bytes of message bodies held in memory at once: the prefetch asked of the broker is
    /// cut to `max_in_flight_bytes / max_message_size` (at least 1); `u64::MAX` cuts nothing.
    pub max_in_flight_bytes: u64,
    /// false (dead-letter processors): deliveries are never refused as `invalid`; a processor
    /// must be able to read back whatever was dead-lettered.
    pub refuse_invalid: bool,
}

impl DeliveryLimits {
    pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 1 << 20;
    pub const DEFAULT_MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;

    /// No size limit and no `invalid` refusals (dead-letter processors).
    pub fn unchecked() -> Self {
        Self {
            max_message_size: u64::MAX,
            max_in_flight_bytes: u64::MAX,
            refuse_invalid: false,
        }
    }
}

impl Default for DeliveryLimits {
    fn default() -> Self {
        Self {
            max_message_size: Self::DEFAULT_MAX_MESSAGE_SIZE,
            max_in_flight_bytes: Self::DEFAULT_MAX_IN_FLIGHT_BYTES,
            refuse_invalid: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub exchange: String,
    pub exchange_type: ExchangeType,
    pub routing_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Topic,
    Fanout,
    Headers,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Topic => "topic",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AmqpDeadLetter {
    Queue(String),
    Exchange {
        exchange: String,
        routing_key: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisConsumerConfig {
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub start_id: String,
    pub batch: usize,
    pub block: Duration,
    pub claim_idle: Duration,
    pub claim_interval: Duration,
    pub max_deliveries: u32,
    pub dead_letter_stream: String,
    /// Bounds on one entry, checked before it is decoded or copied.
    pub limits: RedisEntryLimits,
    /// Other consumers of the group idle this long with nothing pending are removed.
    pub forget_idle: Duration,
    /// Trimming of the stream and of the dead-letter stream; none by default.
    pub trim: StreamTrims,
    /// How entries are read (and copied for retries and dead letters); boxed to keep
    /// [`ConsumerKind`]'s variants of a similar size.
    pub format: Box<EntryFormat>,
}

/// Bounds on one stream entry. An entry over them never reaches a handler: it is
/// dead-lettered as `invalid` in a form whose size does not depend on its field count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisEntryLimits {
    /// Most field/value pairs.
    pub max_fields: usize,
    /// Most bytes, field names and values together.
    pub max_bytes: u64,
}

impl RedisEntryLimits {
    /// The largest `max_fields` allowed: a copy of the entry plus bosun's failure fields must
    /// fit the argument list of one Lua call (about 8,000 values).
    pub const MAX_FIELDS_CEILING: usize = 3_800;
}

impl Default for RedisEntryLimits {
    fn default() -> Self {
        Self {
            max_fields: 1_000,
            max_bytes: 16 << 20,
        }
    }
}

/// `trim` of a redis consumer (its stream) and of its `dead_letter` (the dead-letter stream).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamTrims {
    pub stream: Option<Trim>,
    pub dead_letter: Option<Trim>,
}

/// How far one stream is trimmed, and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct Trim {
    pub limit: TrimLimit,
    pub interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimLimit {
    /// Keep this many of the newest entries.
    MaxLen(u64),
    /// Trim entries whose id is older than this.
    MaxAge(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    None,
    PerKey,
}

impl fmt::Display for Ordering {
    /// The value as written in the file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ordering::None => "none",
            Ordering::PerKey => "per_key",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxConfig {
    pub database: String,
    pub table: String,
    pub target: String,
    pub destination: Option<String>,
    pub batch: usize,
    pub poll_interval: Duration,
    pub notify_channel: String,
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    pub retain_published: Duration,
    pub ordering: Ordering,
    /// Batches relayed at once, each on connections of its own.
    pub concurrency: usize,
    pub publish_timeout: Duration,
    pub maxlen: Option<usize>,
    /// Apply the table's DDL when the relay starts.
    pub migrate: bool,
    /// The layout of an existing table the relay reads instead of bosun's own.
    pub existing: Option<Box<ExistingOutbox>>,
}

/// An application's own outbox table: its columns by role and its status column. Every
/// name is a validated plain identifier, quoted wherever it is formatted into SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingOutbox {
    /// Which column plays which role; also reached through `Deref`.
    pub mapping: OutboxColumns,
    /// The status column.
    pub state: String,
    /// Its values; checked to hold no quote-escaping surprises (no backslash, no control
    /// characters).
    pub pending: String,
    pub published: String,
    pub failed: String,
}

/// `columns = { ... }` of an existing outbox table: which column plays which role. Read
/// from the file as it is, then checked (plain identifiers, none mapped twice).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxColumns {
    /// Integer primary key; rows go out in its order.
    pub id: String,
    /// Exchange (amqp) or stream (redis); unmapped: the outbox's `destination`.
    pub destination: Option<String>,
    pub routing_key: String,
    pub payload: String,
    /// JSON object of message headers; unmapped: none.
    pub headers: Option<String>,
    /// Unmapped: no content type.
    pub content_type: Option<String>,
    /// Unmapped: a UUID derived from the table and the row's id.
    pub message_id: Option<String>,
    /// The message timestamp and the backlog age; unmapped: neither.
    pub created_at: Option<String>,
    /// Text column that receives a failed row's reason; unmapped: the reason is only logged.
    pub last_error: Option<String>,
    /// Integer column counting publish attempts; unmapped: a refused row fails at once.
    pub attempts: Option<String>,
}

impl std::ops::Deref for ExistingOutbox {
    type Target = OutboxColumns;
    fn deref(&self) -> &OutboxColumns {
        &self.mapping
    }
}

impl ExistingOutbox {
    /// Every mapped column, by role name, in a stable order.
    pub fn columns(&self) -> Vec<(&'static str, &str)> {
        let mut out = vec![
            ("id", self.id.as_str()),
            ("routing_key", self.routing_key.as_str()),
            ("payload", self.payload.as_str()),
        ];
        let optional = [
            ("destination", &self.destination),
            ("headers", &self.headers),
            ("content_type", &self.content_type),
            ("message_id", &self.message_id),
            ("created_at", &self.created_at),
            ("last_error", &self.last_error),
            ("attempts", &self.attempts),
        ];
        out.extend(
            optional
                .into_iter()
                .filter_map(|(role, column)| column.as_deref().map(|c| (role, c))),
        );
        out.push(("state", self.state.as_str()));
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterSource {
    Queue(String),
    Stream {
        stream: String,
        group: String,
        /// How the dead letters are read, and replays written.
        format: EntryFormat,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterConfig {
    pub source: String,
    pub from: DeadLetterSource,
    pub archive: Option<String>,
    pub table: String,
    pub default_action: Action,
    pub rules: Vec<Rule>,
    /// Apply the archive table's DDL when the processor starts.
    pub migrate: bool,
    /// The queues (amqp) or streams (redis) a replay may go to: `replay_to` as configured,
    /// else the consumers whose dead letters land in this processor's source. A dead letter
    /// naming anything else is archived, never replayed.
    pub replay_to: Vec<String>,
    /// Where a dead letter goes when its action can never succeed and there is no archive:
    /// an exchange (amqp) or stream (redis) on the processor's broker.
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub when: Matcher,
    pub action: Action,
}

#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// Who wrote the dead letter: `broker` (RabbitMQ's own dead-lettering) or `bosun` (a
    /// consumer's dead-letter copy).
    pub source: Vec<String>,
    pub error_kind: Vec<String>,
    pub error: Option<regex::Regex>,
    pub original: Vec<String>,
    pub reason: Vec<String>,
    pub attempts_below: Option<u32>,
    pub attempts_at_least: Option<u32>,
}

impl PartialEq for Matcher {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
            && self.error_kind == other.error_kind
            && self.error.as_ref().map(regex::Regex::as_str)
                == other.error.as_ref().map(regex::Regex::as_str)
            && self.original == other.original
            && self.reason == other.reason
            && self.attempts_below == other.attempts_below
            && self.attempts_at_least == other.attempts_at_least
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Replay {
        delay: Duration,
        max_replays: u32,
    },
    Archive,
    Drop,
    Forward {
        target: String,
        routing_key: Option<String>,
    },
}
