//! `/admin/dead-letters`: the archive over HTTP, through the same [`Ops`] as `bosun dlq`.
//!
//! Served only when `[http.admin]` configures a token, on the admin API's own listener.
//! Every request must carry `Authorization: Bearer <token>`; the comparison runs in constant
//! time over SHA-256 digests, so neither the token's content nor its length leaks through
//! timing. Anything else is answered 401 before any handler runs; failed authentications
//! beyond a small budget are answered 429, counted in `bosun_admin_auth_failures_total` and
//! logged once per interval with their count, so a flood costs neither CPU nor log volume.
//!
//! Requests are bounded: bodies up to [`MAX_BODY_BYTES`], id lists up to [`MAX_IDS`] (413
//! beyond), and `all` needs a `processor` and `"confirm": "<that processor>"`.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::DeadLetterError;
use super::archive::{ListFilter, Selector};
use super::ops::{MAX_IDS, Ops, parse_time, row_json};
use super::publishers::Publishers;
use crate::config::{Config, Secret};
use crate::resources::Resources;

/// Largest request body: a full id list ([`MAX_IDS`] ids) fits with room to spare.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

/// Failed authentications allowed in a burst before answers turn to 429.
const AUTH_FAILURE_BURST: f64 = 10.0;
/// Failed authentications allowed per second, sustained.
const AUTH_FAILURES_PER_SECOND: f64 = 1.0;
/// At most one log line about failed authentications per interval.
const AUTH_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counter: admin requests refused for a missing or wrong token (`limited` = "true" when
/// answered 429 because the failure budget was spent).
pub const AUTH_FAILURES_METRIC: &str = "bosun_admin_auth_failures_total";

#[derive(Clone)]
struct AdminState {
    ops: AdminOps,
    /// SHA-256 of the token: what requests are compared against.
    token_digest: Arc<[u8; 32]>,
    failures: Arc<Mutex<AuthFailures>>,
}

/// The failed-authentication budget (a token bucket) and the count not yet logged.
struct AuthFailures {
    tokens: f64,
    refilled: Instant,
    unlogged: u64,
    logged: Option<Instant>,
}

impl AuthFailures {
    fn new() -> Self {
        Self {
            tokens: AUTH_FAILURE_BURST,
            refilled: Instant::now(),
            unlogged: 0,
            logged: None,
        }
    }

    /// Records one failure at `now`; true when it is within budget (answer 401), false when
    /// the budget is spent (answer 429). Returns the count to log, when a line is due.
    fn record(&mut self, now: Instant) -> (bool, Option<u64>) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * AUTH_FAILURES_PER_SECOND).min(AUTH_FAILURE_BURST);
        self.refilled = now;
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        }
        self.unlogged += 1;
        (allowed, self.flush(now))
    }

    /// The count not yet logged, when there is one and its interval is over.
    fn flush(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= AUTH_LOG_INTERVAL);
        (due && self.unlogged > 0).then(|| {
            self.logged = Some(now);
            std::mem::take(&mut self.unlogged)
        })
    }
}

/// The [`Ops`] the admin API serves, replaced when a reload is applied, so the API always
/// knows the processors and archives that run now. A request works on the `Ops` it started
/// with.
#[derive(Clone)]
pub struct AdminOps(Arc<RwLock<Ops>>);

impl AdminOps {
    pub fn new(ops: Ops) -> Self {
        Self(Arc::new(RwLock::new(ops)))
    }

    /// The `Ops` for `config`, over the pools in `resources`.
    pub fn build(config: &Arc<Config>, resources: &Resources) -> Ops {
        Ops::new(
            config.clone(),
            resources.databases.clone(),
            Arc::new(Publishers::new(config.clone(), "admin")),
        )
    }

