//! The supervisor, mostly through the library API: restarts with backoff, contained panics,
//! graceful drain, the shutdown timeout, readiness over real HTTP; and reloads, driven
//! directly with a scripted reload hook.

use crate::testing::support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun::Runtime;
use bosun::config::{Env, load_str};
use bosun::handler::HandlerKinds;
use bosun::supervisor::{Component, ComponentContext, ExitStatus, SignalKind, SupervisorConfig};
use futures::channel::mpsc;
use support::{free_port, http_get, metric_value, unique, wait_for_async};

/// Fails every run after a short while, recording when each run started.
struct Flaky {
    starts: Arc<Mutex<Vec<Instant>>>,
    panic: bool,
}

#[async_trait]
impl Component for Flaky {
    async fn run(&self, _ctx: ComponentContext) -> anyhow::Result<()> {
        self.starts
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(Instant::now());
        tokio::time::sleep(Duration::from_millis(10)).await;
        if self.panic {
            panic!("boom from a component");
        }
        anyhow::bail!("broker said no")
    }
}

/// Runs until cancelled, then spends `drain` finishing its "in-flight" work.
struct Worker {
    runs: Arc<AtomicU32>,
    drain: Duration,
    finished: Arc<AtomicBool>,
    ignore_cancel: bool,
}

#[async_trait]
impl Component for Worker {
    async fn run(&self, ctx: ComponentContext) -> anyhow::Result<()> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        ctx.health.set_ready();
        if self.ignore_cancel {
            std::future::pending::<()>().await;
        }
        ctx.shutdown.cancelled().await;
        tokio::time::sleep(self.drain).await;
        self.finished.store(true, Ordering::SeqCst);
        Ok(())
    }
}

fn worker(drain: Duration, ignore_cancel: bool) -> (Worker, Arc<AtomicU32>, Arc<AtomicBool>) {
    let runs = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    (
        Worker {
            runs: runs.clone(),
            drain,
            finished: finished.clone(),
            ignore_cancel,
        },
        runs,
        finished,
    )
}

fn config(port: u16, shutdown_timeout: &str) -> bosun::config::Config {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n[service]\nshutdown_timeout = \"{shutdown_timeout}\"\n"
    );
    load_str(
        &text,
        "test.toml",
        &HandlerKinds::builtin(),
        &Env::default(),
    )
    .expect("valid config")
}

fn fast_restarts() -> SupervisorConfig {
    SupervisorConfig {
        backoff_initial: Duration::from_millis(40),
        backoff_max: Duration::from_secs(5),
        tick: Duration::from_millis(100),
        ..SupervisorConfig::default()
    }
}

async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let url = format!("http://127.0.0.1:{port}{path}");
    tokio::task::spawn_blocking(move || http_get(&url))
        .await
        .ok()
        .flatten()
}

/// A runtime started by [`start`].
struct Running {
    /// Where its HTTP listener answers.
    port: u16,
    signals: mpsc::UnboundedSender<SignalKind>,
    task: tokio::task::JoinHandle<anyhow::Result<ExitStatus>>,
}

/// Runs `runtime` on a free port with `shutdown_timeout`.
fn start(runtime: Runtime, shutdown_timeout: &str) -> Running {
    let port = free_port();
    let (signals, rx) = mpsc::unbounded();
    let task = tokio::spawn(runtime.run(config(port, shutdown_timeout), None, rx));
    Running {
        port,
        signals,
        task,
    }
}

impl Running {
    fn terminate(&self) {
        self.signals
            .unbounded_send(SignalKind::Terminate)
            .expect("send signal");
    }

    /// How the runtime ended; it must end within 10 s (`stops` says how, if it does not).
    async fn exit_status(self, stops: &str) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect(stops)
            .expect("joins")
            .expect("runs")
    }
}

/// A runtime with a [`Flaky`] component `flaky_name` (panicking if `panic`) beside a steady
/// worker `steady_name`; returns it with the flaky one's start times and the worker's runs.
fn flaky_beside_steady(
    flaky_name: &str,
    steady_name: &str,
    panic: bool,
) -> (Runtime, Arc<Mutex<Vec<Instant>>>, Arc<AtomicU32>) {
    let starts = Arc::new(Mutex::new(Vec::new()));
    let (steady, steady_runs, _) = worker(Duration::ZERO, false);
    let runtime = Runtime::builder()
        .supervisor(fast_restarts())
        .component(
            flaky_name,
            Flaky {
                starts: starts.clone(),
                panic,
            },
        )
        .component(steady_name, steady)
        .build();
    (runtime, starts, steady_runs)
}

