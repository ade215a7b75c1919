//! Live reload: on SIGHUP (or a change of the watched file) re-read and validate the file,
//! then restart only the components whose inputs changed.
//!
//! A component's inputs are everything it is built from: its own table, the broker and
//! database it names, and its handler with every handler that handler calls. Components whose
//! inputs are equal keep running untouched, so not one of their deliveries is interrupted.
//! An invalid file changes nothing. Fields that cannot change live (`[service]`, `[http]`)
//! are refused with "restart required"; the rest of the file still applies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::Stream;

use crate::components::components_named;
use crate::config::{self, BrokerConfig, Config, DatabaseConfig, Env, HandlerConfig};
use crate::dead_letter::admin::AdminOps;
use crate::dead_letter::ops::Ops;
use crate::flow_control::Flows;
use crate::handler::HandlerKinds;
use crate::resources::{
    Resources, consumer_component_name, dead_letter_component_name, inbox_component_name,
    outbox_component_name,
};
use crate::supervisor::{Changes, ReloadHook, SignalKind};

/// Everything one component is built from. Equal inputs mean the running component can stay.
#[derive(Debug, PartialEq)]
enum Inputs {
    Consumer {
        consumer: config::ConsumerConfig,
        broker: Option<BrokerConfig>,
        handlers: BTreeMap<String, HandlerConfig>,
        /// Its inbox's store, and that store's database or broker.
        inbox: Option<Box<InboxInputs>>,
    },
    Inbox {
        inbox: config::InboxConfig,
        database: Option<DatabaseConfig>,
    },
    Outbox {
        outbox: config::OutboxConfig,
        database: Option<DatabaseConfig>,
        broker: Option<BrokerConfig>,
    },
    DeadLetter {
        dead_letter: config::DeadLetterConfig,
        broker: Option<BrokerConfig>,
        database: Option<DatabaseConfig>,
    },
}

/// The handler `name` and every handler it depends on, transitively.
fn handler_closure(config: &Config, name: &str) -> BTreeMap<String, HandlerConfig> {
    let mut out = BTreeMap::new();
    let mut todo = vec![name.to_owned()];
    while let Some(next) = todo.pop() {
        if out.contains_key(&next) {
            continue;
        }
        if let Some(handler) = config.handlers.get(&next) {
            todo.extend(handler.factory.dependencies());
            out.insert(next, handler.clone());
        }
    }
    out
}

/// The inputs of every configured component, by component name.
fn inputs(config: &Config) -> BTreeMap<String, Inputs> {
    let mut out = BTreeMap::new();
    for (name, consumer) in &config.consumers {
        out.insert(
            consumer_component_name(name),
            Inputs::Consumer {
                consumer: consumer.clone(),
                broker: config.brokers.get(&consumer.source).cloned(),
                handlers: handler_closure(config, &consumer.handler),
                inbox: consumer
                    .inbox
                    .as_ref()
                    .and_then(|i| config.inboxes.get(&i.store))
                    .map(|inbox| Box::new(inbox_inputs(config, inbox))),
            },
        );
    }
    for (name, inbox) in &config.inboxes {
        if let config::InboxStore::Postgres { database, .. } = &inbox.store {
            out.insert(
                inbox_component_name(name),
                Inputs::Inbox {
                    inbox: inbox.clone(),
                    database: config.databases.get(database).cloned(),
                },
            );
        }
    }
    for (name, outbox) in &config.outboxes {
        out.insert(
            outbox_component_name(name),
            Inputs::Outbox {
                outbox: outbox.clone(),
                database: config.databases.get(&outbox.database).cloned(),
                broker: config.brokers.get(&outbox.target).cloned(),
            },
        );
    }
    for (name, dl) in &config.dead_letters {
        out.insert(
            dead_letter_component_name(name),
            Inputs::DeadLetter {
                dead_letter: dl.clone(),
                broker: config.brokers.get(&dl.source).cloned(),
                database: dl
                    .archive
                    .as_ref()
                    .and_then(|db| config.databases.get(db))
                    .cloned(),
            },
        );
    }
    out
}

/// An inbox, and the database or broker its store connects to.
type InboxInputs = (
    config::InboxConfig,
    Option<DatabaseConfig>,
    Option<BrokerConfig>,
);

