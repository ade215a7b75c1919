//! Turning the raw TOML structs into the validated model: parsing durations, URLs and
//! addresses, filling defaults, and checking cross-references between sections.
//!
//! Every problem is collected (not just the first) with the key path it belongs to; the
//! loader turns paths into file positions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::issue::Issue;
use super::model::*;
use super::raw::*;
use crate::handler::HandlerKinds;
use crate::retry::{Backoff, RetryPolicy};
use crate::units::{UnitError, parse_duration, parse_size};

/// Collects issues while walking the raw config.
struct Checker<'a> {
    issues: Vec<Issue>,
    kinds: &'a HandlerKinds,
    /// With `Secrets::Optional`, secrets that cannot be read are noted here, not in `issues`.
    secrets: Secrets,
    missing_secrets: Vec<Issue>,
    /// Keys whose value holds an unset variable (only with `Secrets::Optional`): their value
    /// is unknown, so problems with it are not reported and URLs get a placeholder.
    unchecked: Vec<Vec<String>>,
}

/// Whether a secret bosun cannot read (an unset variable, a missing token file) stops the
/// load (`bosun run`) or is only reported (`bosun check` without `--strict`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Secrets {
    #[default]
    Required,
    Optional,
}

/// True for a message that says a secret could not be read: an unset environment variable
/// or an unreadable token file. Such a problem is about the machine, not the file's shape.
pub fn is_missing_secret(message: &str) -> bool {
    (message.contains("environment variable `") && message.contains("is not set"))
        || message.starts_with("cannot read token file")
}

/// A handler whose secret could not be read while checking: it can be listed, never built.
struct MissingSecret(String);

impl crate::handler::HandlerFactory for MissingSecret {
    fn build(
        &self,
        _: &crate::handler::BuildContext<'_>,
    ) -> anyhow::Result<std::sync::Arc<dyn crate::handler::Handler>> {
        Err(anyhow::anyhow!("{}", self.0))
    }
}

fn path(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// The entry format `entry_format`, `payload_field` and `id_field` give, `None` when none of
/// them is given, or the key that is wrong and why.
fn entry_format(
    layout: Option<&str>,
    payload_field: Option<&str>,
    id_field: Option<&str>,
) -> Result<Option<EntryFormat>, (&'static str, String)> {
    if layout.is_none() && payload_field.is_none() && id_field.is_none() {
        return Ok(None);
    }
    let layout = match layout {
        None => EntryLayout::Payload,
        Some(name) => EntryLayout::parse(name).ok_or_else(|| {
            (
                "entry_format",
                format!(
                    "unknown entry format `{name}`, expected one of {}",
                    EntryLayout::NAMES.join(", ")
                ),
            )
        })?,
    };
    let mut format = EntryFormat::of(layout);
    if let Some(field) = payload_field {
        if layout == EntryLayout::Fields {
            return Err((
                "payload_field",
                "entry_format \"fields\" has no payload field: the body is every field".into(),
            ));
        }
        format.payload_field = field.to_owned();
    }
    if let Some(field) = id_field {
        format.id_field = field.to_owned();
    }
    for (key, name) in [
        ("payload_field", &format.payload_field),
        ("id_field", &format.id_field),
    ] {
        if name.is_empty() || name.starts_with("bosun-") {
            return Err((
                key,
                format!(
                    "`{name}` cannot name a field: it is empty or one of bosun's own (`bosun-*`)"
                ),
            ));
        }
    }
    for (key, name) in [
        ("payload_field", &format.payload_field),
        ("id_field", &format.id_field),
    ] {
        if key == "payload_field" && layout == EntryLayout::Fields {
            continue;
        }
        // The fields that carry the message itself: a body or id kept in one would be read
        // back as something else.
        let own = match name.as_str() {
            "message_id" => key == "payload_field",
            "correlation_id" | "content_type" | "timestamp_ms" => true,
            "metadata" => layout == EntryLayout::Watermill,
            _ => false,
        };
        if own {
            return Err((
                key,
                format!(
                    "`{name}` is a field bosun reads as part of every message in entry format {}; choose another name",
                    layout.as_str()
                ),
            ));
        }
    }
    if layout != EntryLayout::Fields && format.payload_field == format.id_field {
        return Err(("id_field", "must differ from `payload_field`".into()));
    }
    Ok(Some(format))
}

impl Checker<'_> {
    /// The entry format given by the keys of the table at `at`, `None` when none is given.
    fn entry_format(
        &mut self,
        at: &[&str],
        layout: Option<&str>,
        payload_field: Option<&str>,
        id_field: Option<&str>,
    ) -> Option<EntryFormat> {
        entry_format(layout, payload_field, id_field).unwrap_or_else(|(key, message)| {
            let mut at = at.to_vec();
            at.push(key);
            self.issue(&at, message);
            None
        })
    }

    /// An issue that is only a warning when secrets are optional.
    fn secret_issue(&mut self, at: &[&str], message: impl Into<String>) {
        let issue = Issue {
            path: path(at),
            message: message.into(),
        };
        match self.secrets {
            Secrets::Required => self.issues.push(issue),
            Secrets::Optional => self.missing_secrets.push(issue),
        }
    }

    /// A consumer key of the other broker kind: `at` ends with the key's name.
    fn wrong_kind(&mut self, at: &[&str], belongs_to: &str, broker_kind: &str, broker: &str) {
        let field = at.last().copied().unwrap_or_default();
        self.issue(
            at,
            format!(
                "`{field}` is for {belongs_to} consumers, but broker `{broker}` is {broker_kind}"
            ),
        );
    }

    fn issue(&mut self, at: &[&str], message: impl Into<String>) {
        let path = path(at);
        if self.is_unchecked(&path) {
            return;
        }
        self.issues.push(Issue {
            path,
            message: message.into(),
        });
    }

    fn is_unchecked(&self, at: &[String]) -> bool {
        self.unchecked.iter().any(|u| at.starts_with(u))
    }

    fn duration(&mut self, at: &[&str], value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(text) => match parse_duration(text) {
                Ok(d) => d,
                Err(e) => {
                    self.issue(at, format!("invalid duration {text:?}: {e} (expected e.g. \"500ms\", \"30s\", \"5m\")"));
                    default
                }
            },
        }
    }

    /// A positive size in bytes.
    fn size(&mut self, at: &[&str], raw: &RawSize) -> Option<u64> {
        let parsed = match raw {
            RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| UnitError::Negative),
            RawSize::Text(text) => parse_size(text),
        };
        match parsed {
            Ok(0) => {
                self.issue(at, "must be at least 1 byte");
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                self.issue(
                    at,
                    format!("invalid size: {e} (expected bytes, or e.g. \"16MiB\")"),
                );
                None
            }
        }
    }

    fn url(&mut self, at: &[&str], value: &str, schemes: &[&str]) -> Option<SecretUrl> {
        if self.is_unchecked(&path(at)) && url::Url::parse(value).is_err() {
            // The URL comes from a variable that is not set: a placeholder lets the rest of
            // the file be checked (nothing connects to it: only `bosun check` gets here).
            let scheme = schemes.first().copied().unwrap_or("unset");
            return url::Url::parse(&format!("{scheme}://unset.invalid/"))
                .ok()
                .map(SecretUrl::new);
        }
        match url::Url::parse(value) {
            Ok(url) if schemes.contains(&url.scheme()) => Some(SecretUrl::new(url)),
            // Not even redacted: the value may come from the environment, where it belongs
            // to something else.
            Ok(url) => {
                self.issue(
                    at,
                    format!(
                        "the URL has scheme `{}`, expected one of: {}",
                        url.scheme(),
                        schemes.join(", ")
                    ),
                );
                None
            }
            // The parse error never echoes the URL: it may hold a password.
            Err(e) => {
                self.issue(at, format!("invalid URL: {e}"));
                None
            }
        }
    }

    fn one_of<T: Copy>(
        &mut self,
        at: &[&str],
        value: Option<&str>,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        let Some(text) = value else { return default };
        match options.iter().find(|(name, _)| *name == text) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<String> = options.iter().map(|(n, _)| format!("`{n}`")).collect();
                self.issue(
                    at,
                    format!(
                        "unknown value `{text}`, expected one of {}",
                        names.join(", ")
                    ),
                );
                default
            }
        }
    }

    /// A `trim = { ... }` table: exactly one of `maxlen` and `max_age`.
    fn trim(&mut self, at: &[&str], raw: &RawTrim) -> Option<Trim> {
        let sub = |k: &'static str| -> Vec<&str> { at.iter().copied().chain([k]).collect() };
        let interval = self.duration(
            &sub("interval"),
            raw.interval.as_deref(),
            Duration::from_secs(60),
        );
        if interval.is_zero() {
            self.issue(&sub("interval"), "must be longer than zero");
        }
        let limit = match (raw.maxlen, &raw.max_age) {
            (Some(0), None) => {
                self.issue(&sub("maxlen"), "must be at least 1");
                return None;
            }
            (Some(n), None) => TrimLimit::MaxLen(n),
            (None, Some(age)) => {
                let age = self.duration(&sub("max_age"), Some(age), Duration::ZERO);
                if age.is_zero() {
                    self.issue(&sub("max_age"), "must be longer than zero");
                    return None;
                }
                TrimLimit::MaxAge(age)
            }
            _ => {
                self.issue(
                    at,
                    "give `maxlen` (entries kept) or `max_age` (e.g. \"7d\"), one of the two",
                );
                return None;
            }
        };
        Some(Trim {
            limit,
            interval: interval.max(Duration::from_millis(100)),
        })
    }

    fn name_ok(&mut self, at: &[&str], what: &str, name: &str) {
        if name.is_empty() {
            self.issue(at, format!("{what} must not be empty"));
        }
    }

    /// The `tls` table of broker `name`, whose URL is `url`: it only applies to the TLS
    /// scheme, and a client certificate needs its key.
    fn broker_tls(
        &mut self,
        name: &str,
        url: &SecretUrl,
        tls_scheme: &str,
        raw: Option<&RawTls>,
    ) -> Option<TlsConfig> {
        let t = raw?;
        let at = ["brokers", name, "tls"];
        if url.url().scheme() != tls_scheme {
            self.issue(
                &at,
                format!(
                    "TLS settings need a `{tls_scheme}://` URL; this broker's URL is `{}://`",
                    url.url().scheme()
                ),
            );
        }
        if t.cert_file.is_some() != t.key_file.is_some() {
            self.issue(
                &at,
                "`cert_file` and `key_file` go together: a client certificate needs its key",
            );
        }
        self.tls(raw)
    }

    fn tls(&mut self, raw: Option<&RawTls>) -> Option<TlsConfig> {
        raw.map(|t| TlsConfig {
            ca_file: t.ca_file.as_ref().map(PathBuf::from),
            cert_file: t.cert_file.as_ref().map(PathBuf::from),
            key_file: t.key_file.as_ref().map(PathBuf::from),
        })
    }

    fn retry(&mut self, at: &[&str], raw: Option<&RawRetry>, default_attempts: u32) -> RetryPolicy {
        let defaults = RetryPolicy::default();
        let Some(raw) = raw else {
            return RetryPolicy {
                max_attempts: default_attempts,
                ..defaults
            };
        };
        let sub = |k: &'static str| -> Vec<&str> { at.iter().copied().chain([k]).collect() };
        let max_attempts = raw.max_attempts.unwrap_or(default_attempts);
        if max_attempts == 0 {
            self.issue(
                &sub("max_attempts"),
                "must be at least 1 (1 means no retries)",
            );
        }
        let jitter = raw.jitter.unwrap_or(defaults.jitter);
        if !(0.0..=1.0).contains(&jitter) {
            self.issue(&sub("jitter"), format!("{jitter} is outside 0.0..=1.0"));
        }
        let initial = self.duration(
            &sub("initial"),
            raw.initial.as_deref(),
            Duration::from_secs(1),
        );
        let backoff = if let Some(tiers) = &raw.tiers {
            if raw.backoff.is_some()
                || raw.initial.is_some()
                || raw.max.is_some()
                || raw.multiplier.is_some()
            {
                self.issue(&sub("tiers"), "`tiers` replaces `backoff`, `initial`, `max` and `multiplier`; give one or the other");
            }
            if tiers.is_empty() {
                self.issue(&sub("tiers"), "must list at least one delay");
            }
            let parsed = tiers
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let index = i.to_string();
                    let at: Vec<&str> = at
                        .iter()
                        .copied()
                        .chain(["tiers", index.as_str()])
                        .collect();
                    self.duration(&at, Some(t), Duration::from_secs(1))
                })
                .collect();
            Backoff::Tiers(parsed)
        } else {
            let kind = self.one_of(
                &sub("backoff"),
                raw.backoff.as_deref(),
                true,
                &[("exponential", true), ("fixed", false)],
            );
            if kind {
                let max = self.duration(&sub("max"), raw.max.as_deref(), Duration::from_secs(300));
                let multiplier = raw.multiplier.unwrap_or(2.0);
                if !(multiplier >= 1.0 && multiplier.is_finite()) {
                    self.issue(
                        &sub("multiplier"),
                        format!("{multiplier} must be at least 1.0"),
                    );
                }
                if max < initial {
                    self.issue(&sub("max"), "must not be shorter than `initial`");
                }
                Backoff::Exponential {
                    initial,
                    max,
                    multiplier,
                }
            } else {
                Backoff::Fixed(initial)
            }
        };
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            backoff,
            jitter: jitter.clamp(0.0, 1.0),
        }
    }
}

