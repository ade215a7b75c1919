//! Stream trimming against a real Redis: only entries every group has acknowledged go.

use crate::testing::support;

use std::time::Duration;

use redis::AsyncCommands as _;

use support::REDIS_URL;
use support::streams::{create_group, range, redis, xadd_many, xlen};
use support::unique;

async fn trim_ops() -> bosun::redis_streams::Ops {
    let text = format!("[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n");
    let config = bosun::config::load_str(
        &text,
        "trim.toml",
        &bosun::handler::HandlerKinds::builtin(),
        &bosun::config::Env::default(),
    )
    .expect("valid config");
    let Some(bosun::config::BrokerConfig::Redis(broker)) = config.brokers.get("cache") else {
        panic!("a redis broker");
    };
    bosun::redis_streams::Ops::connect(broker, "trim-test")
        .await
        .expect("connect to redis")
}

#[tokio::test]
async fn trim_removes_only_entries_every_group_has_acknowledged() {
    use bosun::config::TrimLimit;
    use bosun::redis_streams::trim::trim_once;
    let mut conn = redis().await;
    let ops = trim_ops().await;
    let stream = unique("trim_groups");
    xadd_many(&mut conn, &stream, 10).await;
    create_group(&mut conn, &stream).await;
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(6)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 6);
    let acked: i64 = conn.xack(&stream, "g", &ids[..3]).await.expect("XACK");
    assert_eq!(acked, 3);

    // maxlen 1 asks for 9 to go, but 3 pending and 4 never delivered must stay.
    let trimmed = trim_once(&ops, &stream, TrimLimit::MaxLen(1), None)
        .await
        .expect("trim");
    assert_eq!(trimmed, 3);
    assert_eq!(xlen(&mut conn, &stream).await, 7);
    let first = range(&mut conn, &stream).await;
    assert_eq!(first[0].0, ids[3], "the oldest pending entry is kept");

    // A group that has read nothing keeps everything.
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("late")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("XGROUP");
    let acked: i64 = conn.xack(&stream, "g", &ids[3..]).await.expect("XACK");
    assert_eq!(acked, 3);
    assert_eq!(
        trim_once(&ops, &stream, TrimLimit::MaxLen(1), None)
            .await
            .expect("trim"),
        0
    );
    assert_eq!(xlen(&mut conn, &stream).await, 7);

    // Without groups (a dead-letter stream nobody reads) the limit alone decides.
    let bare = unique("trim_bare");
    xadd_many(&mut conn, &bare, 10).await;
    assert_eq!(
        trim_once(&ops, &bare, TrimLimit::MaxLen(4), None)
            .await
            .expect("trim"),
        6
    );
    assert_eq!(xlen(&mut conn, &bare).await, 4);

    // max_age goes by the time in the entry id.
    let aged = unique("trim_aged");
    for id in ["1000-1", "1000-2"] {
        let _: String = redis::cmd("XADD")
            .arg(&aged)
            .arg(id)
            .arg("payload")
            .arg("old")
            .query_async(&mut conn)
            .await
            .expect("XADD");
    }
    xadd_many(&mut conn, &aged, 3).await;
    assert_eq!(
        trim_once(
            &ops,
            &aged,
            TrimLimit::MaxAge(Duration::from_secs(3600)),
            None
        )
        .await
        .expect("trim"),
        2
    );
    assert_eq!(xlen(&mut conn, &aged).await, 3);
    // A consumer's stream is left alone while its group does not exist.
    let ungrouped = unique("trim_ungrouped");
    xadd_many(&mut conn, &ungrouped, 5).await;
    assert_eq!(
        trim_once(&ops, &ungrouped, TrimLimit::MaxLen(1), Some("g"))
            .await
            .expect("trim"),
        0
    );
    assert_eq!(xlen(&mut conn, &ungrouped).await, 5);
    let _: () = conn.del(&ungrouped).await.expect("DEL");
    // An empty or missing stream is nothing to do.
    assert_eq!(
        trim_once(&ops, &unique("trim_none"), TrimLimit::MaxLen(1), None)
            .await
            .expect("trim"),
        0
    );
    let _: () = conn.del(&[&stream, &bare, &aged]).await.expect("DEL");
}