    pub fn current(&self) -> Ops {
        match self.0.read() {
            Ok(ops) => ops.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, ops: Ops) {
        match self.0.write() {
            Ok(mut current) => *current = ops,
            Err(poisoned) => *poisoned.into_inner() = ops,
        }
    }
}

/// The admin routes and the handle a reload replaces their [`Ops`] through, or `None` when no
/// admin token is configured (the API stays off).
pub fn router(config: &Arc<Config>, resources: &Resources) -> Option<(Router, AdminOps)> {
    let token = config.http.admin_token.as_ref()?;
    let ops = AdminOps::new(AdminOps::build(config, resources));
    Some((routes(ops.clone(), token), ops))
}

/// The routes over `ops`, guarded by `token`.
pub fn routes(ops: AdminOps, token: &Secret) -> Router {
    let state = AdminState {
        ops,
        token_digest: Arc::new(digest(token.expose().as_bytes())),
        failures: Arc::new(Mutex::new(AuthFailures::new())),
    };
    flush_failure_counts(Arc::downgrade(&state.failures));
    metrics::describe_counter!(
        AUTH_FAILURES_METRIC,
        "Admin API requests refused for a missing or wrong token (limited=\"true\": answered 429)."
    );
    // Present from the start, so that `increase(...)` sees the first failure.
    for limited in ["false", "true"] {
        metrics::counter!(AUTH_FAILURES_METRIC, "limited" => limited).increment(0);
    }
    Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/groups", get(groups))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .route("/admin/dead-letters/{id}", get(show))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| digest(t.trim().as_bytes()));
    let ok = presented.is_some_and(|d| bool::from(d.ct_eq(&*state.token_digest)));
    if ok {
        return next.run(request).await;
    }
    let (allowed, to_log) = match state.failures.lock() {
        Ok(mut failures) => failures.record(Instant::now()),
        Err(poisoned) => poisoned.into_inner().record(Instant::now()),
    };
    metrics::counter!(AUTH_FAILURES_METRIC, "limited" => if allowed { "false" } else { "true" })
        .increment(1);
    if let Some(count) = to_log {
        tracing::warn!(
            refused = count,
            interval_s = AUTH_LOG_INTERVAL.as_secs(),
            "admin requests refused: missing or wrong token"
        );
    }
    if allowed {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({ "error": "unauthorized" })),
        )
            .into_response()
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            Json(serde_json::json!({ "error": "too many failed authentications; slow down" })),
        )
            .into_response()
    }
}

/// Logs failures still uncounted in a line once their interval is over, so the last ones of
/// a burst are reported too; stops when the routes are dropped.
fn flush_failure_counts(failures: std::sync::Weak<Mutex<AuthFailures>>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(AUTH_LOG_INTERVAL);
        loop {
            tick.tick().await;
            let Some(failures) = failures.upgrade() else {
                return;
            };
            let count = match failures.lock() {
                Ok(mut f) => f.flush(Instant::now()),
                Err(poisoned) => poisoned.into_inner().flush(Instant::now()),
            };
            if let Some(count) = count {
                tracing::warn!(
                    refused = count,
                    interval_s = AUTH_LOG_INTERVAL.as_secs(),
                    "admin requests refused: missing or wrong token"
                );
            }
        }
    });
}

/// An error as an HTTP answer: bad requests 400, missing rows 404, unreachable database or
/// broker 503, refused publishes 502.
struct ApiError(DeadLetterError);

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            DeadLetterError::Invalid(_) | DeadLetterError::NoDestination => StatusCode::BAD_REQUEST,
            DeadLetterError::NotFound(_) => StatusCode::NOT_FOUND,
            DeadLetterError::Database(_)
            | DeadLetterError::Broker { .. }
            | DeadLetterError::Inbox(_) => StatusCode::SERVICE_UNAVAILABLE,
            DeadLetterError::Publish(_) => StatusCode::BAD_GATEWAY,
        };
        (
            status,
            Json(serde_json::json!({ "error": self.0.to_string() })),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProcessorQuery {
    processor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    processor: Option<String>,
    group: Option<String>,
    /// RFC 3339 time or an age ("2h").
    since: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(state): State<AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = ListFilter {
        group: q.group,
        since: q.since.as_deref().map(parse_time).transpose()?,
        status: q.status,
        limit: q.limit.unwrap_or(50).clamp(1, 10_000),
    };
    let rows = state
        .ops
        .current()
        .list(q.processor.as_deref(), &filter)
        .await?;
    Ok(Json(rows).into_response())
}

async fn groups(
    State(state): State<AdminState>,
    Query(q): Query<ProcessorQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(state.ops.current().groups(q.processor.as_deref()).await?).into_response())
}

async fn show(
    State(state): State<AdminState>,
    Path(id): Path<i64>,
    Query(q): Query<ProcessorQuery>,
) -> Result<Response, ApiError> {
    let row = state.ops.current().show(q.processor.as_deref(), id).await?;
    Ok(Json(row_json(&row)).into_response())
}

