//! The archive table against a real PostgreSQL: replay back-off and migrations.

use crate::testing::support;

use support::pg;
use support::unique;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_scheduled_replay_failures_back_off_then_end_failed() {
    let table = unique("dl_backoff");
    let pool = pg().await;
    bosun::dead_letter::archive::migrate(&pool, &table)
        .await
        .expect("migrate");
    let row = bosun::dead_letter::archive::NewRow {
        details: bosun::dead_letter::archive::Details {
            processor: "dl".into(),
            broker: "rabbit".into(),
            source: "q.dlq".into(),
            source_entry_id: None,
            message_id: Some("m".into()),
            correlation_id: None,
            original: Some("q".into()),
            original_exchange: None,
            routing_key: None,
            content_type: None,
            timestamp_ms: None,
            failure: bosun::dead_letter::archive::Failure {
                error_kind: "permanent".into(),
                error: None,
                reason: None,
                attempts: 1,
                replay_count: 0,
                group_key: "g".into(),
            },
            first_failed_at: None,
        },
        headers: serde_json::json!({}),
        body: Vec::new(),
        status: "scheduled",
        note: None,
        replay_due_at: Some(chrono::Utc::now()),
    };
    let id = bosun::dead_letter::archive::insert(&pool, &table, &row)
        .await
        .expect("insert");
    let state = || async {
        let (status, attempts, wait): (String, i32, f64) = sqlx::query_as(&format!(
            "SELECT status, replay_attempts,
                    extract(epoch FROM replay_due_at - now())::float8 FROM {table} WHERE id = $1"
        ))
        .bind(id)
        .fetch_one(&pool)
        .await
        .expect("row");
        (status, attempts, wait)
    };
    let mut waits = Vec::new();
    for attempt in 1..=10 {
        let mut tx = pool.begin().await.expect("begin");
        bosun::dead_letter::archive::mark_replay_failed(&mut tx, &table, id, "down\0", false)
            .await
            .expect("mark");
        tx.commit().await.expect("commit");
        let (status, attempts, wait) = state().await;
        assert_eq!(attempts, attempt);
        waits.push(wait);
        if attempt < 10 {
            assert_eq!(status, "scheduled", "attempt {attempt}");
        } else {
            assert_eq!(status, "failed", "the last attempt ends it");
        }
    }
    assert!(
        waits[0] > 3.0 && waits[1] > waits[0] && waits[9] <= 3600.5,
        "{waits:?}"
    );
    // A purge's dry run lists the failed row, and the purge removes it.
    use bosun::dead_letter::archive::{self, Selector, status};
    let processors = ["dl".to_owned()];
    let listed = archive::preview(
        &pool,
        &table,
        &processors,
        &Selector::All,
        status::PURGEABLE,
    )
    .await
    .expect("preview");
    assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    let purged = archive::purge(&pool, &table, &processors, &Selector::All)
        .await
        .expect("purge");
    assert_eq!(purged, [id]);
    let _ = sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_migration_upgrades_an_earlier_table_idempotently() {
    let table = unique("dl_old");
    let pool = pg().await;
    // The table as an earlier version created it.
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (
            id bigserial PRIMARY KEY, processor text NOT NULL, broker text NOT NULL,
            source text NOT NULL, source_entry_id text, message_id text, correlation_id text,
            original text, original_exchange text, routing_key text,
            headers jsonb NOT NULL DEFAULT '{{}}'::jsonb, body bytea, content_type text,
            timestamp_ms bigint, error_kind text NOT NULL, error text, reason text,
            attempts integer NOT NULL DEFAULT 1, replay_count integer NOT NULL DEFAULT 0,
            group_key text NOT NULL, first_failed_at timestamptz,
            archived_at timestamptz NOT NULL DEFAULT now(),
            status text NOT NULL DEFAULT 'archived'
                CHECK (status IN ('archived', 'scheduled', 'replayed', 'purged')),
            note text, replay_due_at timestamptz, replayed_at timestamptz, purged_at timestamptz);
         INSERT INTO {table} (processor, broker, source, error_kind, group_key)
            VALUES ('dl', 'rabbit', 'q.dlq', 'permanent', 'g');"
    ))
    .execute(&pool)
    .await
    .expect("old table");
    assert!(
        !bosun::dead_letter::archive::up_to_date(&pool, &table)
            .await
            .expect("query")
    );
    for _ in 0..2 {
        bosun::dead_letter::archive::migrate(&pool, &table)
            .await
            .expect("migrate");
    }
    assert!(
        bosun::dead_letter::archive::up_to_date(&pool, &table)
            .await
            .expect("query")
    );
    sqlx::raw_sql(&format!("UPDATE {table} SET status = 'failed'"))
        .execute(&pool)
        .await
        .expect("a row can end failed");
    let rejected = sqlx::raw_sql(&format!("UPDATE {table} SET status = 'bogus'"))
        .execute(&pool)
        .await;
    assert!(rejected.is_err(), "the status is still checked");
    let _ = sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await;
}
