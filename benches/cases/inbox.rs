//! Cases `amqp-inbox` and `redis-inbox`: what an inbox costs. The `amqp` and `redis` cases'
//! bosun runs (noop handler, the consumer keyed on `message_id`) without an inbox, with a
//! postgres inbox and with a redis inbox, each `ROUNDS` times, the three sides rotating their
//! order from round to round (the machine is shared: interleaving spreads its noise over all
//! sides). Every run gets a fresh table or key prefix, so every message is a first claim.
//! Reported: min and median throughput per side, the cost of each inbox (1 - median with /
//! median without), and the claim's p50 and p99 read from bosun's
//! `bosun_inbox_claim_duration_seconds` histogram over all of a side's runs.

use super::util::unique;
use super::{amqp, redis};

const ROUNDS: usize = 3;
/// Connections of the postgres inbox's pool.
const PG_POOL: u32 = 8;
const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const REDIS_URL: &str = "redis://127.0.0.1:6379/";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    None,
    Postgres,
    Redis,
}

impl Side {
    const ALL: [Side; 3] = [Side::None, Side::Postgres, Side::Redis];

    fn label(self) -> &'static str {
        match self {
            Side::None => "no inbox",
            Side::Postgres => "postgres inbox",
            Side::Redis => "redis inbox",
        }
    }
}

/// The consumer's inbox line and the tables it needs, for a fresh table or key prefix `name`.
fn tail(side: Side, name: &str) -> String {
    let store = match side {
        Side::None => return String::new(),
        Side::Postgres => format!(
            "kind = \"postgres\"\ndatabase = \"main\"\ntable = \"{name}\"\n\n\
             [databases.main]\nurl = \"{PG_URL}\"\nmax_connections = {PG_POOL}\n"
        ),
        Side::Redis => format!(
            "kind = \"redis\"\nbroker = \"inbox_cache\"\n\n\
             [brokers.inbox_cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n"
        ),
    };
    format!(
        "inbox = {{ store = \"{name}\", key = \"message_id\" }}\n\n\
         [inboxes.{name}]\nwindow = \"10m\"\nlease = \"1m\"\n{store}"
    )
}

/// Removes what a run with an inbox left: the postgres table, or the redis keys.
async fn clean(side: Side, name: &str) {
    match side {
        Side::None => {}
        Side::Postgres => {
            if let Ok(pool) = sqlx::PgPool::connect(PG_URL).await {
                let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {name} CASCADE"))
                    .execute(&pool)
                    .await;
            }
        }
        Side::Redis => {
            let Ok(mut conn) = redis::connect().await else {
                return;
            };
            let pattern = format!("bosun:inbox:{name}:*");
            let mut cursor = 0u64;
            loop {
                let Ok((next, keys)): Result<(u64, Vec<String>), _> = ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(5000)
                    .query_async(&mut conn)
                    .await
                else {
                    return;
                };
                if !keys.is_empty() {
                    let _: Result<i64, _> = ::redis::cmd("UNLINK")
                        .arg(&keys)
                        .query_async(&mut conn)
                        .await;
                }
                if next == 0 {
                    return;
                }
                cursor = next;
            }
        }
    }
}

/// The claim histogram's cumulative buckets `(le, count)` on a /metrics page.
fn claim_buckets(metrics: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("bosun_inbox_claim_duration_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside its bucket.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().map(|b| b.1).fold(0.0, f64::max);
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let share = if count > below {
                (rank - below) / (count - below)
            } else {
                1.0
            };
            return Some(lower + (le - lower) * share);
        }
        (lower, below) = (le, count);
    }
    None
}

/// Adds `more`'s cumulative bucket counts into `sum` (the same bucket bounds).
fn add_buckets(sum: &mut Vec<(f64, f64)>, more: Vec<(f64, f64)>) {
    if sum.is_empty() {
        *sum = more;
        return;
    }
    for (s, m) in sum.iter_mut().zip(more) {
        s.1 += m.1;
    }
}

struct Results {
    rates: [Vec<f64>; 3],
    buckets: [Vec<(f64, f64)>; 3],
}

impl Results {
    fn new() -> Self {
        Self {
            rates: [Vec::new(), Vec::new(), Vec::new()],
            buckets: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    fn add(&mut self, side: Side, drained: amqp::Drained) {
        let i = side as usize;
        self.rates[i].push(drained.rate);
        add_buckets(&mut self.buckets[i], claim_buckets(&drained.metrics));
    }

    fn summary(mut self, unit: &str) -> String {
        let mut out = String::new();
        let mut medians = [0.0; 3];
        for side in Side::ALL {
            let i = side as usize;
            let v = &mut self.rates[i];
            v.sort_by(|a, b| a.total_cmp(b));
            medians[i] = v[v.len() / 2];
            out.push_str(&format!(
                "{}: min {:.0} {unit}/s, median {:.0} {unit}/s",
                side.label(),
                v[0],
                medians[i]
            ));
            if side != Side::None {
                let ms = |q| {
                    quantile(&self.buckets[i], q)
                        .map(|s| format!("{:.2} ms", s * 1000.0))
                        .unwrap_or_else(|| "n/a".into())
                };
                out.push_str(&format!(
                    ", cost {:.1} %, claim p50 {} p99 {}",
                    100.0 * (1.0 - medians[i] / medians[0]),
                    ms(0.5),
                    ms(0.99)
                ));
            }
            out.push('\n');
        }
        out
    }
}

/// The sides in round `round`'s order: each side leads one round in three.
fn order(round: usize) -> [Side; 3] {
    let mut sides = Side::ALL;
    sides.rotate_left(round % 3);
    sides
}

pub async fn amqp_inbox() -> anyhow::Result<String> {
    let mut results = Results::new();
    for round in 0..ROUNDS {
        for side in order(round) {
            let name = unique("bench_inbox");
            let queue = amqp::filled("bench_amqp_inbox").await?;
            let drained = amqp::drain_with(&queue, "", &tail(side, &name)).await;
            amqp::delete(&queue).await;
            clean(side, &name).await;
            let drained = drained?;
            println!(
                "  round {round}, {}: {:.0} msg/s",
                side.label(),
                drained.rate
            );
            results.add(side, drained);
        }
    }
    Ok(format!(
        "amqp case (50,000 messages, noop handler, prefetch 1000), key message_id, postgres pool {PG_POOL}, {ROUNDS} runs each side, interleaved\n{}",
        results.summary("msg")
    ))
}

pub async fn redis_inbox() -> anyhow::Result<String> {
    let mut conn = redis::connect().await?;
    let mut results = Results::new();
    for round in 0..ROUNDS {
        for side in order(round) {
            let name = unique("bench_inbox");
            let stream = unique("bench_inbox_s");
            let last_id = redis::preload(&mut conn, &stream).await?;
            let drained =
                redis::bosun_with(&mut conn, &stream, &last_id, "", &tail(side, &name)).await;
            let _: () = ::redis::cmd("DEL")
                .arg(&stream)
                .arg(format!("{stream}:retry"))
                .arg(format!("{stream}:dlq"))
                .query_async(&mut conn)
                .await?;
            clean(side, &name).await;
            let drained = drained?;
            println!(
                "  round {round}, {}: {:.0} entries/s",
                side.label(),
                drained.rate
            );
            results.add(side, drained);
        }
    }
    Ok(format!(
        "redis case ({} entries, noop handler, batch 1000), key message_id, postgres pool {PG_POOL}, {ROUNDS} runs each side, interleaved\n{}",
        redis::entries(),
        results.summary("entries")
    ))
}