/// An inbox and what its store connects to.
fn inbox_inputs(config: &Config, inbox: &config::InboxConfig) -> InboxInputs {
    let (database, broker) = match &inbox.store {
        config::InboxStore::Postgres { database, .. } => {
            (config.databases.get(database).cloned(), None)
        }
        config::InboxStore::Redis { broker } => (None, config.brokers.get(broker).cloned()),
    };
    (inbox.clone(), database, broker)
}

/// The components to stop and to start to go from `old` to `new`.
fn diff(old: &Config, new: &Config) -> (Vec<String>, Vec<String>) {
    let old = inputs(old);
    let new = inputs(new);
    let stop = old
        .iter()
        .filter(|(name, inputs)| new.get(*name) != Some(*inputs))
        .map(|(name, _)| name.clone())
        .collect();
    let start = new
        .iter()
        .filter(|(name, inputs)| old.get(*name) != Some(*inputs))
        .map(|(name, _)| name.clone())
        .collect();
    (stop, start)
}

/// The fields of `new` that differ from `old` and cannot change without a restart.
fn restart_required(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let (o, n) = (&old.service, &new.service);
    for (field, changed) in [
        ("service.name", o.name != n.name),
        (
            "service.shutdown_timeout",
            o.shutdown_timeout != n.shutdown_timeout,
        ),
        ("service.log_format", o.log_format != n.log_format),
        ("service.log_level", o.log_level != n.log_level),
        ("service.pid_file", o.pid_file != n.pid_file),
        ("http.listen", old.http.listen != new.http.listen),
        ("tracing", old.tracing != new.tracing),
        (
            "http.admin",
            old.http.admin_token != new.http.admin_token
                || old.http.tokens != new.http.tokens
                || old.http.admin_listen != new.http.admin_listen
                || old.http.console != new.http.console,
        ),
        ("publish_api", old.publish_api != new.publish_api),
    ] {
        if changed {
            fields.push(field);
        }
    }
    fields
}

/// What in `new` would move the ground under the running publish API of `old`, each as a
/// sentence; empty when nothing does.
///
/// The API is built once, at start: it keeps its brokers' publishers, its database's pool and
/// the table of each scheduled outbox, and it goes on writing rows there after a reload. A
/// scheduled outbox that is removed or reads another table, database or broker would leave
/// rows the API accepted (202) unread or send them elsewhere; a changed broker or database
/// would have the API and the rest of the process disagree on where messages go. So such a
/// reload is refused as a whole (the running configuration stays): a restart applies it.
fn publish_api_conflicts(old: &Config, new: &Config) -> Vec<String> {
    let Some(api) = &old.publish_api else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if old.databases.get(&api.database) != new.databases.get(&api.database) {
        out.push(format!(
            "database `{}` holds the publish API's records and scheduled messages",
            api.database
        ));
    }
    let mut brokers: BTreeSet<&String> = api.brokers.iter().collect();
    for outbox_name in api.scheduled.values() {
        let old_outbox = old.outboxes.get(outbox_name);
        let new_outbox = new.outboxes.get(outbox_name);
        let place = |o: &config::OutboxConfig| {
            (
                o.database.clone(),
                o.table.clone(),
                o.target.clone(),
                o.existing.clone(),
            )
        };
        if old_outbox.map(place) != new_outbox.map(place) {
            out.push(format!(
                "outbox `{outbox_name}` stores the publish API's scheduled messages (its presence, database, table, target and columns are fixed while running)"
            ));
        }
        brokers.extend(old_outbox.map(|o| &o.target));
    }
    for broker in brokers {
        if old.brokers.get(broker) != new.brokers.get(broker) {
            out.push(format!("broker `{broker}` is one the publish API sends to"));
        }
    }
    out
}

/// The reload hook the runtime installs.
pub struct ConfigReload {
    path: Option<PathBuf>,
    kinds: HandlerKinds,
    /// The configuration the running components were built from.
    current: Arc<Config>,
    /// Set by `reload`, committed by `applied` once the supervisor has made the change.
    pending: Option<Arc<Config>>,
    /// The admin API's operations, replaced with the new configuration's when a reload is
    /// applied; `None` when the admin API is off.
    admin: Option<AdminOps>,
    pending_admin: Option<Ops>,
    /// Breakers, limiters and pauses, kept across reloads.
    flows: Flows,
}

