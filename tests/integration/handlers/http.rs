//! `kind = "http"` against an axum server started on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, post};
use bosun::handler::{FailureKind, HeaderValue, Outcome};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{build, message, metric, support};

#[derive(Default)]
struct Server {
    /// Every request to `/record`: its headers and body.
    recorded: Mutex<Vec<(HeaderMap, Bytes)>>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

/// What `/respond` answers, read from the request body (the message body).
#[derive(Deserialize)]
struct Spec {
    status: u16,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: String,
    #[serde(default)]
    repeat: usize,
}

async fn respond(body: Bytes) -> Response {
    let Ok(spec) = serde_json::from_slice::<Spec>(&body) else {
        return (StatusCode::IM_A_TEAPOT, "bad spec").into_response();
    };
    let mut response = spec.body.repeat(spec.repeat.max(1)).into_response();
    *response.status_mut() = StatusCode::from_u16(spec.status).unwrap_or(StatusCode::IM_A_TEAPOT);
    for (k, v) in spec.headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    response
}

async fn record(State(server): State<Arc<Server>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    server.recorded.lock().await.push((headers, body));
    StatusCode::NO_CONTENT
}

async fn hang() -> StatusCode {
    tokio::time::sleep(Duration::from_secs(3600)).await;
    StatusCode::OK
}

/// Holds each request until three are in flight (or 5 s pass), so a limit that lets more
/// through shows up as a higher peak.
async fn gate(State(server): State<Arc<Server>>) -> StatusCode {
    let now = server.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    server.peak.fetch_max(now, Ordering::SeqCst);
    support::wait_for_async(Duration::from_secs(5), || async {
        (server.in_flight.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.in_flight.fetch_sub(1, Ordering::SeqCst);
    StatusCode::OK
}

async fn start() -> (String, Arc<Server>) {
    let server = Arc::new(Server::default());
    let app = Router::new()
        .route("/respond", post(respond))
        .route("/record", post(record))
        .route("/hang", post(hang))
        .route("/gate", post(gate))
        .route("/loop", any(|| async { Redirect::temporary("/loop") }))
        .route("/moved", any(|| async { Redirect::temporary("/record") }))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), server)
}

fn respond_handler(base: &str, name: &str, extra: &str) -> Arc<dyn bosun::Handler> {
    build(
        "http",
        name,
        &format!("url = \"{base}/respond\"\ntimeout = \"5s\"\n{extra}"),
    )
}

async fn outcome_for(base: &str, name: &str, extra: &str, spec: &str) -> Outcome {
    respond_handler(base, name, extra)
        .handle(&message(spec))
        .await
}

#[tokio::test]
async fn status_mapping_rows() {
    let (base, _) = start().await;
    let name = support::unique("http_rows");
    let ack = outcome_for(&base, &name, "", r#"{"status":200}"#).await;
    assert_eq!(ack, Outcome::Ack);
    assert_eq!(
        outcome_for(&base, &name, "", r#"{"status":204}"#).await,
        Outcome::Ack
    );
    for status in [408, 429, 500, 502, 503] {
        match outcome_for(
            &base,
            &name,
            "",
            &format!(r#"{{"status":{status},"body":"busy"}}"#),
        )
        .await
        {
            Outcome::Retry {
                after: None,
                reason,
            } => assert!(
                reason.contains(&status.to_string()) && reason.contains("busy"),
                "{reason}"
            ),
            other => panic!("{status}: {other:?}"),
        }
    }
    for status in [400, 404, 409, 422] {
        match outcome_for(
            &base,
            &name,
            "",
            &format!(r#"{{"status":{status},"body":"no such order"}}"#),
        )
        .await
        {
            Outcome::DeadLetter {
                reason,
                kind: FailureKind::Permanent,
            } => {
                assert!(
                    reason.starts_with(&format!("HTTP {status}"))
                        && reason.ends_with("no such order"),
                    "{reason}"
                )
            }
            other => panic!("{status}: {other:?}"),
        }
    }
    assert!(
        metric(
            "bosun_handler_responses_total",
            &[&format!("handler=\"{name}\""), "class=\"2xx\""]
        ) == Some(2.0)
    );
    assert!(
        metric(
            "bosun_handler_responses_total",
            &[&format!("handler=\"{name}\""), "class=\"5xx\""]
        ) == Some(3.0)
    );
    assert!(
        metric(
            "bosun_handler_responses_total",
            &[&format!("handler=\"{name}\""), "class=\"4xx\""]
        ) == Some(6.0)
    );
}

#[tokio::test]
async fn dead_letter_reason_is_the_first_2_kib_of_the_response() {
    let (base, _) = start().await;
    let outcome = outcome_for(
        &base,
        &support::unique("http_big"),
        "",
        r#"{"status":400,"body":"0123456789","repeat":100000}"#,
    )
    .await;
    let Outcome::DeadLetter { reason, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(reason.len(), 2048);
    assert!(
        reason.starts_with("HTTP 400 Bad Request: 0123456789"),
        "{reason}"
    );
}

#[tokio::test]
async fn retry_after_in_seconds_and_as_a_date() {
    let (base, _) = start().await;
    let name = support::unique("http_retry_after");
    let outcome = outcome_for(
        &base,
        &name,
        "",
        r#"{"status":503,"headers":[["retry-after","17"]]}"#,
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(17)),
        "{outcome:?}"
    );

    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let outcome = outcome_for(
        &base,
        &name,
        "",
        &format!(r#"{{"status":429,"headers":[["retry-after","{date}"]]}}"#),
    )
    .await;
    match outcome {
        // The date has whole seconds and a little time passes on the way.
        Outcome::Retry { after: Some(d), .. } => assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn json_status_bodies() {
    let (base, _) = start().await;
    let name = support::unique("http_json");
    let body = |json: &str| {
        format!(
            r#"{{"status":200,"body":{}}}"#,
            serde_json::to_string(json).unwrap()
        )
    };
    let outcome = outcome_for(
        &base,
        &name,
        "",
        &body(r#"{"status":"RETRY","retry_after":5,"reason":"stock service down"}"#),
    )
    .await;
    assert_eq!(
        outcome,
        Outcome::Retry {
            after: Some(Duration::from_secs(5)),
            reason: "stock service down".into()
        }
    );
    let outcome = outcome_for(&base, &name, "", &body(r#"{"status":"RETRY"}"#)).await;
    assert!(
        matches!(outcome, Outcome::Retry { after: None, .. }),
        "{outcome:?}"
    );
    let outcome = outcome_for(
        &base,
        &name,
        "",
        &body(r#"{"status":"DROP","reason":"duplicate"}"#),
    )
    .await;
    assert_eq!(
        outcome,
        Outcome::Drop {
            reason: "duplicate".into()
        }
    );
    let outcome = outcome_for(
        &base,
        &name,
        "",
        &body(r#"{"status":"DEAD_LETTER","reason":"unknown customer"}"#),
    )
    .await;
    assert_eq!(
        outcome,
        Outcome::DeadLetter {
            reason: "unknown customer".into(),
            kind: FailureKind::Permanent
        }
    );
    assert_eq!(
        outcome_for(&base, &name, "", &body(r#"{"status":"SUCCESS"}"#)).await,
        Outcome::Ack
    );
    assert_eq!(
        outcome_for(&base, &name, "", &body(r#"{"ok":true}"#)).await,
        Outcome::Ack
    );
    assert_eq!(
        outcome_for(&base, &name, "", &body("plain text")).await,
        Outcome::Ack
    );
}

#[tokio::test]
async fn status_ok_body_is_success_and_only_retry_drop_dead_letter_change_it() {
    let (base, _) = start().await;
    let name = support::unique("http_ok_body");
    let body = |json: &str| {
        format!(
            r#"{{"status":200,"body":{}}}"#,
            serde_json::to_string(json).unwrap()
        )
    };
    for json in [
        r#"{"status":"ok"}"#,
        r#"{"status":"OK","id":17}"#,
        r#"{"status":"accepted"}"#,
    ] {
        assert_eq!(
            outcome_for(&base, &name, "", &body(json)).await,
            Outcome::Ack,
            "{json}"
        );
    }
    // The three values that ask for something else are read case-insensitively.
    assert!(matches!(
        outcome_for(&base, &name, "", &body(r#"{"status":"retry"}"#)).await,
        Outcome::Retry { .. }
    ));
    assert!(matches!(
        outcome_for(&base, &name, "", &body(r#"{"status":"Drop"}"#)).await,
        Outcome::Drop { .. }
    ));
    assert!(matches!(
        outcome_for(&base, &name, "", &body(r#"{"status":"dead_letter"}"#)).await,
        Outcome::DeadLetter { .. }
    ));
    // `strict_status_body` keeps the old reading: a value it does not know retries.
    let strict = "strict_status_body = true";
    match outcome_for(&base, &name, strict, &body(r#"{"status":"ok"}"#)).await {
        Outcome::Retry { reason, .. } => {
            assert!(reason.contains("unknown status `OK`"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        outcome_for(&base, &name, strict, &body(r#"{"status":"SUCCESS"}"#)).await,
        Outcome::Ack
    );
}

#[tokio::test]
async fn status_overrides_beat_the_default_mapping() {
    let (base, _) = start().await;
    let name = support::unique("http_overrides");
    let extra = r#"status_overrides = { "409" = "ack", "422" = "retry", "503" = "dead_letter", "200" = "drop" }"#;
    assert_eq!(
        outcome_for(&base, &name, extra, r#"{"status":409}"#).await,
        Outcome::Ack
    );
    let outcome = outcome_for(
        &base,
        &name,
        extra,
        r#"{"status":422,"headers":[["retry-after","3"]]}"#,
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(3)),
        "{outcome:?}"
    );
    assert!(matches!(
        outcome_for(&base, &name, extra, r#"{"status":503}"#).await,
        Outcome::DeadLetter { .. }
    ));
    assert!(matches!(
        outcome_for(&base, &name, extra, r#"{"status":200}"#).await,
        Outcome::Drop { .. }
    ));
    // Statuses without an override keep the default mapping.
    assert!(matches!(
        outcome_for(&base, &name, extra, r#"{"status":404}"#).await,
        Outcome::DeadLetter { .. }
    ));
}

#[tokio::test]
async fn request_carries_body_content_type_metadata_and_message_headers() {
    let (base, server) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let handler = build(
        "http",
        &support::unique("http_headers"),
        &format!(
            "url = \"{base}/record\"\ntoken_file = \"{}\"\nheaders = {{ \"x-static\" = \"yes\" }}\ncloudevents = \"binary\"",
            token_file.display()
        ),
    );
    let mut msg = message(r#"{"order":42}"#);
    msg.attempt = 3;
    msg.headers
        .insert("x-tenant".into(), HeaderValue::String("acme".into()));
    msg.headers.insert("x-count".into(), HeaderValue::Int(7));
    msg.headers
        .insert("x-broken".into(), HeaderValue::String("line\nbreak".into()));
    msg.headers
        .insert("bad name".into(), HeaderValue::String("x".into()));
    assert_eq!(handler.handle(&msg).await, Outcome::Ack);

    let recorded = server.recorded.lock().await;
    let (headers, body) = &recorded[0];
    let h = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(body.as_ref(), br#"{"order":42}"#);
    assert_eq!(h("content-type").as_deref(), Some("application/json"));
    assert_eq!(h("authorization").as_deref(), Some("Bearer s3cret-token"));
    assert_eq!(h("x-static").as_deref(), Some("yes"));
    assert_eq!(h("bosun-message-id"), msg.message_id);
    assert_eq!(h("bosun-correlation-id").as_deref(), Some("corr-1"));
    assert_eq!(h("bosun-attempt").as_deref(), Some("3"));
    assert_eq!(h("bosun-source-queue").as_deref(), Some("orders.q"));
    assert_eq!(h("bosun-routing-key").as_deref(), Some("order.created"));
    assert_eq!(h("bosun-exchange").as_deref(), Some("events"));
    assert_eq!(h("bosun-consumer").as_deref(), Some("orders"));
    assert_eq!(h("bosun-header-x-tenant").as_deref(), Some("acme"));
    assert_eq!(h("bosun-header-x-count").as_deref(), Some("7"));
    assert_eq!(
        h("bosun-header-x-broken"),
        None,
        "a value with a newline is skipped"
    );
    assert_eq!(h("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(h("ce-id"), msg.message_id);
    assert_eq!(h("ce-type").as_deref(), Some("order.created"));
    assert_eq!(h("ce-source").as_deref(), Some("/bosun/rabbit/orders.q"));
}

#[tokio::test]
async fn static_headers_interpolate_environment_variables() {
    let (base, server) = start().await;
    let text = format!(
        "[handlers.hook]\nkind = \"http\"\nurl = \"{base}/record\"\nheaders = {{ \"x-api-key\" = \"${{HOOK_KEY}}\" }}\n"
    );
    let env = bosun::config::Env::from_pairs([("HOOK_KEY", "k-123")]);
    let config = bosun::config::load_str(
        &text,
        "test.toml",
        &bosun::handler::HandlerKinds::builtin(),
        &env,
    )
    .unwrap();
    let handlers = bosun::handler::build_all(&config.handlers).unwrap();
    assert_eq!(handlers["hook"].handle(&message("{}")).await, Outcome::Ack);
    let recorded = server.recorded.lock().await;
    assert_eq!(recorded[0].0.get("x-api-key").unwrap(), "k-123");
    assert_eq!(
        recorded[0].0.get("ce-id"),
        None,
        "cloudevents are off by default"
    );
}

#[tokio::test]
async fn hanging_endpoint_times_out_as_retry() {
    let (base, _) = start().await;
    let name = support::unique("http_hang");
    let handler = build(
        "http",
        &name,
        &format!("url = \"{base}/hang\"\ntimeout = \"300ms\""),
    );
    let outcome = tokio::time::timeout(Duration::from_secs(10), handler.handle(&message("{}")))
        .await
        .expect("the timeout holds");
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("no response")),
        "{outcome:?}"
    );
    assert_eq!(
        metric(
            "bosun_handler_responses_total",
            &[&format!("handler=\"{name}\""), "class=\"timeout\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn refused_connection_and_unresolvable_host_retry() {
    let port = support::free_port();
    let name = support::unique("http_refused");
    let handler = build(
        "http",
        &name,
        &format!("url = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"2s\""),
    );
    let outcome = handler.handle(&message("{}")).await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("connect")),
        "{outcome:?}"
    );
    assert_eq!(
        metric(
            "bosun_handler_responses_total",
            &[&format!("handler=\"{name}\""), "class=\"connect\""]
        ),
        Some(1.0)
    );

    let name = support::unique("http_unresolvable");
    let handler = build(
        "http",
        &name,
        "url = \"http://no-such-host.invalid/hook\"\ntimeout = \"2s\"",
    );
    let outcome = handler.handle(&message("{}")).await;
    assert!(matches!(outcome, Outcome::Retry { .. }), "{outcome:?}");
}

#[tokio::test]
async fn redirects_are_not_followed_unless_configured_and_loops_end() {
    let (base, server) = start().await;
    let name = support::unique("http_redirect");
    let outcome = build("http", &name, &format!("url = \"{base}/moved\""))
        .handle(&message("{}"))
        .await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("redirect")),
        "{outcome:?}"
    );
    assert!(server.recorded.lock().await.is_empty());

    let follow = build(
        "http",
        &support::unique("http_follow"),
        &format!("url = \"{base}/moved\"\nfollow_redirects = true"),
    );
    assert_eq!(follow.handle(&message("{}")).await, Outcome::Ack);
    assert_eq!(server.recorded.lock().await.len(), 1);

    let name = support::unique("http_loop");
    let looping = build(
        "http",
        &name,
        &format!("url = \"{base}/loop\"\nfollow_redirects = true\ntimeout = \"5s\""),
    );
    let outcome = looping.handle(&message("{}")).await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("redirect")),
        "{outcome:?}"
    );
    assert_eq!(
        metric(
            "bosun_handler_responses_total",
            &[&format!("handler=\"{name}\""), "class=\"3xx\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn max_concurrency_caps_requests_in_flight() {
    let (base, server) = start().await;
    let handler = build(
        "http",
        &support::unique("http_limit"),
        &format!("url = \"{base}/gate\"\nmax_concurrency = 3"),
    );
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle(&message("{}")).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Outcome::Ack);
    }
    assert_eq!(server.peak.load(Ordering::SeqCst), 3);
}

#[test]
fn bad_options_are_config_errors_with_a_line() {
    let error =
        super::load_error("[handlers.hook]\nkind = \"http\"\nurl = \"ftp://example.com/\"\n");
    assert!(
        error.starts_with("test.toml:3:") && error.contains("scheme `ftp`"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.hook]\nkind = \"http\"\nurl = \"http://x/\"\n\ntimeout = \"soon\"\n",
    );
    assert!(
        error.starts_with("test.toml:5:") && error.contains("invalid duration"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.hook]\nkind = \"http\"\nurl = \"http://x/\"\nstatus_overrides = { \"700\" = \"ack\" }\n",
    );
    assert!(
        error.starts_with("test.toml:4:") && error.contains("not an HTTP status"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.hook]\nkind = \"http\"\nurl = \"http://x/\"\nstatus_overrides = { \"409\" = \"ok\" }\n",
    );
    assert!(
        error.starts_with("test.toml:4:") && error.contains("unknown variant `ok`"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.hook]\nkind = \"http\"\nurl = \"http://x/\"\ntoken_env = \"BOSUN_TEST_NO_SUCH_VAR\"\n",
    );
    assert!(
        error.starts_with("test.toml:4:") && error.contains("BOSUN_TEST_NO_SUCH_VAR"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.hook]\nkind = \"http\"\nurl = \"http://x/\"\ncloudevents = \"structured\"\n",
    );
    assert!(error.contains("unknown variant `structured`"), "{error}");
    let error = super::load_error(
        "[handlers.hook]\nkind = \"http\"\nurl = \"http://x/\"\nfollow_redirect = true\n",
    );
    assert!(
        error.starts_with("test.toml:4:") && error.contains("unknown field `follow_redirect`"),
        "{error}"
    );

    let (path, message) = super::option_error(
        "http",
        "url = \"http://x/\"\ntls = { ca_file = \"/nonexistent/ca.pem\" }",
    );
    assert_eq!(path, "tls.ca_file");
    assert!(message.contains("cannot read"), "{message}");
    let (path, _) = super::option_error(
        "http",
        "url = \"http://x/\"\ntls = { cert_file = \"/etc/hostname\" }",
    );
    assert_eq!(path, "tls.cert_file");
    let (path, _) = super::option_error(
        "http",
        "url = \"http://x/\"\nheaders = { \"bad header\" = \"v\" }",
    );
    assert_eq!(path, "headers.bad header");
    let (path, _) = super::option_error("http", "url = \"http://x/\"\nmax_concurrency = 0");
    assert_eq!(path, "max_concurrency");
}

#[test]
fn token_never_shows_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "zq7\u{7}xv").unwrap();
    let (path, message) = super::option_error(
        "http",
        &format!(
            "url = \"http://x/\"\ntoken_file = \"{}\"",
            token_file.display()
        ),
    );
    assert_eq!(path, "token_file");
    assert!(!message.contains("zq7"), "{message}");
}
