//! The postgres inbox: one row per (consumer, key) in a table of the inbox's database.
//!
//! A claim is one statement: an insert of an in-progress row that, on conflict, takes over a
//! row whose lease has expired; when it neither inserts nor takes over, the same statement
//! reads the row it conflicted with, to tell `done` from a live claim. A claim that
//! conflicts with a row committed after the statement's snapshot sees no row at all; that is
//! answered as busy (the message comes back later and finds the row).
//!
//! Claims, and the done marks, that wait at the same time go in one statement (arrays of
//! consumers, keys and tokens): a consumer with many handlers in flight pays one round trip
//! and one commit per batch, not per message. A batch holds each (consumer, key) once (a
//! second copy in the same batch is answered busy, like a live claim elsewhere), in key
//! order, so two batches lock their rows in one order.
//!
//! The table comes with a function, `bosun_inbox_complete(consumer, key, token)` (named
//! `<table>_complete` for another table), that an application calls in its own transaction:
//! it marks the record done with the claim's token, taking the row's lock until the
//! application commits, and raises when the token no longer holds the claim, so an effect is
//! never committed under a claim that was taken over.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, Row as _, Transaction};
use tokio::sync::{OnceCell, Semaphore, mpsc, oneshot};

use super::{Claimed, InboxError, Record, Store};
use crate::config::valid_sql_identifier;
use crate::handler::Message;

/// The names one inbox table's objects go by, built only from a validated identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// The table, possibly schema-qualified (`app.inbox`).
    table: String,
}

impl Schema {
    pub fn new(table: &str) -> Result<Self, InboxError> {
        if !valid_sql_identifier(table) {
            return Err(InboxError::InvalidIdentifier(table.to_owned()));
        }
        Ok(Self {
            table: table.to_owned(),
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn split(&self) -> (&str, &str) {
        match self.table.rfind('.') {
            Some(i) => (&self.table[..=i], &self.table[i + 1..]),
            None => ("", &self.table),
        }
    }

    fn derived(&self, suffix: &str) -> String {
        crate::database::derived_name(self.split().1, suffix)
    }

    /// The completing function, next to its table: `bosun_inbox_complete` for the default
    /// table `bosun_inbox`, `<table>_complete` for another.
    pub fn function(&self) -> String {
        format!("{}{}", self.split().0, self.derived("complete"))
    }

    /// The DDL, one statement per entry, each idempotent.
    pub fn statements(&self) -> Vec<String> {
        let table = &self.table;
        let done_idx = self.derived("done_idx");
        let function = self.function();
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (
    consumer    text        NOT NULL,
    key         text        NOT NULL,
    status      text        NOT NULL CHECK (status IN ('claimed', 'done')),
    token       text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz NOT NULL,
    done_at     timestamptz,
    takeovers   integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, key)
)"
            ),
            format!("CREATE INDEX IF NOT EXISTS {done_idx} ON {table} (done_at) WHERE status = 'done'"),
            format!(
                "CREATE OR REPLACE FUNCTION {function}(p_consumer text, p_key text, p_token text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {table} SET status = 'done', done_at = coalesce(done_at, now())
     WHERE consumer = p_consumer AND key = p_key AND token = p_token;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'bosun inbox: %/% is not claimed by this token (taken over after its lease, or released)',
            p_consumer, p_key;
    END IF;
END;
$$"
            ),
        ]
    }

    /// The DDL as a script, for `bosun inbox schema`.
    pub fn script(&self) -> String {
        let mut out = format!(
            "-- bosun inbox table {}; call {}(consumer, key, token) in your own transaction\n",
            self.table,
            self.function()
        );
        for statement in self.statements() {
            out.push_str(&statement);
            out.push_str(";\n\n");
        }
        out
    }

