//! The outbox table's DDL, as `bosun outbox schema` prints it and `bosun outbox migrate`
//! applies it.
//!
//! Every statement is idempotent (`IF NOT EXISTS`, `CREATE OR REPLACE`), so migrating an
//! existing table is a no-op and migrating with another channel only re-points the trigger.
//! A table made by an earlier version gains the `insert_xid` column that `per_key` ordering
//! needs (see [`super::store`]) in the same migration, and every index it lacks (the due-time
//! and message-id indexes came later).
//! Requires PostgreSQL 14 or later (`CREATE OR REPLACE TRIGGER`, `xid8`).

use sqlx::PgPool;

use crate::config::valid_sql_identifier;

use super::OutboxError;

/// The names one outbox table's objects go by. Built only from validated identifiers, since
/// they are formatted into SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// The table, possibly schema-qualified (`app.outbox`).
    table: String,
    /// The LISTEN/NOTIFY channel the insert trigger notifies.
    channel: String,
}

impl Schema {
    /// Checks both names with the same rule as the configuration does.
    pub fn new(table: &str, channel: &str) -> Result<Self, OutboxError> {
        if !valid_sql_identifier(table) {
            return Err(OutboxError::InvalidIdentifier(table.to_owned()));
        }
        if !valid_sql_identifier(channel) || channel.contains('.') {
            return Err(OutboxError::InvalidIdentifier(channel.to_owned()));
        }
        Ok(Self {
            table: table.to_owned(),
            channel: channel.to_owned(),
        })
    }

    /// The channel a table notifies when none is configured: its name, `.` replaced by `_`.
    pub fn default_channel(table: &str) -> String {
        table.replace('.', "_")
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// `app.` for `app.outbox`, empty for an unqualified table: functions are created next
    /// to their table, while index and trigger names are never qualified.
    fn schema_prefix(&self) -> &str {
        match self.table.rfind('.') {
            Some(i) => &self.table[..=i],
            None => "",
        }
    }

    fn base(&self) -> &str {
        match self.table.rfind('.') {
            Some(i) => &self.table[i + 1..],
            None => &self.table,
        }
    }

    /// `<table>_<suffix>`, shortened with a hash when it would pass PostgreSQL's limit, so
    /// two long table names never share an index name.
    fn derived(&self, suffix: &str) -> String {
        derived_name(self.base(), suffix)
    }

    /// The table of batches being sent ([`sending_table`]).
    pub fn sending(&self) -> String {
        sending_table(&self.table)
    }

    /// The DDL, one statement per entry, in the order they must run.
    pub fn statements(&self) -> Vec<String> {
        let table = &self.table;
        let pending_idx = self.derived("pending_idx");
        let old_key_idx = format!("{}{}", self.schema_prefix(), self.derived("key_idx"));
        let key_idx = self.derived("key_order_idx");
        let xid_check = self.derived("insert_xid_check");
        let published_idx = self.derived("published_idx");
        let due_idx = self.derived("due_idx");
        let message_id_idx = self.derived("message_id_idx");
        let sending = self.sending();
        let function = format!("{}{}", self.schema_prefix(), self.derived("notify"));
        let trigger = self.derived("notify");
        let channel = &self.channel;
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    destination     text,
    routing_key     text        NOT NULL DEFAULT '',
    headers         jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    payload         bytea       NOT NULL,
    content_type    text,
    partition_key   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    failed_at       timestamptz,
    insert_xid      xid8        NOT NULL DEFAULT pg_current_xact_id()
)"
            ),
            // A table from before `insert_xid`: rows already there were committed before the
            // column existed (ALTER TABLE waits for every open writer of the table), so they
            // are older than any later row and take the lowest possible value. The column
            // stays nullable for them (no rewrite of published history); the check keeps
            // new rows from leaving it empty. Checked first, so an up-to-date table is not
            // locked.
            format!(
                "DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = '{table}'::regclass AND attname = 'insert_xid'
                     AND NOT attisdropped) THEN
        ALTER TABLE {table} ADD COLUMN insert_xid xid8;
        ALTER TABLE {table} ALTER COLUMN insert_xid SET DEFAULT pg_current_xact_id();
        UPDATE {table} SET insert_xid = '0' WHERE published_at IS NULL;
        ALTER TABLE {table} ADD CONSTRAINT {xid_check}
            CHECK (insert_xid IS NOT NULL) NOT VALID;
    END IF;
END
$$"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {pending_idx} ON {table} (id)
    WHERE published_at IS NULL AND failed_at IS NULL"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {key_idx} ON {table} (partition_key, insert_xid, id)
    WHERE published_at IS NULL AND failed_at IS NULL AND partition_key IS NOT NULL"
            ),
            // Replaced by the index above, which orders a key's rows as the claim does.
            format!("DROP INDEX IF EXISTS {old_key_idx}"),
            format!(
                "CREATE INDEX IF NOT EXISTS {published_idx} ON {table} (published_at)
    WHERE published_at IS NOT NULL"
            ),
            // The relay's wake-up for the earliest row not yet due (scheduled, or in backoff).
            format!(
                "CREATE INDEX IF NOT EXISTS {due_idx} ON {table} (next_attempt_at)
    WHERE published_at IS NULL AND failed_at IS NULL"
            ),
            // Looking up and cancelling a row by its message id (the publish API's
            // `/v1/scheduled/ID`, an operator's query); every row, published ones included.
            format!("CREATE INDEX IF NOT EXISTS {message_id_idx} ON {table} (message_id)"),
            // The batches a relay is sending, or sent without learning the outcome: each
            // recorded (and committed) before its first message goes out, and removed in the
            // batch's own transaction once every row's outcome is known. A row still pending
            // that one of them names may be on the broker: it is not cancelled.
            format!(
                "CREATE TABLE IF NOT EXISTS {sending} (
    batch bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ids   bigint[]    NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
)"
            ),
            format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END;
