//! Shared pieces: running the release `bosun` binary, peak RSS, formatting.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `bosun` binary built with the bench profile.
pub fn bosun_bin() -> &'static str {
    env!("CARGO_BIN_EXE_bosun")
}

/// An OTLP/HTTP endpoint that takes every export and answers 200, on a thread of its own.
fn otlp_sink() -> std::net::SocketAddr {
    static SINK: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();
    *SINK.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the OTLP sink");
        let addr = listener.local_addr().expect("sink address");
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = listener.set_nonblocking(true);
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app =
                    axum::Router::new().route("/v1/traces", axum::routing::post(|| async { "" }));
                let _ = axum::serve(listener, app).await;
            });
        });
        addr
    })
}

/// A running daemon for a case; killed on drop.
pub struct Bosun {
    pub child: Child,
    _dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Bosun {
    /// Starts `bosun run` on `config_text`. With `BOSUN_BENCH_TRACING=<ratio>` set, a
    /// `[tracing]` section exporting to an OTLP sink in this process is added (the
    /// tracing-overhead comparison in BENCHMARKS.md).
    pub fn start(config_text: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("bosun.toml");
        let mut config_text = config_text.to_owned();
        if let Ok(ratio) = std::env::var("BOSUN_BENCH_TRACING") {
            let ratio: f64 = ratio.parse()?;
            config_text.push_str(&format!(
                "\n[tracing]\nenabled = true\nendpoint = \"http://{}\"\nsample_ratio = {ratio:?}\n",
                otlp_sink()
            ));
        }
        std::fs::write(&config, config_text)?;
        let child = Command::new(bosun_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self {
            child,
            _dir: dir,
            config,
        })
    }

    /// Peak resident set size so far, in MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> Option<f64> {
        peak_rss_mib(self.child.id())
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }
}

impl Drop for Bosun {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A unique name for queues, streams and tables of one run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// Formats one comparison row.
pub fn comparison(unit: &str, bosun: f64, bare: f64, rss_mib: Option<f64>) -> String {
    let ratio = if bare > 0.0 { bosun / bare } else { 0.0 };
    let rss = rss_mib
        .map(|r| format!("{r:.1} MiB"))
        .unwrap_or_else(|| "n/a".into());
    format!(
        "bosun: {bosun:.0} {unit}/s\nbare:  {bare:.0} {unit}/s\nratio: {ratio:.2}\nbosun peak RSS: {rss}"
    )
}

/// Arrival times of the messages of `queue`, indexed by the sequence number each one's body
/// holds (`now()` taken at arrival), consumed without acks until the task is aborted.
pub type Arrivals<T> = std::sync::Arc<std::sync::Mutex<Vec<Option<T>>>>;

pub async fn record_arrivals<T: Clone + Send + 'static>(
    channel: &lapin::Channel,
    queue: &str,
    total: usize,
    now: fn() -> T,
) -> anyhow::Result<(Arrivals<T>, tokio::task::JoinHandle<()>)> {
    use futures::StreamExt as _;
    let arrivals: Arrivals<T> = std::sync::Arc::new(std::sync::Mutex::new(vec![None; total]));
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let sink = arrivals.clone();
    let consuming = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = now();
            let seq = std::str::from_utf8(&delivery.data)
                .ok()
                .and_then(|s| s.parse::<usize>().ok());
            if let (Some(seq), Ok(mut arrivals)) = (seq, sink.lock())
                && let Some(slot) = arrivals.get_mut(seq)
            {
                *slot = Some(at);
            }
        }
    });
    Ok((arrivals, consuming))
}
