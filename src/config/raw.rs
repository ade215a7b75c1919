//! The TOML file as written: serde structs that mirror the file, field for field.
//!
//! These types are a compatibility boundary with users' files. They hold strings where the
//! runtime wants durations or URLs; `validate` turns them into the types in `model`. Every
//! struct denies unknown fields so a typo is an error, not a silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub service: RawService,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub tracing: RawTracing,
    #[serde(default)]
    pub brokers: BTreeMap<String, RawBroker>,
    #[serde(default)]
    pub databases: BTreeMap<String, RawDatabase>,
    #[serde(default)]
    pub handlers: BTreeMap<String, RawHandler>,
    #[serde(default)]
    pub consumers: BTreeMap<String, RawConsumer>,
    #[serde(default)]
    pub outboxes: BTreeMap<String, RawOutbox>,
    #[serde(default)]
    pub dead_letters: BTreeMap<String, RawDeadLetter>,
    /// `[publish_api]`: `POST /v1/publish` and scheduled sends on the admin listener.
    pub publish_api: Option<RawPublishApi>,
    #[serde(default)]
    pub inboxes: BTreeMap<String, RawInbox>,
}

/// `[inboxes.NAME]`: where consumers with an inbox record the keys they handled.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInbox {
    /// `"postgres"` or `"redis"`.
    pub kind: String,
    /// postgres: name of a `[databases.*]` entry.
    pub database: Option<String>,
    /// postgres: the table (default `bosun_inbox`).
    pub table: Option<String>,
    /// postgres: create the table and function at start (default true).
    pub migrate: Option<bool>,
    /// redis: name of a redis `[brokers.*]` entry.
    pub broker: Option<String>,
    /// How long a done record is kept (default "7d").
    pub window: Option<String>,
    /// How long an in-progress claim holds before another process may take it over
    /// (default "5m").
    pub lease: Option<String>,
}

/// `inbox = { store = "...", key = "..." }` of a consumer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumerInbox {
    /// Name of an `[inboxes.*]` entry.
    pub store: String,
    /// `message_id` (default), `header:NAME`, `json:/pointer` or `sha256:body`.
    pub key: Option<String>,
}

/// A consumer's `ordering = { ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrdering {
    /// `header:NAME`, `json:/pointer`, `routing_key` (amqp), `message_id` or `sha256:body`.
    pub key: String,
    /// Lanes (handlers in flight at most); default 64.
    pub lanes: Option<usize>,
    /// `hold` (default: a retry waits in its lane) or `release` (through the retry topology).
    pub retry: Option<String>,
}

/// `[service]`: process-wide settings; changing them needs a restart.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Name used in logs, the AMQP connection name and the Redis consumer name.
    pub name: Option<String>,
    /// How long SIGTERM waits for in-flight work before aborting it ("30s").
    pub shutdown_timeout: Option<String>,
    /// "json" (default) or "pretty".
    pub log_format: Option<String>,
    /// A tracing filter ("info", "bosun=debug,lapin=warn"); `RUST_LOG` wins when set.
    pub log_level: Option<String>,
    /// Where to write the process id, for `bosun reload --pid-file`.
    pub pid_file: Option<String>,
}

/// `[tracing]`: OpenTelemetry traces over OTLP/HTTP (protobuf); off unless `enabled`. Keys
/// left out fall back to the standard `OTEL_*` environment variables, then to the SDK's
/// defaults. Changing it needs a restart.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// Record and export spans (default false).
    pub enabled: Option<bool>,
    /// The collector's OTLP/HTTP base URL ("http://127.0.0.1:4318"); `/v1/traces` is added
    /// unless the path already ends with it. Default: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else "http://localhost:4318".
    pub endpoint: Option<String>,
    /// Headers sent with every export (an API key): secrets, never logged.
    pub headers: Option<BTreeMap<String, String>>,
    /// How long one export may take ("10s").
    pub timeout: Option<String>,
    /// "parentbased_traceidratio" (the only one; the default when `sample_ratio` is given).
    pub sampler: Option<String>,
    /// Share of new traces recorded, 0.0 to 1.0; a message that arrives with a trace context
    /// follows its producer's decision.
    pub sample_ratio: Option<f64>,
    /// `service.name` of the spans (default `OTEL_SERVICE_NAME`, else `[service].name`).
    pub service_name: Option<String>,
    /// Further resource attributes (`deployment.environment.name = "prod"`).
    pub resource: Option<BTreeMap<String, String>>,
}

