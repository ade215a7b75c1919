//! The postgres inbox: one row per (consumer, key) in a table of the inbox's database.
//!
//! A claim is one statement: an insert of an in-progress row that, on conflict, takes over a
//! row whose lease has expired; when it neither inserts nor takes over, the same statement
//! reads the row it conflicted with, to tell `done` from a live claim. A claim that
//! conflicts with a row committed after the statement's snapshot sees no row at all; that is
//! answered as busy (the message comes back later and finds the row).
//!
//! The table comes with a function, `bosun_inbox_complete(consumer, key, token)` (named
//! `<table>_complete` for another table), that an application calls in its own transaction:
//! it marks the record done with the claim's token, taking the row's lock until the
//! application commits, and raises when the token no longer holds the claim, so an effect is
//! never committed under a claim that was taken over.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, Row as _, Transaction};
use tokio::sync::OnceCell;

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

/// The postgres [`Store`].
pub struct PostgresStore {
    pool: PgPool,
    schema: Schema,
    lease: Duration,
    migrate: bool,
    /// Set once the DDL was applied by this store (with `migrate`).
    migrated: OnceCell<()>,
    claim_sql: String,
    complete_sql: String,
    release_sql: String,
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
                "WITH claim AS (
    INSERT INTO {t} AS i (consumer, key, status, token, claimed_at, lease_until)
    VALUES ($1, $2, 'claimed', $3, now(), now() + $4 * interval '1 millisecond')
    ON CONFLICT (consumer, key) DO UPDATE
       SET token = EXCLUDED.token, claimed_at = EXCLUDED.claimed_at,
           lease_until = EXCLUDED.lease_until, takeovers = i.takeovers + 1
     WHERE i.status = 'claimed' AND i.lease_until < now()
    RETURNING (i.xmax::text <> '0') AS took_over
)
SELECT CASE WHEN took_over THEN 'taken_over' ELSE 'new' END AS state FROM claim
UNION ALL
SELECT CASE WHEN i.status = 'done' THEN 'done' ELSE 'busy' END FROM {t} i
 WHERE i.consumer = $1 AND i.key = $2 AND NOT EXISTS (SELECT 1 FROM claim)"
            ),
            complete_sql: format!(
                "UPDATE {t} SET status = 'done', done_at = coalesce(done_at, now())
  WHERE consumer = $1 AND key = $2 AND token = $3"
            ),
            release_sql: format!(
                "DELETE FROM {t} WHERE consumer = $1 AND key = $2 AND token = $3 AND status = 'claimed'"
            ),
            pool,
            schema,
            lease,
            migrate,
            migrated: OnceCell::new(),
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
}

#[async_trait]
impl Store for PostgresStore {
    async fn claim(&self, consumer: &str, key: &str, token: &str) -> Result<Claimed, InboxError> {
        self.ready().await?;
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let state: Option<String> = sqlx::query_scalar(&self.claim_sql)
            .bind(consumer)
            .bind(key)
            .bind(token)
            .bind(lease_ms as f64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match state.as_deref() {
            Some("new") => Claimed::New,
            Some("taken_over") => Claimed::TakenOver,
            Some("done") => Claimed::Done,
            _ => Claimed::Busy,
        })
    }

    async fn complete(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError> {
        let done = sqlx::query(&self.complete_sql)
            .bind(consumer)
            .bind(key)
            .bind(token)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(InboxError::NotHeld {
                consumer: consumer.to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(())
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
