//! The shared rate budget against a real Redis: two budgets on one key (two replicas) draw on
//! one allowance.

use crate::testing::support;

use bosun::flow_control::SharedBudget;
use bosun::redis_streams::budget::RedisBudget;
use support::{REDIS_URL, unique};

fn broker() -> bosun::config::RedisBrokerConfig {
    let text = format!("[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n");
    let config = bosun::config::load_str(
        &text,
        "budget.toml",
        &bosun::handler::HandlerKinds::builtin(),
        &bosun::config::Env::default(),
    )
    .expect("valid config");
    match config.brokers.get("cache") {
        Some(bosun::config::BrokerConfig::Redis(broker)) => broker.clone(),
        _ => panic!("a redis broker"),
    }
}

#[tokio::test]
async fn two_replicas_share_one_burst_and_are_told_how_long_to_wait() {
    let key = unique("bosun:ratelimit:test");
    let (a, b) = (RedisBudget::new(&broker()), RedisBudget::new(&broker()));
    // One token per 100 s and a burst of 3: whatever the order, exactly 3 takes succeed.
    let mut taken = 0;
    let mut waits = Vec::new();
    for i in 0..8 {
        let budget = if i % 2 == 0 { &a } else { &b };
        match budget.take(&key, 0.01, 3).await.expect("redis answers") {
            None => taken += 1,
            Some(wait) => waits.push(wait),
        }
    }
    assert_eq!(taken, 3, "the burst is shared by both");
    assert_eq!(waits.len(), 5);
    assert!(
        waits
            .iter()
            .all(|w| w.as_secs() >= 50 && w.as_secs() <= 100),
        "the next token is about one interval away: {waits:?}"
    );
    let mut conn = support::streams::redis().await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
}