/// `[http]`: the metrics, health and admin listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// Socket address to listen on ("127.0.0.1:9090").
    pub listen: Option<String>,
    /// `[http.admin]`: the dead-letter admin API; off unless a token is configured.
    pub admin: Option<RawAdmin>,
}

/// `[http.admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Socket address of the admin API's own listener (default "127.0.0.1:9091"); never the
    /// metrics listener, so exposing `/metrics` never exposes the admin API.
    pub listen: Option<String>,
    /// Name of an environment variable that holds the bearer token.
    pub token_env: Option<String>,
    /// Path of a file that holds the bearer token.
    pub token_file: Option<String>,
    /// `[http.admin.tokens.NAME]`: more tokens, each with its roles.
    #[serde(default)]
    pub tokens: BTreeMap<String, RawToken>,
    /// How callers are identified: "tokens" (default), "trusted_header" or "none".
    pub auth: Option<String>,
    /// `trusted_header`: addresses of the auth proxies whose user header is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// `trusted_header`: the header naming the user (default "X-Forwarded-User").
    pub user_header: Option<String>,
    /// `trusted_header`: the header listing the user's groups, comma-separated (default
    /// "X-Forwarded-Groups").
    pub groups_header: Option<String>,
    /// `trusted_header`: the roles each group gives (`ops = ["operator"]`).
    #[serde(default)]
    pub group_roles: BTreeMap<String, Vec<String>>,
    /// Serve the dead-letter console under `/ui` (default true).
    pub console: Option<bool>,
    /// Hide message bodies from viewers (default false).
    pub redact_bodies: Option<bool>,
    /// Allow editors to edit a dead letter and replay the edited copy (default false).
    pub edit_and_replay: Option<bool>,
    /// Mark the console's session cookie `Secure` (default false: set it when the console
    /// is reached over HTTPS).
    pub secure_cookies: Option<bool>,
    /// How long a console session lasts without use ("8h").
    pub session_ttl: Option<String>,
}

/// `[http.admin.tokens.NAME]`: a bearer token with the roles it is given.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    /// Name of an environment variable that holds the token.
    pub token_env: Option<String>,
    /// Path of a file that holds the token.
    pub token_file: Option<String>,
    /// "admin", "publisher".
    pub roles: Vec<String>,
}

/// `[publish_api]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublishApi {
    /// The `[databases.*]` entry holding the idempotency records (and the scheduled outboxes'
    /// tables).
    pub database: String,
    /// The brokers requests may name (default: every broker).
    pub brokers: Option<Vec<String>>,
    /// `[outboxes.*]` entries that store scheduled sends, at most one per broker.
    #[serde(default)]
    pub scheduled: Vec<String>,
    /// Largest message body (bytes, or "1MiB"); larger requests are answered 413.
    pub max_body_size: Option<RawSize>,
    /// How long an immediate send waits for the broker's confirm ("10s").
    pub publish_timeout: Option<String>,
    /// How long a message id is remembered with its answer ("24h").
    pub idempotency_window: Option<String>,
    /// The table of idempotency records (default "bosun_publish_requests").
    pub idempotency_table: Option<String>,
    /// Create the idempotency table at start (default true).
    pub migrate: Option<bool>,
}

/// `[brokers.NAME]`: a connection target, chosen by `kind`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RawBroker {
    Amqp(RawAmqpBroker),
    Redis(RawRedisBroker),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmqpBroker {
    /// `amqp://` or `amqps://` URL.
    pub url: Option<String>,
    /// Several nodes of one RabbitMQ cluster, tried in a shuffled order at every (re)connect.
    pub urls: Option<Vec<String>>,
    /// Connection name shown in the RabbitMQ management UI.
    pub connection_name: Option<String>,
    /// Heartbeat interval ("30s"); "0" disables heartbeats.
    pub heartbeat: Option<String>,
    /// The broker's maximum message body size (bytes, or "16MiB"): publishes over it are
    /// refused without being sent.
    pub max_message_size: Option<RawSize>,
    pub tls: Option<RawTls>,
}

