//! `kind = "exec"` with the scripts in `tests/fixtures/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bosun::handler::{FailureKind, HeaderValue, Outcome};

use super::{build, message, metric, support};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn exec(name: &str, command: &[&str], extra: &str) -> Arc<dyn bosun::Handler> {
    let argv: Vec<String> = command.iter().map(|a| format!("{a:?}")).collect();
    build(
        "exec",
        name,
        &format!("command = [{}]\n{extra}", argv.join(", ")),
    )
}

/// Processes (any state, zombies included) whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<String> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            members.push(format!(
                "{} ({})",
                entry.file_name().to_string_lossy(),
                fields[0]
            ));
        }
    }
    members
}

/// Waits for the pid file a fixture writes and returns the pid in it.
async fn read_pid(path: &Path) -> i32 {
    support::wait_for_async(Duration::from_secs(10), || async {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await
    .expect("the fixture wrote its pid")
}

/// Every process of the group is gone: killed and reaped (the script's children are
/// orphans reaped by init, which may take a moment).
async fn assert_group_gone(pgid: i32) {
    let gone = support::wait_for_async(Duration::from_secs(30), || async {
        group_members(pgid).is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "processes left in group {pgid}: {:?}",
        group_members(pgid)
    );
}

#[tokio::test]
async fn exit_code_mapping_rows() {
    let name = support::unique("exec_rows");
    let script = fixture("exit_with.sh");
    let run = |code: &str, stderr: &str| {
        let handler = exec(&name, &[&script, code, stderr], "");
        async move { handler.handle(&message("{}")).await }
    };
    assert_eq!(run("0", "").await, Outcome::Ack);
    assert_eq!(
        run("75", "database busy").await,
        Outcome::Retry {
            after: None,
            reason: format!("command `{script}` exited with code 75: database busy")
        }
    );
    assert_eq!(
        run("65", "bad json").await,
        Outcome::DeadLetter {
            reason: format!("command `{script}` exited with code 65: bad json"),
            kind: FailureKind::Permanent
        }
    );
    let outcome = run("1", "").await;
    assert_eq!(
        outcome,
        Outcome::Retry {
            after: None,
            reason: format!("command `{script}` exited with code 1")
        }
    );
    assert_eq!(
        metric(
            "bosun_handler_exec_total",
            &[&format!("handler=\"{name}\""), "result=\"success\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            "bosun_handler_exec_total",
            &[&format!("handler=\"{name}\""), "result=\"failure\""]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn exit_code_mapping_is_configurable() {
    let script = fixture("exit_with.sh");
    let extra =
        "exit_codes = { \"3\" = \"drop\", \"75\" = \"dead_letter\" }\nother_exit = \"dead_letter\"";
    let name = support::unique("exec_mapped");
    let outcome = exec(&name, &[&script, "3", "seen it"], extra)
        .handle(&message("{}"))
        .await;
    assert!(
        matches!(&outcome, Outcome::Drop { reason } if reason.ends_with("seen it")),
        "{outcome:?}"
    );
    assert!(matches!(
        exec(&name, &[&script, "75"], extra)
            .handle(&message("{}"))
            .await,
        Outcome::DeadLetter { .. }
    ));
    assert!(matches!(
        exec(&name, &[&script, "9"], extra)
            .handle(&message("{}"))
            .await,
        Outcome::DeadLetter { .. }
    ));
    // Defaults that were not overridden stay.
    assert!(matches!(
        exec(&name, &[&script, "65"], extra)
            .handle(&message("{}"))
            .await,
        Outcome::DeadLetter { .. }
    ));
    assert_eq!(
        exec(&name, &[&script, "0"], extra)
            .handle(&message("{}"))
            .await,
        Outcome::Ack
    );
}

#[tokio::test]
async fn killed_by_a_signal_counts_as_another_failure() {
    let name = support::unique("exec_signal");
    let outcome = exec(&name, &[&fixture("self_kill.sh")], "")
        .handle(&message("{}"))
        .await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("killed by signal 9")),
        "{outcome:?}"
    );
    assert_eq!(
        metric(
            "bosun_handler_exec_total",
            &[&format!("handler=\"{name}\""), "result=\"signal\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn body_on_stdin_and_metadata_in_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let handler = exec(
        &support::unique("exec_env"),
        &[&fixture("record.sh"), &out.display().to_string()],
        "env = { EXTRA = \"from config\" }",
    );
    let mut msg = message(r#"{"order":42}"#);
    msg.attempt = 2;
    msg.headers
        .insert("x-tenant".into(), HeaderValue::String("acme".into()));
    assert_eq!(handler.handle(&msg).await, Outcome::Ack);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), r#"{"order":42}"#);
    let env = std::fs::read_to_string(out.with_extension("env")).unwrap();
    for line in [
        format!("BOSUN_MESSAGE_ID={}", msg.message_id.as_deref().unwrap()),
        "BOSUN_CORRELATION_ID=corr-1".into(),
        "BOSUN_ATTEMPT=2".into(),
        "BOSUN_SOURCE_QUEUE=orders.q".into(),
        "BOSUN_ROUTING_KEY=order.created".into(),
        "BOSUN_EXCHANGE=events".into(),
        "BOSUN_CONSUMER=orders".into(),
        "BOSUN_CONTENT_TYPE=application/json".into(),
        "BOSUN_HEADER_X_TENANT=acme".into(),
        "BOSUN_ENTRY_ID=".into(),
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    // `env` reaches the command too (record.sh lists BOSUN_* only, so check with a shell).
    let shell = exec(
        &support::unique("exec_env2"),
        &[
            "/bin/sh",
            "-c",
            "test \"$EXTRA\" = \"from config\" && test \"$(pwd)\" = \"$1\"",
            "sh",
            &dir.path().display().to_string(),
        ],
        &format!(
            "env = {{ EXTRA = \"from config\" }}\ncwd = \"{}\"",
            dir.path().display()
        ),
    );
    assert_eq!(shell.handle(&msg).await, Outcome::Ack);
}

#[tokio::test]
async fn timeout_kills_the_whole_group_and_reaps_it() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let name = support::unique("exec_timeout");
    let handler = exec(
        &name,
        &[&fixture("hang.sh"), &pid_file.display().to_string()],
        // Long enough for the fixture to write its pid on a loaded machine: a group killed
        // before that leaves nothing to check.
        "timeout = \"3s\"",
    );
    let outcome = tokio::time::timeout(Duration::from_secs(20), handler.handle(&message("{}")))
        .await
        .expect("the timeout holds");
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("timed out")),
        "{outcome:?}"
    );
    assert_group_gone(read_pid(&pid_file).await).await;
    assert_eq!(
        metric(
            "bosun_handler_exec_total",
            &[&format!("handler=\"{name}\""), "result=\"timeout\""]
        ),
        Some(1.0)
    );

    let dead = exec(
        &name,
        &[
            &fixture("hang.sh"),
            &dir.path().join("pid2").display().to_string(),
        ],
        "timeout = \"3s\"\non_timeout = \"dead_letter\"",
    );
    assert!(matches!(
        dead.handle(&message("{}")).await,
        Outcome::DeadLetter { .. }
    ));
    assert_group_gone(read_pid(&dir.path().join("pid2")).await).await;
}

#[tokio::test]
async fn dropping_the_handler_future_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let handler = exec(
        &support::unique("exec_drop"),
        &[&fixture("hang.sh"), &pid_file.display().to_string()],
        "timeout = \"1h\"",
    );
    let task = tokio::spawn(async move { handler.handle(&message("{}")).await });
    let pgid = read_pid(&pid_file).await;
    assert!(!group_members(pgid).is_empty());
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn processes_left_behind_by_a_finished_command_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let handler = exec(
        &support::unique("exec_leftover"),
        &[&fixture("leave_child.sh"), &pid_file.display().to_string()],
        "timeout = \"20s\"",
    );
    let outcome = tokio::time::timeout(Duration::from_secs(15), handler.handle(&message("{}")))
        .await
        .expect("does not wait for the leftover");
    assert_eq!(outcome, Outcome::Ack);
    assert_group_gone(read_pid(&pid_file).await).await;
}

#[tokio::test]
async fn megabytes_of_output_keep_only_the_stderr_tail() {
    let outcome = exec(&support::unique("exec_noisy"), &[&fixture("noisy.sh")], "")
        .handle(&message("{}"))
        .await;
    let Outcome::Retry { reason, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        reason.ends_with("last words"),
        "{}",
        &reason[reason.len().saturating_sub(100)..]
    );
    assert!(reason.len() <= 2048, "{}", reason.len());
    assert!(
        reason.starts_with(&format!(
            "command `{}` exited with code 3: ",
            fixture("noisy.sh")
        )),
        "{}",
        &reason[..100]
    );
    assert!(
        !reason.contains('o'.to_string().repeat(10).as_str()),
        "stdout never reaches the reason"
    );
}

#[tokio::test]
async fn missing_or_non_executable_command_retries_with_a_clear_reason() {
    let name = support::unique("exec_missing");
    let outcome = exec(&name, &["/nonexistent/bin/handler"], "")
        .handle(&message("{}"))
        .await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("`/nonexistent/bin/handler` not found")),
        "{outcome:?}"
    );
    assert_eq!(
        metric(
            "bosun_handler_exec_total",
            &[&format!("handler=\"{name}\""), "result=\"spawn_error\""]
        ),
        Some(1.0)
    );

    let script = fixture("not_executable.sh");
    assert!(
        !is_executable(&PathBuf::from(&script)),
        "the fixture must be committed without the execute bit"
    );
    let outcome = exec(&support::unique("exec_noexec"), &[&script], "")
        .handle(&message("{}"))
        .await;
    assert!(
        matches!(&outcome, Outcome::Retry { reason, .. } if reason.contains("is not executable")),
        "{outcome:?}"
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[test]
fn bad_options_are_config_errors_with_a_line() {
    let error = super::load_error("[handlers.job]\nkind = \"exec\"\ncommand = []\n");
    assert!(
        error.starts_with("test.toml:3:") && error.contains("must name a program"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.job]\nkind = \"exec\"\ncommand = [\"/bin/true\"]\nexit_codes = { \"256\" = \"ack\" }\n",
    );
    assert!(
        error.starts_with("test.toml:4:") && error.contains("not an exit code"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.job]\nkind = \"exec\"\ncommand = [\"/bin/true\"]\ntimeout = \"0s\"\n",
    );
    assert!(
        error.starts_with("test.toml:4:") && error.contains("longer than zero"),
        "{error}"
    );
    let error = super::load_error("[handlers.job]\nkind = \"exec\"\ncommand = \"/bin/true\"\n");
    assert!(
        error.starts_with("test.toml:3:") && error.contains("expected a sequence"),
        "{error}"
    );
    let (path, _) = super::option_error(
        "exec",
        "command = [\"/bin/true\"]\nenv = { \"A=B\" = \"x\" }",
    );
    assert_eq!(path, "env.A=B");
}
