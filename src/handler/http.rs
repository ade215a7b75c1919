//! `kind = "http"`: delivers each message to a web endpoint and maps the response to an
//! outcome (a webhook).
//!
//! One pooled `reqwest` client per handler; a semaphore caps requests in flight. The status
//! decides the outcome (2xx ack, 408/429/5xx retry, other 4xx dead-letter), a 2xx JSON body
//! may ask for another (`{"status": "RETRY"}`), and `status_overrides` beat both. Response
//! bodies are read only up to a cap, and everything from sending to the last body byte runs
//! under `timeout`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue as HttpHeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use super::outcome_map::{MAX_REASON_BYTES, OutcomeName, numeric_keys};
use super::{
    BuildContext, FailureKind, Handler, HandlerFactory, HandlerKind, Message, OptionError, Outcome,
    max_concurrency_option, parse_options, timeout_option,
};
use crate::secret::Secret;
use crate::text::truncate as truncate_start;
use crate::trace_context;

/// Prefix of the request headers that carry the message's own headers.
pub const MESSAGE_HEADER_PREFIX: &str = "bosun-header-";

/// Most of a 2xx body read to look for a status object; a longer body is not one.
const MAX_STATUS_BODY_BYTES: usize = 64 * 1024;

/// Redirects followed at most when `follow_redirects = true`; past that it is a loop.
const MAX_REDIRECTS: usize = 10;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONCURRENCY: usize = 64;

/// `[handlers.NAME]` with `kind = "http"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpOptions {
    /// The endpoint: an `http://` or `https://` URL.
    url: String,
    /// The request method. Default `"POST"`.
    method: Option<String>,
    /// Time allowed for one delivery, from sending the request to reading the response.
    /// Default `"30s"`. Waiting for a `max_concurrency` slot does not count.
    timeout: Option<String>,
    /// Extra request headers sent with every message (values may use `${VAR}`).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Names of `headers` that carry a secret, beyond those recognised by name
    /// (`authorization`, `cookie`, `x-api-key`, anything with `token`, `secret`, `key`,
    /// `auth`, `password` in it). Secret headers are never logged and are dropped when a
    /// redirect leads to another host, port or scheme.
    #[serde(default)]
    secret_headers: Vec<String>,
    /// Requests in flight at once through this handler, across every consumer using it.
    /// Default 64.
    max_concurrency: Option<usize>,
    /// Environment variable holding a bearer token, sent as `Authorization: Bearer ...`.
    token_env: Option<String>,
    /// File holding a bearer token (surrounding whitespace ignored).
    token_file: Option<String>,
    /// TLS settings for `https://` endpoints.
    tls: Option<TlsOptions>,
    /// `"binary"` adds CloudEvents `ce-*` headers (binary content mode); default `"off"`.
    cloudevents: Option<CloudEventsMode>,
    /// Follow 3xx redirects (up to 10). Default false: a redirect is not the endpoint's answer.
    #[serde(default)]
    follow_redirects: bool,
    /// Outcome per exact response status, ahead of the built-in mapping, e.g.
    /// `{ "409" = "ack", "422" = "retry" }`. Values: `ack`, `retry`, `dead_letter`, `drop`.
    #[serde(default)]
    status_overrides: BTreeMap<String, OutcomeName>,
    /// A 2xx body whose `status` is not `RETRY`, `DROP`, `DEAD_LETTER`, `SUCCESS` or `ACK`
    /// retries instead of acking. Default false: `{"status": "ok"}` is a success.
    #[serde(default)]
    strict_status_body: bool,
}

/// `tls = { ... }` of an http handler.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsOptions {
    /// PEM file of CA certificates trusted in addition to the system roots.
    ca_file: Option<String>,
    /// PEM file with the client certificate chain (needs `key_file`).
    cert_file: Option<String>,
    /// PEM file with the client private key (needs `cert_file`).
    key_file: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CloudEventsMode {
    Binary,
    Off,
}