/// A size in bytes: an integer, or a string with an optional `B`, `KiB`, `MiB` or `GiB` unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisBroker {
    /// `redis://` or `rediss://` URL; `redis+cluster://` (`rediss+cluster://`) for a cluster
    /// reached through one seed node.
    pub url: Option<String>,
    /// Redis Cluster: seed nodes (`redis://` or `rediss://` URLs); the rest is discovered.
    pub cluster: Option<Vec<String>>,
    /// Redis Sentinel: the monitored primary's name and the sentinels' URLs.
    pub sentinel: Option<RawSentinel>,
    pub tls: Option<RawTls>,
    /// "payload" (default), "fields", "dapr", "redpanda" or "watermill".
    pub entry_format: Option<String>,
    /// the field holding the body (default: the format's).
    pub payload_field: Option<String>,
    /// the field holding the stable message id (default "message_id").
    pub id_field: Option<String>,
}

/// `sentinel = { master = "mymaster", nodes = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// The sentinels' `redis://` URLs; their credentials are used for the primary too.
    pub nodes: Vec<String>,
}

/// TLS material for `amqps://`, `rediss://` and HTTPS handlers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM file with the CA certificates to trust.
    pub ca_file: Option<String>,
    /// PEM file with the client certificate chain.
    pub cert_file: Option<String>,
    /// PEM file with the client private key.
    pub key_file: Option<String>,
}

/// `[databases.NAME]`: a PostgreSQL pool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: String,
    /// Pool size (default 10).
    pub max_connections: Option<u32>,
    /// Time allowed to open a connection (default "5s").
    pub connect_timeout: Option<String>,
}

/// `[handlers.NAME]`: `kind` picks the implementation; the other keys are that kind's options,
/// checked by the kind itself.
#[derive(Debug, Deserialize)]
pub struct RawHandler {
    pub kind: String,
    #[serde(flatten)]
    pub options: toml::Table,
}

/// `[consumers.NAME]`: one table for both broker kinds; the broker named by `source` decides
/// which fields apply, and a field of the other kind is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumer {
    /// Name of a `[brokers.*]` entry.
    pub source: String,
    /// Name of a `[handlers.*]` entry.
    pub handler: String,
    /// Handlers in flight at once (amqp default: prefetch; redis default: batch).
    pub concurrency: Option<usize>,
    pub retry: Option<RawRetry>,
    pub dead_letter: Option<RawConsumerDeadLetter>,
    /// With tracing on, what the span of each message does with the producer's trace
    /// context: "continue" (default: a child of the producer's span), "link" (a new trace
    /// linked to it) or "new" (a new trace).
    pub trace: Option<String>,
    /// Record each message's key before the handler runs, and settle repeats without it.
    pub inbox: Option<RawConsumerInbox>,
    /// What becomes of a message whose key the inbox holds as done: `ack` (default), `drop`
    /// or `dead_letter`.
    pub on_duplicate: Option<String>,
    /// Per-key order with many keys in flight: `{ key = "header:NAME", lanes = 64 }`.
    pub ordering: Option<RawOrdering>,
    /// One reader at a time across every process running this consumer; the others wait.
    pub single_active: Option<bool>,

    // amqp
    pub queue: Option<String>,
    pub queue_type: Option<String>,
    pub bindings: Option<Vec<RawBinding>>,
    pub declare: Option<bool>,
    pub prefetch: Option<u16>,
    /// Largest body handed to the handler (default "1MiB"); larger ones are dead-lettered as
    /// `invalid`.
    pub max_message_size: Option<RawSize>,
    /// Bytes of bodies held in memory at once (default "64MiB"); the prefetch is cut to
    /// `max_in_flight_bytes / max_message_size`.
    pub max_in_flight_bytes: Option<RawSize>,
    /// A header holding the retries an earlier consumer already made (e.g. `x-retry-count`),
    /// read as the attempt count when `bosun-attempt` is absent.
    pub attempt_header: Option<String>,
    /// How often `bosun_consumer_backlog` is sampled with passive declares (default "15s";
    /// "0" turns it off).
    pub backlog_interval: Option<String>,

    // redis
    pub stream: Option<String>,
    pub group: Option<String>,
    pub consumer: Option<String>,
    pub start_id: Option<String>,
    pub batch: Option<usize>,
    pub block: Option<String>,
    pub claim_idle: Option<String>,
    pub claim_interval: Option<String>,
    pub max_deliveries: Option<u32>,
    /// Most fields an entry may have; one with more is dead-lettered as `invalid`.
    pub max_fields: Option<usize>,
    /// Most bytes (names and values together) an entry may have.
    pub max_entry_size: Option<RawSize>,
    /// Consumers of the group with nothing pending and idle this long are removed.
    pub forget_idle: Option<String>,
    /// redis: trim the stream (`{ maxlen = N }` or `{ max_age = "7d" }`); off by default.
    pub trim: Option<RawTrim>,
    /// redis: "payload" (default), "fields", "dapr", "redpanda" or "watermill".
    pub entry_format: Option<String>,
    /// redis: the field holding the body (default: the format's).
    pub payload_field: Option<String>,
    /// redis: the field holding the stable message id (default "message_id").
    pub id_field: Option<String>,
}