    /// Applies the DDL in one transaction, serialized with other processes migrating the
    /// same table ([`crate::database::migrate`]).
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), InboxError> {
        crate::database::migrate(pool, "bosun.inbox.migrate", &self.table, &self.statements())
            .await?;
        Ok(())
    }

    /// Begins a transaction on the inbox's database that marks the message's inbox record
    /// done when it commits: a Rust handler writes its effect in it, and the effect and the
    /// record commit together (or neither does). Errors when the message has no inbox claim
    /// or the claim is no longer held (taken over after its lease).
    pub async fn begin_completing(
        &self,
        pool: &PgPool,
        message: &Message,
    ) -> Result<Transaction<'static, Postgres>, InboxError> {
        let Some(claim) = &message.inbox else {
            return Err(InboxError::NotHeld {
                consumer: message.source.consumer.clone(),
                key: String::new(),
            });
        };
        let mut tx = pool.begin().await?;
        let done = sqlx::query(&format!(
            "UPDATE {} SET status = 'done', done_at = coalesce(done_at, now())
              WHERE consumer = $1 AND key = $2 AND token = $3",
            self.table
        ))
        .bind(&claim.consumer)
        .bind(&claim.key)
        .bind(&claim.token)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(InboxError::NotHeld {
                consumer: claim.consumer.clone(),
                key: claim.key.clone(),
            });
        }
        Ok(tx)
    }
}

/// Most claims (or done marks) in one statement.
const MAX_BATCH: usize = 500;
/// Statements of one kind (claims, done marks) in flight at once, per store: while they run,
/// the next batch fills.
const BATCHES_IN_FLIGHT: usize = 3;

/// One claim or done mark waiting for its batch.
struct Pending<R> {
    consumer: String,
    key: String,
    token: String,
    reply: oneshot::Sender<Result<R, InboxError>>,
}

type Queue<R> = mpsc::UnboundedSender<Pending<R>>;

/// The postgres [`Store`].
pub struct PostgresStore {
    pool: PgPool,
    schema: Schema,
    lease: Duration,
    migrate: bool,
    /// Set once the DDL was applied by this store (with `migrate`).
    migrated: OnceCell<()>,
    claim_sql: Arc<str>,
    complete_sql: Arc<str>,
    release_sql: String,
    /// The batching tasks' queues, started on first use (inside the runtime); a task ends
    /// when the store, and with it the queue's sender, is dropped.
    claims: OnceCell<Queue<Claimed>>,
    completions: OnceCell<Queue<()>>,
}

impl PostgresStore {
    pub fn new(
        pool: PgPool,
        table: &str,
        lease: Duration,
        migrate: bool,
    ) -> Result<Self, InboxError> {
        let schema = Schema::new(table)?;
        let t = schema.table();
        Ok(Self {
            claim_sql: format!(
                "WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(consumer, key, token, n)
), claim AS (
    INSERT INTO {t} AS i (consumer, key, status, token, claimed_at, lease_until)
    SELECT consumer, key, 'claimed', token, now(), now() + $4 * interval '1 millisecond'
      FROM input ORDER BY n
    ON CONFLICT (consumer, key) DO UPDATE
       SET token = EXCLUDED.token, claimed_at = EXCLUDED.claimed_at,
           lease_until = EXCLUDED.lease_until, takeovers = i.takeovers + 1
     WHERE i.status = 'claimed' AND i.lease_until < now()
    RETURNING i.consumer, i.key, (i.xmax::text <> '0') AS took_over
)
SELECT input.n,
       CASE WHEN c.key IS NOT NULL THEN CASE WHEN c.took_over THEN 'taken_over' ELSE 'new' END
            WHEN i.status = 'done' THEN 'done'
            ELSE 'busy' END AS state
  FROM input
  LEFT JOIN claim c ON c.consumer = input.consumer AND c.key = input.key
  LEFT JOIN {t} i ON c.key IS NULL AND i.consumer = input.consumer AND i.key = input.key"
            )
            .into(),
            complete_sql: format!(
                "UPDATE {t} i SET status = 'done', done_at = coalesce(i.done_at, now())
   FROM unnest($1::text[], $2::text[], $3::text[]) AS input(consumer, key, token)
  WHERE i.consumer = input.consumer AND i.key = input.key AND i.token = input.token
RETURNING i.consumer, i.key"
            )
            .into(),
            release_sql: format!(
                "DELETE FROM {t} WHERE consumer = $1 AND key = $2 AND token = $3 AND status = 'claimed'"
            ),
            pool,
            schema,
            lease,
            migrate,
            migrated: OnceCell::new(),
            claims: OnceCell::new(),
            completions: OnceCell::new(),
        })
    }

    /// Applies the DDL once, before the first claim, when the inbox migrates.
    async fn ready(&self) -> Result<(), InboxError> {
        if self.migrate {
            self.migrated
                .get_or_try_init(|| self.schema.migrate(&self.pool))
                .await?;
        }
        Ok(())
    }

    /// Queues one claim or done mark on `queue` (starting its task with `run` on first use)
    /// and waits for its batch's answer.
    async fn batched<R, F, Fut>(
        &self,
        queue: &OnceCell<Queue<R>>,
        sql: &Arc<str>,
        run: F,
        consumer: &str,
        key: &str,
        token: &str,
    ) -> Result<R, InboxError>
    where
        R: Send + 'static,
        F: Fn(PgPool, Arc<str>, Vec<Pending<R>>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let sender = queue
            .get_or_init(|| async {
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(batches(self.pool.clone(), sql.clone(), receiver, run));
                sender
            })
            .await;
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            consumer: consumer.to_owned(),
            key: key.to_owned(),
            token: token.to_owned(),
            reply,
        };
        if sender.send(pending).is_err() {
            return Err(InboxError::Batch(Arc::new(sqlx::Error::PoolClosed)));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(InboxError::Batch(Arc::new(sqlx::Error::PoolClosed))))
    }
}

