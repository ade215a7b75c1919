//! Operational commands against the real binary: `bosun reload` and `bosun probe`.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use support::{ConfigFile, Daemon, bosun_output, free_port};

fn config_text(port: u16, pid_file: &std::path::Path) -> String {
    format!(
        "[service]\nshutdown_timeout = \"5s\"\nlog_format = \"json\"\npid_file = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[handlers.drain]\nkind = \"noop\"\n",
        pid_file.display()
    )
}

fn recv_until(socket: &UnixDatagram, timeout: Duration, wanted: &str) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.lines().any(|l| l == wanted) {
                return Some(message);
            }
        }
    }
    None
}

#[test]
fn reload_sends_sighup_to_the_daemon_named_by_its_pid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("bosun.pid");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let port = free_port();
    let config = ConfigFile::new(&config_text(port, &pid_file));
    let notify_env = notify_path.to_string_lossy().into_owned();
    let mut daemon = Daemon::start_with_env(
        &config.path,
        port,
        &[("NOTIFY_SOCKET", notify_env.as_str())],
    );
    assert!(
        recv_until(&notify, Duration::from_secs(30), "READY=1").is_some(),
        "{}",
        daemon.logs()
    );

    let pid_arg = pid_file.to_string_lossy().into_owned();
    let (code, stdout, stderr) = bosun_output(&["reload", "--pid-file", &pid_arg], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("sent SIGHUP to process {}", daemon.pid())),
        "{stdout}"
    );
    assert!(
        recv_until(&notify, Duration::from_secs(15), "RELOADING=1").is_some(),
        "the daemon did not reload\n{}",
        daemon.logs()
    );

    // --pid does the same.
    let (code, _, stderr) = bosun_output(&["reload", "--pid", &daemon.pid().to_string()], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        recv_until(&notify, Duration::from_secs(15), "RELOADING=1").is_some(),
        "{}",
        daemon.logs()
    );

    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );

    // The daemon removed its pid file on the way out: a clear error, exit 1.
    let (code, _, stderr) = bosun_output(&["reload", "--pid-file", &pid_arg], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot read the pid file") && stderr.contains("is bosun running"),
        "{stderr}"
    );
}

#[test]
fn reload_refuses_stale_and_foreign_pid_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("bosun.pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();

    std::fs::write(&pid_file, "not a number\n").expect("write");
    let (code, _, stderr) = bosun_output(&["reload", "--pid-file", &pid_arg], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("does not hold a process id"), "{stderr}");

    // A process that has exited.
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let gone_pid = gone.id();
    gone.wait().expect("wait");
    std::fs::write(&pid_file, format!("{gone_pid}\n")).expect("write");
    let (code, _, stderr) = bosun_output(&["reload", "--pid-file", &pid_arg], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not running"), "{stderr}");

    // A live process of another program: SIGHUP would kill it, so nothing is sent.
    let mut other = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    std::fs::write(&pid_file, format!("{}\n", other.id())).expect("write");
    let (code, _, stderr) = bosun_output(&["reload", "--pid-file", &pid_arg], &[]);
    let still_running = matches!(other.try_wait(), Ok(None));
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is `sleep`, not `bosun`"), "{stderr}");
    assert!(still_running, "the foreign process was signalled");
}

#[test]
fn reload_usage_errors_exit_64() {
    for args in [
        &["reload"][..],
        &["reload", "--pid-file", "/tmp/x.pid", "--pid", "1"],
        &["reload", "--pid", "0"],
        &["reload", "--pid", "-1"],
        &["reload", "--pid", "abc"],
    ] {
        let (code, _, stderr) = bosun_output(args, &[]);
        assert_eq!(code, 64, "{args:?}: {stderr}");
    }
}

#[test]
fn probe_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = ConfigFile::new(&config_text(port, &dir.path().join("bosun.pid")));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_http(Duration::from_secs(20)),
        "{}",
        daemon.logs()
    );

    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let (code, stdout, stderr) = bosun_output(&["probe", "--url", &healthz], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // The URL can come from the environment too (a container sets it once).
    let (code, _, stderr) = bosun_output(&["probe"], &[("BOSUN_PROBE_URL", healthz.as_str())]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = bosun_output(
        &["probe", "--url", &format!("http://localhost:{port}/readyz")],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");

    let missing = format!("http://127.0.0.1:{port}/nope");
    let (code, _, stderr) = bosun_output(&["probe", "--url", &missing], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("404"), "{stderr}");

    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );

    // Nothing listens any more.
    let (code, _, stderr) = bosun_output(&["probe", "--url", &healthz, "--timeout", "3s"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");

    // A listener that accepts and never answers: the timeout ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}/healthz", silent.local_addr().expect("addr"));
    let (code, _, stderr) =
        bosun_output(&["probe", "--url", &silent_url, "--timeout", "300ms"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no answer within"), "{stderr}");

    for bad in ["https://127.0.0.1:9090/healthz", "127.0.0.1:9090"] {
        let (code, _, stderr) = bosun_output(&["probe", "--url", bad], &[]);
        assert_eq!(code, 64, "{bad}: {stderr}");
    }
    let (code, _, stderr) = bosun_output(&["probe", "--timeout", "0"], &[]);
    assert_eq!(code, 64, "{stderr}");
}