/// The default Redis consumer name: `$BOSUN_CONSUMER_NAME`, else the hostname (the pod name
/// in Kubernetes). Stable across restarts, so a restarted process reads its own pending
/// entries again; two live processes with one name are refused by the consumer's name lock.
pub fn default_consumer_name() -> String {
    if let Ok(name) = std::env::var("BOSUN_CONSUMER_NAME")
        && !name.trim().is_empty()
    {
        return name.trim().to_owned();
    }
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "bosun".into())
}

/// Validates `raw` (`origin` names the file in the result); with `Secrets::Optional`, secrets that cannot be read come back in the
/// second list instead of failing the load.
pub fn validate_with(
    raw: RawConfig,
    origin: &str,
    kinds: &HandlerKinds,
    secrets: Secrets,
    unchecked: Vec<Vec<String>>,
) -> (Result<Config, Vec<Issue>>, Vec<Issue>) {
    let mut c = Checker {
        issues: Vec::new(),
        kinds,
        secrets,
        missing_secrets: Vec::new(),
        unchecked,
    };

    let service = ServiceConfig {
        name: raw.service.name.clone().unwrap_or_else(|| "bosun".into()),
        shutdown_timeout: c.duration(
            &["service", "shutdown_timeout"],
            raw.service.shutdown_timeout.as_deref(),
            Duration::from_secs(30),
        ),
        log_format: c.one_of(
            &["service", "log_format"],
            raw.service.log_format.as_deref(),
            LogFormat::Json,
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
        ),
        log_level: raw
            .service
            .log_level
            .clone()
            .unwrap_or_else(|| "info".into()),
        pid_file: raw.service.pid_file.as_ref().map(PathBuf::from),
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&service.log_level) {
        c.issue(
            &["service", "log_level"],
            format!("invalid log filter: {e}"),
        );
    }

    let listen_text = raw.http.listen.as_deref().unwrap_or("127.0.0.1:9090");
    let listen = match listen_text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(e) => {
            c.issue(
                &["http", "listen"],
                format!(
                    "invalid socket address {listen_text:?}: {e} (expected e.g. \"127.0.0.1:9090\")"
                ),
            );
            SocketAddr::from(([127, 0, 0, 1], 9090))
        }
    };
    let admin_token = raw
        .http
        .admin
        .as_ref()
        .and_then(|admin| admin_token(&mut c, admin));
    let tokens = raw
        .http
        .admin
        .as_ref()
        .map(|admin| access_tokens(&mut c, admin))
        .unwrap_or_default();
    let admin_listen_text = raw
        .http
        .admin
        .as_ref()
        .and_then(|admin| admin.listen.as_deref())
        .unwrap_or(DEFAULT_ADMIN_LISTEN);
    let default_admin_listen = SocketAddr::from(([127, 0, 0, 1], 9091));
    let admin_listen = match admin_listen_text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(e) => {
            c.issue(
                &["http", "admin", "listen"],
                format!(
                    "invalid socket address {admin_listen_text:?}: {e} (expected e.g. \"127.0.0.1:9091\")"
                ),
            );
            default_admin_listen
        }
    };
    if raw.http.admin.is_some() && admin_listen == listen {
        c.issue(
            &["http", "admin", "listen"],
            format!("the admin API needs a listener of its own: {admin_listen} is also `[http].listen`, which serves /metrics"),
        );
    }
    let console =
        super::console::build(raw.http.admin.as_ref(), admin_listen, &mut |at, message| {
            c.issue(at, message)
        });
    let http = HttpConfig {
        listen,
        admin_token,
        tokens,
        admin_listen,
        console,
    };
    let tracing = tracing_config(&mut c, &raw.tracing);

    let mut brokers = BTreeMap::new();
    for (name, broker) in &raw.brokers {
        let config = match broker {
            RawBroker::Amqp(b) => amqp_urls(&mut c, name, b).map(|(url, urls)| {
                let heartbeat = b.heartbeat.as_deref().map(|h| {
                    c.duration(
                        &["brokers", name, "heartbeat"],
                        Some(h),
                        Duration::from_secs(30),
                    )
                });
                let max_message_size = b
                    .max_message_size
                    .as_ref()
                    .and_then(|size| c.size(&["brokers", name, "max_message_size"], size));
                let tls = c.broker_tls(name, &url, "amqps", b.tls.as_ref());
                BrokerConfig::Amqp(AmqpBrokerConfig {
                    url,
                    urls,
                    connection_name: b.connection_name.clone(),
                    heartbeat,
                    max_message_size,
                    tls,
                })
            }),
            RawBroker::Redis(b) => redis_servers(&mut c, name, b).map(|(url, topology)| {
                let tls = c.broker_tls(name, &url, "rediss", b.tls.as_ref());
                let format = c
                    .entry_format(
                        &["brokers", name.as_str()],
                        b.entry_format.as_deref(),
                        b.payload_field.as_deref(),
                        b.id_field.as_deref(),
                    )
                    .unwrap_or_default();
                BrokerConfig::Redis(RedisBrokerConfig {
                    url,
                    topology,
                    tls,
                    format,
                })
            }),
        };
        if let Some(config) = config {
            brokers.insert(name.clone(), config);
        }
    }

    let mut databases = BTreeMap::new();
    for (name, db) in &raw.databases {
        if let Some(url) = c.url(
            &["databases", name, "url"],
            &db.url,
            &["postgres", "postgresql"],
        ) {
            let max_connections = db.max_connections.unwrap_or(10);
            if max_connections == 0 {
                c.issue(
                    &["databases", name, "max_connections"],
                    "must be at least 1",
                );
            }
            let connect_timeout = c.duration(
                &["databases", name, "connect_timeout"],
                db.connect_timeout.as_deref(),
                Duration::from_secs(5),
            );
            databases.insert(
                name.clone(),
                DatabaseConfig {
                    url,
                    max_connections,
                    connect_timeout,
                },
            );
        }
    }

    let mut handlers = BTreeMap::new();
    for (name, handler) in &raw.handlers {
        let Some(kind) = c.kinds.get(&handler.kind) else {
            let known = c.kinds.names().join("`, `");
            c.issue(
                &["handlers", name, "kind"],
                format!(
                    "unknown handler kind `{}`, expected one of `{known}`",
                    handler.kind
                ),
            );
            continue;
        };
        // `circuit_breaker` and `rate_limit` belong to flow control, whatever the kind.
        let (kind_options, flow) = crate::flow_control::split_options(&handler.options);
        match flow {
            Err(e) => {
                let mut at: Vec<&str> = vec!["handlers", name];
                at.extend(e.path.iter().map(String::as_str));
                c.issue(&at, e.message);
            }
            Ok(flow) => {
                if let Some(broker) = flow.rate_limit.and_then(|r| r.global) {
                    match raw.brokers.get(&broker) {
                        Some(RawBroker::Redis(_)) => {}
                        Some(_) => c.issue(
                            &["handlers", name, "rate_limit", "broker"],
                            format!("broker `{broker}` is amqp: a global rate limit is shared through a redis broker"),
                        ),
                        None => c.issue(
                            &["handlers", name, "rate_limit", "broker"],
                            format!("broker `{broker}` is not defined (defined brokers: {})", list(raw.brokers.keys())),
                        ),
                    }
                }
            }
        }
        match kind.parse(name, &kind_options) {
            Ok(factory) => {
                handlers.insert(
                    name.clone(),
                    HandlerConfig {
                        kind: handler.kind.clone(),
                        options: handler.options.clone(),
                        factory,
                    },
                );
            }
            Err(e) => {
                let mut at: Vec<&str> = vec!["handlers", name];
                at.extend(e.path.iter().map(String::as_str));
                if c.secrets == Secrets::Optional && is_missing_secret(&e.message) {
                    handlers.insert(
                        name.clone(),
                        HandlerConfig {
                            kind: handler.kind.clone(),
                            options: handler.options.clone(),
                            factory: std::sync::Arc::new(MissingSecret(e.message.clone())),
                        },
                    );
                }
                c.issue(&at, e.message);
            }
        }
    }
    check_handler_references(&mut c, &handlers);

    let broker_names = || -> String { list(raw.brokers.keys()) };
    let mut consumers = BTreeMap::new();
    for (name, consumer) in &raw.consumers {
        if !raw.handlers.contains_key(&consumer.handler) {
            c.issue(&["consumers", name, "handler"], format!(
                "consumer `{name}` names handler `{}`, which is not defined (defined handlers: {})",
                consumer.handler, list(raw.handlers.keys())));
        }
        let Some(broker) = raw.brokers.get(&consumer.source) else {
            c.issue(&["consumers", name, "source"], format!(
                "consumer `{name}` names broker `{}`, which is not defined (defined brokers: {})",
                consumer.source, broker_names()));
            continue;
        };
        if let Some(mut config) = consumer_config(&mut c, name, consumer, broker) {
            config.inbox = consumer_inbox(&mut c, name, consumer, &raw.inboxes);
            config.ordering = consumer_ordering(&mut c, name, consumer, &config);
            config.single_active = consumer.single_active.unwrap_or(false);
            consumers.insert(name.clone(), config);
        }
    }
    let inboxes = inboxes(&mut c, &raw);

    let mut outboxes = BTreeMap::new();
    for (name, outbox) in &raw.outboxes {
        if !raw.databases.contains_key(&outbox.database) {
            c.issue(&["outboxes", name, "database"], format!(
                "outbox `{name}` names database `{}`, which is not defined (defined databases: {})",
                outbox.database, list(raw.databases.keys())));
        }
        if !raw.brokers.contains_key(&outbox.target) {
            c.issue(
                &["outboxes", name, "target"],
                format!(
                    "outbox `{name}` names broker `{}`, which is not defined (defined brokers: {})",
                    outbox.target,
                    broker_names()
                ),
            );
        }
        outboxes.insert(name.clone(), outbox_config(&mut c, name, outbox));
    }

    let mut dead_letters = BTreeMap::new();
    for (name, dl) in &raw.dead_letters {
        if let Some(db) = &dl.archive
            && !raw.databases.contains_key(db)
        {
            c.issue(&["dead_letters", name, "archive"], format!(
                "dead-letter processor `{name}` names database `{db}`, which is not defined (defined databases: {})",
                list(raw.databases.keys())));
        }
        let Some(broker) = raw.brokers.get(&dl.source) else {
            c.issue(&["dead_letters", name, "source"], format!(
                "dead-letter processor `{name}` names broker `{}`, which is not defined (defined brokers: {})",
                dl.source, broker_names()));
            continue;
        };
        if let Some(config) = dead_letter_config(&mut c, name, dl, broker, &consumers) {
            dead_letters.insert(name.clone(), config);
        }
    }

    let publish_api = raw
        .publish_api
        .as_ref()
        .map(|api| publish_api_config(&mut c, &raw, api, &outboxes));

    if c.secrets == Secrets::Optional {
        let (missing, issues): (Vec<Issue>, Vec<Issue>) = std::mem::take(&mut c.issues)
            .into_iter()
            .partition(|issue| is_missing_secret(&issue.message));
        c.issues = issues;
        c.missing_secrets.extend(missing);
    }
    let missing_secrets = std::mem::take(&mut c.missing_secrets);
    let result = if c.issues.is_empty() {
        Ok(Config {
            origin: origin.to_owned(),
            service,
            http,
            tracing,
            brokers,
            databases,
            handlers,
            consumers,
            outboxes,
            dead_letters,
            publish_api,
            inboxes,
        })
    } else {
        Err(c.issues)
    };
    (result, missing_secrets)
}

