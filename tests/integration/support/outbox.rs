//! Outbox helpers: a migrated table dropped at the end, a queue consumed into memory, and a
//! config of outboxes on a table.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bosun::config::Config;
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::{ConfigFile, PG_URL, RABBIT_URL, REDIS_URL, pg, unique};

pub const WAIT: Duration = Duration::from_secs(60);

/// A migrated outbox table, dropped (with its trigger function) when the test ends.
pub struct Table {
    pub name: String,
    pub pool: PgPool,
}

impl Table {
    pub async fn new(prefix: &str) -> Self {
        let name = unique(prefix).to_lowercase();
        let pool = pg().await;
        bosun::OutboxSchema::new(&name, &name)
            .expect("valid names")
            .migrate(&pool)
            .await
            .expect("migrate");
        Self { name, pool }
    }

    /// Inserts one row per payload, in one transaction, destination NULL unless given.
    pub async fn insert(
        &self,
        destination: Option<&str>,
        routing_key: &str,
        rows: &[(Option<&str>, String)],
    ) {
        let keys: Vec<Option<&str>> = rows.iter().map(|(k, _)| *k).collect();
        let payloads: Vec<Vec<u8>> = rows.iter().map(|(_, p)| p.clone().into_bytes()).collect();
        sqlx::query(&format!(
            "INSERT INTO {} (destination, routing_key, partition_key, payload, headers, content_type)
             SELECT $1, $2, k, p, '{{\"source\": \"test\", \"n\": 7}}'::jsonb, 'text/plain'
             FROM unnest($3::text[], $4::bytea[]) WITH ORDINALITY AS r(k, p, i) ORDER BY i",
            self.name
        ))
        .bind(destination)
        .bind(routing_key)
        .bind(&keys)
        .bind(&payloads)
        .execute(&self.pool)
        .await
        .expect("insert outbox rows");
    }

    /// The `last_error` of the one failed row.
    pub async fn failed_error(&self) -> String {
        sqlx::query_scalar(&format!(
            "SELECT last_error FROM {} WHERE failed_at IS NOT NULL",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .expect("last_error")
    }

    pub async fn count(&self, condition: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE {condition}",
            self.name
        ))
        .fetch_one(&self.pool)
        .await
        .expect("count rows")
    }

    pub async fn wait_count(&self, condition: &str, expected: i64) -> bool {
        super::wait_for_async(WAIT, || async {
            (self.count(condition).await == expected).then_some(())
        })
        .await
        .is_some()
    }

