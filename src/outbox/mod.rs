//! Transactional outbox relays: rows an application committed to a PostgreSQL table, moved
//! onto a broker with at-least-once delivery.
//!
//! - [`schema`]: the table, its indexes and the NOTIFY trigger (`bosun outbox schema|migrate`);
//! - [`store`]: the SQL that claims, settles, measures and cleans up rows;
//! - [`headers`]: a row's `headers` text, parsed within bounds;
//! - [`relay`]: the claim → publish → mark → commit loop;
//! - [`listener`]: LISTEN for the insert trigger, so new rows go out without waiting for a poll;
//! - [`cleanup`]: backlog gauges and retention of published rows;
//! - [`table`]: an application's existing table, inspected (`bosun outbox check`).
//!
//! - [`enqueue`]: an application's insert of one row (immediate or scheduled) in its own
//!   transaction: the public Rust helper.
//!
//! Each `[outboxes.NAME]` runs as one component, `outbox:NAME`, holding one connection of its
//! own for batches plus one pooled connection for LISTEN.

pub(crate) mod cleanup;
mod enqueue;
pub(crate) mod headers;
pub(crate) mod listener;
pub(crate) mod publishers;
pub(crate) mod relay;
pub(crate) mod schema;
pub(crate) mod store;
pub(crate) mod table;

#[cfg(test)]
mod live_tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::config::OutboxConfig;
use crate::publish::Publisher;
use crate::resources::Resources;
use crate::retry::ExponentialBackoff;
use crate::supervisor::{Component, ComponentContext};

pub use enqueue::{DEFAULT_TABLE, Enqueued, Message, enqueue};
pub(crate) use publishers::publisher_source;
pub(crate) use relay::Relay;
pub use schema::Schema;

/// What goes wrong in a relay; every variant is retried with backoff by the relay loop.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("`{0}` is not a plain lowercase SQL identifier")]
    InvalidIdentifier(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database did not finish the batch within {0:?}; reconnecting")]
    DatabaseTimeout(Duration),
    #[error(
        "publishing the batch took longer than publish_timeout ({0:?}); rolled back, the rows will be claimed again"
    )]
    PublishTimeout(Duration),
    #[error("broker: {0}")]
    Broker(String),
}

impl OutboxError {
    /// Whether the relay's database connection must be replaced.
    fn resets_database(&self) -> bool {
        matches!(
            self,
            OutboxError::Database(_) | OutboxError::DatabaseTimeout(_)
        )
    }

    /// Whether the publisher must be replaced: its connection is gone or in an unknown state.
    fn resets_broker(&self) -> bool {
        matches!(
            self,
            OutboxError::Broker(_)
                | OutboxError::PublishTimeout(_)
                | OutboxError::DatabaseTimeout(_)
        )
    }
}

/// Makes publishers for a relay: called at start and again after the broker connection was
/// lost, so a relay never keeps using a publisher in an unknown state.
#[async_trait]
pub(crate) trait PublisherSource: Send + Sync {
    async fn connect(&self) -> anyhow::Result<Arc<dyn Publisher>>;
}

/// The `application_name` of a relay's batch connection.
pub(crate) fn application_name(name: &str) -> String {
    format!("bosun outbox:{name}")
}

/// Waits between reconnects of a relay or its listener: 200 ms doubling to 30 s.
pub(crate) const RECONNECT: ExponentialBackoff =
    ExponentialBackoff::new(Duration::from_millis(200), Duration::from_secs(30));

/// Builds the component for `[outboxes.NAME]` from the shared resources.
pub(crate) fn component(name: &str, resources: &Resources) -> anyhow::Result<OutboxComponent> {
    let outbox = resources
        .config
        .outboxes
        .get(name)
        .ok_or_else(|| anyhow::anyhow!("outbox `{name}` is not defined"))?
        .clone();
    let pool = resources.database(&outbox.database)?;
    let publishers = publisher_source(name, &resources.config, &outbox)?;
    Ok(OutboxComponent::new(name, outbox, pool, publishers)?)
}

fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "bosun_outbox_published_total",
        "Outbox rows published and confirmed by the broker."
    );
    describe_counter!(
        "bosun_outbox_retried_total",
        "Failed outbox publish attempts that will be retried after a backoff."
    );
    describe_counter!(
        "bosun_outbox_failed_total",
        "Outbox rows marked failed: attempts ran out, or the row is invalid."
    );
    describe_gauge!(
        "bosun_outbox_pending",
        "Outbox rows neither published nor failed."
    );
    describe_gauge!(
        "bosun_outbox_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest pending outbox row."
    );
    describe_histogram!(
        "bosun_outbox_batch_duration_seconds",
        Unit::Seconds,
        "Claim to commit of one non-empty outbox batch."
    );
}

/// One `[outboxes.NAME]` as a supervised component: the relay loop, its listener and its
/// housekeeping.
pub(crate) struct OutboxComponent {
    relay: Arc<Relay>,
    /// Shared pool for LISTEN, backlog gauges and cleanup.
    pool: PgPool,
}

impl OutboxComponent {
    pub fn new(
        name: &str,
        config: OutboxConfig,
        pool: PgPool,
        publishers: Arc<dyn PublisherSource>,
    ) -> Result<Self, OutboxError> {
        // The configuration checked these already; checking again keeps this module safe
        // for embedders that build an OutboxConfig by hand.
        Schema::new(&config.table, &config.notify_channel)?;
        if let Some(layout) = &config.existing {
            for (_, column) in layout.columns() {
                if !crate::config::valid_sql_identifier(column) || column.contains('.') {
                    return Err(OutboxError::InvalidIdentifier(column.to_owned()));
                }
            }
            for value in [&layout.pending, &layout.published, &layout.failed] {
                if value.chars().any(|ch| ch.is_control() || ch == '\\') {
                    return Err(OutboxError::InvalidIdentifier(value.clone()));
                }
            }
        }
        describe_metrics();
        let connect = (*pool.connect_options())
            .clone()
            .application_name(&application_name(name));
        let queries = match &config.existing {
            Some(layout) => {
                store::Queries::existing(&config.table, layout, config.retain_published.is_zero())
            }
            None => store::Queries::new(
                &config.table,
                config.ordering,
                config.retain_published.is_zero(),
            ),
        };
        Ok(Self {
            relay: Arc::new(Relay {
                name: name.to_owned(),
                config,
                queries,
                connect,
                publishers,
            }),
            pool,
        })
    }
}

#[async_trait]
impl Component for OutboxComponent {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()> {
        let relay = &self.relay;
        if relay.config.migrate {
            let schema = Schema::new(&relay.config.table, &relay.config.notify_channel)?;
            if let Err(e) = schema.migrate(&self.pool).await {
                ctx.health
                    .set_not_ready(format!("cannot migrate the outbox table: {e}"));
                anyhow::bail!("cannot migrate outbox table `{}`: {e}", relay.config.table);
            }
        }
        let wake = Arc::new(Notify::new());
        let helpers = ctx.shutdown.child_token();
        // Stops the helpers also when this task is aborted (a drain that timed out), so
        // they never outlive their relay.
        let _stop_helpers = helpers.clone().drop_guard();
        let listen = tokio::spawn(listener::run(
            relay.name.clone(),
            self.pool.clone(),
            relay.config.notify_channel.clone(),
            wake.clone(),
            helpers.clone(),
        ));
        // Only logs; never delays the relay.
        let inspection = tokio::spawn(table::warn_at_start(
            relay.name.clone(),
            self.pool.clone(),
            relay.config.clone(),
        ));
        let housekeeping = tokio::spawn(cleanup::run(
            relay.name.clone(),
            self.pool.clone(),
            relay.queries.clone(),
            relay.config.retain_published,
            helpers.clone(),
        ));
        tracing::info!(outbox = %relay.name, table = %relay.config.table, channel = %relay.config.notify_channel,
            batch = relay.config.batch, ordering = %relay.config.ordering, "outbox relay started");
        relay.run(&ctx, &wake).await;
        helpers.cancel();
        let _ = listen.await;
        let _ = housekeeping.await;
        inspection.abort();
        tracing::info!(outbox = %relay.name, "outbox relay stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_doubles_and_caps() {
        assert_eq!(RECONNECT.base(1), Duration::from_millis(200));
        assert_eq!(RECONNECT.base(2), Duration::from_millis(400));
        assert_eq!(RECONNECT.base(40), Duration::from_secs(30));
    }
}