/// `[tracing]`: the endpoint a URL (made the traces URL), the ratio within 0..=1, header
/// values kept as secrets.
fn tracing_config(c: &mut Checker<'_>, raw: &RawTracing) -> TracingConfig {
    let endpoint = raw.endpoint.as_deref().and_then(|text| {
        c.url(&["tracing", "endpoint"], text, &["http", "https"])
            .map(|url| traces_url(url.expose()))
    });
    let timeout = raw
        .timeout
        .as_deref()
        .map(|t| c.duration(&["tracing", "timeout"], Some(t), Duration::from_secs(10)));
    if let Some(sampler) = raw.sampler.as_deref()
        && sampler != "parentbased_traceidratio"
    {
        c.issue(
            &["tracing", "sampler"],
            format!("unknown sampler `{sampler}`, expected `parentbased_traceidratio`"),
        );
    }
    let sample_ratio = match raw.sample_ratio {
        Some(r) if !(0.0..=1.0).contains(&r) => {
            c.issue(
                &["tracing", "sample_ratio"],
                format!("must be between 0.0 and 1.0, not {r}"),
            );
            None
        }
        Some(r) => Some(r),
        None if raw.sampler.is_some() => Some(1.0),
        None => None,
    };
    let headers = raw
        .headers
        .iter()
        .flatten()
        .filter_map(|(name, value)| {
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                && !value.bytes().any(|b| b.is_ascii_control());
            if !ok {
                // The value is a secret: only the name is shown.
                c.issue(
                    &["tracing", "headers", name],
                    "a header name is letters, digits, `-` and `_`, and its value holds no control characters",
                );
            }
            ok.then(|| (name.clone(), Secret::new(value.clone())))
        })
        .collect();
    TracingConfig {
        enabled: raw.enabled.unwrap_or(false),
        endpoint,
        headers,
        timeout,
        sample_ratio,
        service_name: raw.service_name.clone(),
        resource: raw.resource.clone().unwrap_or_default(),
    }
}

/// An OTLP/HTTP base URL made the traces URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is.
fn traces_url(base: &str) -> String {
    if base.trim_end_matches('/').ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{}/v1/traces", base.trim_end_matches('/'))
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// `[http.admin]`'s own token (role `admin`). It may be left out when named tokens are
/// given.
fn admin_token(c: &mut Checker<'_>, admin: &RawAdmin) -> Option<Secret> {
    if admin.token_env.is_none() && admin.token_file.is_none() {
        if admin.tokens.is_empty() && admin.auth.as_deref().is_none_or(|auth| auth == "tokens") {
            c.issue(
                &["http", "admin"],
                "`[http.admin]` needs `token_env` or `token_file` (or `[http.admin.tokens.NAME]`)",
            );
        }
        return None;
    }
    read_token(
        c,
        &["http", "admin"],
        admin.token_env.as_deref(),
        admin.token_file.as_deref(),
    )
}

/// `[http.admin.tokens.NAME]`: each token read like `[http.admin]`'s, with its roles.
fn access_tokens(c: &mut Checker<'_>, admin: &RawAdmin) -> BTreeMap<String, AccessToken> {
    let mut out = BTreeMap::new();
    for (name, raw) in &admin.tokens {
        let at = ["http", "admin", "tokens", name.as_str()];
        let mut roles = Vec::new();
        for role in &raw.roles {
            match Role::parse(role) {
                Some(role) if !roles.contains(&role) => roles.push(role),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                    c.issue(
                        &[&at[..], &["roles"]].concat(),
                        format!("unknown role {role:?} (roles: {})", known.join(", ")),
                    );
                }
            }
        }
        if raw.roles.is_empty() {
            c.issue(
                &[&at[..], &["roles"]].concat(),
                "a token needs at least one role (e.g. `roles = [\"publisher\"]`)",
            );
        }
        if raw.token_env.is_none() && raw.token_file.is_none() {
            c.issue(&at, "a token needs `token_env` or `token_file`");
            continue;
        }
        if let Some(token) = read_token(c, &at, raw.token_env.as_deref(), raw.token_file.as_deref())
            && !roles.is_empty()
        {
            out.insert(name.clone(), AccessToken { token, roles });
        }
    }
    out
}