$$"
            ),
            format!(
                "CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}('{channel}')"
            ),
        ]
    }

    /// The DDL as a script, for `bosun outbox schema`.
    pub fn script(&self) -> String {
        let mut out = format!(
            "-- bosun outbox table {}, notifying channel {}\n",
            self.table, self.channel
        );
        for statement in self.statements() {
            out.push_str(&statement);
            out.push_str(";\n\n");
        }
        out
    }

    /// Applies the DDL in one transaction, serialized with other processes migrating the
    /// same table ([`crate::database::migrate`]).
    pub async fn migrate(&self, pool: &PgPool) -> Result<(), OutboxError> {
        crate::database::migrate(
            pool,
            "bosun.outbox.migrate",
            &self.table,
            &self.statements(),
        )
        .await?;
        Ok(())
    }
}

pub(super) use crate::database::derived_name;

/// The table of batches being sent beside outbox `table` (`<table>_sending`, in the same
/// schema), which the relay writes before sending a batch and a cancel reads: a pending row
/// it names may already be on the broker.
pub fn sending_table(table: &str) -> String {
    match table.rfind('.') {
        Some(i) => format!(
            "{}{}",
            &table[..=i],
            derived_name(&table[i + 1..], "sending")
        ),
        None => derived_name(table, "sending"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_tables_keep_their_schema_only_where_sql_allows_it() {
        let schema = Schema::new("app.outbox", "app_outbox").unwrap();
        let script = schema.script();
        assert!(script.contains("CREATE TABLE IF NOT EXISTS app.outbox ("));
        assert!(
            script.contains("CREATE INDEX IF NOT EXISTS outbox_pending_idx ON app.outbox (id)")
        );
        assert!(script.contains("CREATE OR REPLACE FUNCTION app.outbox_notify()"));
        assert!(
            script.contains("CREATE OR REPLACE TRIGGER outbox_notify AFTER INSERT ON app.outbox")
        );
        assert!(script.contains("EXECUTE FUNCTION app.outbox_notify('app_outbox')"));
    }

    #[test]
    fn tables_from_the_previous_ddl_gain_insert_xid_and_the_new_key_index() {
        let script = Schema::new("app.outbox", "c").unwrap().script();
        assert!(
            script.contains("insert_xid      xid8        NOT NULL DEFAULT pg_current_xact_id()")
        );
        assert!(
            script.contains("WHERE attrelid = 'app.outbox'::regclass AND attname = 'insert_xid'")
        );
        assert!(script.contains("ALTER TABLE app.outbox ADD COLUMN insert_xid xid8;"));
        assert!(script.contains("ADD CONSTRAINT outbox_insert_xid_check"));
        assert!(script.contains(
            "CREATE INDEX IF NOT EXISTS outbox_key_order_idx ON app.outbox (partition_key, insert_xid, id)"
        ));
        assert!(script.contains("DROP INDEX IF EXISTS app.outbox_key_idx;"));
    }

    #[test]
    fn the_message_id_is_indexed_on_every_table() {
        let script = Schema::new("app.outbox", "c").unwrap().script();
        assert!(script.contains(
            "CREATE INDEX IF NOT EXISTS outbox_message_id_idx ON app.outbox (message_id);"
        ));
    }

    #[test]
    fn the_batches_being_sent_are_kept_beside_the_table() {
        let script = Schema::new("app.outbox", "c").unwrap().script();
        assert!(script.contains("CREATE TABLE IF NOT EXISTS app.outbox_sending ("));
        assert_eq!(sending_table("outbox"), "outbox_sending");
    }

    #[test]
    fn long_names_are_shortened_without_colliding() {
        let a = "a".repeat(60);
        let b = format!("{}b", "a".repeat(59));
        let na = derived_name(&a, "pending_idx");
        let nb = derived_name(&b, "pending_idx");
        assert!(na.len() <= 63 && nb.len() <= 63);
        assert_ne!(na, nb);
        assert!(na.ends_with("_pending_idx"));
        assert_eq!(derived_name("outbox", "key_idx"), "outbox_key_idx");
    }

    #[test]
    fn identifiers_from_outside_are_refused() {
        assert!(Schema::new("outbox; drop table x", "c").is_err());
        assert!(Schema::new("outbox", "a.b").is_err());
        assert!(Schema::new("Outbox", "c").is_err());
    }
}
