//! `/metrics` of the real daemon against what reads it: every metric and label the alert
//! rules (deploy/prometheus/alerts.yml, the PrometheusRule) and the Grafana dashboard use is
//! exported, counters exist at 0 before their first increment, every family has HELP text,
//! docs/metrics.md lists exactly the families a daemon with every kind of component exports,
//! with their types, and a component removed by a reload leaves no series behind.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use regex::Regex;
use serde_json::Value;
use support::{ConfigFile, Daemon, PG_URL, RABBIT_URL, REDIS_URL, free_port, unique, wait_for};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Labels Prometheus adds to every scraped series (and `le` of histogram buckets).
const TARGET_LABELS: &[&str] = &["instance", "job", "le", "__name__"];

/// Gauges that read state shared by every replica (a consumer group, a table): summing them
/// across replicas multiplies them by the replica count.
const GROUP_WIDE_GAUGES: &[&str] = &[
    "bosun_redis_pending_messages",
    "bosun_dead_letters_archived",
    "bosun_outbox_pending",
    "bosun_outbox_oldest_pending_age_seconds",
];

/// A scrape: family name to its HELP text (if any), TYPE, and the label names of its samples.
#[derive(Debug, Default)]
struct Scrape {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    /// Sample name (with `_bucket`/`_sum`/`_count`) to the label sets seen.
    samples: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

fn parse_labels(set: &str) -> BTreeMap<String, String> {
    let re = Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).expect("regex");
    re.captures_iter(set)
        .map(|c| (c[1].to_owned(), c[2].to_owned()))
        .collect()
}

fn parse_scrape(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            scrape.help.insert(name.to_owned(), help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            scrape.types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let (name, labels) = match line.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.rsplit_once('}').map(|(s, _)| s).unwrap_or(rest)),
                ),
                None => (
                    line.split_whitespace().next().unwrap_or(line),
                    BTreeMap::new(),
                ),
            };
            scrape
                .samples
                .entry(name.to_owned())
                .or_default()
                .push(labels);
        }
    }
    scrape
}

impl Scrape {
    fn has(&self, name: &str) -> bool {
        self.samples.contains_key(name)
    }

    fn label_names(&self, name: &str) -> BTreeSet<String> {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .flat_map(|labels| labels.keys().cloned())
            .collect()
    }

    fn value_exists(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.get(name).into_iter().flatten().any(|set| {
            labels
                .iter()
                .all(|(k, v)| set.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

/// One PromQL expression and where it comes from.
struct Query {
    origin: String,
    expr: String,
}

fn yaml_json(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1], encoding='utf-8')) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("python3 with PyYAML reads the YAML files (.ci/run has it)");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json from python")
}

fn alert_groups(path: &Path) -> Value {
    let docs = yaml_json(path);
    let doc = &docs[0];
    if doc["kind"] == "PrometheusRule" {
        doc["spec"]["groups"].clone()
    } else {
        doc["groups"].clone()
    }
}

fn rule_queries(path: &Path) -> Vec<Query> {
    let name = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    let mut out = Vec::new();
    for group in alert_groups(path).as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let id = rule["alert"]
                .as_str()
                .or(rule["record"].as_str())
                .unwrap_or("?");
            out.push(Query {
                origin: format!("{name} {id}"),
                expr: rule["expr"].as_str().expect("expr").to_owned(),
            });
        }
    }
    out
}

fn dashboard_queries() -> Vec<Query> {
    let path = repo().join("deploy/grafana/bosun.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
            .expect("dashboard JSON");
    let mut out = Vec::new();
    fn walk(panel: &Value, out: &mut Vec<Query>) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(Query {
                    origin: format!("bosun.json panel {}", panel["title"]),
                    expr: expr.to_owned(),
                });
            }
        }
        for child in panel["panels"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    walk(&dashboard, &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = var["query"]["query"].as_str().or(var["query"].as_str());
        if let Some(query) = query.filter(|q| q.contains("bosun_")) {
            out.push(Query {
                origin: format!("bosun.json variable {}", var["name"]),
                expr: query.to_owned(),
            });
        }
    }
    out
}

