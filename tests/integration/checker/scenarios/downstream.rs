//! The downstream-outage scenario: the http handler's endpoint refuses connections for a
//! while, then comes back. With a circuit breaker the consumer stops fetching and waits, so
//! every message is handled once the endpoint recovers and none is dead-lettered; without
//! one, each message burns its attempts against the closed port and is dead-lettered.

use super::*;

/// The first sample of `name` with `labels` on the daemon's `/metrics` (0 when absent).
fn metric(port: u16, name: &str, labels: &[&str]) -> usize {
    support::http_get(&format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|(_, body)| support::metric_value(&body, name, labels))
        .unwrap_or(0.0) as usize
}

pub async fn downstream_down(
    bin: &Path,
    plan: &Plan,
    down: Duration,
    breaker: bool,
) -> anyhow::Result<Row> {
    let queue = unique("rel_down");
    let service = unique("rel");
    let port = free_port();
    // Nothing listens here until the endpoint "recovers": connections are refused.
    let sink_port = free_port();
    let sink_url = format!("http://127.0.0.1:{sink_port}/");
    let flow = if breaker {
        "circuit_breaker = { consecutive_failures = 5, open_for = \"2s\", max_open_for = \"5s\" }\n"
    } else {
        ""
    };
    let config = format!(
        "{}{flow}\n[consumers.load]\nsource = \"rabbit\"\nhandler = \"sink\"\nqueue = \"{queue}\"\nprefetch = 50\nconcurrency = 8\nretry = {{ max_attempts = 3, tiers = [\"1s\", \"5s\"] }}\n",
        base_config(&service, port, &sink_url, "5s")
    );
    let mut daemon = ready_daemon(bin, &config, port).await?;
    let started = Instant::now();
    let ids = ids(plan.messages);
    let confirmed = amqp_produce_with(&queue, &ids, plan.rate, false).await?;
    let left = down.saturating_sub(started.elapsed());
    tokio::time::sleep(left).await;
    // The handler's connection attempts that found nothing listening.
    let attempts_while_down = metric(
        port,
        "bosun_handler_responses_total",
        &["handler=\"sink\"", "class=\"connect\""],
    );
    let opened = metric(
        port,
        "bosun_breaker_transitions_total",
        &["handler=\"sink\"", "to=\"open\""],
    );
    let sink = Sink::start_at(plan.sink, sink_port).await?;

    let dlq = format!("{queue}.dlq");
    let (code, dead) = settle_then_stop(
        &mut daemon,
        &sink,
        &dlq,
        confirmed.len(),
        Duration::from_secs(180),
    )
    .await?;
    let accepted = sink.accepted();
    let mut row = tally(
        plan.name,
        &ids,
        &confirmed,
        &accepted,
        &dead,
        Duration::ZERO,
    );
    // With a breaker the outage must cost nothing but delay: a dead letter is misplaced.
    if breaker {
        row.misplaced = dead.iter().collect::<HashSet<_>>().len();
    }
    let note = if breaker {
        format!(
            "endpoint refused connections for {} s; {attempts_while_down} requests reached it while down (breaker opened {opened}x)",
            down.as_secs()
        )
    } else {
        format!(
            "no breaker: endpoint refused connections for {} s; {attempts_while_down} requests reached it while down",
            down.as_secs()
        )
    };
    row.note = note_with_exit(note, code);
    amqp_delete(&[
        queue.clone(),
        dlq,
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.5s"),
    ])
    .await;
    Ok(row)
}