/// Takes what waits on `receiver` in batches of up to [`MAX_BATCH`], [`BATCHES_IN_FLIGHT`]
/// statements at a time: while they run, the next batch fills.
async fn batches<R, F, Fut>(
    pool: PgPool,
    sql: Arc<str>,
    mut receiver: mpsc::UnboundedReceiver<Pending<R>>,
    run: F,
) where
    R: Send + 'static,
    F: Fn(PgPool, Arc<str>, Vec<Pending<R>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = receiver.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        let work = run(pool.clone(), sql.clone(), batch);
        tokio::spawn(async move {
            work.await;
            drop(slot);
        });
    }
}

/// The batch's columns, in key order, each (consumer, key) once; the copies are returned
/// apart.
/// A batch split into its unique claims, the copies, and the unique claims' columns.
type Split<R> = (Vec<Pending<R>>, Vec<Pending<R>>, [Vec<String>; 3]);

fn columns<R>(mut batch: Vec<Pending<R>>) -> Split<R> {
    batch.sort_by(|a, b| (&a.consumer, &a.key).cmp(&(&b.consumer, &b.key)));
    let mut seen = HashSet::new();
    let (unique, copies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .partition(|p| seen.insert((p.consumer.clone(), p.key.clone())));
    let columns = [
        unique.iter().map(|p| p.consumer.clone()).collect(),
        unique.iter().map(|p| p.key.clone()).collect(),
        unique.iter().map(|p| p.token.clone()).collect(),
    ];
    (unique, copies, columns)
}

/// Runs one batch of claims and answers each.
async fn claim_batch(pool: PgPool, sql: Arc<str>, lease_ms: f64, batch: Vec<Pending<Claimed>>) {
    let (unique, copies, [consumers, keys, tokens]) = columns(batch);
    // A second copy of a key in the batch waits, like one whose key is claimed elsewhere.
    for copy in copies {
        let _ = copy.reply.send(Ok(Claimed::Busy));
    }
    let rows = sqlx::query(&sql)
        .bind(consumers)
        .bind(keys)
        .bind(tokens)
        .bind(lease_ms)
        .fetch_all(&pool)
        .await;
    let states: Result<HashMap<i64, Claimed>, sqlx::Error> = rows.and_then(|rows| {
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                Ok((
                    row.try_get::<i64, _>("n")?,
                    match state.as_str() {
                        "new" => Claimed::New,
                        "taken_over" => Claimed::TakenOver,
                        "done" => Claimed::Done,
                        _ => Claimed::Busy,
                    },
                ))
            })
            .collect()
    });
    match states {
        Ok(states) => {
            for (n, pending) in (1i64..).zip(unique) {
                let _ = pending
                    .reply
                    .send(Ok(states.get(&n).copied().unwrap_or(Claimed::Busy)));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for pending in unique {
                let _ = pending.reply.send(Err(InboxError::Batch(e.clone())));
            }
        }
    }
}