/// A token from `token_env` or `token_file` (one of them) under `at`.
fn read_token(
    c: &mut Checker<'_>,
    at: &[&str],
    token_env: Option<&str>,
    token_file: Option<&str>,
) -> Option<Secret> {
    let under = |key: &'static str| -> Vec<&str> { [at, &[key]].concat() };
    match (token_env, token_file) {
        (Some(_), Some(_)) => {
            c.issue(at, "give `token_env` or `token_file`, not both");
            None
        }
        (Some(var), None) => {
            crate::secret::note_env_read(var);
            match std::env::var(var) {
                Ok(token) if !token.trim().is_empty() => {
                    strong_token(c, &under("token_env"), token.trim())
                }
                _ => {
                    c.secret_issue(
                        &under("token_env"),
                        format!("environment variable `{var}` is not set or empty"),
                    );
                    None
                }
            }
        }
        (None, Some(file)) => match std::fs::read_to_string(file) {
            Ok(token) if !token.trim().is_empty() => {
                strong_token(c, &under("token_file"), token.trim())
            }
            Ok(_) => {
                c.issue(
                    &under("token_file"),
                    format!("token file {file:?} is empty"),
                );
                None
            }
            Err(e) => {
                c.secret_issue(
                    &under("token_file"),
                    format!("cannot read token file {file:?}: {e}"),
                );
                None
            }
        },
        (None, None) => None,
    }
}

/// `[publish_api]`: its database, brokers and scheduled outboxes must exist, and a scheduled
/// outbox must be bosun's own table (an existing table has no due time) in the same database
/// as the idempotency records, so that a scheduled send and its record commit together.
fn publish_api_config(
    c: &mut Checker<'_>,
    raw: &RawConfig,
    api: &RawPublishApi,
    outboxes: &BTreeMap<String, OutboxConfig>,
) -> PublishApiConfig {
    let at = |k: &'static str| -> [&str; 2] { ["publish_api", k] };
    if !raw.databases.contains_key(&api.database) {
        c.issue(
            &at("database"),
            format!(
                "database `{}` is not defined (defined databases: {})",
                api.database,
                list(raw.databases.keys())
            ),
        );
    }
    if raw.http.admin.is_none() {
        c.issue(
            &["publish_api"],
            "the publish API is served on the admin listener: configure `[http.admin]` with a token that has the `publisher` (or `admin`) role",
        );
    }
    let brokers = match &api.brokers {
        Some(names) => {
            for name in names {
                if !raw.brokers.contains_key(name) {
                    c.issue(
                        &at("brokers"),
                        format!(
                            "broker `{name}` is not defined (defined brokers: {})",
                            list(raw.brokers.keys())
                        ),
                    );
                }
            }
            names.clone()
        }
        None => raw.brokers.keys().cloned().collect(),
    };
    let mut scheduled = BTreeMap::new();
    for name in &api.scheduled {
        let Some(outbox) = outboxes.get(name) else {
            c.issue(
                &at("scheduled"),
                format!(
                    "outbox `{name}` is not defined (defined outboxes: {})",
                    list(raw.outboxes.keys())
                ),
            );
            continue;
        };
        if outbox.existing.is_some() {
            c.issue(&at("scheduled"), format!("outbox `{name}` relays from an existing table (`columns`), which has no due time: scheduled sends need bosun's own outbox table"));
        }
        if outbox.database != api.database {
            c.issue(&at("scheduled"), format!("outbox `{name}` is in database `{}`, the publish API's records in `{}`: they must be the same, so that a scheduled send and its record commit together", outbox.database, api.database));
        }
        if !brokers.contains(&outbox.target) {
            c.issue(
                &at("scheduled"),
                format!(
                    "outbox `{name}` publishes to broker `{}`, which is not among `brokers`",
                    outbox.target
                ),
            );
        }
        if let Some(other) = scheduled.insert(outbox.target.clone(), name.clone()) {
            c.issue(&at("scheduled"), format!("outboxes `{other}` and `{name}` both publish to broker `{}`: give at most one scheduled outbox per broker", outbox.target));
        }
    }
    let max_body_size = api
        .max_body_size
        .as_ref()
        .and_then(|raw| c.size(&at("max_body_size"), raw))
        .unwrap_or(DEFAULT_PUBLISH_BODY_SIZE);
    let idempotency_table = api
        .idempotency_table
        .clone()
        .unwrap_or_else(|| "bosun_publish_requests".into());
    if !valid_sql_identifier(&idempotency_table) {
        c.issue(
            &at("idempotency_table"),
            format!("`{idempotency_table}` is not a plain lowercase SQL identifier"),
        );
    }
    let publish_timeout = c.duration(
        &at("publish_timeout"),
        api.publish_timeout.as_deref(),
        Duration::from_secs(10),
    );
    if publish_timeout.is_zero() {
        c.issue(&at("publish_timeout"), "must be longer than 0");
    }
    let idempotency_window = c.duration(
        &at("idempotency_window"),
        api.idempotency_window.as_deref(),
        Duration::from_secs(24 * 3600),
    );
    if idempotency_window.is_zero() {
        c.issue(&at("idempotency_window"), "must be longer than 0");
    }
    PublishApiConfig {
        database: api.database.clone(),
        brokers,
        scheduled,
        max_body_size,
        publish_timeout,
        idempotency_window,
        idempotency_table,
        migrate: api.migrate.unwrap_or(true),
    }
}

/// Largest publish API body when `max_body_size` is not given.
const DEFAULT_PUBLISH_BODY_SIZE: u64 = 1024 * 1024;

/// The admin token, if it is long enough to resist guessing. The message never shows it.
fn strong_token(c: &mut Checker<'_>, at: &[&str], token: &str) -> Option<Secret> {
    let secret = Secret::new(token);
    if token.len() < MIN_ADMIN_TOKEN_BYTES {
        c.issue(
            at,
            format!(
                "the admin token is {} bytes long; it must be at least {MIN_ADMIN_TOKEN_BYTES} (e.g. `openssl rand -hex 32`)",
                token.len()
            ),
        );
        return None;
    }
    Some(secret)
}

