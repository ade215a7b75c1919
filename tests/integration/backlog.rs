//! `bosun_consumer_backlog`: the work a consumer still has, as an autoscaler must see it,
//! including messages waiting out a retry delay (in an amqp retry tier, or scheduled in a
//! Redis stream's `:retry` set), which a broker's queue length leaves out.

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;

use crate::support::{self, ConfigFile, Daemon, RABBIT_URL, REDIS_URL, unique};

const WAIT: Duration = Duration::from_secs(60);

/// An endpoint that always answers 503: every message goes to a retry.
async fn failing_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new().route("/hook", post(|| async { StatusCode::SERVICE_UNAVAILABLE }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

fn start(consumer: &str) -> (ConfigFile, Daemon) {
    let port = support::free_port();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n{consumer}"
    );
    let file = ConfigFile::new(&text);
    let daemon = Daemon::start(&file.path, port);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    (file, daemon)
}

fn wait_backlog(daemon: &Daemon, consumer: &str, expected: f64) {
    let label = format!("consumer=\"{consumer}\"");
    let seen = support::wait_for(WAIT, || {
        (daemon.metric("bosun_consumer_backlog", &[&label]) == Some(expected)).then_some(())
    });
    assert!(
        seen.is_some(),
        "backlog of {consumer} never {expected}; last {:?}\n{}",
        daemon.metric("bosun_consumer_backlog", &[&label]),
        daemon.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_backlog_counts_messages_waiting_in_a_retry_tier() {
    let hook = failing_endpoint().await;
    let queue = unique("backlog_q");
    let (_file, daemon) = start(&format!(
        "[handlers.hook]\nkind = \"http\"\nurl = \"{hook}\"\n\
         [consumers.waiting]\nsource = \"rabbit\"\nqueue = \"{queue}\"\nhandler = \"hook\"\n\
         backlog_interval = \"200ms\"\nretry = {{ max_attempts = 3, initial = \"5m\", max = \"5m\" }}\n"
    ));
    for i in 0..3 {
        let mut message =
            support::amqp::OutgoingMessage::new("", queue.clone(), format!("m{i}").into_bytes());
        message.message_id = unique("m");
        support::amqp::Publisher
            .publish(&message)
            .await
            .expect("publish");
    }
    // All three failed once and wait 5 minutes in `<queue>.retry.5m`: `Q` itself is empty.
    wait_backlog(&daemon, "waiting", 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backlog_counts_unread_pending_and_scheduled_entries() {
    let hook = failing_endpoint().await;
    let stream = unique("backlog_s");
    let (_file, daemon) = start(&format!(
        "[handlers.hook]\nkind = \"http\"\nurl = \"{hook}\"\n\
         [consumers.scheduled]\nsource = \"cache\"\nstream = \"{stream}\"\ngroup = \"g\"\nhandler = \"hook\"\n\
         block = \"200ms\"\nclaim_interval = \"200ms\"\nretry = {{ max_attempts = 3, initial = \"5m\", max = \"5m\" }}\n"
    ));
    let mut redis = support::streams::redis().await;
    for i in 0..4 {
        support::streams::xadd(
            &mut redis,
            &stream,
            &[("payload", format!("e{i}").as_bytes())],
        )
        .await;
    }
    // Every entry failed once and is scheduled for 5 minutes later, acknowledged meanwhile.
    wait_backlog(&daemon, "scheduled", 4.0);
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(format!("{stream}:retry"))
        .query_async(&mut redis)
        .await
        .expect("clean up");
}