fn all_queries() -> Vec<Query> {
    let mut queries = rule_queries(&repo().join("deploy/prometheus/alerts.yml"));
    queries.extend(rule_queries(
        &repo().join("deploy/kubernetes/prometheusrule.yaml"),
    ));
    queries.extend(dashboard_queries());
    queries
}

/// What a query asks of the exporter: the metric names it reads, the labels it matches on
/// per metric, and the labels it groups by.
struct Uses {
    metrics: BTreeSet<String>,
    matchers: Vec<(String, String)>,
    grouping: BTreeSet<String>,
}

fn uses(expr: &str) -> Uses {
    // Grafana's $variables and [$__rate_interval] are not PromQL.
    let expr = Regex::new(r"\$[a-zA-Z_]+")
        .expect("regex")
        .replace_all(expr, "x");
    let name = Regex::new(r"\b(bosun_[a-zA-Z0-9_]+)").expect("regex");
    let selector = Regex::new(r"\b(bosun_[a-zA-Z0-9_]+)\s*\{([^}]*)\}").expect("regex");
    let matcher = Regex::new(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)").expect("regex");
    let grouping = Regex::new(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)").expect("regex");
    Uses {
        metrics: name.captures_iter(&expr).map(|c| c[1].to_owned()).collect(),
        matchers: selector
            .captures_iter(&expr)
            .flat_map(|c| {
                let metric = c[1].to_owned();
                matcher
                    .captures_iter(&c[2])
                    .map(move |m| (metric.clone(), m[1].to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect(),
        grouping: grouping
            .captures_iter(&expr)
            .flat_map(|c| {
                c[1].split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
            })
            .collect(),
    }
}

/// What is wrong with the queries against this scrape.
fn problems(queries: &[Query], scrape: &Scrape) -> Vec<String> {
    let sum = Regex::new(r"\bsum\b").expect("regex");
    let mut out = Vec::new();
    for q in queries {
        let u = uses(&q.expr);
        let mut labels_of_query: BTreeSet<String> =
            TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for metric in &u.metrics {
            if !scrape.has(metric) {
                out.push(format!("{}: `{metric}` is not exported", q.origin));
            }
            labels_of_query.extend(scrape.label_names(metric));
        }
        for (metric, label) in &u.matchers {
            if !TARGET_LABELS.contains(&label.as_str())
                && !scrape.label_names(metric).contains(label)
            {
                out.push(format!("{}: `{metric}` has no label `{label}`", q.origin));
            }
        }
        for label in &u.grouping {
            if !labels_of_query.contains(label) {
                out.push(format!(
                    "{}: groups by `{label}`, which none of its metrics has",
                    q.origin
                ));
            }
        }
        for gauge in GROUP_WIDE_GAUGES {
            if u.metrics.contains(*gauge) && sum.is_match(&q.expr) {
                out.push(format!(
                    "{}: sums the group-wide gauge `{gauge}` across replicas; use max",
                    q.origin
                ));
            }
        }
    }
    out
}

fn config(port: u16, names: &Names) -> String {
    format!(
        r#"
[service]
shutdown_timeout = "5s"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[databases.main]
url = "{PG_URL}"
max_connections = 4

[handlers.web]
kind = "http"
url = "http://127.0.0.1:9/"
circuit_breaker = {{}}
rate_limit = {{ per_second = 1000 }}

[handlers.run]
kind = "exec"
command = ["true"]

[handlers.split]
kind = "route"
routes = [{{ routing_key = "a.#", handler = "web" }}]
default = "run"

[consumers.{queue}]
source = "rabbit"
queue = "{queue}"
handler = "split"

[inboxes.{inbox}]
kind = "postgres"
database = "main"
table = "{inbox}"

[consumers.{stream}]
source = "cache"
stream = "{stream}"
group = "g"
handler = "run"
inbox = {{ store = "{inbox}" }}

[outboxes.{outbox}]
database = "main"
table = "{outbox}"
target = "cache"
destination = "{stream}"
migrate = true

[dead_letters.{dlq}]
source = "cache"
stream = "{stream}:dlq"
group = "dlq"
archive = "main"
table = "{dlq}"
migrate = true
"#,
        queue = names.queue,
        stream = names.stream,
        outbox = names.outbox,
        dlq = names.dlq,
        inbox = names.inbox,
    )
}

struct Names {
    queue: String,
    stream: String,
    outbox: String,
    dlq: String,
    inbox: String,
}

impl Names {
    fn new() -> Self {
        Self {
            queue: unique("metrics_q"),
            stream: unique("metrics_s"),
            outbox: unique("metrics_outbox"),
            dlq: unique("metrics_dl"),
            inbox: unique("metrics_inbox"),
        }
    }
}

fn scrape(daemon: &Daemon) -> Option<Scrape> {
    let (status, body) = daemon.get("/metrics")?;
    (status == 200).then(|| parse_scrape(&body))
}

#[test]
fn alerts_and_dashboard_use_only_exported_metrics_and_labels() {
    let names = Names::new();
    let port = free_port();
    let file = ConfigFile::new(&config(port, &names));
    let daemon = Daemon::start(&file.path, port);
    assert!(
        daemon.wait_ready(Duration::from_secs(90)),
        "the daemon never became ready: {:?}",
        daemon.get("/readyz")
    );
    let queries = all_queries();
    assert!(
        queries.len() > 20,
        "the rule and dashboard files were not read"
    );

    // Sampled gauges show up after their first sample: poll until nothing is missing.
    let mut last = Vec::new();
    let found = wait_for(Duration::from_secs(60), || {
        let scrape = scrape(&daemon)?;
        last = problems(&queries, &scrape);
        last.is_empty().then_some(scrape)
    });
    let Some(scrape) = found else {
        panic!("queries that do not match /metrics:\n{}", last.join("\n"));
    };

    // Every family has HELP text.
    let families: BTreeSet<&String> = scrape.types.keys().collect();
    let undocumented: Vec<&&String> = families
        .iter()
        .filter(|f| f.starts_with("bosun_") && !scrape.help.contains_key(f.as_str()))
        .collect();
    assert!(undocumented.is_empty(), "no HELP text: {undocumented:?}");
    let connected_help = &scrape.help["bosun_broker_connected"];
    assert!(
        !connected_help.starts_with("1 while"),
        "bosun_broker_connected counts connections: {connected_help}"
    );

    // Counters are there at 0 before their first increment, so increase() sees the first one.
    let outbox_component = format!("outbox:{}", names.outbox);
    for (metric, labels) in [
        ("bosun_config_reloads_total", vec![("result", "error")]),
        ("bosun_config_reloads_total", vec![("result", "success")]),
        (
            "bosun_outbox_failed_total",
            vec![("outbox", names.outbox.as_str())],
        ),
        (
            "bosun_outbox_retried_total",
            vec![("outbox", names.outbox.as_str())],
        ),
        (
            "bosun_task_restarts_total",
            vec![("component", outbox_component.as_str())],
        ),
        (
            "bosun_dead_letters_total",
            vec![("processor", names.dlq.as_str()), ("action", "archive")],
        ),
        (
            "bosun_dead_letter_replays_total",
            vec![("processor", names.dlq.as_str())],
        ),
        (
            "bosun_handler_responses_total",
            vec![("handler", "web"), ("class", "5xx")],
        ),
        (
            "bosun_handler_exec_total",
            vec![("handler", "run"), ("result", "failure")],
        ),
        (
            "bosun_route_total",
            vec![("handler", "split"), ("target", "unmatched")],
        ),
        (
            "bosun_breaker_transitions_total",
            vec![("handler", "web"), ("to", "open")],
        ),
        (
            "bosun_consumer_paused",
            vec![("consumer", names.queue.as_str())],
        ),
        (
            "bosun_messages_settled_total",
            vec![
                ("consumer", names.queue.as_str()),
                ("outcome", "dead_letter"),
            ],
        ),
    ] {
        assert!(
            scrape.value_exists(metric, &labels),
            "{metric}{labels:?} is not registered before its first increment"
        );
    }

    // Readiness is exported per component.
    for component in [
        format!("consumer:{}", names.queue),
        format!("consumer:{}", names.stream),
        outbox_component.clone(),
    ] {
        assert!(
            scrape.value_exists(
                "bosun_component_ready",
                &[("component", component.as_str())]
            ),
            "no bosun_component_ready for {component}"
        );
    }
    let ready = daemon.metric(
        "bosun_component_ready",
        &[&format!("component=\"{outbox_component}\"")],
    );
    assert_eq!(ready, Some(1.0));

    // An alert watches readiness.
    assert!(
        all_queries()
            .iter()
            .any(|q| q.origin.contains("alerts.yml") && q.expr.contains("bosun_component_ready")),
        "no alert on bosun_component_ready"
    );
}

#[test]
fn query_check_reports_unknown_metrics_labels_and_sums_of_group_gauges() {
    let scrape = parse_scrape(
        "# HELP bosun_component_up x\n# TYPE bosun_component_up gauge\nbosun_component_up{component=\"a\"} 1\nbosun_redis_pending_messages{consumer=\"c\"} 3\n",
    );
    let q = |expr: &str| {
        problems(
            &[Query {
                origin: "t".into(),
                expr: expr.into(),
            }],
            &scrape,
        )
    };
    assert!(q("bosun_component_up{instance=~\"$instance\"} == 0").is_empty());
    assert!(q("max by (consumer) (bosun_redis_pending_messages)").is_empty());
    assert_eq!(q("bosun_component_upp == 0").len(), 1);
    assert_eq!(q("bosun_component_up{components=\"a\"}").len(), 1);
    assert_eq!(q("sum by (processor) (bosun_component_up)").len(), 1);
    assert_eq!(
        q("sum by (consumer) (bosun_redis_pending_messages)").len(),
        1
    );
}

#[test]
fn prometheus_rule_holds_the_same_rules_as_alerts_file() {
    assert_eq!(
        alert_groups(&repo().join("deploy/prometheus/alerts.yml")),
        alert_groups(&repo().join("deploy/kubernetes/prometheusrule.yaml")),
        "deploy/kubernetes/prometheusrule.yaml and deploy/prometheus/alerts.yml differ"
    );
}

fn promtool() -> Option<PathBuf> {
    let ok = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let in_path = PathBuf::from("promtool");
    if ok(&in_path) {
        return Some(in_path);
    }
    // Where .ci/run unpacks it.
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let unpacked = cache.join("bosun-ci/bin/promtool");
    ok(&unpacked).then_some(unpacked)
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else {
        println!(
            "skipped: promtool is not installed (.ci/run unpacks it from Debian's prometheus package)"
        );
        return;
    };
    let check = |path: &Path| {
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(path)
            .output()
            .expect("run promtool")
    };
    let out = check(&repo().join("deploy/prometheus/alerts.yml"));
    assert!(
        out.status.success(),
        "promtool check rules alerts.yml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The PrometheusRule's groups, as a rule file.
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = alert_groups(&repo().join("deploy/kubernetes/prometheusrule.yaml"));
    let rules = dir.path().join("prometheusrule.json");
    std::fs::write(&rules, serde_json::json!({ "groups": groups }).to_string()).expect("write");
    let out = check(&rules);
    assert!(
        out.status.success(),
        "promtool check rules (PrometheusRule):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it can fail.
    let broken = dir.path().join("broken.json");
    std::fs::write(
        &broken,
        serde_json::json!({ "groups": [{ "name": "b", "rules": [{ "alert": "B", "expr": "sum by (x (y)" }] }] })
            .to_string(),
    )
    .expect("write");
    assert!(
        !check(&broken).status.success(),
        "promtool accepted a broken expression"
    );
}

#[test]
fn a_component_removed_by_reload_leaves_no_series() {
    let (kept, removed) = (unique("kept_s"), unique("removed_s"));
    let port = free_port();
    let text = |streams: &[&str]| {
        let mut t = format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.n]\nkind = \"noop\"\n"
        );
        for s in streams {
            t.push_str(&format!(
                "[consumers.{s}]\nsource = \"cache\"\nstream = \"{s}\"\ngroup = \"g\"\nhandler = \"n\"\n"
            ));
        }
        t
    };
    let file = ConfigFile::new(&text(&[&kept, &removed]));
    let daemon = Daemon::start(&file.path, port);
    assert!(daemon.wait_ready(Duration::from_secs(60)), "never ready");
    let up = |name: &str| {
        daemon.metric(
            "bosun_component_up",
            &[&format!("component=\"consumer:{name}\"")],
        )
    };
    let ready = |name: &str| {
        daemon.metric(
            "bosun_component_ready",
            &[&format!("component=\"consumer:{name}\"")],
        )
    };
    assert_eq!(up(&removed), Some(1.0));
    assert_eq!(ready(&removed), Some(1.0));

    file.rewrite(&text(&[&kept]));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let gone = wait_for(Duration::from_secs(30), || {
        (up(&removed).is_none() && ready(&removed).is_none()).then_some(())
    });
    assert!(
        gone.is_some(),
        "the removed consumer still has series: up {:?}, ready {:?}",
        up(&removed),
        ready(&removed)
    );
    assert_eq!(up(&kept), Some(1.0), "the kept consumer's series stay");

    // Added back, it is shown again.
    file.rewrite(&text(&[&kept, &removed]));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let back = wait_for(Duration::from_secs(30), || {
        (up(&removed) == Some(1.0)).then_some(())
    });
    assert!(back.is_some(), "the re-added consumer's series are hidden");
}

#[test]
fn broker_connected_counts_each_connected_consumer() {
    let (a, b) = (unique("conn_a"), unique("conn_b"));
    let port = free_port();
    let broker = unique("cache");
    let text = |streams: &[&str]| {
        let mut t = format!(
            "[http]\nlisten = \"127.0.0.1:{port}\"\n[brokers.{broker}]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.n]\nkind = \"noop\"\n"
        );
        for s in streams {
            t.push_str(&format!(
                "[consumers.{s}]\nsource = \"{broker}\"\nstream = \"{s}\"\ngroup = \"g\"\nhandler = \"n\"\n"
            ));
        }
        t
    };
    let file = ConfigFile::new(&text(&[&a, &b]));
    let daemon = Daemon::start(&file.path, port);
    assert!(daemon.wait_ready(Duration::from_secs(60)), "never ready");
    let connected = || daemon.metric("bosun_broker_connected", &[&format!("broker=\"{broker}\"")]);
    let two = wait_for(Duration::from_secs(10), || {
        (connected() == Some(2.0)).then_some(())
    });
    assert!(
        two.is_some(),
        "two consumers connected, the gauge reads {:?}",
        connected()
    );

    // One consumer stops: the other is still connected.
    file.rewrite(&text(&[&a]));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let one = wait_for(Duration::from_secs(30), || {
        (connected() == Some(1.0)).then_some(())
    });
    assert!(
        one.is_some(),
        "one consumer left connected, the gauge reads {:?}",
        connected()
    );
}

/// The families docs/metrics.md lists, with their types.
fn documented_families() -> BTreeMap<String, String> {
    let path = repo().join("docs/metrics.md");
    let text = std::fs::read_to_string(&path).expect("read docs/metrics.md");
    let row = Regex::new(r"(?m)^\| `(bosun_[a-z0-9_]+)` \| ([a-z]+) \|").expect("regex");
    let mut out = BTreeMap::new();
    for c in row.captures_iter(&text) {
        let previous = out.insert(c[1].to_owned(), c[2].to_owned());
        assert!(previous.is_none(), "{} is listed twice", &c[1]);
    }
    out
}

/// Where the documented and exported families differ: missing on either side, or typed
/// differently.
fn family_differences(
    documented: &BTreeMap<String, String>,
    exported: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, kind) in documented {
        match exported.get(name) {
            None => out.push(format!("{name} is in docs/metrics.md but not exported")),
            Some(k) if k != kind => out.push(format!(
                "{name} is a {k} on /metrics, a {kind} in docs/metrics.md"
            )),
            Some(_) => {}
        }
    }
    for name in exported.keys() {
        if !documented.contains_key(name) {
            out.push(format!("{name} is exported but not in docs/metrics.md"));
        }
    }
    out
}

#[test]
fn docs_metrics_lists_every_exported_family_with_its_type() {
    let names = Names::new();
    let (trimmed, held) = (unique("metrics_trim"), unique("metrics_held"));
    let requests = unique("metrics_publish_requests");
    let (port, admin_port) = (free_port(), free_port());
    let token = "0123456789abcdef0123456789abcdef0123456789abcdef";
    // Every kind of component: the base config's amqp and redis consumers, outbox, archiving
    // processor and http/exec/route handlers, plus the admin API, a trimmed stream and a
    // processor without an archive.
    let text = format!(
        r#"{base}
[http.admin]
token_env = "BOSUN_METRICS_DOCS_TOKEN"
listen = "127.0.0.1:{admin_port}"

[publish_api]
database = "main"
idempotency_table = "{requests}"

[handlers.quiet]
kind = "noop"

[consumers.{trimmed}]
source = "cache"
stream = "{trimmed}"
group = "g"
handler = "quiet"
trim = {{ maxlen = 1, interval = "1s" }}
inbox = {{ store = "{inbox}", key = "sha256:body" }}

[dead_letters.{held}]
source = "cache"
stream = "{held}"
default_action = "drop"
"#,
        base = config(port, &names),
        inbox = names.inbox,
    );
    let file = ConfigFile::new(&text);
    let daemon = Daemon::start_with_env(&file.path, port, &[("BOSUN_METRICS_DOCS_TOKEN", token)]);
    assert!(
        daemon.wait_ready(Duration::from_secs(90)),
        "the daemon never became ready: {:?}",
        daemon.get("/readyz")
    );

    // The families that appear at their first increment: entries for `trim` to remove (each
    // claimed in the inbox first), and an entry the processor without an archive cannot read
    // (no `payload`).
    let mut redis = redis::Client::open(REDIS_URL)
        .expect("redis client")
        .get_connection()
        .expect("connect to Redis");
    for i in 0..5 {
        let _: String = redis::cmd("XADD")
            .arg(&trimmed)
            .arg("*")
            .arg("payload")
            .arg(i)
            .query(&mut redis)
            .expect("XADD");
    }
    let _: String = redis::cmd("XADD")
        .arg(&held)
        .arg("*")
        .arg("not-a-payload")
        .arg("x")
        .query(&mut redis)
        .expect("XADD");

    let documented = documented_families();
    assert!(documented.len() > 30, "docs/metrics.md was not read");
    let mut last = Vec::new();
    let matched = wait_for(Duration::from_secs(90), || {
        let scrape = scrape(&daemon)?;
        let exported: BTreeMap<String, String> = scrape
            .types
            .into_iter()
            .filter(|(name, _)| name.starts_with("bosun_"))
            .collect();
        last = family_differences(&documented, &exported);
        last.is_empty().then_some(())
    });
    assert!(
        matched.is_some(),
        "docs/metrics.md and /metrics differ:\n{}",
        last.join("\n")
    );
}

#[test]
fn family_comparison_reports_missing_extra_and_mistyped_families() {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect()
    };
    let documented = map(&[
        ("bosun_a", "counter"),
        ("bosun_b", "gauge"),
        ("bosun_c", "gauge"),
    ]);
    let exported = map(&[
        ("bosun_a", "counter"),
        ("bosun_b", "counter"),
        ("bosun_d", "gauge"),
    ]);
    let diff = family_differences(&documented, &exported);
    assert_eq!(diff.len(), 3, "{diff:#?}");
    assert!(diff[0].contains("bosun_b is a counter"), "{diff:#?}");
    assert!(diff[1].contains("bosun_c is in docs"), "{diff:#?}");
    assert!(diff[2].contains("bosun_d is exported"), "{diff:#?}");
    assert!(family_differences(&documented, &documented).is_empty());
}