/// Every handler a handler depends on (e.g. a route's targets) must exist, without cycles.
fn check_handler_references(c: &mut Checker<'_>, handlers: &BTreeMap<String, HandlerConfig>) {
    for (name, handler) in handlers {
        for dep in handler.factory.dependencies() {
            if !handlers.contains_key(&dep) {
                c.issue(
                    &["handlers", name],
                    format!("handler `{name}` refers to handler `{dep}`, which is not defined"),
                );
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        name: &str,
        handlers: &BTreeMap<String, HandlerConfig>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if done.contains(name) {
            return None;
        }
        if let Some(pos) = stack.iter().position(|n| n == name) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(name.to_owned());
            return Some(cycle);
        }
        stack.push(name.to_owned());
        if let Some(handler) = handlers.get(name) {
            for dep in handler.factory.dependencies() {
                if let Some(cycle) = visit(&dep, handlers, stack, done) {
                    return Some(cycle);
                }
            }
        }
        stack.pop();
        done.insert(name.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for name in handlers.keys() {
        if let Some(cycle) = visit(name, handlers, &mut Vec::new(), &mut done) {
            c.issue(
                &["handlers", name],
                format!(
                    "handlers refer to each other in a cycle: {}",
                    cycle.join(" -> ")
                ),
            );
            return;
        }
    }
}

fn consumer_config(
    c: &mut Checker<'_>,
    name: &str,
    raw: &RawConsumer,
    broker: &RawBroker,
) -> Option<ConsumerConfig> {
    let at = |k: &'static str| -> [&str; 3] { ["consumers", name, k] };
    let default_attempts = 5;
    let retry = c.retry(&at("retry"), raw.retry.as_ref(), default_attempts);
    let trace = c.one_of(
        &at("trace"),
        raw.trace.as_deref(),
        TraceMode::Continue,
        &[
            ("continue", TraceMode::Continue),
            ("link", TraceMode::Link),
            ("new", TraceMode::New),
        ],
    );
    let dl = raw.dead_letter.as_ref();
    match broker {
        RawBroker::Amqp(_) => {
            for (field, given) in [
                ("stream", raw.stream.is_some()),
                ("group", raw.group.is_some()),
                ("consumer", raw.consumer.is_some()),
                ("start_id", raw.start_id.is_some()),
                ("batch", raw.batch.is_some()),
                ("block", raw.block.is_some()),
                ("claim_idle", raw.claim_idle.is_some()),
                ("claim_interval", raw.claim_interval.is_some()),
                ("max_deliveries", raw.max_deliveries.is_some()),
                ("max_fields", raw.max_fields.is_some()),
                ("max_entry_size", raw.max_entry_size.is_some()),
                ("forget_idle", raw.forget_idle.is_some()),
                ("trim", raw.trim.is_some()),
                ("entry_format", raw.entry_format.is_some()),
                ("payload_field", raw.payload_field.is_some()),
                ("id_field", raw.id_field.is_some()),
            ] {
                if given {
                    c.wrong_kind(&at(field), "redis", "amqp", &raw.source);
                }
            }
            if dl.is_some_and(|d| d.trim.is_some()) {
                c.issue(
                    &["consumers", name, "dead_letter", "trim"],
                    "`dead_letter.trim` is for redis consumers: a queue is bounded by its own policy (`x-max-length`)",
                );
            }
            if dl.is_some_and(|d| d.stream.is_some()) {
                c.issue(
                    &["consumers", name, "dead_letter", "stream"],
                    "`dead_letter.stream` is for redis consumers; use `queue` or `exchange`",
                );
            }
            let Some(queue) = raw.queue.clone() else {
                c.issue(
                    &["consumers", name],
                    format!(
                        "consumer `{name}` reads from amqp broker `{}` and needs `queue`",
                        raw.source
                    ),
                );
                return None;
            };
            c.name_ok(&at("queue"), "queue", &queue);
            let queue_type = c.one_of(
                &at("queue_type"),
                raw.queue_type.as_deref(),
                QueueType::Classic,
                &[
                    ("classic", QueueType::Classic),
                    ("quorum", QueueType::Quorum),
                ],
            );
            let mut bindings = Vec::new();
            for (i, b) in raw.bindings.iter().flatten().enumerate() {
                let index = i.to_string();
                let exchange_type = c.one_of(
                    &["consumers", name, "bindings", &index, "exchange_type"],
                    b.exchange_type.as_deref(),
                    ExchangeType::Topic,
                    &[
                        ("direct", ExchangeType::Direct),
                        ("topic", ExchangeType::Topic),
                        ("fanout", ExchangeType::Fanout),
                        ("headers", ExchangeType::Headers),
                    ],
                );
                if b.exchange.is_empty() {
                    c.issue(
                        &["consumers", name, "bindings", &index, "exchange"],
                        "cannot bind to the default exchange (it routes by queue name already)",
                    );
                }
                bindings.push(Binding {
                    exchange: b.exchange.clone(),
                    exchange_type,
                    routing_key: b.routing_key.clone().unwrap_or_else(|| "#".into()),
                });
            }
            let prefetch = raw.prefetch.unwrap_or(100);
            if prefetch == 0 {
                c.issue(
                    &at("prefetch"),
                    "must be at least 1 (0 would mean unlimited)",
                );
            }
            let concurrency = raw.concurrency.unwrap_or(prefetch as usize);
            if concurrency == 0 {
                c.issue(&at("concurrency"), "must be at least 1");
            }
            let mut limits = DeliveryLimits::default();
            if let Some(size) = &raw.max_message_size {
                limits.max_message_size = c
                    .size(&at("max_message_size"), size)
                    .unwrap_or(limits.max_message_size);
            }
            if let Some(size) = &raw.max_in_flight_bytes {
                limits.max_in_flight_bytes = c
                    .size(&at("max_in_flight_bytes"), size)
                    .unwrap_or(limits.max_in_flight_bytes);
            }
            if let Some(header) = &raw.attempt_header {
                attempt_header_ok(c, &at("attempt_header"), header);
            }
            let dead_letter = match dl {
                Some(RawConsumerDeadLetter {
                    queue: Some(_),
                    exchange: Some(_),
                    ..
                }) => {
                    c.issue(
                        &["consumers", name, "dead_letter"],
                        "give `queue` or `exchange`, not both",
                    );
                    AmqpDeadLetter::Queue(format!("{queue}.dlq"))
                }
                Some(RawConsumerDeadLetter {
                    exchange: Some(exchange),
                    routing_key,
                    ..
                }) => AmqpDeadLetter::Exchange {
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                },
                Some(RawConsumerDeadLetter { queue: Some(q), .. }) => {
                    AmqpDeadLetter::Queue(q.clone())
                }
                _ => AmqpDeadLetter::Queue(format!("{queue}.dlq")),
            };
            Some(ConsumerConfig {
                source: raw.source.clone(),
                handler: raw.handler.clone(),
                concurrency: concurrency.max(1),
                retry,
                trace,
                inbox: None,
                ordering: None,
                single_active: false,
                kind: ConsumerKind::Amqp(AmqpConsumerConfig {
                    queue,
                    queue_type,
                    bindings,
                    declare: raw.declare.unwrap_or(true),
                    prefetch: prefetch.max(1),
                    dead_letter,
                    limits,
                    attempt_header: raw.attempt_header.clone(),
                    backlog_interval: c.duration(
                        &at("backlog_interval"),
                        raw.backlog_interval.as_deref(),
                        DEFAULT_BACKLOG_INTERVAL,
                    ),
                }),
            })
        }
        RawBroker::Redis(b) => {
            for (field, given) in [
                ("queue", raw.queue.is_some()),
                ("queue_type", raw.queue_type.is_some()),
                ("bindings", raw.bindings.is_some()),
                ("declare", raw.declare.is_some()),
                ("prefetch", raw.prefetch.is_some()),
                ("max_message_size", raw.max_message_size.is_some()),
                ("max_in_flight_bytes", raw.max_in_flight_bytes.is_some()),
                ("attempt_header", raw.attempt_header.is_some()),
                ("backlog_interval", raw.backlog_interval.is_some()),
            ] {
                if given {
                    c.wrong_kind(&at(field), "amqp", "redis", &raw.source);
                }
            }
            if dl.is_some_and(|d| {
                d.queue.is_some() || d.exchange.is_some() || d.routing_key.is_some()
            }) {
                c.issue(&["consumers", name, "dead_letter"], "redis consumers dead-letter into a stream: use `dead_letter = { stream = \"...\" }`");
            }
            let Some(stream) = raw.stream.clone() else {
                c.issue(
                    &["consumers", name],
                    format!(
                        "consumer `{name}` reads from redis broker `{}` and needs `stream`",
                        raw.source
                    ),
                );
                return None;
            };
            c.name_ok(&at("stream"), "stream", &stream);
            if raw_is_cluster(b) && !super::redis_keys::can_derive(&stream) {
                c.issue(
                    &at("stream"),
                    format!("`{stream}` has no hash tag but holds a `}}`: on a cluster its retry set, dead-letter stream and locks cannot share its slot; give it a hash tag (`{{orders}}.events`)"),
                );
            }
            let group = raw.group.clone().unwrap_or_else(|| name.to_owned());
            let start_id = raw.start_id.clone().unwrap_or_else(|| "0".into());
            if start_id != "0" && start_id != "$" && !start_id.contains('-') {
                c.issue(&at("start_id"), format!("`{start_id}` is not a stream id; use \"0\" (whole stream), \"$\" (new entries only) or an id like \"1700000000000-0\""));
            }
            let batch = raw.batch.unwrap_or(100);
            if batch == 0 {
                c.issue(&at("batch"), "must be at least 1");
            }
            let block = c.duration(&at("block"), raw.block.as_deref(), Duration::from_secs(5));
            let claim_idle = c.duration(
                &at("claim_idle"),
                raw.claim_idle.as_deref(),
                Duration::from_secs(60),
            );
            if claim_idle.is_zero() {
                c.issue(
                    &at("claim_idle"),
                    "must be longer than zero (and longer than the slowest handler)",
                );
            }
            let claim_interval = c.duration(
                &at("claim_interval"),
                raw.claim_interval.as_deref(),
                (claim_idle / 2).max(Duration::from_secs(1)),
            );
            let max_deliveries = raw
                .max_deliveries
                .unwrap_or(retry.max_attempts.saturating_add(5));
            if max_deliveries == 0 {
                c.issue(&at("max_deliveries"), "must be at least 1");
            }
            let concurrency = raw.concurrency.unwrap_or(batch);
            if concurrency == 0 {
                c.issue(&at("concurrency"), "must be at least 1");
            }
            let mut limits = RedisEntryLimits::default();
            if let Some(n) = raw.max_fields {
                if n == 0 || n > RedisEntryLimits::MAX_FIELDS_CEILING {
                    c.issue(
                        &at("max_fields"),
                        format!(
                            "{n} is outside 1..={} (a copy must fit one script call)",
                            RedisEntryLimits::MAX_FIELDS_CEILING
                        ),
                    );
                } else {
                    limits.max_fields = n;
                }
            }
            if let Some(size) = raw.max_entry_size.as_ref()
                && let Some(n) = c.size(&at("max_entry_size"), size)
            {
                limits.max_bytes = n;
            }
            let forget_idle = c.duration(
                &at("forget_idle"),
                raw.forget_idle.as_deref(),
                Duration::from_secs(86_400),
            );
            if forget_idle < claim_idle {
                c.issue(&at("forget_idle"), "must not be shorter than `claim_idle`");
            }
            // The consumer's own format, else its broker's (whose problems the broker reports).
            let format = c
                .entry_format(
                    &["consumers", name],
                    raw.entry_format.as_deref(),
                    raw.payload_field.as_deref(),
                    raw.id_field.as_deref(),
                )
                .or_else(|| broker_format(b))
                .unwrap_or_default();
            Some(ConsumerConfig {
                source: raw.source.clone(),
                handler: raw.handler.clone(),
                concurrency: concurrency.max(1),
                retry,
                trace,
                inbox: None,
                ordering: None,
                single_active: false,
                kind: ConsumerKind::Redis(RedisConsumerConfig {
                    dead_letter_stream: dl.and_then(|d| d.stream.clone()).unwrap_or_else(|| {
                        super::redis_keys::derived_key(&stream, "dlq", raw_is_cluster(b))
                    }),
                    stream,
                    group,
                    consumer: raw.consumer.clone().unwrap_or_else(default_consumer_name),
                    start_id,
                    batch: batch.max(1),
                    block,
                    claim_idle,
                    claim_interval,
                    max_deliveries: max_deliveries.max(1),
                    limits,
                    forget_idle,
                    format: Box::new(format),
                    trim: StreamTrims {
                        stream: raw.trim.as_ref().and_then(|t| c.trim(&at("trim"), t)),
                        dead_letter: dl
                            .and_then(|d| d.trim.as_ref())
                            .and_then(|t| c.trim(&["consumers", name, "dead_letter", "trim"], t)),
                    },
                }),
            })
        }
    }
}

/// Whether a raw redis broker is a cluster (`cluster`, or a `redis+cluster://` URL).
fn raw_is_cluster(b: &RawRedisBroker) -> bool {
    b.cluster.is_some()
        || b.url.as_deref().is_some_and(|u| {
            u.starts_with("redis+cluster://") || u.starts_with("rediss+cluster://")
        })
}

/// `url` or `urls` of an amqp broker: the first address and all of them.
fn amqp_urls(
    c: &mut Checker<'_>,
    name: &str,
    b: &RawAmqpBroker,
) -> Option<(SecretUrl, Vec<SecretUrl>)> {
    const SCHEMES: &[&str] = &["amqp", "amqps"];
    match (&b.url, &b.urls) {
        (Some(url), None) => {
            let url = c.url(&["brokers", name, "url"], url, SCHEMES)?;
            Some((url.clone(), vec![url]))
        }
        (None, Some(urls)) => {
            if urls.is_empty() {
                c.issue(&["brokers", name, "urls"], "must list at least one URL");
                return None;
            }
            let mut parsed = Vec::new();
            for (i, url) in urls.iter().enumerate() {
                parsed.push(c.url(&["brokers", name, "urls", &i.to_string()], url, SCHEMES));
            }
            let parsed: Option<Vec<SecretUrl>> = parsed.into_iter().collect();
            let parsed = parsed?;
            let schemes: BTreeSet<&str> = parsed.iter().map(|u| u.url().scheme()).collect();
            if schemes.len() > 1 {
                c.issue(
                    &["brokers", name, "urls"],
                    "mixes `amqp://` and `amqps://`: the nodes of one broker share one TLS setting",
                );
            }
            Some((parsed[0].clone(), parsed))
        }
        (Some(_), Some(_)) => {
            c.issue(
                &["brokers", name],
                "give `url` or `urls`, not both (put every node in `urls`)",
            );
            None
        }
        (None, None) => {
            c.issue(
                &["brokers", name, "url"],
                "is required (or `urls` for several nodes)",
            );
            None
        }
    }
}

/// Where a redis broker's servers are: `url` (`redis+cluster://` for a cluster through one
/// seed), `cluster` or `sentinel`, exactly one of them.
fn redis_servers(
    c: &mut Checker<'_>,
    name: &str,
    b: &RawRedisBroker,
) -> Option<(SecretUrl, RedisTopology)> {
    const SCHEMES: &[&str] = &["redis", "rediss"];
    let given = [b.url.is_some(), b.cluster.is_some(), b.sentinel.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        c.issue(
            &["brokers", name],
            "give exactly one of `url` (one server), `cluster` (seed nodes) and `sentinel` (`{ master, nodes }`)",
        );
        return None;
    }
    let list = |c: &mut Checker<'_>, at: &[&str], urls: &[String]| -> Option<Vec<SecretUrl>> {
        if urls.is_empty() {
            c.issue(at, "must list at least one URL");
            return None;
        }
        let mut parsed = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let mut path = at.to_vec();
            let index = i.to_string();
            path.push(&index);
            parsed.push(c.url(&path, url, SCHEMES));
        }
        let parsed: Option<Vec<SecretUrl>> = parsed.into_iter().collect();
        let parsed = parsed?;
        let schemes: BTreeSet<&str> = parsed.iter().map(|u| u.url().scheme()).collect();
        if schemes.len() > 1 {
            c.issue(
                at,
                "mixes `redis://` and `rediss://`: the nodes of one broker share one TLS setting",
            );
        }
        Some(parsed)
    };
    if let Some(url) = &b.url {
        let at = ["brokers", name, "url"];
        // `redis+cluster://host:port`: a cluster reached through that one seed node.
        let seed = url
            .strip_prefix("redis+cluster://")
            .map(|rest| format!("redis://{rest}"))
            .or_else(|| {
                url.strip_prefix("rediss+cluster://")
                    .map(|rest| format!("rediss://{rest}"))
            });
        return match seed {
            Some(seed) => {
                let url = c.url(&at, &seed, SCHEMES)?;
                Some((url.clone(), RedisTopology::Cluster { nodes: vec![url] }))
            }
            None => c
                .url(&at, url, SCHEMES)
                .map(|url| (url, RedisTopology::Single)),
        };
    }
    if let Some(nodes) = &b.cluster {
        let nodes = list(c, &["brokers", name, "cluster"], nodes)?;
        return Some((nodes[0].clone(), RedisTopology::Cluster { nodes }));
    }
    let sentinel = b.sentinel.as_ref()?;
    if sentinel.master.trim().is_empty() {
        c.issue(
            &["brokers", name, "sentinel", "master"],
            "must name the primary the sentinels monitor (e.g. \"mymaster\")",
        );
    }
    let nodes = list(c, &["brokers", name, "sentinel", "nodes"], &sentinel.nodes)?;
    Some((
        nodes[0].clone(),
        RedisTopology::Sentinel {
            master: sentinel.master.clone(),
            nodes,
        },
    ))
}

/// A table name is used in SQL identifiers: keep it to a safe, optionally schema-qualified form.
/// `attempt_header` must name a header an earlier consumer counted retries in: not one of
/// bosun's own (`bosun-attempt` is read first anyway) nor the broker's dead-letter history.
fn attempt_header_ok(c: &mut Checker<'_>, at: &[&str], header: &str) {
    let lower = header.to_ascii_lowercase();
    if header.trim().is_empty() {
        c.issue(at, "must name a header, e.g. \"x-retry-count\"");
    } else if header.len() > 255 {
        c.issue(at, "is longer than 255 bytes, the longest AMQP header name");
    } else if header
        .chars()
        .any(|ch| ch.is_whitespace() || ch.is_control())
    {
        c.issue(
            at,
            format!(
                "{header:?} holds whitespace or control characters; give the header's exact name"
            ),
        );
    } else if lower.starts_with("bosun-") {
        c.issue(
            at,
            format!("`{header}` is one of bosun's own headers; `bosun-attempt` is always read first, so name the header an earlier consumer wrote (e.g. \"x-retry-count\")"),
        );
    } else if lower == "x-death"
        || lower.starts_with("x-first-death-")
        || lower.starts_with("x-last-death-")
    {
        c.issue(
            at,
            format!("`{header}` is the broker's dead-letter history, written on every hop through a retry tier too, not a count of retries; bosun never counts attempts from it"),
        );
    }
}

/// `[inboxes.*]`: each names a defined database (postgres) or redis broker (redis).
fn inboxes(c: &mut Checker<'_>, raw: &RawConfig) -> BTreeMap<String, InboxConfig> {
    let mut inboxes = BTreeMap::new();
    for (name, inbox) in &raw.inboxes {
        let at = |k: &'static str| -> [&str; 3] { ["inboxes", name, k] };
        c.name_ok(&["inboxes", name], "inbox", name);
        let window = c.duration(
            &at("window"),
            inbox.window.as_deref(),
            Duration::from_secs(7 * 86_400),
        );
        let lease = c.duration(
            &at("lease"),
            inbox.lease.as_deref(),
            Duration::from_secs(300),
        );
        if lease.is_zero() {
            c.issue(&at("lease"), "must be longer than zero");
        }
        if window < lease {
            c.issue(&at("window"), "must not be shorter than `lease`");
        }
        let misplaced = |c: &mut Checker<'_>, field: &'static str, kind: &str| {
            c.issue(
                &at(field),
                format!("`{field}` is not an option of a {kind} inbox"),
            );
        };
        let store = match inbox.kind.as_str() {
            "postgres" => {
                if inbox.broker.is_some() {
                    misplaced(c, "broker", "postgres");
                }
                let Some(database) = inbox.database.clone() else {
                    c.issue(&["inboxes", name], "a postgres inbox needs `database`");
                    continue;
                };
                if !raw.databases.contains_key(&database) {
                    c.issue(&at("database"), format!(
                        "inbox `{name}` names database `{database}`, which is not defined (defined databases: {})",
                        list(raw.databases.keys())));
                }
                let table = inbox.table.clone().unwrap_or_else(|| "bosun_inbox".into());
                if !valid_sql_identifier(&table) {
                    c.issue(&at("table"), format!("`{table}` is not a plain SQL identifier (lower-case letters, digits and `_`, optionally `schema.table`)"));
                }
                InboxStore::Postgres {
                    database,
                    table,
                    migrate: inbox.migrate.unwrap_or(true),
                }
            }
            "redis" => {
                for (field, given) in [
                    ("database", inbox.database.is_some()),
                    ("table", inbox.table.is_some()),
                    ("migrate", inbox.migrate.is_some()),
                ] {
                    if given {
                        misplaced(c, field, "redis");
                    }
                }
                let Some(broker) = inbox.broker.clone() else {
                    c.issue(&["inboxes", name], "a redis inbox needs `broker`");
                    continue;
                };
                match raw.brokers.get(&broker) {
                    Some(RawBroker::Redis(_)) => {}
                    Some(_) => c.issue(&at("broker"), format!("inbox `{name}` names broker `{broker}`, which is not a redis broker")),
                    None => c.issue(&at("broker"), format!(
                        "inbox `{name}` names broker `{broker}`, which is not defined (defined brokers: {})",
                        list(raw.brokers.keys()))),
                }
                InboxStore::Redis { broker }
            }
            other => {
                c.issue(
                    &at("kind"),
                    format!("unknown inbox kind `{other}`, expected `postgres` or `redis`"),
                );
                continue;
            }
        };
        inboxes.insert(
            name.clone(),
            InboxConfig {
                store,
                window,
                lease,
            },
        );
    }
    inboxes
}

/// A consumer's `inbox = { store, key }` and `on_duplicate`.
fn consumer_inbox(
    c: &mut Checker<'_>,
    name: &str,
    raw: &RawConsumer,
    inboxes: &BTreeMap<String, RawInbox>,
) -> Option<ConsumerInbox> {
    let at = |k: &'static str| -> [&str; 3] { ["consumers", name, k] };
    let Some(inbox) = &raw.inbox else {
        if raw.on_duplicate.is_some() {
            c.issue(&at("on_duplicate"), "`on_duplicate` needs an `inbox`");
        }
        return None;
    };
    if !inboxes.contains_key(&inbox.store) {
        c.issue(
            &["consumers", name, "inbox", "store"],
            format!(
                "consumer `{name}` names inbox `{}`, which is not defined (defined inboxes: {})",
                inbox.store,
                list(inboxes.keys())
            ),
        );
    }
    let key = match inbox_key(inbox.key.as_deref().unwrap_or("message_id")) {
        Ok(key) => key,
        Err(e) => {
            c.issue(&["consumers", name, "inbox", "key"], e);
            InboxKey::MessageId
        }
    };
    let on_duplicate = c.one_of(
        &at("on_duplicate"),
        raw.on_duplicate.as_deref(),
        OnDuplicate::Ack,
        &[
            ("ack", OnDuplicate::Ack),
            ("drop", OnDuplicate::Drop),
            ("dead_letter", OnDuplicate::DeadLetter),
        ],
    );
    Some(ConsumerInbox {
        store: inbox.store.clone(),
        key,
        on_duplicate,
    })
}

/// Most lanes one consumer may have.
pub const MAX_LANES: usize = 4096;

/// A consumer's `ordering = { ... }`, checked against its broker kind.
fn consumer_ordering(
    c: &mut Checker,
    name: &str,
    raw: &RawConsumer,
    config: &ConsumerConfig,
) -> Option<ConsumerOrdering> {
    let ordering = raw.ordering.as_ref()?;
    let at = |k: &'static str| -> [&str; 4] { ["consumers", name, "ordering", k] };
    let key = if ordering.key == "routing_key" {
        if matches!(config.kind, ConsumerKind::Redis(_)) {
            c.issue(
                &at("key"),
                "`routing_key` is for amqp consumers: a stream entry has no routing key; use `header:NAME` or `json:/pointer`",
            );
        }
        OrderingKey::RoutingKey
    } else {
        match inbox_key(&ordering.key) {
            Ok(key) => OrderingKey::Inbox(key),
            Err(e) => {
                c.issue(&at("key"), format!("{e}, or `routing_key`"));
                OrderingKey::RoutingKey
            }
        }
    };
    let lanes = ordering.lanes.unwrap_or(64);
    if lanes == 0 || lanes > MAX_LANES {
        c.issue(&at("lanes"), format!("{lanes} is outside 1..={MAX_LANES}"));
    }
    let retry = c.one_of(
        &at("retry"),
        ordering.retry.as_deref(),
        LaneRetry::Hold,
        &[("hold", LaneRetry::Hold), ("release", LaneRetry::Release)],
    );
    Some(ConsumerOrdering {
        key,
        lanes: lanes.clamp(1, MAX_LANES),
        retry,
    })
}

/// An inbox key spec: `message_id`, `header:NAME`, `json:/pointer` or `sha256:body`.
pub fn inbox_key(spec: &str) -> Result<InboxKey, String> {
    let expected = "expected `message_id`, `header:NAME`, `json:/pointer` or `sha256:body`";
    match spec.split_once(':') {
        None if spec == "message_id" => Ok(InboxKey::MessageId),
        Some(("sha256", "body")) => Ok(InboxKey::Sha256Body),
        Some(("header", name)) => {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                Err(format!(
                    "`{spec}`: a header name is one or more visible ASCII characters"
                ))
            } else {
                Ok(InboxKey::Header(name.to_owned()))
            }
        }
        Some(("json", pointer)) => {
            if !pointer.starts_with('/') {
                Err(format!(
                    "`{spec}`: a JSON pointer starts with `/` (e.g. `json:/order/id`)"
                ))
            } else if pointer.split('/').any(|t| {
                let mut rest = t;
                while let Some(i) = rest.find('~') {
                    if !matches!(rest.as_bytes().get(i + 1), Some(b'0' | b'1')) {
                        return true;
                    }
                    rest = &rest[i + 2..];
                }
                false
            }) {
                Err(format!(
                    "`{spec}`: `~` in a JSON pointer must be `~0` or `~1`"
                ))
            } else {
                Ok(InboxKey::Json(pointer.to_owned()))
            }
        }
        _ => Err(format!("unknown inbox key `{spec}`, {expected}")),
    }
}