/// Runs one batch of done marks and answers each: done, or not held by its token.
async fn complete_batch(pool: PgPool, sql: Arc<str>, batch: Vec<Pending<()>>) {
    let (unique, copies, [consumers, keys, tokens]) = columns(batch);
    let rows = sqlx::query(&sql)
        .bind(consumers)
        .bind(keys)
        .bind(tokens)
        .fetch_all(&pool)
        .await;
    let done: Result<HashSet<(String, String)>, sqlx::Error> = rows.and_then(|rows| {
        rows.iter()
            .map(|row| Ok((row.try_get("consumer")?, row.try_get("key")?)))
            .collect()
    });
    let not_held = |p: &Pending<()>| InboxError::NotHeld {
        consumer: p.consumer.clone(),
        key: p.key.clone(),
    };
    match done {
        Ok(done) => {
            for pending in unique {
                let answer = if done.contains(&(pending.consumer.clone(), pending.key.clone())) {
                    Ok(())
                } else {
                    Err(not_held(&pending))
                };
                let _ = pending.reply.send(answer);
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for pending in unique {
                let _ = pending.reply.send(Err(InboxError::Batch(e.clone())));
            }
        }
    }
    // A key's claim has one token: a second mark of the same key in a batch is not held.
    for copy in copies {
        let answer = Err(not_held(&copy));
        let _ = copy.reply.send(answer);
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, consumer: &str, key: &str, token: &str) -> Result<Claimed, InboxError> {
        self.ready().await?;
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX) as f64;
        self.batched(
            &self.claims,
            &self.claim_sql,
            move |pool, sql, batch| claim_batch(pool, sql, lease_ms, batch),
            consumer,
            key,
            token,
        )
        .await
    }

    async fn complete(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError> {
        self.batched(
            &self.completions,
            &self.complete_sql,
            complete_batch,
            consumer,
            key,
            token,
        )
        .await
    }

    async fn release(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError> {
        sqlx::query(&self.release_sql)
            .bind(consumer)
            .bind(key)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn show(&self, consumer: &str, key: &str) -> Result<Option<Record>, InboxError> {
        let row = sqlx::query(&format!(
            "SELECT status, token, claimed_at::text AS claimed_at, done_at::text AS done_at,
                    takeovers::bigint AS takeovers
               FROM {} WHERE consumer = $1 AND key = $2",
            self.schema.table()
        ))
        .bind(consumer)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => Some(Record {
                status: row.try_get("status")?,
                token: row.try_get("token")?,
                claimed_at: row.try_get("claimed_at")?,
                done_at: row.try_get("done_at")?,
                takeovers: row.try_get("takeovers")?,
            }),
            None => None,
        })
    }

    async fn forget(&self, consumer: &str, key: &str) -> Result<bool, InboxError> {
        let gone = sqlx::query(&format!(
            "DELETE FROM {} WHERE consumer = $1 AND key = $2",
            self.schema.table()
        ))
        .bind(consumer)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(gone.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_table_has_the_documented_function_name() {
        let schema = Schema::new("bosun_inbox").unwrap();
        assert_eq!(schema.function(), "bosun_inbox_complete");
        assert!(
            schema
                .script()
                .contains("CREATE OR REPLACE FUNCTION bosun_inbox_complete(p_consumer text")
        );
        let qualified = Schema::new("app.inbox").unwrap();
        assert_eq!(qualified.function(), "app.inbox_complete");
        assert!(
            qualified
                .script()
                .contains("CREATE INDEX IF NOT EXISTS inbox_done_idx ON app.inbox")
        );
    }

    #[test]
    fn identifiers_from_outside_are_refused() {
        assert!(Schema::new("inbox; drop table x").is_err());
        assert!(Schema::new("Inbox").is_err());
    }
}
