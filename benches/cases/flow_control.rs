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