impl ConfigReload {
    pub fn new(path: Option<PathBuf>, kinds: HandlerKinds, current: Arc<Config>) -> Self {
        register_series(&current);
        metrics::gauge!("bosun_config_last_reload_success_timestamp_seconds").set(unix_now());
        Self {
            path,
            kinds,
            current,
            pending: None,
            admin: None,
            pending_admin: None,
            flows: Flows::default(),
        }
    }

    /// The process's flow control: a reload builds handlers with it, so breakers, limiters
    /// and pauses go on across reloads.
    pub fn with_flows(mut self, flows: Flows) -> Self {
        self.flows = flows;
        self
    }

    /// Keeps the admin API's view of dead-letter processors and archives in step with
    /// reloads.
    pub fn with_admin(mut self, admin: Option<AdminOps>) -> Self {
        self.admin = admin;
        self
    }

    fn failed(&self, error: &str) -> Option<Changes> {
        tracing::error!(error = %error, "configuration reload failed; keeping the running configuration");
        metrics::counter!("bosun_config_reloads_total", "result" => "error").increment(1);
        None
    }
}

#[async_trait]
impl ReloadHook for ConfigReload {
    async fn reload(&mut self, _running: &[String]) -> Option<Changes> {
        let Some(path) = self.path.clone() else {
            tracing::warn!("reload requested, but the configuration did not come from a file");
            return None;
        };
        tracing::info!(config = %path.display(), "reloading configuration");
        let kinds = self.kinds.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            config::check_permissions_on_reload(&path)?;
            config::load_file_with_env(&path, &kinds, &Env::from_process())
        })
        .await;
        let mut new = match loaded {
            Ok(Ok(new)) => new,
            Ok(Err(e)) => return self.failed(&e.to_string()),
            Err(e) => return self.failed(&format!("the loader failed: {e}")),
        };
        let conflicts = publish_api_conflicts(&self.current, &new);
        if !conflicts.is_empty() {
            return self.failed(&format!(
                "restart required, reload refused: {}",
                conflicts.join("; ")
            ));
        }
        for field in restart_required(&self.current, &new) {
            tracing::warn!(
                field,
                "restart required: `{field}` cannot change while running; keeping the running value"
            );
        }
        // The running process keeps its process-wide settings.
        new.service = self.current.service.clone();
        new.http = self.current.http.clone();
        new.publish_api = self.current.publish_api.clone();
        new.tracing = self.current.tracing.clone();
        let new = Arc::new(new);

        let (stop, start) = diff(&self.current, &new);
        let resources = match Resources::with_flows(new.clone(), self.flows.clone()) {
            Ok(resources) => resources,
            Err(e) => return self.failed(&format!("{e:#}")),
        };
        let wanted: BTreeSet<&str> = start.iter().map(String::as_str).collect();
        let built = match components_named(&resources, |name| wanted.contains(name)) {
            Ok(built) => built,
            Err(e) => return self.failed(&format!("{e:#}")),
        };
        tracing::info!(stop = %stop.join(", "), start = %start.join(", "), "configuration is valid; applying changes");
        if self.admin.is_some() {
            self.pending_admin = Some(AdminOps::build(&new, &resources));
        }
        self.pending = Some(new);
        Some(Changes { stop, start: built })
    }

    async fn applied(&mut self) {
        if let Some(new) = self.pending.take() {
            register_series(&new);
            let consumers: Vec<&str> = new.consumers.keys().map(String::as_str).collect();
            let handlers: Vec<&str> = new.handlers.keys().map(String::as_str).collect();
            self.flows.retain(&consumers, &handlers);
            self.current = new;
        }
        if let (Some(admin), Some(ops)) = (&self.admin, self.pending_admin.take()) {
            admin.replace(ops);
        }
        metrics::counter!("bosun_config_reloads_total", "result" => "success").increment(1);
        metrics::gauge!("bosun_config_last_reload_success_timestamp_seconds").set(unix_now());
        tracing::info!("configuration reload applied");
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Registers at 0 the labelled counters of every outbox, dead-letter processor and handler
/// of `config`, so each series exists before its first increment and `increase(...) > 0`
/// fires on the first one. (Consumers register theirs when they are built; the supervisor
/// those of every component; the process-wide ones are registered with the recorder.)
fn register_series(config: &Config) {
    use metrics::counter;
    for name in config.outboxes.keys() {
        for metric in [
            "bosun_outbox_published_total",
            "bosun_outbox_retried_total",
            "bosun_outbox_failed_total",
        ] {
            counter!(metric, "outbox" => name.clone()).increment(0);
        }
        // A histogram with no samples yet still renders its buckets at 0.
        let _ =
            metrics::histogram!("bosun_outbox_batch_duration_seconds", "outbox" => name.clone());
    }
    for name in config.dead_letters.keys() {
        for action in ["replay", "archive", "drop", "forward"] {
            counter!(crate::dead_letter::metric::TOTAL, "processor" => name.clone(), "action" => action)
                .increment(0);
        }
        counter!(crate::dead_letter::metric::REPLAYS, "processor" => name.clone()).increment(0);
    }
    for (name, handler) in &config.handlers {
        match handler.kind.as_str() {
            "http" => {
                for class in ["2xx", "3xx", "4xx", "5xx", "other", "timeout", "connect"] {
                    counter!("bosun_handler_responses_total", "handler" => name.clone(), "class" => class)
                        .increment(0);
                }
            }
            "exec" => {
                for result in ["success", "failure", "signal", "timeout", "spawn_error"] {
                    counter!("bosun_handler_exec_total", "handler" => name.clone(), "result" => result)
                        .increment(0);
                }
            }
            "route" => {
                let targets = handler.factory.dependencies();
                for target in targets.iter().map(String::as_str).chain(["unmatched"]) {
                    counter!("bosun_route_total", "handler" => name.clone(), "target" => target.to_owned())
                        .increment(0);
                }
            }
            _ => {}
        }
    }
}

/// A stream that yields [`SignalKind::Reload`] whenever the file at `path` changes (its
/// modification time, size or inode), polled every `interval`. Editors that replace the file
/// by rename are seen as well as in-place writes.
pub fn watch_file(
    path: PathBuf,
    interval: Duration,
) -> impl Stream<Item = SignalKind> + Unpin + Send {
    fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    }
    let initial = stamp(&path);
    Box::pin(futures::stream::unfold(
        (path, initial),
        move |(path, mut last)| async move {
            loop {
                tokio::time::sleep(interval).await;
                let now = stamp(&path);
                if now.is_some() && now != last {
                    last = now;
                    tracing::info!(config = %path.display(), "configuration file changed");
                    return Some((SignalKind::Reload, (path, last)));
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Config {
        match config::load_str(text, "t.toml", &HandlerKinds::builtin(), &Env::default()) {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        }
    }

    const BASE: &str = "[brokers.r]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1/\"\n[brokers.s]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/\"\n[handlers.a]\nkind = \"noop\"\n[handlers.b]\nkind = \"log\"\n";

    #[test]
    fn only_changed_components_restart() {
        let old = load(&format!(
            "{BASE}[consumers.keep]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"k\"\n[consumers.change]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"c\"\n[consumers.gone]\nsource = \"s\"\nhandler = \"a\"\nstream = \"g\"\n"
        ));
        let new = load(&format!(
            "{BASE}[consumers.keep]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"k\"\n[consumers.change]\nsource = \"r\"\nhandler = \"b\"\nqueue = \"c\"\n[consumers.added]\nsource = \"s\"\nhandler = \"a\"\nstream = \"x\"\n"
        ));
        let (stop, start) = diff(&old, &new);
        assert_eq!(stop, vec!["consumer:change", "consumer:gone"]);
        assert_eq!(start, vec!["consumer:added", "consumer:change"]);
    }

    #[test]
    fn a_changed_broker_or_handler_restarts_its_users() {
        let old = load(&format!(
            "{BASE}[consumers.c]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"k\"\n"
        ));
        let new = load(&format!(
            "{}[consumers.c]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"k\"\n",
            BASE.replace("amqp://127.0.0.1/", "amqp://127.0.0.2/")
        ));
        assert_eq!(diff(&old, &new).0, vec!["consumer:c"]);
        let new = load(&format!(
            "{}[consumers.c]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"k\"\n",
            BASE.replace(
                "[handlers.a]\nkind = \"noop\"",
                "[handlers.a]\nkind = \"log\""
            )
        ));
        assert_eq!(diff(&old, &new).0, vec!["consumer:c"]);
        // An unrelated handler's change touches nothing.
        let new = load(&format!(
            "{}[consumers.c]\nsource = \"r\"\nhandler = \"a\"\nqueue = \"k\"\n",
            BASE.replace(
                "[handlers.b]\nkind = \"log\"",
                "[handlers.b]\nkind = \"noop\""
            )
        ));
        assert_eq!(diff(&old, &new), (vec![], vec![]));
    }

    /// A configuration with the publish API over broker `r` and scheduled outbox `later`,
    /// and an unrelated consumer; `tweak` edits its text.
    fn publish_api_text(dir: &std::path::Path, tweak: impl Fn(String) -> String) -> String {
        let token = dir.join("admin.token");
        std::fs::write(&token, "a".repeat(40)).expect("token");
        tweak(format!(
            "{BASE}[http.admin]\ntoken_file = \"{}\"\n[databases.main]\nurl = \"postgres://127.0.0.1/test\"\n[databases.other]\nurl = \"postgres://127.0.0.1/other\"\n[outboxes.later]\ndatabase = \"main\"\ntable = \"later_rows\"\ntarget = \"r\"\n[consumers.c]\nsource = \"s\"\nhandler = \"a\"\nstream = \"k\"\n[publish_api]\ndatabase = \"main\"\nbrokers = [\"r\"]\nscheduled = [\"later\"]\n",
            token.display()
        ))
    }

    #[tokio::test]
    async fn a_reload_that_moves_the_publish_apis_outbox_or_broker_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bosun.toml");
        let same = |t: String| t;
        std::fs::write(&path, publish_api_text(dir.path(), same)).expect("write");
        let current = Arc::new(
            config::load_file_with_env(&path, &HandlerKinds::builtin(), &Env::default())
                .expect("valid"),
        );
        type Edit = Box<dyn Fn(String) -> String>;
        let changes: [(&str, Edit); 5] = [
            (
                "table",
                Box::new(|t: String| t.replace("later_rows", "other_rows")),
            ),
            (
                "database",
                Box::new(|t: String| {
                    t.replace(
                        "[outboxes.later]\ndatabase = \"main\"",
                        "[outboxes.later]\ndatabase = \"other\"",
                    )
                    .replace(
                        "[publish_api]\ndatabase = \"main\"",
                        "[publish_api]\ndatabase = \"other\"",
                    )
                }),
            ),
            (
                "removed",
                Box::new(|t: String| {
                    t.replace("[outboxes.later]\ndatabase = \"main\"\ntable = \"later_rows\"\ntarget = \"r\"\n", "")
                        .replace("scheduled = [\"later\"]\n", "")
                }),
            ),
            (
                "broker",
                Box::new(|t: String| t.replace("amqp://127.0.0.1/", "amqp://127.0.0.2/")),
            ),
            (
                "database url",
                Box::new(|t: String| t.replace("127.0.0.1/test", "127.0.0.3/test")),
            ),
        ];
        for (what, change) in changes {
            std::fs::write(&path, publish_api_text(dir.path(), &change)).expect("write");
            // Valid on its own: refused only for what it does to the running API.
            config::load_file_with_env(&path, &HandlerKinds::builtin(), &Env::default())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut hook =
                ConfigReload::new(Some(path.clone()), HandlerKinds::builtin(), current.clone());
            assert!(
                hook.reload(&[]).await.is_none(),
                "a change of the scheduled outbox's {what} must be refused"
            );
        }
        // Anything else still reloads: the unrelated consumer restarts.
        std::fs::write(
            &path,
            publish_api_text(dir.path(), |t| {
                t.replace("stream = \"k\"", "stream = \"k2\"")
            }),
        )
        .expect("write");
        let mut hook = ConfigReload::new(Some(path.clone()), HandlerKinds::builtin(), current);
        let changes = hook.reload(&[]).await.expect("applied");
        assert_eq!(changes.stop, vec!["consumer:c"]);
    }

    #[test]
    fn process_wide_fields_are_restart_required() {
        let old = load("[http]\nlisten = \"127.0.0.1:9090\"\n");
        let new =
            load("[http]\nlisten = \"127.0.0.1:9091\"\n[service]\nshutdown_timeout = \"5s\"\n");
        assert_eq!(
            restart_required(&old, &new),
            vec!["service.shutdown_timeout", "http.listen"]
        );
        assert!(restart_required(&old, &old).is_empty());
    }
}
