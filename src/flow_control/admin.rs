//! The admin API's pause, resume and status routes. They are merged into the admin router by
//! `runtime`, status behind [`Permission::ReadStatus`](crate::roles::Permission) and pause
//! and resume behind `ControlConsumers`; `bosun pause`, `bosun resume` and `bosun status`
//! call them.
//!
//! - `POST /admin/consumers/NAME/pause` and `POST /admin/handlers/NAME/pause`, with an
//!   optional JSON body `{"for": "10m", "reason": "..."}`;
//! - `POST /admin/consumers/NAME/resume` and `POST /admin/handlers/NAME/resume`;
//! - `GET /admin/status`: every consumer (state, why it is stopped, breaker, in flight) and
//!   handler (breaker, throttling, pause).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{FlowError, Flows};

/// The longest reason kept with a pause.
const MAX_REASON_BYTES: usize = 200;

/// `GET /admin/status` over `flows`.
pub fn status_routes(flows: Flows) -> Router {
    Router::new()
        .route("/admin/status", get(status))
        .with_state(flows)
}

/// Pause and resume over `flows`.
pub fn control_routes(flows: Flows) -> Router {
    Router::new()
        .route("/admin/consumers/{name}/pause", post(pause_consumer))
        .route("/admin/consumers/{name}/resume", post(resume_consumer))
        .route("/admin/handlers/{name}/pause", post(pause_handler))
        .route("/admin/handlers/{name}/resume", post(resume_handler))
        .with_state(flows)
}

/// The body of a pause, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseBody {
    /// How long, as the file writes durations (`"10m"`); without it, until resumed.
    #[serde(rename = "for")]
    pub duration: Option<String>,
    pub reason: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn not_found(e: FlowError) -> Response {
    error(StatusCode::NOT_FOUND, e.to_string())
}

/// The body's duration and reason, or the answer refusing it.
fn parse_body(text: &str) -> Result<(Option<Duration>, String), Box<Response>> {
    let body: PauseBody = if text.trim().is_empty() {
        PauseBody::default()
    } else {
        serde_json::from_str(text)
            .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("invalid body: {e}"))))?
    };
    let duration = match body.duration.as_deref() {
        None => None,
        Some(text) => match crate::units::parse_duration(text) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "`for` must be longer than zero",
                )));
            }
            Err(e) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("invalid duration in `for`: {e}"),
                )));
            }
        },
    };
    let reason = body
        .reason
        .unwrap_or_else(|| "paused through the admin API".into());
    Ok((
        duration,
        crate::text::truncate(&reason, MAX_REASON_BYTES).to_owned(),
    ))
}

async fn status(State(flows): State<Flows>) -> Response {
    Json(flows.status()).into_response()
}

/// What is paused or resumed: `consumers` or `handlers`.
#[derive(Clone, Copy)]
enum Target {
    Consumer,
    Handler,
}

impl Target {
    fn key(self) -> &'static str {
        match self {
            Target::Consumer => "consumer",
            Target::Handler => "handler",
        }
    }
}

fn pause(flows: &Flows, target: Target, name: String, text: &str) -> Response {
    let (duration, reason) = match parse_body(text) {
        Ok(parsed) => parsed,
        Err(refused) => return *refused,
    };
    let paused = match target {
        Target::Consumer => flows.pause_consumer(&name, duration, &reason),
        Target::Handler => flows.pause_handler(&name, duration, &reason),
    };
    match paused {
        Ok(()) => Json(serde_json::json!({ target.key(): name, "paused": true, "for_s": duration.map(|d| d.as_secs()) })).into_response(),
        Err(e) => not_found(e),
    }
}

fn resume(flows: &Flows, target: Target, name: String) -> Response {
    let resumed = match target {
        Target::Consumer => flows.resume_consumer(&name),
        Target::Handler => flows.resume_handler(&name),
    };
    match resumed {
        Ok(was) => {
            Json(serde_json::json!({ target.key(): name, "paused": false, "was_paused": was }))
                .into_response()
        }
        Err(e) => not_found(e),
    }
}

async fn pause_consumer(
    State(flows): State<Flows>,
    Path(name): Path<String>,
    text: String,
) -> Response {
    pause(&flows, Target::Consumer, name, &text)
}

async fn resume_consumer(State(flows): State<Flows>, Path(name): Path<String>) -> Response {
    resume(&flows, Target::Consumer, name)
}

async fn pause_handler(
    State(flows): State<Flows>,
    Path(name): Path<String>,
    text: String,
) -> Response {
    pause(&flows, Target::Handler, name, &text)
}

async fn resume_handler(State(flows): State<Flows>, Path(name): Path<String>) -> Response {
    resume(&flows, Target::Handler, name)
}