pub fn valid_sql_identifier(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && p.chars()
                    .next()
                    .is_some_and(|ch| ch.is_ascii_lowercase() || ch == '_')
                && p.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
        })
}

fn outbox_config(c: &mut Checker<'_>, name: &str, raw: &RawOutbox) -> OutboxConfig {
    let at = |k: &'static str| -> [&str; 3] { ["outboxes", name, k] };
    let table = raw.table.clone().unwrap_or_else(|| "bosun_outbox".into());
    if !valid_sql_identifier(&table) {
        c.issue(&at("table"), format!("`{table}` is not a plain lowercase SQL identifier (letters, digits, `_`, optionally `schema.table`)"));
    }
    let batch = raw.batch.unwrap_or(500);
    if batch == 0 || batch > 10_000 {
        c.issue(&at("batch"), format!("{batch} is outside 1..=10000"));
    }
    let max_attempts = raw.max_attempts.unwrap_or(10);
    if max_attempts == 0 {
        c.issue(&at("max_attempts"), "must be at least 1");
    }
    let concurrency = raw.concurrency.unwrap_or(1);
    if concurrency == 0 || concurrency > 16 {
        c.issue(
            &at("concurrency"),
            format!("{concurrency} is outside 1..=16"),
        );
    }
    let mut retry = c.retry(&at("retry"), raw.retry.as_ref(), max_attempts);
    retry.max_attempts = max_attempts.max(1);
    let notify_channel = raw
        .notify_channel
        .clone()
        .unwrap_or_else(|| table.replace('.', "_"));
    if !valid_sql_identifier(&notify_channel) || notify_channel.contains('.') {
        c.issue(
            &at("notify_channel"),
            format!("`{notify_channel}` is not a plain lowercase identifier"),
        );
    }
    OutboxConfig {
        database: raw.database.clone(),
        target: raw.target.clone(),
        destination: raw.destination.clone(),
        batch: batch.clamp(1, 10_000),
        poll_interval: c.duration(
            &at("poll_interval"),
            raw.poll_interval.as_deref(),
            Duration::from_secs(1),
        ),
        notify_channel,
        max_attempts: max_attempts.max(1),
        retry,
        retain_published: c.duration(
            &at("retain_published"),
            raw.retain_published.as_deref(),
            Duration::from_secs(24 * 3600),
        ),
        ordering: c.one_of(
            &at("ordering"),
            raw.ordering.as_deref(),
            Ordering::None,
            &[("none", Ordering::None), ("per_key", Ordering::PerKey)],
        ),
        publish_timeout: c.duration(
            &at("publish_timeout"),
            raw.publish_timeout.as_deref(),
            Duration::from_secs(30),
        ),
        concurrency: concurrency.clamp(1, 16),
        maxlen: raw.maxlen,
        migrate: raw.migrate.unwrap_or(false),
        existing: existing_outbox(c, name, raw),
        table,
    }
}

