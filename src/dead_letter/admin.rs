//! `/admin/dead-letters`: the archive over HTTP, through the same [`Ops`] as `bosun dlq`.
//!
//! Served only when `[http.admin]` configures a token, on the admin API's own listener;
//! every request is checked by [`Access`] (a token whose roles grant the route's
//! permission) before any handler runs.
//!
//! Requests are bounded: bodies up to [`MAX_BODY_BYTES`], id lists up to [`MAX_IDS`] (413
//! beyond), and `all` needs a `processor` and `"confirm": "<that processor>"`.
//!
//! `/admin/dead-letters/operations` starts recorded operations (a replay or purge over a
//! filter, at a rate, with progress and cancel): the same ones the console and
//! `bosun dlq replay --rate` run.

use std::sync::{Arc, RwLock};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::DeadLetterError;
use super::archive::{ListFilter, Selector};
use super::browse::Filter;
use super::operations::{self, Kind};
use super::ops::{MAX_IDS, Ops, parse_time, row_json};
use super::publishers::Publishers;
use crate::access::{Access, Identity};
use crate::config::Config;
use crate::resources::Resources;
use crate::roles::Permission;

/// Largest request body: a full id list ([`MAX_IDS`] ids) fits with room to spare.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

#[derive(Clone)]
struct AdminState {
    ops: AdminOps,
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

/// The dead-letter routes over `ops`: reading needs [`Permission::ReadDeadLetters`],
/// replay [`Permission::ReplayDeadLetters`] and purge [`Permission::PurgeDeadLetters`],
/// each checked by `access` before any handler runs.
pub fn routes(ops: AdminOps, access: &Access) -> Router {
    let state = AdminState { ops };
    let read = Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/groups", get(groups))
        .route("/admin/dead-letters/{id}", get(show));
    let read = read
        .route("/admin/dead-letters/operations", get(list_operations))
        .route("/admin/dead-letters/operations/{id}", get(get_operation));
    let replays = Router::new()
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/operations", post(start_operation))
        .route(
            "/admin/dead-letters/operations/{id}/cancel",
            post(cancel_operation),
        );
    let purges = Router::new().route("/admin/dead-letters/purge", post(purge));
    access
        .guard(read, Permission::ReadDeadLetters)
        .merge(access.guard(replays, Permission::ReplayDeadLetters))
        .merge(access.guard(purges, Permission::PurgeDeadLetters))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
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

/// The body of `POST /admin/dead-letters/operations`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationBody {
    /// `replay` or `purge`.
    kind: String,
    processor: Option<String>,
    #[serde(default)]
    filter: Filter,
    /// `50/s`, `300/m`; absent: unlimited.
    rate: Option<String>,
    batch_size: Option<i64>,
    /// Only count what the operation would touch.
    #[serde(default)]
    dry_run: bool,
}

fn caller(identity: Option<axum::Extension<Identity>>) -> Identity {
    identity.map(|i| i.0).unwrap_or(Identity {
        user: "unknown".into(),
        roles: Vec::new(),
    })
}

async fn start_operation(
    State(state): State<AdminState>,
    identity: Option<axum::Extension<Identity>>,
    text: String,
) -> Result<Response, ApiError> {
    let who = caller(identity);
    let body: OperationBody = serde_json::from_str(&text)
        .map_err(|e| DeadLetterError::Invalid(format!("invalid JSON body: {e}")))?;
    let kind = Kind::parse(&body.kind)
        .ok_or_else(|| DeadLetterError::Invalid("`kind` is \"replay\" or \"purge\"".into()))?;
    if kind == Kind::Purge && !who.can(Permission::PurgeDeadLetters) {
        return Ok(Refused(
            StatusCode::FORBIDDEN,
            "this caller's roles do not allow a purge".into(),
        )
        .into_response());
    }
    if body
        .filter
        .ids
        .as_ref()
        .is_some_and(|ids| ids.len() > MAX_IDS)
    {
        return Ok(Refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_IDS} ids per operation"),
        )
        .into_response());
    }
    let rate = body
        .rate
        .as_deref()
        .map(operations::parse_rate)
        .transpose()
        .map_err(DeadLetterError::Invalid)?;
    let ops = state.ops.current();
    if body.dry_run {
        let count =
            operations::dry_run(&ops, kind, body.processor.as_deref(), &body.filter).await?;
        operations::audit(
            &ops,
            body.processor.as_deref(),
            &who.user,
            &format!("{} dry run", kind.name()),
            Some(&body.filter),
            Some(count),
            None,
        )
        .await?;
        return Ok(Json(serde_json::json!({ "dry_run": true, "count": count })).into_response());
    }
    let request = operations::Request {
        kind,
        processor: body.processor.clone(),
        filter: body.filter,
        rate,
        batch_size: body.batch_size.unwrap_or(operations::DEFAULT_BATCH),
        requested_by: who.user,
    };
    let op = operations::start(&ops, &request).await?;
    let id = op.id;
    let processor = body.processor;
    tokio::spawn(async move {
        if let Err(e) = operations::run(&ops, processor.as_deref(), id, |_| {}).await {
            tracing::error!(operation = id, error = %e, "dead-letter operation stopped");
        }
    });
    Ok((StatusCode::ACCEPTED, Json(op)).into_response())
}

async fn list_operations(
    State(state): State<AdminState>,
    Query(q): Query<ProcessorQuery>,
) -> Result<Response, ApiError> {
    let ops = state.ops.current();
    Ok(Json(operations::list(&ops, q.processor.as_deref(), 100).await?).into_response())
}

async fn get_operation(
    State(state): State<AdminState>,
    Path(id): Path<i64>,
    Query(q): Query<ProcessorQuery>,
) -> Result<Response, ApiError> {
    let ops = state.ops.current();
    Ok(Json(operations::get(&ops, q.processor.as_deref(), id).await?).into_response())
}

async fn cancel_operation(
    State(state): State<AdminState>,
    identity: Option<axum::Extension<Identity>>,
    Path(id): Path<i64>,
    Query(q): Query<ProcessorQuery>,
) -> Result<Response, ApiError> {
    let who = caller(identity);
    let ops = state.ops.current();
    Ok(
        Json(operations::cancel(&ops, q.processor.as_deref(), id, &who.user).await?)
            .into_response(),
    )
}