/// Validated options, shared by every handler built from them.
struct HttpSettings {
    url: reqwest::Url,
    /// Scheme, host and port of the URL, for logs and reasons: never the path or the query,
    /// which often hold the secret (webhook URLs).
    shown_url: String,
    /// Static headers that carry secrets: dropped on a redirect to another origin.
    secret_headers: Vec<HeaderName>,
    method: Method,
    timeout: Duration,
    /// Static headers, the bearer token included (marked sensitive).
    headers: HeaderMap,
    max_concurrency: usize,
    ca_certs: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
    cloudevents: bool,
    follow_redirects: bool,
    overrides: BTreeMap<u16, OutcomeName>,
    strict_status_body: bool,
}

pub(super) struct HttpKind;

impl HandlerKind for HttpKind {
    fn parse(
        &self,
        _name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError> {
        let options: HttpOptions = parse_options(options)?;
        Ok(Arc::new(HttpFactory {
            settings: Arc::new(settings(options)?),
        }))
    }
}

fn settings(o: HttpOptions) -> Result<HttpSettings, OptionError> {
    // The parse error never echoes the URL: it may hold a password.
    let url = reqwest::Url::parse(&o.url)
        .map_err(|e| OptionError::new(&["url"], format!("invalid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OptionError::new(
            &["url"],
            format!(
                "URL scheme `{}` is not supported, expected `http` or `https`",
                url.scheme()
            ),
        ));
    }
    let shown_url = shown(&url);
    // Its password and secret query values are masked wherever they might show up.
    crate::redact::register_url(&url);

    let method = match &o.method {
        None => Method::POST,
        Some(m) => Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| OptionError::new(&["method"], format!("`{m}` is not an HTTP method")))?,
    };

    let timeout = timeout_option(o.timeout.as_deref(), DEFAULT_TIMEOUT)?;

    let max_concurrency = max_concurrency_option(o.max_concurrency, DEFAULT_MAX_CONCURRENCY)?;

    let mut secret_names = Vec::new();
    for name in &o.secret_headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            OptionError::new(
                &["secret_headers"],
                format!("`{name}` is not a valid HTTP header name"),
            )
        })?;
        secret_names.push(header);
    }
    for sensitive in [
        reqwest::header::AUTHORIZATION,
        reqwest::header::PROXY_AUTHORIZATION,
        reqwest::header::COOKIE,
        reqwest::header::WWW_AUTHENTICATE,
    ] {
        if !secret_names.contains(&sensitive) {
            secret_names.push(sensitive);
        }
    }

    let mut headers = HeaderMap::new();
    for (name, value) in &o.headers {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            OptionError::new(
                &["headers", name],
                format!("`{name}` is not a valid HTTP header name"),
            )
        })?;
        // Header values may carry interpolated secrets: the error never shows the value.
        let mut value = HttpHeaderValue::from_str(value)
            .map_err(|_| OptionError::new(&["headers", name], "not a valid HTTP header value (control characters such as newlines are not allowed)"))?;
        if secret_names.contains(&header) || crate::redact::is_secret_name(header.as_str()) {
            value.set_sensitive(true);
            // Registered, so the value is masked wherever it might show up.
            let _ = Secret::new(value.to_str().unwrap_or_default());
            if !secret_names.contains(&header) {
                secret_names.push(header.clone());
            }
        }
        headers.insert(header, value);
    }

    if let Some(token) = token(&o)? {
        if headers.contains_key(reqwest::header::AUTHORIZATION) {
            return Err(OptionError::new(
                &["headers", "authorization"],
                "give the bearer token through `token_env`/`token_file` or an `authorization` header, not both",
            ));
        }
        let mut value =
            HttpHeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                OptionError::new(
                    &[if o.token_env.is_some() {
                        "token_env"
                    } else {
                        "token_file"
                    }],
                    "the token holds characters not allowed in an HTTP header",
                )
            })?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }

    let (ca_certs, identity) = match &o.tls {
        None => (Vec::new(), None),
        Some(tls) => tls_material(tls)?,
    };

    let overrides = numeric_keys(
        "status_overrides",
        &o.status_overrides,
        100..=599,
        "an HTTP status",
    )?
    .into_iter()
    .filter_map(|(code, outcome)| u16::try_from(code).ok().map(|code| (code, outcome)))
    .collect();

    Ok(HttpSettings {
        url,
        shown_url,
        secret_headers: secret_names,
        method,
        timeout,
        headers,
        max_concurrency,
        ca_certs,
        identity,
        cloudevents: o.cloudevents == Some(CloudEventsMode::Binary),
        follow_redirects: o.follow_redirects,
        overrides,
        strict_status_body: o.strict_status_body,
    })
}