/// The entry format a redis broker gives its consumers and dead-letter processors.
fn broker_format(b: &RawRedisBroker) -> Option<EntryFormat> {
    entry_format(
        b.entry_format.as_deref(),
        b.payload_field.as_deref(),
        b.id_field.as_deref(),
    )
    .ok()
    .flatten()
}

/// `columns` and `state` of an outbox relaying from an existing table: both or neither,
/// every column a plain identifier, the status values distinct and safe to quote.
fn existing_outbox(
    c: &mut Checker<'_>,
    name: &str,
    raw: &RawOutbox,
) -> Option<Box<ExistingOutbox>> {
    let at = |k: &'static str| -> [&str; 3] { ["outboxes", name, k] };
    let (columns, state) = match (&raw.columns, &raw.state) {
        (None, None) => return None,
        (Some(columns), Some(state)) => (columns, state),
        (Some(_), None) => {
            c.issue(&at("columns"), "`columns` needs `state` (the status column and its values, e.g. state = { column = \"status\" })");
            return None;
        }
        (None, Some(_)) => {
            c.issue(
                &at("state"),
                "`state` needs `columns` (which column is the id, routing key, payload, ...)",
            );
            return None;
        }
    };
    if raw.migrate == Some(true) {
        c.issue(&at("migrate"), "an existing table (`columns`) is never migrated; `bosun outbox check` prints what it lacks");
    }
    if raw.ordering.as_deref() == Some("per_key") {
        c.issue(
            &at("ordering"),
            "`per_key` needs bosun's own table; it is not available with `columns`",
        );
    }
    let existing = ExistingOutbox {
        mapping: columns.clone(),
        state: state.column.clone(),
        pending: state.pending.clone().unwrap_or_else(|| "pending".into()),
        published: state
            .published
            .clone()
            .unwrap_or_else(|| "published".into()),
        failed: state.failed.clone().unwrap_or_else(|| "failed".into()),
    };
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (role, column) in existing.columns() {
        let key = if role == "state" { "state" } else { "columns" };
        if !valid_sql_identifier(column) || column.contains('.') {
            c.issue(&["outboxes", name, key], format!("{role} column `{column}` is not a plain lowercase SQL identifier (letters, digits, `_`)"));
        } else if let Some(other) = seen.insert(column, role) {
            c.issue(
                &["outboxes", name, key],
                format!("column `{column}` is mapped twice ({other} and {role})"),
            );
        }
    }
    let values = [
        ("pending", &existing.pending),
        ("published", &existing.published),
        ("failed", &existing.failed),
    ];
    for (i, (key, value)) in values.iter().enumerate() {
        if value.is_empty()
            || value.len() > 200
            || value.chars().any(|ch| ch.is_control() || ch == '\\')
        {
            c.issue(&["outboxes", name, "state"], format!("state value {key} = {value:?} must be 1 to 200 characters, without control characters or `\\`"));
        }
        if let Some((other, _)) = values[..i].iter().find(|(_, v)| v == value) {
            c.issue(
                &["outboxes", name, "state"],
                format!("state values {other} and {key} are both {value:?}"),
            );
        }
    }
    Some(Box::new(existing))
}

