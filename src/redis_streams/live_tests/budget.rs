//! The shared rate budget against a real Redis: two budgets on one key (two replicas) draw on
//! one allowance.

use crate::testing::support;

use std::time::Duration;

use bosun::flow_control::{SharedBudget, Taken};
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
    // One token per 100 s and a burst of 3: whatever the order, exactly 3 takes succeed;
    // the next token is beyond the 1 s horizon, so nothing is reserved.
    let mut taken = 0;
    let mut waits = Vec::new();
    for i in 0..8 {
        let budget = if i % 2 == 0 { &a } else { &b };
        match budget
            .take(&key, 0.01, 3, Duration::from_secs(1))
            .await
            .expect("redis answers")
        {
            Taken::Held(wait) => {
                assert_eq!(wait, Duration::ZERO);
                taken += 1;
            }
            Taken::NotYet(wait) => waits.push(wait),
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
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut support::streams::redis().await)
        .await
        .expect("DEL");
}

#[tokio::test]
async fn tokens_within_the_horizon_are_reserved_back_to_back_so_none_is_lost() {
    let key = unique("bosun:ratelimit:test");
    let (a, b) = (RedisBudget::new(&broker()), RedisBudget::new(&broker()));
    // 10 a second, burst 1, horizon 1 s: the first at once, then one reserved every 100 ms
    // whoever asks, each 100 ms after the one before (not after the moment it is asked for),
    // until the next would be more than 1 s away.
    let mut held = Vec::new();
    let mut not_yet = None;
    for i in 0..20 {
        let budget = if i % 2 == 0 { &a } else { &b };
        let taken = budget
            .take(&key, 10.0, 1, Duration::from_secs(1))
            .await
            .expect("redis answers");
        let answered = std::time::Instant::now();
        match taken {
            // The instant the token is for.
            Taken::Held(wait) => held.push((wait, answered + wait)),
            Taken::NotYet(wait) => {
                not_yet = Some(wait);
                break;
            }
        }
    }
    assert!((10..=12).contains(&held.len()), "{held:?}");
    assert_eq!(held[0].0, Duration::ZERO);
    // The k-th token is for k intervals after the first, however long the asking took (up to
    // the time a reply takes to come back).
    let first = held[0].1;
    for (k, (_, at)) in held.iter().enumerate() {
        let due = first + Duration::from_millis(100) * k as u32;
        let off = if *at > due { *at - due } else { due - *at };
        assert!(
            off < Duration::from_millis(40),
            "token {k} is {off:?} off its slot: {held:?}"
        );
    }
    let not_yet = not_yet.expect("the budget runs out of the horizon");
    assert!(not_yet <= Duration::from_millis(100), "{not_yet:?}");
    let mut conn = support::streams::redis().await;
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DEL");
}
