//! `http`: messages/s through the http handler to a local sink that answers 200 at once,
//! against the same messages through the noop handler. Both are driven in-process through
//! the `Handler` trait by 64 concurrent tasks, with the Prometheus recorder installed as in
//! the daemon.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use bosun::handler::{BuildContext, Handler, HandlerKinds, Message, Outcome, Source};

const MESSAGES: usize = 50_000;
const CONCURRENCY: usize = 64;
const BODY_BYTES: usize = 200;

pub async fn run() -> anyhow::Result<String> {
    bosun::metrics_handle();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sink = axum::Router::new().route(
        "/sink",
        axum::routing::post(|| async { axum::http::StatusCode::OK }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, sink).await });

    let http = handler(
        "http",
        &format!("url = \"http://{addr}/sink\"\nmax_concurrency = {CONCURRENCY}"),
    )?;
    let noop = handler("noop", "")?;

    // Warm-up: open the pooled connections before measuring.
    drive(&http, 2_000).await?;
    let http_rate = drive(&http, MESSAGES).await?;
    let noop_rate = drive(&noop, MESSAGES).await?;
    server.abort();

    Ok(format!(
        "{MESSAGES} messages of {BODY_BYTES} B, {CONCURRENCY} in flight\n\
         http handler: {http_rate:.0} msg/s\n\
         noop handler: {noop_rate:.0} msg/s\n\
         http / noop:  {:.5}",
        http_rate / noop_rate
    ))
}

fn handler(kind: &str, options: &str) -> anyhow::Result<Arc<dyn Handler>> {
    let table: toml::Table = toml::from_str(options)?;
    let kinds = HandlerKinds::builtin();
    let factory = kinds
        .get(kind)
        .with_context(|| format!("no handler kind `{kind}`"))?
        .parse(&format!("bench_{kind}"), &table)
        .map_err(|e| anyhow::anyhow!("{}: {}", e.path.join("."), e.message))?;
    factory.build(&BuildContext {
        name: &format!("bench_{kind}"),
        handlers: &BTreeMap::new(),
    })
}

fn message(i: usize) -> Message {
    let mut body = format!("{{\"order\":{i},\"payload\":\"");
    body.push_str(&"x".repeat(BODY_BYTES.saturating_sub(body.len() + 2)));
    body.push_str("\"}");
    Message {
        message_id: Some(format!("bench-{i}")),
        correlation_id: None,
        headers: BTreeMap::new(),
        content_type: Some("application/json".into()),
        body: body.into(),
        attempt: 1,
        redelivered: false,
        inbox: None,
        source: Source {
            broker: "bench".into(),
            consumer: "bench".into(),
            queue: "bench".into(),
            exchange: None,
            routing_key: Some("order.created".into()),
            entry_id: None,
        },
    }
}

/// Sends `count` messages through `handler` from `CONCURRENCY` tasks; returns messages/s.
async fn drive(handler: &Arc<dyn Handler>, count: usize) -> anyhow::Result<f64> {
    let messages: Arc<Vec<Message>> = Arc::new((0..count).map(message).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (handler, messages, next) = (handler.clone(), messages.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(message) = messages.get(i) else {
                        return Ok(());
                    };
                    match handler.handle(message).await {
                        Outcome::Ack => {}
                        other => anyhow::bail!("message {i} was not acknowledged: {other:?}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}
