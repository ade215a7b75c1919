//! The runtime: turns a validated [`Config`] into running components under a
//! [`Supervisor`], with the HTTP listener beside them.
//!
//! This is also the library entry point: a Rust program builds a [`Runtime`] with its own
//! handler kinds and components and runs it like the `bosun` binary does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use futures::Stream;

use crate::access::Access;
use crate::components::components_for;
use crate::config::{self, Config, ConfigError};
use crate::dead_letter::admin::AdminOps;
use crate::handler::{FnKind, Handler, HandlerKind, HandlerKinds, OptionError};
use crate::health::Health;
use crate::publish_api::PublishApi;
use crate::resources::Resources;
use crate::roles::Permission;
use crate::supervisor::{
    Component, ExitStatus, Lifecycle, NamedComponent, NoLifecycle, SignalKind, Supervisor,
    SupervisorConfig,
};

/// Builds a [`Runtime`].
#[derive(Default)]
pub struct RuntimeBuilder {
    kinds: HandlerKinds,
    extra: Vec<NamedComponent>,
    supervisor: Option<SupervisorConfig>,
}

impl RuntimeBuilder {
    /// Registers a handler kind, usable as `kind = "<name>"` in `[handlers.*]`.
    pub fn handler_kind(mut self, name: &str, kind: impl HandlerKind) -> Self {
        self.kinds.register(name, kind);
        self
    }

    /// Registers a handler kind from a closure that builds the handler from its options.
    pub fn handler_fn<F>(self, name: &str, build: F) -> Self
    where
        F: Fn(&str, &toml::Table) -> Result<Arc<dyn Handler>, OptionError> + Send + Sync + 'static,
    {
        self.handler_kind(name, FnKind(build))
    }

    /// Adds a component of the program's own, supervised like the configured ones.
    pub fn component(mut self, name: &str, component: impl Component) -> Self {
        self.extra.push((name.to_owned(), Arc::new(component)));
        self
    }

    /// Overrides supervisor tunables (restart backoff); the shutdown timeout still comes
    /// from `[service].shutdown_timeout`.
    pub fn supervisor(mut self, config: SupervisorConfig) -> Self {
        self.supervisor = Some(config);
        self
    }

    pub fn build(self) -> Runtime {
        Runtime {
            kinds: self.kinds,
            extra: self.extra,
            supervisor: self.supervisor.unwrap_or_default(),
        }
    }
}

/// A configured daemon, ready to run.
pub struct Runtime {
    kinds: HandlerKinds,
    extra: Vec<NamedComponent>,
    supervisor: SupervisorConfig,
}

impl Runtime {
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    pub fn handler_kinds(&self) -> &HandlerKinds {
        &self.kinds
    }

    /// Loads and validates a config file with this runtime's handler kinds.
    pub fn load(&self, path: &Path) -> Result<Config, ConfigError> {
        config::load_file(path, &self.kinds)
    }

    /// Runs until a terminate signal arrives on `signals` and the drain that follows.
    /// `path` is re-read on reload signals. Fails only at start (listener cannot bind, a
    /// component cannot be built).
    pub async fn run<S>(
        self,
        config: Config,
        path: Option<PathBuf>,
        signals: S,
    ) -> anyhow::Result<ExitStatus>
    where
        S: Stream<Item = SignalKind> + Unpin + Send,
    {
        self.run_with(config, path, signals, Box::new(NoLifecycle))
            .await
    }

    /// [`Runtime::run`] with a lifecycle observer (systemd notification).
    pub async fn run_with<S>(
        self,
        config: Config,
        path: Option<PathBuf>,
        signals: S,
        lifecycle: Box<dyn Lifecycle>,
    ) -> anyhow::Result<ExitStatus>
    where
        S: Stream<Item = SignalKind> + Unpin + Send,
    {
        let health = Health::default();
        let metrics = crate::telemetry::metrics_handle();
        let listener = crate::http::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.http.listen))?;
        let listen = listener.local_addr().unwrap_or(config.http.listen);

        let config = Arc::new(config);
        // One for the process's life: breakers, rate limits and pauses survive reloads.
        let flows = crate::flow_control::Flows::default();
        let resources = Resources::with_flows(config.clone(), flows.clone())?;
        let mut components = components_for(&resources)?;
        components.extend(self.extra);
        // Every component is "starting" before the listener answers: otherwise `/readyz` could
        // report an empty, and so trivially ready, set while the supervisor is still spawning.
        for (name, _) in &components {
            health.register(name);
        }

        let supervisor = Supervisor::new(
            SupervisorConfig {
                shutdown_timeout: config.service.shutdown_timeout,
                ..self.supervisor
            },
            health.clone(),
        );
        let http_stop = tokio_util::sync::CancellationToken::new();
        let admin_ops = match admin_router(&config, &resources, &health).await? {
            Some((router, ops)) => {
                let admin_listener = crate::http::bind(config.http.admin_listen)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen on {} for the admin API",
                            config.http.admin_listen
                        )
                    })?;
                let admin_listen = admin_listener
                    .local_addr()
                    .unwrap_or(config.http.admin_listen);
                tracing::info!(listen = %admin_listen, "admin API listening");
                let admin_stop = http_stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::http::serve(admin_listener, router, admin_stop).await {
                        tracing::warn!(error = %e, "admin API listener failed");
                    }
                });
                Some(ops)
            }
            None => None,
        };
        let app = crate::http::router(health, metrics, flows.clone());
        let http = tokio::spawn(crate::http::serve(listener, app, http_stop.clone()));
        tracing::info!(listen = %listen, components = components.len(), config = %config.origin, "bosun started");

        let reload = Box::new(
            crate::reload::ConfigReload::new(path, self.kinds, config.clone())
                .with_admin(admin_ops)
                .with_flows(flows),
        );
        let status = supervisor.run(components, signals, reload, lifecycle).await;

        // The listener outlives the drain so /metrics and /readyz answer during it.
        http_stop.cancel();
        match http.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP listener failed"),
            Err(e) => tracing::warn!(error = %e, "HTTP listener task failed"),
            Ok(Ok(())) => {}
        }
        // Spans of the drained work are exported before the process ends.
        crate::otlp::flush(std::time::Duration::from_secs(5)).await;
        tracing::info!(status = %status, "bosun stopped");
        Ok(status)
    }
}

