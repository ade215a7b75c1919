//! Background work that every replica runs but only one may do at a time: outbox retention
//! takes the table's advisory lock first, and a replica that finds it held (here the test,
//! standing in for another replica) leaves the round to the holder.

use std::time::Duration;

use crate::support::outbox::Table;
use crate::support::{ConfigFile, Daemon, PG_URL, RABBIT_URL, free_port, pg, wait_for_async};

#[tokio::test(flavor = "multi_thread")]
async fn outbox_retention_runs_on_one_replica_at_a_time() {
    let table = Table::new("retention").await;
    table
        .insert(None, "k", &[(None, "a".into()), (None, "b".into())])
        .await;
    sqlx::query(&format!(
        "UPDATE {} SET published_at = now() - interval '1 hour'",
        table.name
    ))
    .execute(&table.pool)
    .await
    .expect("mark published");

    // Another replica holds the retention lock of this table.
    let pool = pg().await;
    let mut other = pool.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock(hashtext('bosun.outbox.retention'), hashtext($1))")
        .bind(&table.name)
        .execute(&mut *other)
        .await
        .expect("lock");

    let port = free_port();
    let text = format!(
        r#"
[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[databases.main]
url = "{PG_URL}"

[outboxes.o]
database = "main"
table = "{table}"
target = "rabbit"
retain_published = "1s"
"#,
        table = table.name
    );
    let file = ConfigFile::new(&text);
    let daemon = Daemon::start(&file.path, port);
    assert!(
        daemon.wait_ready(Duration::from_secs(60)),
        "{}",
        daemon.logs()
    );
    // Retention looks every 5 s: two rounds pass while the other replica holds the lock.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        table.count("true").await,
        2,
        "rows deleted while another replica held the retention lock"
    );

    sqlx::query("SELECT pg_advisory_unlock(hashtext('bosun.outbox.retention'), hashtext($1))")
        .bind(&table.name)
        .execute(&mut *other)
        .await
        .expect("unlock");
    let deleted = wait_for_async(Duration::from_secs(30), || async {
        (table.count("true").await == 0).then_some(())
    })
    .await;
    assert!(deleted.is_some(), "{}", daemon.logs());
}
