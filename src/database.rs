//! PostgreSQL pools, one per `[databases.NAME]`, shared by the components that name it.

use std::collections::BTreeMap;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::DatabaseConfig;

/// A pool that connects lazily: an unreachable database at start does not stop the daemon;
/// the components using it report not ready and retry.
pub fn lazy_pool(config: &DatabaseConfig) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = config
        .url
        .expose()
        .parse()
        // sqlx's parse error does not echo the URL, so no password leaks here.
        .map_err(|e| anyhow::anyhow!("invalid database URL {}: {e}", config.url))?;
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect_lazy_with(options.application_name("bosun")))
}

/// Pools for every configured database.
pub fn pools(
    databases: &BTreeMap<String, DatabaseConfig>,
) -> anyhow::Result<BTreeMap<String, PgPool>> {
    databases
        .iter()
        .map(|(name, config)| {
            Ok((
                name.clone(),
                lazy_pool(config).map_err(|e| e.context(format!("database `{name}`")))?,
            ))
        })
        .collect()
}

/// Longest identifier PostgreSQL keeps; longer ones are silently truncated.
const MAX_IDENTIFIER: usize = 63;

/// `<base>_<suffix>`, shortened with a hash when it would pass PostgreSQL's limit, so two
/// long table names never share an index or function name.
pub fn derived_name(base: &str, suffix: &str) -> String {
    use sha2::Digest as _;
    let name = format!("{base}_{suffix}");
    if name.len() <= MAX_IDENTIFIER {
        return name;
    }
    let digest = sha2::Sha256::digest(base.as_bytes());
    let hash = hex::encode(&digest[..4]);
    // Identifiers are ASCII (validated), so byte slicing stays on char boundaries.
    let keep = MAX_IDENTIFIER - suffix.len() - hash.len() - 2;
    format!("{}_{hash}_{suffix}", &base[..keep.min(base.len())])
}

/// Applies `statements` in one transaction. Concurrent migrations of the same `table` (several
/// processes starting together) wait for each other on an advisory lock in `namespace`, since
/// concurrent `CREATE OR REPLACE FUNCTION` on one function fails with "tuple concurrently
/// updated".
pub async fn migrate(
    pool: &PgPool,
    namespace: &str,
    table: &str,
    statements: &[String],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
        .bind(namespace)
        .bind(table)
        .execute(&mut *tx)
        .await?;
    for statement in statements {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Takes the transaction-level advisory lock `(namespace, key)` if it is free: true when this
/// process may do the singleton work the lock stands for until `tx` ends, false when another
/// replica is doing it (this round is theirs). Background work that every replica runs but
/// only one should do at a time (retention, sweeping, scheduled replays) takes it first.
pub async fn try_singleton(
    tx: &mut sqlx::PgConnection,
    namespace: &str,
    key: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1), hashtext($2))")
        .bind(namespace)
        .bind(key)
        .fetch_one(tx)
        .await
}