/// `trim = { ... }`: how far a Redis stream is trimmed. Entries some group has not read and
/// acknowledged are never trimmed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrim {
    /// Keep about this many of the newest entries.
    pub maxlen: Option<u64>,
    /// Trim entries older than this ("7d", "12h"), by their id's time.
    pub max_age: Option<String>,
    /// How often to trim (default "1m").
    pub interval: Option<String>,
}

/// `retry = { ... }`: how failed messages are retried before they are dead-lettered.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Total attempts, the first included (default 5). 1 means no retries.
    pub max_attempts: Option<u32>,
    /// "exponential" (default) or "fixed".
    pub backoff: Option<String>,
    /// First delay (default "1s"); the only delay for "fixed".
    pub initial: Option<String>,
    /// Largest delay (default "5m").
    pub max: Option<String>,
    /// Growth factor per attempt (default 2.0).
    pub multiplier: Option<f64>,
    /// Random spread, a fraction of the delay (default 0.1).
    pub jitter: Option<f64>,
    /// Explicit delay tiers ("1s", "10s", "1m"); attempt N waits tiers[N-1] (the last repeats).
    pub tiers: Option<Vec<String>>,
}

/// `dead_letter = { ... }` on a consumer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsumerDeadLetter {
    /// amqp: queue to dead-letter into (default `<queue>.dlq`).
    pub queue: Option<String>,
    /// amqp: exchange to dead-letter into, instead of a queue.
    pub exchange: Option<String>,
    /// amqp: routing key used with `exchange` (default: the original routing key).
    pub routing_key: Option<String>,
    /// redis: stream to dead-letter into (default `<stream>:dlq`).
    pub stream: Option<String>,
    /// redis: trim the dead-letter stream (`{ maxlen = N }` or `{ max_age = "30d" }`).
    pub trim: Option<RawTrim>,
}

/// One `bindings = [{ ... }]` item.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBinding {
    pub exchange: String,
    /// "direct", "topic" (default), "fanout" or "headers".
    pub exchange_type: Option<String>,
    /// Default "#".
    pub routing_key: Option<String>,
}