/// The URL as logs may show it: scheme, host and port only. User, password, query and
/// path all may hold a token (a Slack-style webhook's path is its secret).
fn shown(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

fn token(o: &HttpOptions) -> Result<Option<Secret>, OptionError> {
    match (&o.token_env, &o.token_file) {
        (Some(_), Some(_)) => Err(OptionError::new(
            &["token_env"],
            "give `token_env` or `token_file`, not both",
        )),
        (Some(var), None) => match read_token_env(var) {
            Ok(token) if !token.trim().is_empty() => Ok(Some(Secret::new(token.trim()))),
            _ => Err(OptionError::new(
                &["token_env"],
                format!("environment variable `{var}` is not set or empty"),
            )),
        },
        (None, Some(file)) => match std::fs::read_to_string(file) {
            Ok(token) if !token.trim().is_empty() => Ok(Some(Secret::new(token.trim()))),
            Ok(_) => Err(OptionError::new(
                &["token_file"],
                format!("token file {file:?} is empty"),
            )),
            Err(e) => Err(OptionError::new(
                &["token_file"],
                format!("cannot read token file {file:?}: {e}"),
            )),
        },
        (None, None) => Ok(None),
    }
}

/// The token variable's value; the variable is noted as one the configuration reads, so
/// that child processes never inherit it.
fn read_token_env(var: &str) -> Result<String, std::env::VarError> {
    crate::secret::note_env_read(var);
    std::env::var(var)
}

fn tls_material(
    tls: &TlsOptions,
) -> Result<(Vec<reqwest::Certificate>, Option<reqwest::Identity>), OptionError> {
    let read = |key: &str, file: &str| -> Result<Vec<u8>, OptionError> {
        std::fs::read(file)
            .map_err(|e| OptionError::new(&["tls", key], format!("cannot read {file:?}: {e}")))
    };
    let ca_certs = match &tls.ca_file {
        None => Vec::new(),
        Some(file) => {
            let certs =
                reqwest::Certificate::from_pem_bundle(&read("ca_file", file)?).map_err(|_| {
                    OptionError::new(
                        &["tls", "ca_file"],
                        format!("{file:?} is not a PEM file of certificates"),
                    )
                })?;
            if certs.is_empty() {
                return Err(OptionError::new(
                    &["tls", "ca_file"],
                    format!("{file:?} holds no PEM certificate"),
                ));
            }
            certs
        }
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (None, None) => None,
        (Some(_), None) => {
            return Err(OptionError::new(
                &["tls", "cert_file"],
                "`cert_file` needs `key_file`",
            ));
        }
        (None, Some(_)) => {
            return Err(OptionError::new(
                &["tls", "key_file"],
                "`key_file` needs `cert_file`",
            ));
        }
        (Some(cert), Some(key)) => {
            let mut pem = read("cert_file", cert)?;
            pem.push(b'\n');
            pem.extend(read("key_file", key)?);
            // The error never quotes the key file's contents.
            Some(reqwest::Identity::from_pem(&pem).map_err(|_| {
                OptionError::new(
                    &["tls", "cert_file"],
                    format!("{cert:?} and {key:?} are not a PEM certificate chain and private key"),
                )
            })?)
        }
    };
    Ok((ca_certs, identity))
}

struct HttpFactory {
    settings: Arc<HttpSettings>,
}

impl HandlerFactory for HttpFactory {
    fn build(&self, ctx: &BuildContext<'_>) -> anyhow::Result<Arc<dyn Handler>> {
        Ok(Arc::new(HttpHandler::new(ctx.name, self.settings.clone())?))
    }
}

/// The `http` handler: one pooled client, a semaphore for `max_concurrency`.
pub struct HttpHandler {
    name: String,
    settings: Arc<HttpSettings>,
    client: reqwest::Client,
    permits: Semaphore,
    /// How a 2xx body's `status` is read; remembers whether an unknown value was logged.
    body_policy: StatusBodyPolicy,
}

impl HttpHandler {
    fn new(name: &str, settings: Arc<HttpSettings>) -> anyhow::Result<Self> {
        // Redirects are followed here, not by the client, so that secret headers can be
        // dropped when one leads elsewhere.
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bosun/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.timeout)
            .pool_max_idle_per_host(settings.max_concurrency);
        if !settings.ca_certs.is_empty() {
            builder = builder.tls_certs_merge(settings.ca_certs.iter().cloned());
        }
        if let Some(identity) = &settings.identity {
            builder = builder.identity(identity.clone());
        }
        let client = builder.build().map_err(|e| {
            anyhow::anyhow!(
                "handler `{name}`: cannot build the HTTP client for {}: {e}",
                settings.shown_url
            )
        })?;
        Ok(Self {
            name: name.to_owned(),
            permits: Semaphore::new(settings.max_concurrency),
            body_policy: StatusBodyPolicy::new(name, settings.strict_status_body),
            settings,
            client,
        })
    }

    /// Sends `message`, following redirects when configured: up to [`MAX_REDIRECTS`], to
    /// `http`/`https` only, without the secret headers once a redirect leaves the origin.
    /// Past the limit the last 3xx response is returned.
    async fn send(&self, message: &Message) -> Result<reqwest::Response, reqwest::Error> {
        let mut headers = request_headers(&self.settings, message, &self.name);
        let mut url = self.settings.url.clone();
        let mut method = self.settings.method.clone();
        let mut body = Some(message.body.clone());
        let mut hops = 0;
        loop {
            let mut request = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            let response = request.send().await?;
            let status = response.status();
            if !self.settings.follow_redirects || !status.is_redirection() || hops >= MAX_REDIRECTS
            {
                return Ok(response);
            }
            let Some(next) = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .filter(|next| matches!(next.scheme(), "http" | "https"))
            else {
                return Ok(response);
            };
            if !same_origin(&url, &next) {
                for name in &self.settings.secret_headers {
                    headers.remove(name);
                }
            }
            // As browsers and reqwest do: 303, and 301/302 after a POST, become a GET
            // without a body; 307 and 308 repeat the request as it was.
            let to_get = status == StatusCode::SEE_OTHER
                || (matches!(status.as_u16(), 301 | 302) && method == Method::POST);
            if to_get && method != Method::HEAD {
                method = Method::GET;
                body = None;
                headers.remove(reqwest::header::CONTENT_TYPE);
            }
            url = next;
            hops += 1;
        }
    }

    async fn deliver(&self, message: &Message) -> (Outcome, &'static str) {
        // The semaphore is never closed, so acquiring only waits.
        let Ok(_permit) = self.permits.acquire().await else {
            return (Outcome::retry("the handler is shutting down"), "connect");
        };
        let span = trace_context::http_client_span(
            self.settings.method.as_str(),
            &self.name,
            &self.settings.shown_url,
        );
        let exchange = async {
            let mut response = self.send(message).await?;
            let status = response.status();
            trace_context::record_status(&tracing::Span::current(), status.as_u16());
            let cap = if status.is_success() {
                MAX_STATUS_BODY_BYTES
            } else {
                MAX_REASON_BYTES
            };
            let body = read_capped(&mut response, cap).await;
            Ok::<_, reqwest::Error>((status, response.headers().clone(), body))
        }
        .instrument(span);
        match tokio::time::timeout(self.settings.timeout, exchange).await {
            Err(_) => {
                let reason = format!(
                    "handler `{}`: no response from {} within {:?}",
                    self.name, self.settings.shown_url, self.settings.timeout
                );
                (Outcome::retry(reason), "timeout")
            }
            Ok(Err(e)) => {
                let failure = TransportError::from(e);
                let text = format!(
                    "handler `{}`: {failure} ({})",
                    self.name, self.settings.shown_url
                );
                (
                    Outcome::retry(
                        truncate_start(&crate::redact::text(&text), MAX_REASON_BYTES).to_owned(),
                    ),
                    failure.class(),
                )
            }
            Ok(Ok((status, headers, body))) => {
                let outcome = map_response(
                    status,
                    &headers,
                    &body,
                    &self.settings.overrides,
                    SystemTime::now(),
                    &self.body_policy,
                );
                (redact_reason(outcome), status_class(status))
            }
        }
    }
}

