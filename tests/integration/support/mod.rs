//! Helpers shared by the integration tests: unique names, the real `bosun` binary started
//! on a config file, HTTP probes, signals.
//!
//! Also compiled into the library's unit tests that drive a module against the real services
//! (`src/*/live_tests`, where the `bosun` binary is not available), and into
//! `benches/reliability.rs` for the checker.
#![allow(dead_code)]

pub mod amqp;
pub mod cluster;
pub mod outbox;
pub mod streams;

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A pool on the test database.
pub async fn pg() -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(PG_URL)
        .await
        .expect("connect to PostgreSQL")
}

/// A name no other test (or earlier run) uses: `prefix_<pid>_<counter>_<nanos>`.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async flavour of [`wait_for`].
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config file in a temporary directory.
pub struct ConfigFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bosun.toml");
        std::fs::write(&path, text).expect("write config");
        Self { dir, path }
    }

    pub fn rewrite(&self, text: &str) {
        let tmp = self.dir.path().join("bosun.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.path).expect("replace config");
    }
}

/// Path of the `bosun` binary cargo built for these tests. Cargo builds none for the
/// library's unit tests, which run bosun in-process and never call this.
pub fn bosun_bin() -> &'static str {
    option_env!("CARGO_BIN_EXE_bosun").unwrap_or("bosun")
}

/// Runs `bosun ARGS` to completion and returns (exit code, stdout, stderr).
pub fn bosun_output(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bosun_bin())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .expect("run bosun");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `bosun run` process; killed on drop if still running.
pub struct Daemon {
    pub child: Child,
    pub http: String,
    pub log_path: PathBuf,
}

impl Daemon {
    /// Starts `bosun run --config path`; logs go to a file next to the config.
    pub fn start(config: &Path, http_port: u16) -> Self {
        Self::start_with_env(config, http_port, &[])
    }

    /// Starts `bosun run --config path ARGS...`.
    pub fn start_args(config: &Path, http_port: u16, args: &[&str]) -> Self {
        Self::spawn(config, http_port, &[], args)
    }

    pub fn start_with_env(config: &Path, http_port: u16, env: &[(&str, &str)]) -> Self {
        Self::spawn(config, http_port, env, &[])
    }

    fn spawn(config: &Path, http_port: u16, env: &[(&str, &str)], args: &[&str]) -> Self {
        let log_path = config.with_extension(format!("{}.log", unique("run")));
        let level = std::env::var("BOSUN_TEST_LOG").unwrap_or_else(|_| "info".into());
        let env: Vec<(&str, &str)> = env
            .iter()
            .copied()
            .chain([("RUST_LOG", level.as_str())])
            .collect();
        Self::launch(
            Path::new(bosun_bin()),
            config,
            http_port,
            &env,
            args,
            &log_path,
        )
        .expect("spawn bosun")
    }

    /// Starts `bin run --config path ARGS...` with `env` added to this process's environment,
    /// appending its output to `log_path` (a daemon started again keeps one log).
    pub fn launch(
        bin: &Path,
        config: &Path,
        http_port: u16,
        env: &[(&str, &str)],
        args: &[&str],
        log_path: &Path,
    ) -> std::io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            log_path: log_path.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("send signal");
    }

    /// Waits for exit; `None` on timeout.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_for(timeout, || {
            self.child
                .try_wait()
                .ok()
                .flatten()
                .map(|s| s.code().unwrap_or(-1))
        })
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET `path` on the daemon's HTTP listener: (status, body), or None if unreachable.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&format!("{}{path}", self.http))
    }

    /// Waits until the listener answers `/healthz`.
    pub fn wait_http(&self, timeout: Duration) -> bool {
        wait_for(timeout, || self.get("/healthz").map(|_| ())).is_some()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        wait_for(timeout, || self.get("/readyz").filter(|(s, _)| *s == 200)).is_some()
    }

    /// The value of the first sample of `metric` whose labels contain every `label`.
    pub fn metric(&self, metric: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        metric_value(&body, metric, labels)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "--- bosun log ({}) ---\n{}",
                self.log_path.display(),
                self.logs()
            );
        }
    }
}

/// A blocking HTTP GET over a plain TCP socket (the tests' HTTP client for probes).
pub fn http_get(url: &str) -> Option<(u16, String)> {
    http_request("GET", url, &[], b"")
}

/// A minimal blocking HTTP/1.1 request: (status, body).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    use std::io::Read as _;
    let rest = url.strip_prefix("http://")?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status: u16 = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Finds `metric{...labels...} value` in a Prometheus text rendering.
pub fn metric_value(body: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(metric)
                && matches!(l.as_bytes().get(metric.len()), Some(b'{') | Some(b' '))
        })
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// RabbitMQ's `max_message_size`, read with `rabbitmqctl` (`{ok,134217728}`).
pub fn rabbit_max_message_size() -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", "application:get_env(rabbit, max_message_size)."])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let digits: String = text
        .split_once("{ok,")?
        .1
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A `bosun::Runtime` running in this process with `handler` as handler kind `test`, stopped
/// through its signal stream.
pub struct InProcess {
    signals: futures::channel::mpsc::UnboundedSender<bosun::supervisor::SignalKind>,
    task: tokio::task::JoinHandle<anyhow::Result<bosun::supervisor::ExitStatus>>,
    _config: Option<ConfigFile>,
}

impl InProcess {
    /// Loads `config` (it must be valid) and runs it.
    pub fn start(config: &Path, handler: std::sync::Arc<dyn bosun::Handler>) -> Self {
        let runtime = bosun::Runtime::builder()
            .handler_fn("test", move |_, _| Ok(handler.clone()))
            .build();
        let config = runtime.load(config).expect("valid config");
        let (signals, rx) = futures::channel::mpsc::unbounded();
        let task = tokio::spawn(runtime.run(config, None, rx));
        Self {
            signals,
            task,
            _config: None,
        }
    }

    /// Runs the config `text`, keeping its file as long as the runtime.
    pub fn start_text(text: &str, handler: std::sync::Arc<dyn bosun::Handler>) -> Self {
        let file = ConfigFile::new(text);
        let mut running = Self::start(&file.path, handler);
        running._config = Some(file);
        running
    }

    /// SIGTERM, then the runtime's exit status (within 30 s).
    pub async fn stop(self) -> bosun::supervisor::ExitStatus {
        self.signals
            .unbounded_send(bosun::supervisor::SignalKind::Terminate)
            .expect("send terminate");
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("runtime stops")
            .expect("join")
            .expect("run")
    }
}