/// `[outboxes.NAME]`: a relay from a PostgreSQL outbox table to a broker.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutbox {
    /// Name of a `[databases.*]` entry.
    pub database: String,
    /// Outbox table (default "bosun_outbox").
    pub table: Option<String>,
    /// Name of a `[brokers.*]` entry to publish to.
    pub target: String,
    /// Exchange (amqp) or stream (redis) for rows whose `destination` is NULL.
    pub destination: Option<String>,
    /// Rows claimed per batch (default 500).
    pub batch: Option<usize>,
    /// Poll interval when no NOTIFY arrives (default "1s").
    pub poll_interval: Option<String>,
    /// LISTEN channel (default: the table name).
    pub notify_channel: Option<String>,
    /// Publish attempts before a row is marked failed (default 10).
    pub max_attempts: Option<u32>,
    pub retry: Option<RawRetry>,
    /// How long published rows are kept (default "24h"; "0" deletes at once).
    pub retain_published: Option<String>,
    /// "none" (default) or "per_key".
    pub ordering: Option<String>,
    /// Batches relayed at once, each claiming with SKIP LOCKED on connections of its own
    /// (default 1).
    pub concurrency: Option<usize>,
    /// Upper bound on publishing one batch while its row locks are held (default "30s").
    pub publish_timeout: Option<String>,
    /// Redis targets: approximate MAXLEN for XADD.
    pub maxlen: Option<usize>,
    /// Create or update the outbox table (as `bosun outbox migrate` does) when the relay starts.
    pub migrate: Option<bool>,
    /// An existing table's columns, by role (with `state`): relay from a table the
    /// application already has, unchanged.
    pub columns: Option<super::model::OutboxColumns>,
    /// An existing table's status column and its values (with `columns`).
    pub state: Option<RawOutboxState>,
}

/// `state = { ... }`: the status column of an existing outbox table and its values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutboxState {
    pub column: String,
    /// Default "pending".
    pub pending: Option<String>,
    /// Default "published".
    pub published: Option<String>,
    /// Default "failed".
    pub failed: Option<String>,
}

/// `[dead_letters.NAME]`: a processor for one dead-letter queue or stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadLetter {
    /// Name of a `[brokers.*]` entry.
    pub source: String,
    /// amqp: the dead-letter queue.
    pub queue: Option<String>,
    /// redis: the dead-letter stream.
    pub stream: Option<String>,
    /// redis: consumer group (default "bosun-dlq").
    pub group: Option<String>,
    /// redis: "payload" (default), "fields", "dapr", "redpanda" or "watermill".
    pub entry_format: Option<String>,
    /// redis: the field holding the body (default: the format's).
    pub payload_field: Option<String>,
    /// redis: the field holding the stable message id (default "message_id").
    pub id_field: Option<String>,
    /// Name of a `[databases.*]` entry to archive into.
    pub archive: Option<String>,
    /// Archive table (default "dead_letters").
    pub table: Option<String>,
    /// Action when no rule matches (default "archive").
    pub default_action: Option<String>,
    /// Create or update the archive table (as `bosun dlq migrate` does) when the processor starts.
    pub migrate: Option<bool>,
    /// Queues (amqp) or streams (redis) replays may go to (default: the queues or streams of
    /// the consumers that dead-letter into this processor's source).
    pub replay_to: Option<Vec<String>>,
    /// Without an archive: exchange (amqp) or stream (redis) for dead letters whose action can
    /// never succeed.
    pub fallback: Option<String>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

/// `[[dead_letters.NAME.rules]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub when: RawMatcher,
    /// "replay", "archive", "drop" or "forward".
    pub action: String,
    /// replay: wait before republishing (default "0s").
    pub delay: Option<String>,
    /// replay: replays allowed before the message is archived instead (default 3).
    pub max_replays: Option<u32>,
    /// forward: exchange (amqp) target.
    pub exchange: Option<String>,
    /// forward: routing key (default: the original).
    pub routing_key: Option<String>,
    /// forward: stream (redis) target.
    pub stream: Option<String>,
}

/// `when = { ... }`: every field given must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatcher {
    /// Who wrote the dead letter: "broker" (RabbitMQ dead-lettered it: expired, maxlen,
    /// rejected, delivery limit) or "bosun" (a consumer's dead-letter copy). A string or a list.
    pub source: Option<StringOrList>,
    pub error_kind: Option<Vec<String>>,
    /// Regular expression over the error text.
    pub error: Option<String>,
    /// Original queue or stream names.
    pub original: Option<Vec<String>>,
    /// Broker reasons from `x-death`: rejected, expired, maxlen, delivery_limit.
    pub reason: Option<Vec<String>>,
    pub attempts_below: Option<u32>,
    pub attempts_at_least: Option<u32>,
}

/// A value given as one string or as a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}
