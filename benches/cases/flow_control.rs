//! Cases `amqp-flow` and `redis-flow`: what a closed circuit breaker and a rate limit set far
//! above the rate cost. The `amqp` and `redis` cases' bosun runs (noop handler), each done
//! three times with `circuit_breaker = {}` and `rate_limit = { per_second = 10000000 }` on
//! the handler and three times without, alternately (the machine is shared: interleaving
//! spreads its noise over both sides); min and median of each side.

use super::amqp;
use super::redis;

/// The handler table's flow control for the "with" side: a breaker that never opens (noop
/// never fails) and a limit no run reaches.
const FLOW: &str = "circuit_breaker = {}\nrate_limit = { per_second = 10000000, burst = 10000000 }";
const ROUNDS: usize = 3;

fn summary(unit: &str, without: &mut [f64], with: &mut [f64]) -> String {
    let stats = |v: &mut [f64]| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[0], v[v.len() / 2])
    };
    let (without_min, without_median) = stats(without);
    let (with_min, with_median) = stats(with);
    format!(
        "without flow control: min {without_min:.0} {unit}/s, median {without_median:.0} {unit}/s\n\
         with breaker + rate limit: min {with_min:.0} {unit}/s, median {with_median:.0} {unit}/s\n\
         median with / without: {:.1} %\n",
        100.0 * with_median / without_median
    )
}

pub async fn amqp_flow() -> anyhow::Result<String> {
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for flow in [round % 2 == 1, round % 2 == 0] {
            let queue = amqp::filled("bench_amqp_flow").await?;
            let result = amqp::drain_with_bosun(&queue, if flow { FLOW } else { "" }).await;
            amqp::delete(&queue).await;
            let (rate, _) = result?;
            println!("  round {round}, flow control {flow}: {rate:.0} msg/s");
            (if flow { &mut with } else { &mut without }).push(rate);
        }
    }
    Ok(format!(
        "amqp case (noop handler, prefetch 1000), {ROUNDS} runs each side, interleaved\n{}",
        summary("msg", &mut without, &mut with)
    ))
}

pub async fn redis_flow() -> anyhow::Result<String> {
    let mut conn = redis::connect().await?;
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for flow in [round % 2 == 1, round % 2 == 0] {
            let stream = super::util::unique("bench_flow");
            let last_id = redis::preload(&mut conn, &stream).await?;
            let result =
                redis::bosun(&mut conn, &stream, &last_id, if flow { FLOW } else { "" }).await;
            let _: () = ::redis::cmd("DEL")
                .arg(&stream)
                .arg(format!("{stream}:retry"))
                .arg(format!("{stream}:dlq"))
                .query_async(&mut conn)
                .await?;
            let (rate, _) = result?;
            println!("  round {round}, flow control {flow}: {rate:.0} entries/s");
            (if flow { &mut with } else { &mut without }).push(rate);
        }
    }
    Ok(format!(
        "redis case (noop handler), {ROUNDS} runs each side, interleaved\n{}",
        summary("entries", &mut without, &mut with)
    ))
}

/// The global rate limit the `global-rate` case sets.
const GLOBAL_PER_SECOND: f64 = 50.0;
/// How long the `global-rate` case counts requests.
const WINDOW: std::time::Duration = std::time::Duration::from_secs(20);

/// Case `global-rate`: two bosun processes consume one queue through an http handler with
/// `rate_limit = { per_second = 50, scope = "global", broker = "cache" }`; the endpoint counts
/// the requests it gets over 20 s, after both have started.
pub async fn global_rate() -> anyhow::Result<String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // More than two processes can take in the window at the limit.
    let queue = amqp::filled("bench_global_rate").await?;
    let handler = super::util::unique("global");
    let config = |n: usize| {
        format!(
            "[service]\nname = \"bench-global-{n}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [brokers.rabbit]\nkind = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\
             [brokers.cache]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\n\
             [handlers.{handler}]\nkind = \"http\"\nurl = \"{url}\"\n\
             rate_limit = {{ per_second = {GLOBAL_PER_SECOND}, burst = 1, scope = \"global\", broker = \"cache\" }}\n\
             [consumers.bench]\nsource = \"rabbit\"\nhandler = \"{handler}\"\nqueue = \"{queue}\"\n\
             prefetch = 20\ndeclare = false\nretry = {{ max_attempts = 1 }}\n"
        )
    };
    let first = super::util::Bosun::start(&config(1))?;
    let second = super::util::Bosun::start(&config(2))?;
    // Both running and calling: requests flow, then the window starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while count.load(Ordering::Relaxed) < 10 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the endpoint got no requests"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let before = count.load(Ordering::Relaxed);
    let started = std::time::Instant::now();
    tokio::time::sleep(WINDOW).await;
    let requests = count.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed().as_secs_f64();
    drop(first);
    drop(second);
    server.abort();
    amqp::delete(&queue).await;
    let rate = requests as f64 / elapsed;
    Ok(format!(
        "2 bosun processes, global limit {GLOBAL_PER_SECOND:.0}/s (burst 1) through Redis\n\
         {requests} requests at the endpoint in {elapsed:.1} s: {rate:.1} req/s ({:+.1} % of the limit)\n",
        100.0 * (rate - GLOBAL_PER_SECOND) / GLOBAL_PER_SECOND
    ))
}