/// The entry format of the redis consumers of `broker` whose dead-letter stream is `stream`,
/// when there are some and they agree: the format their dead-letter copies are in.
fn dead_letter_writers_format(
    consumers: &BTreeMap<String, ConsumerConfig>,
    broker: &str,
    stream: &str,
) -> Option<EntryFormat> {
    let mut formats = consumers
        .values()
        .filter_map(|consumer| match &consumer.kind {
            ConsumerKind::Redis(r)
                if consumer.source == broker && r.dead_letter_stream == stream =>
            {
                Some(r.format.as_ref())
            }
            _ => None,
        });
    let first = formats.next()?;
    formats.all(|f| f == first).then(|| first.clone())
}

fn dead_letter_config(
    c: &mut Checker<'_>,
    name: &str,
    raw: &RawDeadLetter,
    broker: &RawBroker,
    consumers: &BTreeMap<String, ConsumerConfig>,
) -> Option<DeadLetterConfig> {
    let at = |k: &'static str| -> [&str; 3] { ["dead_letters", name, k] };
    let from = match (broker, &raw.queue, &raw.stream) {
        (RawBroker::Amqp(_), Some(queue), None) => {
            for (key, given) in [
                ("entry_format", raw.entry_format.is_some()),
                ("payload_field", raw.payload_field.is_some()),
                ("id_field", raw.id_field.is_some()),
            ] {
                if given {
                    c.issue(
                        &at(key),
                        format!(
                            "`{key}` is for redis dead-letter processors, but broker `{}` is amqp",
                            raw.source
                        ),
                    );
                }
            }
            DeadLetterSource::Queue(queue.clone())
        }
        (RawBroker::Redis(b), None, Some(stream)) => DeadLetterSource::Stream {
            stream: stream.clone(),
            group: raw.group.clone().unwrap_or_else(|| "bosun-dlq".into()),
            format: c
                .entry_format(
                    &["dead_letters", name],
                    raw.entry_format.as_deref(),
                    raw.payload_field.as_deref(),
                    raw.id_field.as_deref(),
                )
                .or_else(|| dead_letter_writers_format(consumers, &raw.source, stream))
                .or_else(|| broker_format(b))
                .unwrap_or_default(),
        },
        (RawBroker::Amqp(_), _, _) => {
            c.issue(&["dead_letters", name], format!("dead-letter processor `{name}` reads amqp broker `{}`: give `queue` (and no `stream`)", raw.source));
            return None;
        }
        (RawBroker::Redis(_), _, _) => {
            c.issue(&["dead_letters", name], format!("dead-letter processor `{name}` reads redis broker `{}`: give `stream` (and no `queue`)", raw.source));
            return None;
        }
    };
    let table = raw.table.clone().unwrap_or_else(|| "dead_letters".into());
    if !valid_sql_identifier(&table) {
        c.issue(
            &at("table"),
            format!("`{table}` is not a plain lowercase SQL identifier"),
        );
    }
    let default_action = match raw.default_action.as_deref() {
        None | Some("archive") => Action::Archive,
        Some("drop") => Action::Drop,
        Some(other) => {
            c.issue(
                &at("default_action"),
                format!("unknown value `{other}`, expected `archive` or `drop`"),
            );
            Action::Archive
        }
    };
    let mut rules = Vec::new();
    for (i, rule) in raw.rules.iter().enumerate() {
        let index = i.to_string();
        let rat = |k: &'static str| -> Vec<&str> {
            vec!["dead_letters", name, "rules", index.as_str(), k]
        };
        let error = rule
            .when
            .error
            .as_ref()
            .and_then(|pattern| match regex::Regex::new(pattern) {
                Ok(re) => Some(re),
                Err(e) => {
                    c.issue(
                        &["dead_letters", name, "rules", &index, "when", "error"],
                        format!("invalid regular expression: {e}"),
                    );
                    None
                }
            });
        for reason in rule.when.reason.iter().flatten() {
            if !["rejected", "expired", "maxlen", "delivery_limit"].contains(&reason.as_str()) {
                c.issue(&["dead_letters", name, "rules", &index, "when", "reason"], format!("unknown broker reason `{reason}`, expected `rejected`, `expired`, `maxlen` or `delivery_limit`"));
            }
        }
        for kind in rule.when.error_kind.iter().flatten() {
            if !["transient", "permanent", "exhausted", "invalid", "unknown"]
                .contains(&kind.as_str())
            {
                c.issue(&["dead_letters", name, "rules", &index, "when", "error_kind"], format!("unknown error kind `{kind}`, expected `transient`, `permanent`, `exhausted`, `invalid` or `unknown`"));
            }
        }
        let source = rule
            .when
            .source
            .clone()
            .map(StringOrList::into_vec)
            .unwrap_or_default();
        for writer in &source {
            if !["broker", "bosun"].contains(&writer.as_str()) {
                c.issue(
                    &["dead_letters", name, "rules", &index, "when", "source"],
                    format!("unknown source `{writer}`, expected `broker` or `bosun`"),
                );
            }
        }
        let when = Matcher {
            source,
            error_kind: rule.when.error_kind.clone().unwrap_or_default(),
            error,
            original: rule.when.original.clone().unwrap_or_default(),
            reason: rule.when.reason.clone().unwrap_or_default(),
            attempts_below: rule.when.attempts_below,
            attempts_at_least: rule.when.attempts_at_least,
        };
        let action = match rule.action.as_str() {
            "replay" => Action::Replay {
                delay: c.duration(&rat("delay"), rule.delay.as_deref(), Duration::ZERO),
                max_replays: rule.max_replays.unwrap_or(3),
            },
            "archive" => Action::Archive,
            "drop" => Action::Drop,
            "forward" => {
                let target = match (broker, &rule.exchange, &rule.stream) {
                    (RawBroker::Amqp(_), Some(exchange), None) => Some(exchange.clone()),
                    (RawBroker::Redis(_), None, Some(stream)) => Some(stream.clone()),
                    _ => None,
                };
                match target {
                    Some(target) => Action::Forward {
                        target,
                        routing_key: rule.routing_key.clone(),
                    },
                    None => {
                        c.issue(
                            &rat("action"),
                            format!(
                                "`forward` on a {} broker needs `{}`",
                                if matches!(broker, RawBroker::Amqp(_)) {
                                    "amqp"
                                } else {
                                    "redis"
                                },
                                if matches!(broker, RawBroker::Amqp(_)) {
                                    "exchange"
                                } else {
                                    "stream"
                                }
                            ),
                        );
                        Action::Archive
                    }
                }
            }
            other => {
                c.issue(&rat("action"), format!("unknown action `{other}`, expected `replay`, `archive`, `drop` or `forward`"));
                Action::Archive
            }
        };
        if matches!(action, Action::Replay { .. }) && raw.archive.is_none() {
            c.issue(
                &rat("action"),
                "action `replay` needs `archive = \"<database>\"` on the processor: delayed replays wait there, and replays past `max_replays` are archived",
            );
        }
        if matches!(action, Action::Archive) && raw.archive.is_none() {
            c.issue(
                &rat("action"),
                "action `archive` needs `archive = \"<database>\"` on the processor",
            );
        }
        rules.push(Rule { when, action });
    }
    if matches!(default_action, Action::Archive) && raw.archive.is_none() {
        c.issue(&at("archive"), format!("dead-letter processor `{name}` archives by default and needs `archive = \"<database>\"` (or `default_action = \"drop\"`)"));
    }
    let replay_to = match &raw.replay_to {
        Some(list) => list.clone(),
        None => served_originals(&raw.source, &from, consumers),
    };
    if let Some(fallback) = &raw.fallback {
        if raw.archive.is_some() {
            c.issue(
                &at("fallback"),
                "`fallback` is for processors without an archive; this one keeps such dead letters in its archive",
            );
        }
        if fallback.trim().is_empty() {
            c.issue(
                &at("fallback"),
                "must name an exchange (amqp) or a stream (redis)",
            );
        }
    }
    Some(DeadLetterConfig {
        source: raw.source.clone(),
        from,
        archive: raw.archive.clone(),
        table,
        default_action,
        rules,
        migrate: raw.migrate.unwrap_or(false),
        replay_to,
        fallback: raw.fallback.clone(),
    })
}

/// The queues or streams of the consumers on `broker` that dead-letter into `from`: where
/// the dead letters a processor reads came from, so where replays may go.
fn served_originals(
    broker: &str,
    from: &DeadLetterSource,
    consumers: &BTreeMap<String, ConsumerConfig>,
) -> Vec<String> {
    let mut originals: Vec<String> = consumers
        .values()
        .filter(|consumer| consumer.source == broker)
        .filter_map(|consumer| match (&consumer.kind, from) {
            (ConsumerKind::Amqp(amqp), DeadLetterSource::Queue(queue)) => {
                matches!(&amqp.dead_letter, AmqpDeadLetter::Queue(q) if q == queue)
                    .then(|| amqp.queue.clone())
            }
            (ConsumerKind::Redis(redis), DeadLetterSource::Stream { stream, .. }) => {
                (&redis.dead_letter_stream == stream).then(|| redis.stream.clone())
            }
            _ => None,
        })
        .collect();
    originals.sort();
    originals.dedup();
    originals
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2 KiB"), Ok(2048));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("7B"), Ok(7));
        assert!(parse_size("16MB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