/// The admin API (dead letters, the publish API, its description) behind the configured
/// tokens, and the handle a reload replaces the dead-letter operations through; `None` when
/// no token is configured (the API stays off).
pub(crate) async fn admin_router(
    config: &Arc<Config>,
    resources: &Resources,
    health: &Health,
) -> anyhow::Result<Option<(axum::Router, AdminOps)>> {
    if !config.http.admin_enabled() {
        return Ok(None);
    }
    let access = Access::for_http(&config.http);
    let ops = AdminOps::new(AdminOps::build(config, resources));
    let api = PublishApi::build(config, resources)?;
    if let Some(api) = &api
        && let Err(e) = api.migrate().await
    {
        // Not fatal: the database may come back; the first request that reaches it creates
        // the table (until then, publishing is answered 503).
        tracing::error!(error = %e, "cannot create the publish API's idempotency table");
    }
    let flows = resources.flows.clone();
    let console = config.http.console.enabled.then(|| {
        crate::console::routes(crate::console::Console::new(
            ops.clone(),
            access.clone(),
            config.http.console.clone(),
            health.clone(),
            flows.clone(),
        ))
    });
    let router = crate::dead_letter::admin::routes(ops.clone(), &access)
        .merge(crate::publish_api::routes(api, &access))
        .merge(access.guard(
            crate::flow_control::admin::status_routes(flows.clone()),
            Permission::ReadStatus,
        ))
        .merge(access.guard(
            crate::flow_control::admin::control_routes(flows),
            Permission::ControlConsumers,
        ));
    let router = match console {
        Some(console) => router.merge(console),
        None => router,
    };
    Ok(Some((router, ops)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::support::{PG_URL, unique};

    /// Every `.route("PATH", METHOD(...)...)` the admin API's modules register.
    fn registered_routes() -> Vec<(String, String)> {
        let route = regex::Regex::new(
            r#"\.route\(\s*"([^"]+)",\s*([a-z]+\([^)]*\)(?:\.[a-z]+\([^)]*\))*)"#,
        )
        .unwrap();
        let method = regex::Regex::new(r"(?:^|\.)([a-z]+)\(").unwrap();
        let mut out = Vec::new();
        for source in [
            include_str!("dead_letter/admin.rs"),
            include_str!("publish_api/mod.rs"),
        ] {
            for found in route.captures_iter(source) {
                for m in method.captures_iter(&found[2]) {
                    out.push((found[1].to_owned(), m[1].to_owned()));
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_openapi_document_parses_and_lists_exactly_the_routes_served() {
        let doc: serde_json::Value =
            serde_json::from_str(crate::publish_api::OPENAPI).expect("the document is JSON");
        assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
        let paths = doc["paths"].as_object().expect("paths");

        let routes = registered_routes();
        assert!(routes.len() >= 9, "routes found in the sources: {routes:?}");
        for (path, method) in &routes {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} is served but not in openapi.json"
            );
        }

        // And every operation of the document is served: without a token it is refused as
        // unauthorized, never unknown (404) or not allowed (405).
        let table = unique("openapi_requests");
        let text = format!(
            r#"
[http.admin]
token_file = "/nonexistent"
[databases.main]
url = "{PG_URL}"
[brokers.rabbit]
kind = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[publish_api]
database = "main"
idempotency_table = "{table}"
migrate = false
"#
        );
        let mut config = config::load_str_with(
            &text,
            "test",
            &HandlerKinds::default(),
            &config::Env::default(),
            config::Secrets::Optional,
        )
        .expect("config")
        .config;
        config.http.admin_token = Some(crate::config::Secret::new(
            "a-token-of-more-than-thirty-two-bytes-0123",
        ));
        let config = Arc::new(config);
        let resources = Resources::new(config.clone()).expect("resources");
        let (router, _) = admin_router(&config, &resources, &Health::default())
            .await
            .expect("router")
            .expect("admin API on");
        let listener = crate::http::bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(crate::http::serve(listener, router, stop.clone()));
        let client = reqwest::Client::new();
        let mut operations = 0;
        for (path, item) in paths {
            for method in item.as_object().into_iter().flat_map(|m| m.keys()) {
                if method == "parameters" {
                    continue;
                }
                operations += 1;
                let uri = format!("{base}{}", path.replace("{id}", "1"));
                let method =
                    reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
                let status = client
                    .request(method.clone(), &uri)
                    .send()
                    .await
                    .expect("answer")
                    .status();
                // Past the failed-authentication burst the refusal is 429: still refused
                // for its missing token, never unknown.
                assert!(
                    status == reqwest::StatusCode::UNAUTHORIZED
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
                    "{method} {path} in openapi.json is not served: {status}"
                );
            }
        }
        stop.cancel();
        let _ = server.await;
        assert_eq!(operations, routes.len());
    }
}