/// Waits up to 10 s for `starts` to hold `n` starts.
async fn started_times(starts: &Mutex<Vec<Instant>>, n: usize) -> Option<()> {
    wait_for_async(Duration::from_secs(10), || {
        let count = starts.lock().map(|s| s.len()).unwrap_or(0);
        async move { (count >= n).then_some(()) }
    })
    .await
}

/// Waits up to 10 s for `/readyz` on `port` to answer 200.
async fn ready(port: u16) -> Option<(u16, String)> {
    wait_for_async(Duration::from_secs(10), || async move {
        get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await
}

/// Waits up to 10 s for a worker to have run exactly once.
async fn ran_once(runs: &AtomicU32) -> Option<()> {
    wait_for_async(Duration::from_secs(10), || async move {
        (runs.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_component_restarts_with_backoff_while_others_keep_running() {
    let flaky_name = unique("flaky");
    let steady_name = unique("steady");
    let (runtime, starts, steady_runs) = flaky_beside_steady(&flaky_name, &steady_name, false);
    let run = start(runtime, "5s");

    let enough = started_times(&starts, 5).await;
    assert!(
        enough.is_some(),
        "the failing component was not restarted repeatedly"
    );

    let times = starts.lock().expect("lock").clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff doubles: 40, 80, 160, 320 ms (plus the 10 ms each run takes).
    assert!(gaps[0] >= Duration::from_millis(40), "{gaps:?}");
    assert!(gaps[3] >= Duration::from_millis(320), "{gaps:?}");
    assert_eq!(
        steady_runs.load(Ordering::SeqCst),
        1,
        "the healthy component must not be restarted"
    );

    let (status, body) = get(run.port, "/metrics").await.expect("metrics answer");
    assert_eq!(status, 200);
    let restarts =
        metric_value(&body, "bosun_task_restarts_total", &[&flaky_name]).expect("restart counter");
    assert!(restarts >= 4.0, "{restarts}");
    // Registered at 0 when it started, so the first restart is an increase.
    assert_eq!(
        metric_value(&body, "bosun_task_restarts_total", &[&steady_name]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&body, "bosun_component_up", &[&steady_name]),
        Some(1.0)
    );
    assert!(body.contains("bosun_build_info{version=\""), "{body}");

    let (status, body) = get(run.port, "/readyz").await.expect("readyz answers");
    assert_eq!(status, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json body");
    let reason = json["not_ready"][&flaky_name]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("broker said no"), "{body}");
    assert!(json["not_ready"].get(&steady_name).is_none(), "{body}");

    run.terminate();
    let status = run.exit_status("stops").await;
    assert_eq!(status, ExitStatus::Clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_contained_and_restarted() {
    let name = unique("panicky");
    let other = unique("bystander");
    let (runtime, starts, steady_runs) = flaky_beside_steady(&name, &other, true);
    let run = start(runtime, "5s");

    let restarted = started_times(&starts, 3).await;
    assert!(
        restarted.is_some(),
        "the panicking component was not restarted"
    );
    let (_, body) = get(run.port, "/readyz").await.expect("readyz answers");
    assert!(body.contains("panicked: boom from a component"), "{body}");
    assert_eq!(steady_runs.load(Ordering::SeqCst), 1);
    let (_, health) = get(run.port, "/healthz").await.expect("healthz answers");
    assert!(health.contains("\"ok\""), "{health}");

    run.terminate();
    let status = run.exit_status("stops").await;
    assert_eq!(status, ExitStatus::Clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_lets_in_flight_work_finish() {
    let (slow, _, finished) = worker(Duration::from_millis(500), false);
    let runtime = Runtime::builder()
        .supervisor(fast_restarts())
        .component(&unique("draining"), slow)
        .build();
    let run = start(runtime, "10s");
    assert!(ready(run.port).await.is_some(), "never ready");

    run.terminate();
    // During the drain the listener still answers.
    let during = get(run.port, "/healthz").await;
    assert!(matches!(during, Some((200, _))), "{during:?}");
    let status = run.exit_status("stops").await;
    assert_eq!(status, ExitStatus::Clean);
    assert!(
        finished.load(Ordering::SeqCst),
        "the component's drain was cut short"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_off_a_stuck_component() {
    let (stuck, _, finished) = worker(Duration::ZERO, true);
    let (fine, _, fine_finished) = worker(Duration::from_millis(50), false);
    let runtime = Runtime::builder()
        .supervisor(fast_restarts())
        .component(&unique("stuck"), stuck)
        .component(&unique("fine"), fine)
        .build();
    let run = start(runtime, "300ms");
    assert!(ready(run.port).await.is_some(), "never ready");

    run.terminate();
    let status = run.exit_status("stops").await;
    assert_eq!(status, ExitStatus::TimedOut);
    assert_eq!(status.code(), 1);
    assert!(!finished.load(Ordering::SeqCst));
    assert!(
        fine_finished.load(Ordering::SeqCst),
        "the well-behaved component should still drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_terminate_stops_at_once() {
    let (slow, _, finished) = worker(Duration::from_secs(30), false);
    let runtime = Runtime::builder()
        .supervisor(fast_restarts())
        .component(&unique("slow"), slow)
        .build();
    let run = start(runtime, "60s");
    assert!(ready(run.port).await.is_some(), "never ready");

    run.terminate();
    run.terminate();
    let status = run.exit_status("stops at once").await;
    assert_eq!(status, ExitStatus::Forced);
    assert_ne!(status.code(), 0);
    assert!(!finished.load(Ordering::SeqCst));
}

/// A reload hook that hands out prepared changes, one per SIGHUP.
struct Scripted {
    changes: std::collections::VecDeque<bosun::supervisor::Changes>,
}

#[async_trait]
impl bosun::supervisor::ReloadHook for Scripted {
    async fn reload(&mut self, _running: &[String]) -> Option<bosun::supervisor::Changes> {
        self.changes.pop_front()
    }
}

/// Reports each finished reload (`true`: applied).
struct Reloads(mpsc::UnboundedSender<bool>);

impl bosun::supervisor::Lifecycle for Reloads {
    fn reloaded(&mut self, ok: bool) {
        let _ = self.0.unbounded_send(ok);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_aborts_a_component_that_does_not_stop_within_shutdown_timeout() {
    use bosun::supervisor::{Changes, NamedComponent, Supervisor};
    use futures::StreamExt as _;

    let metrics = bosun::telemetry::metrics_handle();
    let stuck_name = unique("stuck");
    let (stuck, _, stuck_finished) = worker(Duration::ZERO, true);
    let (replacement, replacement_runs, _) = worker(Duration::ZERO, false);
    let (later, later_runs, _) = worker(Duration::ZERO, false);
    let later_name = unique("later");
    let script = Scripted {
        changes: [
            // Stop the component that never drains and start its replacement.
            Changes {
                stop: vec![stuck_name.clone()],
                start: vec![(stuck_name.clone(), Arc::new(replacement) as _)],
            },
            // A later reload must still be applied.
            Changes {
                stop: vec![],
                start: vec![(later_name.clone(), Arc::new(later) as _)],
            },
        ]
        .into(),
    };
    let supervisor = Supervisor::new(
        SupervisorConfig {
            shutdown_timeout: Duration::from_millis(500),
            ..fast_restarts()
        },
        bosun::health::Health::default(),
    );
    let (signals, rx) = mpsc::unbounded();
    let (reloaded_tx, mut reloaded) = mpsc::unbounded();
    let components: Vec<NamedComponent> = vec![(stuck_name.clone(), Arc::new(stuck))];
    let task = tokio::spawn(supervisor.run(
        components,
        rx,
        Box::new(script),
        Box::new(Reloads(reloaded_tx)),
    ));

    signals.unbounded_send(SignalKind::Reload).expect("send");
    let first = tokio::time::timeout(Duration::from_secs(20), reloaded.next()).await;
    assert_eq!(
        first.ok().flatten(),
        Some(true),
        "the reload never finished: a stopping component that does not drain held it"
    );
    assert!(!stuck_finished.load(Ordering::SeqCst));
    let replaced = ran_once(&replacement_runs).await;
    assert!(replaced.is_some(), "the replacement never started");
    let aborted = metric_value(
        &metrics.render(),
        "bosun_reload_stops_aborted_total",
        &[&format!("component=\"{stuck_name}\"")],
    );
    assert_eq!(aborted, Some(1.0), "the abort is counted");

    signals.unbounded_send(SignalKind::Reload).expect("send");
    let second = tokio::time::timeout(Duration::from_secs(20), reloaded.next()).await;
    assert_eq!(
        second.ok().flatten(),
        Some(true),
        "a later reload is applied"
    );
    let started = ran_once(&later_runs).await;
    assert!(
        started.is_some(),
        "the later reload's component never started"
    );

    signals.unbounded_send(SignalKind::Terminate).expect("send");
    let status = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stops")
        .expect("joins");
    assert_eq!(status, ExitStatus::Clean);
}
