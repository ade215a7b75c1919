//! The runtime: turns a validated [`Config`] into running components under a
//! [`Supervisor`], with the HTTP listener beside them.
//!
//! This is also the library entry point: a Rust program builds a [`Runtime`] with its own
//! handler kinds and components and runs it like the `bosun` binary does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use futures::Stream;

use crate::components::components_for;
use crate::config::{self, Config, ConfigError};
use crate::handler::{FnKind, Handler, HandlerKind, HandlerKinds, OptionError};
use crate::health::Health;
use crate::resources::Resources;
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
        let resources = Resources::new(config.clone())?;
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
        let admin_ops = match crate::dead_letter::admin::router(&config, &resources) {
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
        let app = crate::http::router(health, metrics);
        let http = tokio::spawn(crate::http::serve(listener, app, http_stop.clone()));
        tracing::info!(listen = %listen, components = components.len(), config = %config.origin, "bosun started");

        let reload = Box::new(
            crate::reload::ConfigReload::new(path, self.kinds, config.clone())
                .with_admin(admin_ops),
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
