//! The real `bosun` binary: HTTP endpoints, signals, exit codes.

use crate::support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::{ConfigFile, Daemon, free_port};

fn minimal(port: u16, extra: &str) -> String {
    format!(
        "[service]\nshutdown_timeout = \"5s\"\nlog_format = \"json\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[handlers.drain]\nkind = \"noop\"\n{extra}"
    )
}

#[test]
fn serves_metrics_health_and_readiness_then_stops_on_sigterm() {
    let port = free_port();
    let config = ConfigFile::new(&minimal(port, ""));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_http(Duration::from_secs(20)),
        "listener never came up:\n{}",
        daemon.logs()
    );

    let (status, body) = daemon.get("/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = daemon.get("/readyz").expect("readyz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ready\""), "{body}");
    let (status, body) = daemon.get("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!(
            "bosun_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{body}"
    );
    let (status, _) = daemon.get("/nope").expect("404 answers");
    assert_eq!(status, 404);

    daemon.signal(Signal::SIGTERM);
    let code = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", daemon.logs());
    let logs = daemon.logs();
    // JSON logs: one object per line.
    let started = logs
        .lines()
        .find(|l| l.contains("bosun started"))
        .expect("start line");
    let parsed: serde_json::Value = serde_json::from_str(started).expect("json log line");
    assert_eq!(parsed["level"], "INFO");
    assert!(logs.contains("bosun stopped"), "{logs}");
}

#[test]
fn sigint_also_drains_and_pid_file_is_written_and_removed() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("bosun.pid");
    let config = ConfigFile::new(&minimal(port, "").replace(
        "[service]\n",
        &format!("[service]\npid_file = \"{}\"\n", pid_file.display()),
    ));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_http(Duration::from_secs(20)),
        "{}",
        daemon.logs()
    );
    let written = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(written.trim(), daemon.pid().to_string());
    daemon.signal(Signal::SIGINT);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );
    assert!(!pid_file.exists(), "pid file left behind");
}

#[test]
fn sighup_revalidates_and_a_broken_file_keeps_the_daemon_running() {
    let port = free_port();
    let config = ConfigFile::new(&minimal(port, ""));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_http(Duration::from_secs(20)),
        "{}",
        daemon.logs()
    );

    config.rewrite("[service]\nshutdown_timeout = \"forever\"\n");
    daemon.signal(Signal::SIGHUP);
    let logged = support::wait_for(Duration::from_secs(10), || {
        daemon
            .logs()
            .contains("configuration reload failed")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", daemon.logs());
    assert!(
        daemon.logs().contains("invalid duration"),
        "{}",
        daemon.logs()
    );
    let (status, _) = daemon.get("/healthz").expect("still serving");
    assert_eq!(status, 200);
    assert_eq!(
        daemon.metric("bosun_config_reloads_total", &["result=\"error\""]),
        Some(1.0)
    );

    // A valid file with a new listen address: the address needs a restart, the rest applies.
    config.rewrite(&minimal(port + 1, "[handlers.more]\nkind = \"log\"\n"));
    daemon.signal(Signal::SIGHUP);
    let applied = support::wait_for(Duration::from_secs(10), || {
        // The series exists at 0 from the start: wait for the increment.
        daemon
            .metric("bosun_config_reloads_total", &["result=\"success\""])
            .filter(|v| *v >= 1.0)
    });
    assert_eq!(applied, Some(1.0), "{}", daemon.logs());
    assert!(
        daemon.logs().contains("restart required"),
        "{}",
        daemon.logs()
    );
    assert!(daemon.logs().contains("http.listen"), "{}", daemon.logs());
    assert!(
        daemon
            .metric("bosun_config_last_reload_success_timestamp_seconds", &[])
            .is_some_and(|t| t > 1.0e9)
    );
    let (status, _) = daemon.get("/healthz").expect("still on the old address");
    assert_eq!(status, 200);

    daemon.signal(Signal::SIGTERM);
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        daemon.logs()
    );
}

#[test]
fn config_error_exits_78_and_busy_port_exits_1() {
    let config = ConfigFile::new("[consumers.x]\nsource = \"nowhere\"\nhandler = \"none\"\n");
    let (code, _, stderr) =
        support::bosun_output(&["run", "--config", &config.path.to_string_lossy()], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("names broker `nowhere`"), "{stderr}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let config = ConfigFile::new(&minimal(port, ""));
    let (code, _, stderr) =
        support::bosun_output(&["run", "--config", &config.path.to_string_lossy()], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn watch_config_reloads_on_file_change() {
    let port = free_port();
    let config = ConfigFile::new(&minimal(port, ""));
    let mut daemon = support::Daemon::start_args(&config.path, port, &["--watch-config"]);
    assert!(
        daemon.wait_http(Duration::from_secs(20)),
        "{}",
        daemon.logs()
    );
    std::thread::sleep(Duration::from_millis(1100));
    config.rewrite(&minimal(port, "[handlers.extra]\nkind = \"log\"\n"));
    let applied = support::wait_for(Duration::from_secs(10), || {
        // The series exists at 0 from the start: wait for the increment.
        daemon
            .metric("bosun_config_reloads_total", &["result=\"success\""])
            .filter(|v| *v >= 1.0)
    });
    assert_eq!(applied, Some(1.0), "{}", daemon.logs());
    assert!(
        daemon.logs().contains("configuration file changed"),
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
}

#[test]
fn migrate_true_creates_outbox_and_archive_tables_at_start() {
    let port = free_port();
    let outbox = support::unique("mig_outbox");
    let archive = support::unique("mig_archive");
    let queue = support::unique("mig_dlq");
    let extra = format!(
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{}\"\n[databases.main]\nurl = \"{}\"\n\
         [outboxes.o]\ndatabase = \"main\"\ntable = \"{outbox}\"\ntarget = \"rabbit\"\nmigrate = true\n\
         [consumers.c]\nsource = \"rabbit\"\nhandler = \"drain\"\nqueue = \"{queue}\"\n\
         [dead_letters.d]\nsource = \"rabbit\"\nqueue = \"{queue}.dlq\"\narchive = \"main\"\ntable = \"{archive}\"\nmigrate = true\n",
        support::RABBIT_URL,
        support::PG_URL
    );
    let config = ConfigFile::new(&minimal(port, &extra));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_ready(Duration::from_secs(30)),
        "{}",
        daemon.logs()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(support::PG_URL)
            .await
            .expect("connect");
        for table in [&outbox, &archive] {
            let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(table)
                .fetch_one(&pool)
                .await
                .expect("query");
            assert_eq!(
                found.as_deref(),
                Some(table.as_str()),
                "{table} was not created"
            );
        }
        daemon.signal(Signal::SIGTERM);
        assert_eq!(
            daemon.wait_exit(Duration::from_secs(20)),
            Some(0),
            "{}",
            daemon.logs()
        );
        for table in [&outbox, &archive] {
            let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table} CASCADE"))
                .execute(&pool)
                .await;
        }
    });
}
