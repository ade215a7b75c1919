//! `/admin/dead-letters`: the archive over HTTP, through the same [`Ops`] as `bosun dlq`.
//!
//! Mounted only when `[http.admin]` configures a token. Every request must carry
//! `Authorization: Bearer <token>`; the comparison runs in constant time over SHA-256
//! digests, so neither the token's content nor its length leaks through timing. Anything
//! else is answered 401 before any handler runs.

use std::sync::{Arc, RwLock};

use axum::extract::{Path, Query, Request, State};
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
use super::ops::{Ops, parse_time, row_json};
use super::publishers::Publishers;
use crate::config::{Config, Secret};
use crate::runtime::Resources;

#[derive(Clone)]
struct AdminState {
    ops: AdminOps,
    /// SHA-256 of the token: what requests are compared against.
    token_digest: Arc<[u8; 32]>,
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
    };
    Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/groups", get(groups))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .route("/admin/dead-letters/{id}", get(show))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
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
        next.run(request).await
    } else {
        tracing::warn!(path = %request.uri().path(), "admin request refused: missing or wrong bearer token");
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({ "error": "unauthorized" })),
        )
            .into_response()
    }
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
            DeadLetterError::Database(_) | DeadLetterError::Broker { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
/// purge only).
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
}

impl SelectBody {
    fn selector(&self) -> Result<Selector, DeadLetterError> {
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

async fn replay(State(state): State<AdminState>, text: String) -> Result<Response, ApiError> {
    let body = body(&text)?;
    let report = state
        .ops
        .current()
        .replay(body.processor.as_deref(), &body.selector()?, body.dry_run)
        .await?;
    Ok(Json(report).into_response())
}

async fn purge(State(state): State<AdminState>, text: String) -> Result<Response, ApiError> {
    let body = body(&text)?;
    let report = state
        .ops
        .current()
        .purge(body.processor.as_deref(), &body.selector()?, body.dry_run)
        .await?;
    Ok(Json(report).into_response())
}
