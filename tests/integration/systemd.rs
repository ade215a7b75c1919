//! systemd's side of `Type=notify-reload`, played by a unix datagram socket in
//! `NOTIFY_SOCKET`: the messages the real binary sends at start, on reload (valid and broken
//! files), at stop, and the watchdog keep-alives.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{ConfigFile, Daemon, bosun_bin, free_port, unique};

fn config_text(port: u16, log_level: &str) -> String {
    format!(
        "[service]\nshutdown_timeout = \"5s\"\nlog_format = \"json\"\nlog_level = \"{log_level}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[handlers.drain]\nkind = \"noop\"\n"
    )
}

/// The service manager's end: a datagram socket bound in a temporary directory.
struct Manager {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: UnixDatagram,
}

impl Manager {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("read timeout");
        Self {
            _dir: dir,
            path,
            socket,
        }
    }

    /// The next datagram within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// The next datagram that is not a watchdog keep-alive; keep-alives seen on the way are
    /// counted into `keepalives`.
    fn recv_state(&self, timeout: Duration, keepalives: &mut usize) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let message = self.recv(left)?;
            if message == "WATCHDOG=1\n" {
                *keepalives += 1;
            } else {
                return Some(message);
            }
        }
    }
}

/// Starts `bosun run` as systemd would: with `NOTIFY_SOCKET` and the given watchdog variables
/// (any inherited ones removed).
fn start(config: &Path, port: u16, manager: &Manager, watchdog: &[(&str, &str)]) -> Daemon {
    let log_path = config.with_extension(format!("{}.log", unique("run")));
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(bosun_bin())
        .args(["run", "--config"])
        .arg(config)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("NOTIFY_SOCKET", &manager.path)
        .envs(watchdog.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn bosun");
    Daemon {
        child,
        http: format!("http://127.0.0.1:{port}"),
        log_path,
    }
}

fn monotonic_usec() -> i128 {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(sd_notify::NotifyState::MonotonicUsec(usec)) => usec,
        other => panic!("cannot read CLOCK_MONOTONIC: {other:?}"),
    }
}

/// Checks one reload's pair of datagrams: RELOADING=1 with a fresh MONOTONIC_USEC, then
/// READY=1 with a STATUS= line, which is returned.
fn expect_reload_pair(manager: &Manager, daemon: &Daemon, keepalives: &mut usize) -> String {
    let before = monotonic_usec();
    daemon.signal(Signal::SIGHUP);
    let reloading = manager
        .recv_state(Duration::from_secs(15), keepalives)
        .unwrap_or_else(|| panic!("no RELOADING=1 after SIGHUP\n{}", daemon.logs()));
    let lines: Vec<&str> = reloading.lines().collect();
    assert!(lines.contains(&"RELOADING=1"), "{reloading:?}");
    let usec: i128 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!("RELOADING=1 without MONOTONIC_USEC in one datagram: {reloading:?}")
        });
    let after = monotonic_usec();
    assert!(
        before <= usec && usec <= after,
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC between {before} and {after}"
    );
    let ready = manager
        .recv_state(Duration::from_secs(15), keepalives)
        .unwrap_or_else(|| panic!("no READY=1 after the reload\n{}", daemon.logs()));
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready:?}");
    lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("READY=1 without STATUS=: {ready:?}"))
        .to_owned()
}

#[test]
fn notify_sequence_for_start_reload_failed_reload_and_stop() {
    let manager = Manager::new();
    let port = free_port();
    let config = ConfigFile::new(&config_text(port, "info"));
    // A watchdog meant for another process (pid 1) must be ignored: no keep-alives at all.
    let mut daemon = start(
        &config.path,
        port,
        &manager,
        &[("WATCHDOG_USEC", "1000000"), ("WATCHDOG_PID", "1")],
    );
    let mut keepalives = 0;

    let ready = manager
        .recv_state(Duration::from_secs(30), &mut keepalives)
        .unwrap_or_else(|| panic!("no READY=1 at start\n{}", daemon.logs()));
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(lines.first(), Some(&"READY=1"), "{ready:?}");
    assert!(lines.iter().any(|l| l.starts_with("STATUS=")), "{ready:?}");
    // READY=1 means the listener is up already.
    assert_eq!(daemon.get("/healthz").map(|(s, _)| s), Some(200));

    // A valid file (one value changed).
    config.rewrite(&config_text(port, "debug"));
    let status = expect_reload_pair(&manager, &daemon, &mut keepalives);
    assert!(status.contains("reloaded"), "{status}");

    // A broken file: the same pair, and the daemon keeps serving.
    config.rewrite("[service]\nshutdown_timeout = \"forever\"\n");
    let status = expect_reload_pair(&manager, &daemon, &mut keepalives);
    assert!(status.contains("failed"), "{status}");
    assert!(
        daemon.logs().contains("invalid duration"),
        "{}",
        daemon.logs()
    );
    assert_eq!(daemon.get("/healthz").map(|(s, _)| s), Some(200));

    daemon.signal(Signal::SIGTERM);
    let stopping = manager
        .recv_state(Duration::from_secs(15), &mut keepalives)
        .unwrap_or_else(|| panic!("no STOPPING=1\n{}", daemon.logs()));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );
    assert_eq!(keepalives, 0, "keep-alives for a watchdog meant for pid 1");
}

#[test]
fn watchdog_keepalives_arrive_while_the_loop_turns() {
    let manager = Manager::new();
    let port = free_port();
    let config = ConfigFile::new(&config_text(port, "info"));
    // 2 s: a keep-alive on every supervisor tick (once a second). WATCHDOG_PID stays unset,
    // as the child's pid is not known before it is spawned.
    let mut daemon = start(
        &config.path,
        port,
        &manager,
        &[("WATCHDOG_USEC", "2000000")],
    );
    let mut keepalives = 0;
    let ready = manager
        .recv_state(Duration::from_secs(30), &mut keepalives)
        .unwrap_or_else(|| panic!("no READY=1 at start\n{}", daemon.logs()));
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");

    let got = support::wait_for(Duration::from_secs(30), || {
        if let Some(message) = manager.recv(Duration::from_millis(500)) {
            assert_eq!(message, "WATCHDOG=1\n", "unexpected notification");
            keepalives += 1;
        }
        (keepalives >= 3).then_some(())
    });
    assert!(
        got.is_some(),
        "only {keepalives} keep-alives\n{}",
        daemon.logs()
    );

    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );
}

#[test]
fn without_notify_socket_the_daemon_runs_as_before() {
    let port = free_port();
    let config = ConfigFile::new(&config_text(port, "info"));
    let mut daemon = Daemon::start_with_env(&config.path, port, &[("NOTIFY_SOCKET", "")]);
    assert!(
        daemon.wait_http(Duration::from_secs(20)),
        "{}",
        daemon.logs()
    );
    daemon.signal(Signal::SIGHUP);
    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );
    assert!(
        !daemon.logs().contains("cannot notify systemd"),
        "{}",
        daemon.logs()
    );
}
