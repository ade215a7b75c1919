//! The outbox commands and a relay in the `bosun` binary, against real PostgreSQL and
//! RabbitMQ. The relay's own behaviour is tested in-process in `src/outbox/live_tests.rs`.

use crate::support;

use std::collections::BTreeSet;

use support::outbox::{
    PYTHON_OUTBOX_DDL, PYTHON_OUTBOX_MAPPING, Queue, Table, WAIT, config, existing_table,
    insert_as_python, numbered,
};
use support::pg;
use support::{ConfigFile, PG_URL, RABBIT_URL, unique};

#[test]
fn schema_command_prints_the_ddl() {
    let (code, out, err) =
        support::bosun_output(&["outbox", "schema", "--table", "app.orders_outbox"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("CREATE TABLE IF NOT EXISTS app.orders_outbox ("),
        "{out}"
    );
    assert!(out.contains("message_id      uuid"), "{out}");
    assert!(
        out.contains(
            "CREATE INDEX IF NOT EXISTS orders_outbox_message_id_idx ON app.orders_outbox (message_id)"
        ),
        "{out}"
    );
    assert!(
        out.contains("WHERE published_at IS NULL AND failed_at IS NULL"),
        "{out}"
    );
    assert!(
        out.contains(
            "FOR EACH STATEMENT EXECUTE FUNCTION app.orders_outbox_notify('app_orders_outbox')"
        ),
        "{out}"
    );

    let (code, _, err) = support::bosun_output(
        &["outbox", "schema", "--table", "orders; drop table x"],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("not a plain lowercase SQL identifier"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_the_trigger_notifies() {
    let table = unique("ob_migrate").to_lowercase();
    let (file, _config) = config(&["migrated"], &table, "target = \"rabbit\"");
    let path = file.path.to_str().expect("utf-8 path").to_owned();
    for _ in 0..2 {
        let (code, out, err) =
            support::bosun_output(&["outbox", "migrate", "--config", &path], &[]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains(&format!("table {table} in database main is up to date")),
            "{out}"
        );
    }
    let guard = Table {
        name: table.clone(),
        pool: pg().await,
    };
    let mut listener = sqlx::postgres::PgListener::connect(PG_URL)
        .await
        .expect("listen");
    listener.listen(&table).await.expect("listen");
    sqlx::query(&format!(
        "INSERT INTO {table} (destination, payload) VALUES ('x', 'y'), ('x', 'z')"
    ))
    .execute(&guard.pool)
    .await
    .expect("insert");
    let notification = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("a notification")
        .expect("recv");
    assert_eq!(notification.channel(), table);
    let row: (i32, Option<chrono::DateTime<chrono::Utc>>, uuid::Uuid) = sqlx::query_as(&format!(
        "SELECT attempts, published_at, message_id FROM {table} LIMIT 1"
    ))
    .fetch_one(&guard.pool)
    .await
    .expect("defaults");
    assert_eq!((row.0, row.1), (0, None));
    assert_eq!(row.2.get_version_num(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_daemon_mid_run_loses_no_row() {
    let table = Table::new("ob_kill").await;
    let queue = Queue::new("ob_kill").await;
    let port = support::free_port();
    let text = format!(
        "[service]\nname = \"outbox-kill\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [databases.main]\nurl = \"{PG_URL}\"\n\
         [outboxes.kill]\ndatabase = \"main\"\ntable = \"{}\"\ntarget = \"rabbit\"\ndestination = \"\"\nbatch = 200\n",
        table.name
    );
    let file = ConfigFile::new(&text);
    table
        .insert(None, &queue.name, &numbered(20_000, None))
        .await;

    let mut daemon = support::Daemon::start(&file.path, port);
    // Kill -9 once part of the table has gone out and part has not: as soon as the first
    // batch committed (the relay drains 20,000 rows in a second or two, faster than a
    // consumer's count of arrivals would tell).
    let partial = support::wait_for_async(WAIT, || async {
        (table.count("published_at IS NOT NULL").await >= 200).then_some(())
    })
    .await;
    assert!(
        partial.is_some(),
        "the daemon published nothing:\n{}",
        daemon.logs()
    );
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(WAIT).expect("killed");
    let pending = table.count("published_at IS NULL").await;
    assert!(pending > 0, "the kill came too late to test anything");

    let daemon = support::Daemon::start(&file.path, port);
    assert!(
        table.wait_count("published_at IS NULL", 0).await,
        "{}",
        daemon.logs()
    );
    let ids = table.message_ids().await;
    let received = support::wait_for_async(WAIT, || async {
        let got: BTreeSet<String> = queue.received().into_iter().map(|(id, _)| id).collect();
        (got == ids).then_some(got)
    })
    .await;
    assert!(received.is_some(), "some rows never arrived");
    drop(daemon);
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_check_prints_the_missing_ddl_and_passes_once_it_is_applied() {
    let table = existing_table("ob_check", PYTHON_OUTBOX_DDL).await;
    let (file, _config) = config(&["legacy"], &table.name, PYTHON_OUTBOX_MAPPING);
    let path = file.path.to_str().expect("utf-8 path").to_owned();

    let (code, out, err) =
        support::bosun_output(&["outbox", "check", "--config", &path, "legacy"], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("ok      payload column payload (text)"),
        "{out}"
    );
    assert!(out.contains("MISSING index on the pending rows"), "{out}");
    assert!(out.contains("MISSING NOTIFY trigger"), "{out}");
    let marker = "-- DDL for outbox legacy:\n";
    let ddl = &out[out.find(marker).expect("the DDL is printed") + marker.len()..];
    assert!(ddl.contains("CREATE INDEX"), "{ddl}");
    assert!(ddl.contains("CREATE OR REPLACE TRIGGER"), "{ddl}");
    sqlx::raw_sql(ddl)
        .execute(&table.pool)
        .await
        .expect("the printed DDL applies");

    let (code, out, err) =
        support::bosun_output(&["outbox", "check", "--config", &path, "legacy"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("MISSING"), "{out}");
    assert!(
        out.contains(&format!("ok      NOTIFY trigger on channel {}", table.name)),
        "{out}"
    );

    // The trigger it printed does notify the relay's channel.
    let mut listener = sqlx::postgres::PgListener::connect(PG_URL)
        .await
        .expect("listen");
    listener.listen(&table.name).await.expect("listen");
    insert_as_python(&table, "events", "order.created", &["{}".to_owned()]).await;
    let notification = tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("a notification")
        .expect("recv");
    assert_eq!(notification.channel(), table.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_check_passes_a_migrated_table_and_fails_a_missing_one() {
    let table = Table::new("ob_checkown").await;
    let (file, _config) = config(&["own"], &table.name, "target = \"rabbit\"");
    let path = file.path.to_str().expect("utf-8 path").to_owned();
    let (code, out, err) = support::bosun_output(&["outbox", "check", "--config", &path], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok      index on the pending rows"), "{out}");
    assert!(out.contains("ok      index on message_id"), "{out}");

    let missing = unique("ob_checknone").to_lowercase();
    let (file, _config) = config(&["none"], &missing, "target = \"rabbit\"");
    let path = file.path.to_str().expect("utf-8 path").to_owned();
    let (code, out, err) = support::bosun_output(&["outbox", "check", "--config", &path], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("MISSING table {missing}")), "{out}");
    assert!(
        out.contains(&format!("CREATE TABLE IF NOT EXISTS {missing} (")),
        "{out}"
    );
}

/// `bosun run` on a table without a NOTIFY trigger says at start that the relay polls, and
/// relays all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_notify_trigger_the_daemon_says_it_polls() {
    let table = existing_table("ob_polls", PYTHON_OUTBOX_DDL).await;
    let queue = Queue::new("ob_polls").await;
    let port = support::free_port();
    let text = format!(
        "[service]\nname = \"outbox-polls\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [databases.main]\nurl = \"{PG_URL}\"\n\
         [outboxes.polls]\ndatabase = \"main\"\ntable = \"{}\"\npoll_interval = \"200ms\"\n{PYTHON_OUTBOX_MAPPING}\n",
        table.name
    );
    let file = ConfigFile::new(&text);
    let daemon = support::Daemon::start(&file.path, port);
    insert_as_python(&table, "", &queue.name, &["{\"n\": 1}".to_owned()]).await;
    assert!(
        table.wait_count("status = 'published'", 1).await,
        "{}",
        daemon.logs()
    );
    let logged = support::wait_for(WAIT, || {
        let logs = daemon.logs();
        logs.contains("no NOTIFY trigger on the outbox table: the relay polls")
            .then_some(logs)
    });
    assert!(logged.is_some(), "{}", daemon.logs());
    assert_eq!(queue.wait_len(1).await[0].1, "{\"n\": 1}");
    drop(daemon);
    queue.delete().await;
}