#[async_trait]
impl Handler for HttpHandler {
    async fn handle(&self, message: &Message) -> Outcome {
        let started = Instant::now();
        let (outcome, class) = self.deliver(message).await;
        let elapsed = started.elapsed();
        metrics::counter!("bosun_handler_responses_total", "handler" => self.name.clone(), "class" => class).increment(1);
        let message_id = message.message_id.as_deref().unwrap_or("");
        match &outcome {
            Outcome::Ack => {
                tracing::debug!(handler = %self.name, message_id, class, elapsed_ms = elapsed.as_millis() as u64, "delivered")
            }
            Outcome::Retry { reason, after } => tracing::warn!(
                handler = %self.name, message_id, class, outcome = "retry",
                retry_after_ms = after.map(|a| a.as_millis() as u64), reason = %reason, "delivery failed; will retry"
            ),
            Outcome::DeadLetter { reason, .. } => {
                tracing::warn!(handler = %self.name, message_id, class, outcome = "dead_letter", reason = %reason, "endpoint rejected the message")
            }
            Outcome::Drop { reason } => {
                tracing::info!(handler = %self.name, message_id, class, outcome = "drop", reason = %reason, "endpoint dropped the message")
            }
            Outcome::Release { reason } | Outcome::Defer { reason, .. } => {
                tracing::info!(handler = %self.name, message_id, class, outcome = outcome.label(), reason = %reason, "message handed back")
            }
        }
        outcome
    }
}