/// The body of `replay` and `purge`: exactly one of `ids`, `group`, `all` (`before` for
/// purge only). `all` needs `processor` and, unless `dry_run`, `confirm` naming it again.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SelectBody {
    processor: Option<String>,
    ids: Option<Vec<i64>>,
    group: Option<String>,
    #[serde(default)]
    all: bool,
    before: Option<String>,
    #[serde(default)]
    dry_run: bool,
    confirm: Option<String>,
}

impl SelectBody {
    fn selector(&self) -> Result<Selector, DeadLetterError> {
        if self.all {
            super::ops::confirm_all(
                self.processor.as_deref(),
                self.confirm.as_deref(),
                self.dry_run,
                "\"confirm\": \"<processor>\"",
            )?;
        }
        match (&self.ids, &self.group, self.all, &self.before) {
            (Some(ids), None, false, None) if !ids.is_empty() => Ok(Selector::Ids(ids.clone())),
            (None, Some(g), false, None) => Ok(Selector::Group(g.clone())),
            (None, None, true, None) => Ok(Selector::All),
            (None, None, false, Some(t)) => Ok(Selector::Before(parse_time(t)?)),
            _ => Err(DeadLetterError::Invalid(
                "give exactly one of `ids` (non-empty), `group`, `all` or (purge) `before`".into(),
            )),
        }
    }
}

fn body(text: &str) -> Result<SelectBody, DeadLetterError> {
    serde_json::from_str(text)
        .map_err(|e| DeadLetterError::Invalid(format!("invalid JSON body: {e}")))
}

/// Why a body was refused before any work: not JSON of the right shape (400), or an id
/// list over [`MAX_IDS`] (413).
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// The body, or why it is refused.
fn checked_body(text: &str) -> Result<SelectBody, Refused> {
    let body = body(text).map_err(|e| Refused(StatusCode::BAD_REQUEST, e.to_string()))?;
    if let Some(ids) = &body.ids
        && ids.len() > MAX_IDS
    {
        return Err(Refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} ids given; at most {MAX_IDS} per request (split the list, or select by `group`)",
                ids.len()
            ),
        ));
    }
    Ok(body)
}

async fn replay(State(state): State<AdminState>, text: String) -> Result<Response, ApiError> {
    select_and_run(&state, &text, async |ops, processor, selector, dry_run| {
        ops.replay(processor, selector, dry_run).await
    })
    .await
}

async fn purge(State(state): State<AdminState>, text: String) -> Result<Response, ApiError> {
    select_and_run(&state, &text, async |ops, processor, selector, dry_run| {
        ops.purge(processor, selector, dry_run).await
    })
    .await
}

/// Replay and purge take the same body: it is checked (a refusal is answered as is), its
/// selector built, and `run` given the current operations; its report is the answer.
async fn select_and_run<R: serde::Serialize>(
    state: &AdminState,
    text: &str,
    run: impl AsyncFnOnce(&Ops, Option<&str>, &Selector, bool) -> Result<R, DeadLetterError>,
) -> Result<Response, ApiError> {
    let body = match checked_body(text) {
        Ok(body) => body,
        Err(refused) => return Ok(refused.into_response()),
    };
    let ops = state.ops.current();
    let report = run(
        &ops,
        body.processor.as_deref(),
        &body.selector()?,
        body.dry_run,
    )
    .await?;
    Ok(Json(report).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_authentications_beyond_the_burst_are_limited_and_logged_in_aggregate() {
        let mut failures = AuthFailures::new();
        let start = Instant::now();
        let mut limited = 0;
        let mut logged = Vec::new();
        for _ in 0..100 {
            let (allowed, to_log) = failures.record(start);
            limited += usize::from(!allowed);
            logged.extend(to_log);
        }
        assert_eq!(limited, 100 - AUTH_FAILURE_BURST as usize);
        assert_eq!(
            logged,
            vec![1],
            "one line at first, the rest waits for the interval"
        );
        // The budget refills, and the next line carries the count since the last one.
        let later = start + AUTH_LOG_INTERVAL;
        let (allowed, to_log) = failures.record(later);
        assert!(allowed);
        assert_eq!(to_log, Some(100));
        // Failures after the last line are flushed once their interval is over.
        failures.record(later);
        assert_eq!(failures.flush(later), None);
        assert_eq!(failures.flush(later + AUTH_LOG_INTERVAL), Some(1));
        assert_eq!(failures.flush(later + 3 * AUTH_LOG_INTERVAL), None);
    }
}