    pub async fn message_ids(&self) -> BTreeSet<String> {
        let ids: Vec<uuid::Uuid> =
            sqlx::query_scalar(&format!("SELECT message_id FROM {}", self.name))
                .fetch_all(&self.pool)
                .await
                .expect("message ids");
        ids.into_iter().map(|u| u.to_string()).collect()
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on async work: use a
        // thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(pool) = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(PG_URL)
                    .await
                {
                    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {name} CASCADE"))
                        .execute(&pool)
                        .await;
                    let _ = sqlx::query(&format!("DROP FUNCTION IF EXISTS {name}_notify()"))
                        .execute(&pool)
                        .await;
                    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {name}_sending"))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A config with one or more outboxes on `table`, each `[outboxes.NAME]` getting `extra`.
pub fn config(names: &[&str], table: &str, extra: &str) -> (ConfigFile, Config) {
    config_with_db(names, table, extra, PG_URL)
}

pub fn config_with_db(names: &[&str], table: &str, extra: &str, db: &str) -> (ConfigFile, Config) {
    config_full(names, table, extra, db, "")
}

/// A config whose `[brokers.rabbit]` also has `rabbit_extra`.
pub fn config_full(
    names: &[&str],
    table: &str,
    extra: &str,
    db: &str,
    rabbit_extra: &str,
) -> (ConfigFile, Config) {
    let mut text = format!(
        "[service]\nname = \"outbox-test\"\nshutdown_timeout = \"10s\"\n\
         [http]\nlisten = \"127.0.0.1:{}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n{rabbit_extra}\n\
         [brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n\
         [databases.main]\nurl = \"{db}\"\nconnect_timeout = \"2s\"\n",
        super::free_port()
    );
    for name in names {
        text.push_str(&format!(
            "[outboxes.{name}]\ndatabase = \"main\"\ntable = \"{table}\"\n{extra}\n"
        ));
    }
    let file = ConfigFile::new(&text);
    let config = bosun::Runtime::builder()
        .build()
        .load(&file.path)
        .unwrap_or_else(|e| panic!("config:\n{e}\n{text}"));
    (file, config)
}

/// A queue on the default exchange, consumed into memory as (message_id, body).
pub struct Queue {
    pub name: String,
    pub channel: lapin::Channel,
    _connection: lapin::Connection,
    pub received: Arc<Mutex<Vec<(String, String)>>>,
}

impl Queue {
    pub async fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        let connection =
            lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
                .await
                .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        let mut consumer = channel
            .basic_consume(
                name.as_str().into(),
                "outbox-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let body = String::from_utf8_lossy(&delivery.data).into_owned();
                sink.lock().expect("lock").push((id, body));
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Self {
            name,
            channel,
            _connection: connection,
            received,
        }
    }

    pub fn received(&self) -> Vec<(String, String)> {
        self.received.lock().expect("lock").clone()
    }

    pub async fn wait_len(&self, n: usize) -> Vec<(String, String)> {
        let got = super::wait_for_async(WAIT, || async {
            let r = self.received();
            (r.len() >= n).then_some(r)
        })
        .await;
        got.unwrap_or_else(|| {
            panic!(
                "expected {n} messages on {}, got {}",
                self.name,
                self.received().len()
            )
        })
    }

    pub async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

pub fn numbered(n: usize, key: Option<&'static str>) -> Vec<(Option<&'static str>, String)> {
    (0..n).map(|i| (key, format!("row {i}"))).collect()
}

/// The outbox table of the Python design (`OutboxPublisher` writes it, `OutboxProcessor`
/// reads it): a status column instead of bosun's timestamps, the exchange in its own
/// column, the payload as `json.dumps` text.
pub const PYTHON_OUTBOX_DDL: &str = "CREATE TABLE {table} (
    id SERIAL PRIMARY KEY,
    exchange VARCHAR(255) NOT NULL,
    routing_key VARCHAR(255) NOT NULL,
    payload TEXT NOT NULL,
    status VARCHAR(20) NOT NULL DEFAULT 'pending',
    error TEXT,
    created_at TIMESTAMP NOT NULL DEFAULT NOW()
)";

/// The mapping of the Python design's table, as docs/configuration/outboxes.md shows it.
pub const PYTHON_OUTBOX_MAPPING: &str = "target = \"rabbit\"
columns = { id = \"id\", destination = \"exchange\", routing_key = \"routing_key\", payload = \"payload\", created_at = \"created_at\", last_error = \"error\" }
state = { column = \"status\", pending = \"pending\", published = \"published\", failed = \"failed\" }";

/// Creates `ddl` (with `{table}` replaced) under a unique name, dropped when the test ends.
pub async fn existing_table(prefix: &str, ddl: &str) -> Table {
    let name = unique(prefix).to_lowercase();
    let pool = pg().await;
    sqlx::query(&ddl.replace("{table}", &name))
        .execute(&pool)
        .await
        .expect("create the existing outbox table");
    Table { name, pool }
}

/// Rows written as the Python `OutboxPublisher.publish_with_outbox` does: a business
/// statement and the outbox insert in one transaction, payload as `json.dumps` text.
pub async fn insert_as_python(
    table: &Table,
    exchange: &str,
    routing_key: &str,
    payloads: &[String],
) {
    let mut tx = table.pool.begin().await.expect("begin");
    sqlx::query("SELECT 1")
        .execute(&mut *tx)
        .await
        .expect("business operation");
    for payload in payloads {
        sqlx::query(&format!(
            "INSERT INTO {} (exchange, routing_key, payload, status)
             VALUES ($1, $2, $3, 'pending')",
            table.name
        ))
        .bind(exchange)
        .bind(routing_key)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .expect("insert as OutboxPublisher");
    }
    tx.commit().await.expect("commit");
}
