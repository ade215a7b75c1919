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
