//! The HTTP listeners: `/metrics`, `/healthz`, `/readyz` on one, and the dead-letter admin
//! API, when configured, on a listener of its own (`[http.admin].listen`, loopback by
//! default), so that exposing metrics never exposes the admin API.
//!
//! Everything served passes through the redactor: `/readyz` reasons quote broker and
//! database errors, and `/metrics` labels come from configuration.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::flow_control::Flows;
use crate::health::Health;

/// `/healthz` fails once the supervisor loop has not turned for this long.
pub const LOOP_STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: PrometheusHandle,
    /// What `/healthz?verbose` reports about stopped consumers.
    flows: Flows,
}

/// The base router.
pub fn router(health: Health, metrics: PrometheusHandle, flows: Flows) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            health,
            metrics,
            flows,
        })
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::redact::text(&crate::telemetry::render(&state.metrics)).into_owned(),
    )
        .into_response()
}

/// `/healthz`; with `?verbose`, also every consumer that does not fetch and why (paused,
/// its handler's breaker open). A stopped consumer is healthy: restarting the process
/// would not help it, so neither this nor `/readyz` fails for it.
async fn healthz(
    State(state): State<AppState>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let stalled = state.health.since_beat();
    let (code, mut body) = if stalled > LOOP_STALL_LIMIT {
        let body = serde_json::json!({ "status": "stalled", "supervisor_loop_idle_seconds": stalled.as_secs() });
        (StatusCode::SERVICE_UNAVAILABLE, body)
    } else {
        (StatusCode::OK, serde_json::json!({ "status": "ok" }))
    };
    if query.contains_key("verbose") {
        let status = state.flows.status();
        let stopped: serde_json::Map<String, serde_json::Value> = status
            .consumers
            .iter()
            .filter_map(|(name, c)| {
                let reason = c.stopped.as_ref()?;
                Some((
                    name.clone(),
                    serde_json::Value::String(crate::redact::text(reason).into_owned()),
                ))
            })
            .collect();
        body["stopped_consumers"] = serde_json::Value::Object(stopped);
        // `single_active` consumers waiting for another process to stop reading.
        body["standby_consumers"] = serde_json::Value::Object(
            crate::activity::standbys()
                .into_iter()
                .map(|(name, why)| (name, serde_json::Value::String(why)))
                .collect(),
        );
    }
    (code, Json(body)).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let components = state.health.snapshot();
    let not_ready: serde_json::Map<String, serde_json::Value> = components
        .iter()
        .filter(|(_, c)| !c.ready)
        .map(|(name, c)| {
            (
                name.clone(),
                serde_json::json!({ "reason": crate::redact::text(&c.reason), "since": c.since }),
            )
        })
        .collect();
    if not_ready.is_empty() {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready", "components": components.len() })),
        )
            .into_response()
    } else {
        let body = serde_json::json!({ "status": "not_ready", "not_ready": not_ready });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Binds `listen`; errors here (address in use) stop the daemon at start.
pub async fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await
}

/// Serves `app` until `shutdown` is cancelled. Handlers can read the peer's address
/// (`ConnectInfo<SocketAddr>`): trusted-proxy checks need it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await
}