/// Whether `next` is on the same scheme, host and port as `previous`: secret headers go
/// only there.
fn same_origin(previous: &reqwest::Url, next: &reqwest::Url) -> bool {
    previous.scheme() == next.scheme()
        && previous.host_str() == next.host_str()
        && previous.port_or_known_default() == next.port_or_known_default()
}

/// The outcome with its reason passed through the redactor: reasons quote response
/// bodies, and an endpoint may echo the request's credentials back.
fn redact_reason(outcome: Outcome) -> Outcome {
    let clean = |reason: String| match crate::redact::text(&reason) {
        std::borrow::Cow::Borrowed(_) => reason,
        std::borrow::Cow::Owned(cleaned) => cleaned,
    };
    match outcome {
        Outcome::Retry { after, reason } => Outcome::Retry {
            after,
            reason: clean(reason),
        },
        Outcome::DeadLetter { reason, kind } => Outcome::DeadLetter {
            reason: clean(reason),
            kind,
        },
        Outcome::Drop { reason } => Outcome::Drop {
            reason: clean(reason),
        },
        Outcome::Release { reason } => Outcome::Release {
            reason: clean(reason),
        },
        Outcome::Defer { after, reason } => Outcome::Defer {
            after,
            reason: clean(reason),
        },
        Outcome::Ack => Outcome::Ack,
    }
}

/// Reads at most `cap` bytes of the body; the rest is left unread (the connection is then
/// not reused, which is cheaper than reading an unbounded body). A body that breaks off
/// yields what arrived.
async fn read_capped(response: &mut reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = cap - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The headers of one request: the static ones, then the message's.
fn request_headers(settings: &HttpSettings, message: &Message, handler: &str) -> HeaderMap {
    let mut headers = settings.headers.clone();
    let mut skipped = 0usize;
    let mut set = |name: &'static str, value: &str| match HttpHeaderValue::from_str(value) {
        Ok(value) => {
            headers.insert(name, value);
        }
        Err(_) => skipped += 1,
    };
    set(
        "content-type",
        message
            .content_type
            .as_deref()
            .unwrap_or("application/octet-stream"),
    );
    if let Some(id) = &message.message_id {
        set("bosun-message-id", id);
    }
    if let Some(id) = &message.correlation_id {
        set("bosun-correlation-id", id);
    }
    set("bosun-attempt", &message.attempt.to_string());
    set(
        "bosun-redelivered",
        if message.redelivered { "true" } else { "false" },
    );
    set("bosun-consumer", &message.source.consumer);
    set("bosun-source-queue", &message.source.queue);
    if let Some(exchange) = &message.source.exchange {
        set("bosun-exchange", exchange);
    }
    if let Some(key) = &message.source.routing_key {
        set("bosun-routing-key", key);
    }
    if let Some(id) = &message.source.entry_id {
        set("bosun-entry-id", id);
    }
    if let Some(claim) = &message.inbox {
        set("bosun-inbox-key", &claim.key);
        set("bosun-inbox-token", &claim.token);
    }
    if settings.cloudevents {
        set("ce-specversion", "1.0");
        let id = message
            .message_id
            .clone()
            .or_else(|| message.source.entry_id.clone())
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        set("ce-id", &id);
        set(
            "ce-source",
            &format!("/bosun/{}/{}", message.source.broker, message.source.queue),
        );
        set(
            "ce-type",
            message
                .source
                .routing_key
                .as_deref()
                .filter(|k| !k.is_empty())
                .unwrap_or(&message.source.queue),
        );
    }
    // The request's own span (the handler's CLIENT span) is the parent the endpoint sees.
    for (name, value) in trace_context::current_headers() {
        set(name, &value);
        if settings.cloudevents {
            set(
                match name {
                    trace_context::TRACEPARENT => trace_context::CE_TRACEPARENT,
                    _ => trace_context::CE_TRACESTATE,
                },
                &value,
            );
        }
    }
    for (name, value) in &message.headers {
        let name = HeaderName::from_bytes(
            format!("{MESSAGE_HEADER_PREFIX}{}", name.to_ascii_lowercase()).as_bytes(),
        );
        let value = value
            .as_text()
            .and_then(|v| HttpHeaderValue::from_str(&v).ok());
        match (name, value) {
            (Ok(name), Some(value)) => {
                headers.append(name, value);
            }
            _ => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::debug!(
            handler,
            message_id = message.message_id.as_deref().unwrap_or(""),
            skipped,
            "message headers not valid in HTTP were not sent"
        );
    }
    headers
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("request timed out: {0}")]
    Timeout(String),
    #[error("redirect not followed: {0}")]
    Redirect(String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl TransportError {
    fn class(&self) -> &'static str {
        match self {
            TransportError::Timeout(_) => "timeout",
            TransportError::Redirect(_) => "3xx",
            TransportError::Connect(_) | TransportError::Other(_) => "connect",
        }
    }
}

impl From<reqwest::Error> for TransportError {
    fn from(e: reqwest::Error) -> Self {
        // Without the URL: it may carry credentials. The causes say what went wrong.
        let e = e.without_url();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        if e.is_timeout() {
            TransportError::Timeout(text)
        } else if e.is_redirect() {
            TransportError::Redirect(text)
        } else if e.is_connect() {
            TransportError::Connect(text)
        } else {
            TransportError::Other(text)
        }
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}

/// Maps a response to an outcome: overrides first, then a 2xx status body, then the status.
fn map_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    overrides: &BTreeMap<u16, OutcomeName>,
    now: SystemTime,
    body_policy: &StatusBodyPolicy,
) -> Outcome {
    let after = retry_after(headers, now);
    let code = status.as_u16();
    let described = || {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let reason = if text.is_empty() {
            format!("HTTP {status}")
        } else {
            format!("HTTP {status}: {text}")
        };
        truncate_start(&reason, MAX_REASON_BYTES).to_owned()
    };
    if let Some(outcome) = overrides.get(&code) {
        return outcome.outcome(described(), after);
    }
    match code {
        200..=299 => status_body(status, body, after, body_policy),
        408 | 429 | 500..=599 => Outcome::Retry {
            after,
            reason: described(),
        },
        300..=399 => Outcome::retry(format!(
            "HTTP {status}: redirect not followed (`follow_redirects` is off, or too many redirects)"
        )),
        400..=499 => Outcome::DeadLetter {
            reason: described(),
            kind: FailureKind::Permanent,
        },
        _ => Outcome::Retry {
            after,
            reason: described(),
        },
    }
}

/// How a handler reads the `status` of a 2xx JSON body it does not know.
struct StatusBodyPolicy {
    handler: String,
    /// `strict_status_body`: an unknown value retries instead of acking.
    strict: bool,
    /// An unknown value is logged once per handler, not once per message.
    unknown_logged: std::sync::atomic::AtomicBool,
}

impl StatusBodyPolicy {
    fn new(handler: &str, strict: bool) -> Self {
        Self {
            handler: handler.to_owned(),
            strict,
            unknown_logged: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// What a 2xx JSON body asks for: `{"status": "RETRY"|"DROP"|"DEAD_LETTER",
/// "retry_after": seconds, "reason": "..."}` (case-insensitive). Any other body, and any
/// other status value (`"ok"`, `"SUCCESS"`, ...), means ack, unless the policy is strict.
fn status_body(
    status: StatusCode,
    body: &[u8],
    header_after: Option<Duration>,
    policy: &StatusBodyPolicy,
) -> Outcome {
    #[derive(Deserialize)]
    struct StatusBody {
        status: String,
        retry_after: Option<f64>,
        reason: Option<String>,
    }
    let Ok(parsed) = serde_json::from_slice::<StatusBody>(body) else {
        return Outcome::Ack;
    };
    let reason = |default: &str| {
        truncate_start(
            parsed.reason.as_deref().unwrap_or(default),
            MAX_REASON_BYTES,
        )
        .to_owned()
    };
    let after = parsed
        .retry_after
        .filter(|s| s.is_finite() && *s >= 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .or(header_after);
    match parsed.status.to_ascii_uppercase().as_str() {
        "SUCCESS" | "ACK" => Outcome::Ack,
        "RETRY" => Outcome::Retry {
            after,
            reason: reason(&format!("the endpoint asked to retry (HTTP {status})")),
        },
        "DROP" => Outcome::Drop {
            reason: reason(&format!("the endpoint dropped the message (HTTP {status})")),
        },
        "DEAD_LETTER" => Outcome::DeadLetter {
            reason: reason(&format!(
                "the endpoint dead-lettered the message (HTTP {status})"
            )),
            kind: FailureKind::Permanent,
        },
        // Strict: the endpoint meant something we cannot tell; retrying loses nothing.
        other if policy.strict => Outcome::Retry {
            after,
            reason: format!(
                "the endpoint answered HTTP {status} with unknown status `{}` (`strict_status_body` is on)",
                truncate_start(other, 64)
            ),
        },
        other => {
            if !policy
                .unknown_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::debug!(
                    handler = %policy.handler,
                    http_status = status.as_u16(),
                    body_status = truncate_start(other, 64),
                    "2xx body status is not RETRY, DROP or DEAD_LETTER; treated as success (logged once)"
                );
            }
            Outcome::Ack
        }
    }
}

/// `Retry-After` as delay-seconds or an HTTP date; a date in the past means now.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More seconds than a u64 holds still means "much later": saturate, never wrap.
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HttpHeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "99999999999999999999999")]), now),
            Some(Duration::from_secs(u64::MAX)),
            "a number too large for u64 saturates"
        );
    }

    #[test]
    fn unknown_status_in_body_acks_unless_strict() {
        let lenient = StatusBodyPolicy::new("h", false);
        let strict = StatusBodyPolicy::new("h", true);
        for body in [&br#"{"status":"MAYBE"}"#[..], br#"{"status":"ok"}"#] {
            assert_eq!(
                status_body(StatusCode::OK, body, None, &lenient),
                Outcome::Ack
            );
            let outcome = status_body(StatusCode::OK, body, None, &strict);
            assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
        }
        for policy in [&lenient, &strict] {
            assert_eq!(
                status_body(StatusCode::OK, br#"{"other":1}"#, None, policy),
                Outcome::Ack
            );
            assert_eq!(
                status_body(StatusCode::OK, b"not json", None, policy),
                Outcome::Ack
            );
            assert!(matches!(
                status_body(StatusCode::OK, br#"{"status":"retry"}"#, None, policy),
                Outcome::Retry { .. }
            ));
        }
    }

    #[test]
    fn shown_url_hides_credentials_query_and_path() {
        let url = reqwest::Url::parse("https://user:pw@example.com:8443/hook?token=abc").unwrap();
        assert_eq!(shown(&url), "https://example.com:8443");
    }
}
