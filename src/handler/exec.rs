//! `kind = "exec"`: runs a command per message, body on stdin, metadata in `BOSUN_*`
//! environment variables, and maps its exit status to an outcome.
//!
//! The command runs without a shell, in a process group of its own, so that on a timeout, on
//! exit, and when the handler is dropped at shutdown the whole group (children of children
//! included) is killed with SIGKILL and the command itself is reaped. Output is read as it
//! comes: stdout is discarded, only the last 2 KiB of stderr are kept (the failure reason), so
//! a command writing megabytes costs no memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::outcome_map::{MAX_REASON_BYTES, OutcomeName, numeric_keys, tail_text};
use super::{
    BuildContext, Handler, HandlerFactory, HandlerKind, Message, OptionError, Outcome,
    max_concurrency_option, parse_options, timeout_option,
};

/// EX_DATAERR from sysexits.h: the input was bad; dead-letter by default.
pub const EXIT_DATAERR: i32 = 65;
/// EX_TEMPFAIL from sysexits.h: try again later; retry by default.
pub const EXIT_TEMPFAIL: i32 = 75;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_CONCURRENCY: usize = 8;

/// `[handlers.NAME]` with `kind = "exec"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecOptions {
    /// The program and its arguments, e.g. `["/usr/local/bin/ingest", "--strict"]`. No shell
    /// is involved: no globbing, no `$VAR` expansion at run time (`${VAR}` in the file is
    /// interpolated at load time like everywhere else).
    command: Vec<String>,
    /// Extra environment variables for the command.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Which of bosun's own environment variables the command inherits: `"allowlist"`
    /// (default: `PATH`, `HOME`, `USER`, `LOGNAME`, `LANG`, `LANGUAGE`, `LC_*`, `TZ`,
    /// `TMPDIR`, `SSL_CERT_FILE`, `SSL_CERT_DIR`), `"all"` (or `true`), or `"none"` (or
    /// `false`). Whatever the choice, variables the configuration itself reads (`${VAR}`,
    /// `token_env`, `BOSUN__*` overrides) are never inherited: they hold bosun's secrets.
    /// Pass one on deliberately with `env = { NAME = "${NAME}" }`.
    inherit_env: Option<InheritEnvOption>,
    /// Working directory of the command. Default: bosun's.
    cwd: Option<String>,
    /// Time the command may run before its process group is killed. Default `"30s"`.
    timeout: Option<String>,
    /// Commands running at once through this handler, across every consumer using it.
    /// Default 8.
    max_concurrency: Option<usize>,
    /// Outcome per exit code, over the defaults `{ "0" = "ack", "65" = "dead_letter",
    /// "75" = "retry" }`. Values: `ack`, `retry`, `dead_letter`, `drop`.
    #[serde(default)]
    exit_codes: BTreeMap<String, OutcomeName>,
    /// Outcome of any other exit code, and of a command killed by a signal. Default `retry`.
    other_exit: Option<OutcomeName>,
    /// Outcome when the command runs past `timeout`. Default `retry`.
    on_timeout: Option<OutcomeName>,
}

/// `inherit_env` as written: a mode, or a boolean for `all` / `none`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InheritEnvOption {
    Flag(bool),
    Mode(String),
}

/// Which of bosun's environment variables a command inherits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InheritEnv {
    /// The non-secret basics a program expects (see [`ALLOWED_ENV`]).
    Allowlist,
    /// Everything but what the configuration read.
    All,
    /// Nothing.
    None,
}

/// Variables inherited by default: what programs need to find binaries, files and locale,
/// never credentials. `LC_*` variables are allowed too.
pub const ALLOWED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

impl InheritEnv {
    /// Whether a command inherits bosun's variable `name` in this mode.
    pub fn passes(self, name: &str) -> bool {
        let allowed = match self {
            InheritEnv::None => false,
            InheritEnv::All => true,
            InheritEnv::Allowlist => ALLOWED_ENV.contains(&name) || name.starts_with("LC_"),
        };
        allowed && !crate::secret::env_read_by_config(name)
    }
}

/// Validated options.
struct ExecSettings {
    program: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    inherit_env: InheritEnv,
    cwd: Option<PathBuf>,
    timeout: Duration,
    max_concurrency: usize,
    exit_codes: BTreeMap<i32, OutcomeName>,
    other_exit: OutcomeName,
    on_timeout: OutcomeName,
}

pub(super) struct ExecKind;

impl HandlerKind for ExecKind {
    fn parse(
        &self,
        _name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError> {
        let options: ExecOptions = parse_options(options)?;
        Ok(Arc::new(ExecFactory {
            settings: Arc::new(settings(options)?),
        }))
    }
}

fn settings(o: ExecOptions) -> Result<ExecSettings, OptionError> {
    let mut command = o.command.into_iter();
    let program = match command.next() {
        Some(program) if !program.trim().is_empty() => program,
        Some(_) => {
            return Err(OptionError::new(
                &["command", "0"],
                "the program name must not be empty",
            ));
        }
        None => {
            return Err(OptionError::new(
                &["command"],
                "must name a program, e.g. [\"/usr/local/bin/handle\"]",
            ));
        }
    };
    let args: Vec<String> = command.collect();
    for (i, arg) in args.iter().enumerate() {
        if arg.contains('\0') {
            return Err(OptionError::new(
                &["command", &(i + 1).to_string()],
                "arguments cannot hold NUL characters",
            ));
        }
    }
    for (name, value) in &o.env {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(OptionError::new(
                &["env", name],
                "environment variable names cannot be empty or hold `=` or NUL",
            ));
        }
        if value.contains('\0') {
            return Err(OptionError::new(
                &["env", name],
                "environment variable values cannot hold NUL characters",
            ));
        }
    }
    let inherit_env = match o.inherit_env {
        None => InheritEnv::Allowlist,
        Some(InheritEnvOption::Flag(true)) => InheritEnv::All,
        Some(InheritEnvOption::Flag(false)) => InheritEnv::None,
        Some(InheritEnvOption::Mode(mode)) => match mode.as_str() {
            "allowlist" => InheritEnv::Allowlist,
            "all" => InheritEnv::All,
            "none" => InheritEnv::None,
            other => {
                return Err(OptionError::new(
                    &["inherit_env"],
                    format!("unknown value `{other}`, expected `allowlist`, `all` or `none`"),
                ));
            }
        },
    };
    let timeout = timeout_option(o.timeout.as_deref(), DEFAULT_TIMEOUT)?;
    let max_concurrency = max_concurrency_option(o.max_concurrency, DEFAULT_MAX_CONCURRENCY)?;
    let mut exit_codes: BTreeMap<i32, OutcomeName> = [
        (0, OutcomeName::Ack),
        (EXIT_DATAERR, OutcomeName::DeadLetter),
        (EXIT_TEMPFAIL, OutcomeName::Retry),
    ]
    .into();
    exit_codes.extend(numeric_keys(
        "exit_codes",
        &o.exit_codes,
        0..=255,
        "an exit code",
    )?);
    Ok(ExecSettings {
        program,
        args,
        env: o.env,
        inherit_env,
        cwd: o.cwd.map(PathBuf::from),
        timeout,
        max_concurrency,
        exit_codes,
        other_exit: o.other_exit.unwrap_or(OutcomeName::Retry),
        on_timeout: o.on_timeout.unwrap_or(OutcomeName::Retry),
    })
}

struct ExecFactory {
    settings: Arc<ExecSettings>,
}

impl HandlerFactory for ExecFactory {
    fn build(&self, ctx: &BuildContext<'_>) -> anyhow::Result<Arc<dyn Handler>> {
        Ok(Arc::new(ExecHandler {
            name: ctx.name.to_owned(),
            permits: Semaphore::new(self.settings.max_concurrency),
            settings: self.settings.clone(),
        }))
    }
}

/// The `exec` handler.
pub struct ExecHandler {
    name: String,
    settings: Arc<ExecSettings>,
    permits: Semaphore,
}

/// How one run ended, for the `result` label and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunResult {
    /// Exit code 0.
    Success,
    /// Any other exit code.
    Failure,
    /// Killed by a signal bosun did not send.
    Signal,
    /// Ran past `timeout`; bosun killed its process group.
    Timeout,
    /// Could not be started (missing, not executable, bad `cwd`).
    SpawnError,
}

impl RunResult {
    fn label(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Signal => "signal",
            RunResult::Timeout => "timeout",
            RunResult::SpawnError => "spawn_error",
        }
    }
}

/// Why a command could not be started.
#[derive(Debug, thiserror::Error)]
enum SpawnError {
    #[error("command `{program}` not found (or `cwd` does not exist): {source}")]
    NotFound {
        program: String,
        source: std::io::Error,
    },
    #[error("command `{program}` is not executable: {source}")]
    NotExecutable {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot start command `{program}`: {source}")]
    Other {
        program: String,
        source: std::io::Error,
    },
}

impl SpawnError {
    fn new(program: &str, source: std::io::Error) -> Self {
        let program = program.to_owned();
        match source.kind() {
            std::io::ErrorKind::NotFound => SpawnError::NotFound { program, source },
            std::io::ErrorKind::PermissionDenied => SpawnError::NotExecutable { program, source },
            _ => SpawnError::Other { program, source },
        }
    }
}

impl ExecHandler {
    fn command(&self, message: &Message) -> tokio::process::Command {
        let s = &self.settings;
        let mut command = tokio::process::Command::new(&s.program);
        command
            .args(&s.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own: one signal reaches everything the command started.
            .process_group(0)
            .kill_on_drop(true);
        command.env_clear();
        command.envs(inherited_env(s.inherit_env));
        command.envs(&s.env);
        command.envs(bosun_env(message, &self.name));
        // The W3C names for environment carriers: the command continues the message's trace.
        for (name, value) in crate::trace_context::current_headers() {
            command.env(name.to_ascii_uppercase(), value);
        }
        if let Some(cwd) = &s.cwd {
            command.current_dir(cwd);
        }
        command
    }

    async fn run(&self, message: &Message) -> (Outcome, RunResult) {
        let s = &self.settings;
        // The semaphore is never closed, so acquiring only waits.
        let Ok(_permit) = self.permits.acquire().await else {
            return (
                Outcome::retry("the handler is shutting down"),
                RunResult::SpawnError,
            );
        };
        let mut child = match self.command(message).spawn() {
            Ok(child) => child,
            Err(e) => {
                // A missing or broken command is a deployment problem, not the message's:
                // retrying keeps the message until it is fixed.
                let error = SpawnError::new(&s.program, e);
                return (Outcome::retry(error.to_string()), RunResult::SpawnError);
            }
        };
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut group = Group::new(child);

        let body = message.body.clone();
        let write = async move {
            if let Some(mut stdin) = stdin {
                // A command that exits without reading its input is its own business.
                let _ = stdin.write_all(&body).await;
            }
        };
        let mut stdout_bytes = 0u64;
        let mut stderr_tail = Tail::new(MAX_REASON_BYTES);
        let finished = {
            let exited = async {
                let status = group.wait().await;
                // Whatever the command left behind would hold the pipes open.
                group.kill_rest();
                status
            };
            let run = async {
                let (status, (), (), ()) = tokio::join!(
                    exited,
                    write,
                    drain(stdout, &mut stdout_bytes),
                    stderr_tail.fill(stderr)
                );
                status
            };
            tokio::time::timeout(s.timeout, run).await
        };
        // A command may print what it was given (a token in a URL, an Authorization line).
        let tail = crate::redact::text(&tail_text(stderr_tail.bytes())).into_owned();
        let with_stderr = |head: String| {
            // The end of stderr says most: cut from its start to fit the reason's limit.
            let room = MAX_REASON_BYTES.saturating_sub(head.len() + 2);
            match crate::text::tail(&tail, room) {
                "" => head,
                kept => format!("{head}: {kept}"),
            }
        };
        match finished {
            Err(_) => {
                group.kill_and_reap().await;
                let reason = with_stderr(format!(
                    "command `{}` timed out after {:?}; its process group was killed",
                    s.program, s.timeout
                ));
                (s.on_timeout.outcome(reason, None), RunResult::Timeout)
            }
            Ok(Err(e)) => (
                Outcome::retry(format!("cannot wait for command `{}`: {e}", s.program)),
                RunResult::Failure,
            ),
            Ok(Ok(status)) => {
                if stdout_bytes > 0 || stderr_tail.total > MAX_REASON_BYTES as u64 {
                    tracing::debug!(handler = %self.name, stdout_bytes, stderr_bytes = stderr_tail.total, "command output discarded beyond the kept stderr tail");
                }
                self.exit_outcome(status, with_stderr)
            }
        }
    }

    fn exit_outcome(
        &self,
        status: ExitStatus,
        with_stderr: impl Fn(String) -> String,
    ) -> (Outcome, RunResult) {
        use std::os::unix::process::ExitStatusExt as _;
        let s = &self.settings;
        match status.code() {
            Some(code) => {
                let mapped = s.exit_codes.get(&code).copied().unwrap_or(s.other_exit);
                let result = if code == 0 {
                    RunResult::Success
                } else {
                    RunResult::Failure
                };
                (
                    mapped.outcome(
                        with_stderr(format!("command `{}` exited with code {code}", s.program)),
                        None,
                    ),
                    result,
                )
            }
            None => {
                let signal = status.signal().unwrap_or(0);
                (
                    s.other_exit.outcome(
                        with_stderr(format!(
                            "command `{}` was killed by signal {signal}",
                            s.program
                        )),
                        None,
                    ),
                    RunResult::Signal,
                )
            }
        }
    }
}

#[async_trait]
impl Handler for ExecHandler {
    async fn handle(&self, message: &Message) -> Outcome {
        let started = Instant::now();
        let (outcome, result) = self.run(message).await;
        let elapsed = started.elapsed();
        metrics::counter!("bosun_handler_exec_total", "handler" => self.name.clone(), "result" => result.label()).increment(1);
        let message_id = message.message_id.as_deref().unwrap_or("");
        let result = result.label();
        match &outcome {
            Outcome::Ack => {
                tracing::debug!(handler = %self.name, message_id, result, elapsed_ms = elapsed.as_millis() as u64, "command succeeded")
            }
            Outcome::Retry { reason, .. }
            | Outcome::DeadLetter { reason, .. }
            | Outcome::Drop { reason }
            | Outcome::Release { reason }
            | Outcome::Defer { reason, .. } => {
                tracing::warn!(handler = %self.name, message_id, result, outcome = outcome.label(), reason = %reason, "command failed")
            }
        }
        outcome
    }
}

/// bosun's own variables a command inherits under `mode`.
pub fn inherited_env(mode: InheritEnv) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    if mode == InheritEnv::None {
        return Vec::new();
    }
    std::env::vars_os()
        .filter(|(name, _)| name.to_str().is_some_and(|name| mode.passes(name)))
        .collect()
}

/// The `BOSUN_*` variables. Each is always set (empty when the message has no such value),
/// so that a value inherited from bosun's own environment never passes for the message's.
fn bosun_env(message: &Message, handler: &str) -> Vec<(String, String)> {
    let text = |v: Option<&str>| v.unwrap_or("").replace('\0', "");
    let source = &message.source;
    // Owned once here, so that each name stays a literal on one line.
    let mut env: Vec<(String, String)> = [
        ("BOSUN_HANDLER", text(Some(handler))),
        ("BOSUN_MESSAGE_ID", text(message.message_id.as_deref())),
        (
            "BOSUN_CORRELATION_ID",
            text(message.correlation_id.as_deref()),
        ),
        ("BOSUN_CONTENT_TYPE", text(message.content_type.as_deref())),
        ("BOSUN_ATTEMPT", message.attempt.to_string()),
        ("BOSUN_REDELIVERED", message.redelivered.to_string()),
        ("BOSUN_BROKER", text(Some(&source.broker))),
        ("BOSUN_CONSUMER", text(Some(&source.consumer))),
        ("BOSUN_SOURCE_QUEUE", text(Some(&source.queue))),
        ("BOSUN_EXCHANGE", text(source.exchange.as_deref())),
        ("BOSUN_ROUTING_KEY", text(source.routing_key.as_deref())),
        ("BOSUN_ENTRY_ID", text(source.entry_id.as_deref())),
        (
            "BOSUN_INBOX_KEY",
            text(message.inbox.as_ref().map(|c| c.key.as_str())),
        ),
        (
            "BOSUN_INBOX_TOKEN",
            text(message.inbox.as_ref().map(|c| c.token.as_str())),
        ),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    for (name, value) in &message.headers {
        let Some(value) = value.as_text().filter(|v| !v.contains('\0')) else {
            continue;
        };
        env.push((header_env_name(name), value));
    }
    env
}

/// `x-tenant.id` -> `BOSUN_HEADER_X_TENANT_ID`.
pub fn header_env_name(header: &str) -> String {
    let mapped: String = header
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("BOSUN_HEADER_{mapped}")
}

/// Reads a pipe to its end, counting and discarding.
async fn drain(pipe: Option<impl AsyncRead + Unpin>, total: &mut u64) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        *total += n as u64;
    }
}

/// The last `cap` bytes of a stream.
struct Tail {
    buf: Vec<u8>,
    cap: usize,
    total: u64,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(2 * cap),
            cap,
            total: 0,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        self.buf.extend_from_slice(data);
        // Trim in bulk, not per write: the buffer stays under twice the cap.
        if self.buf.len() > 2 * self.cap {
            self.buf.drain(..self.buf.len() - self.cap);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.buf.len().saturating_sub(self.cap)..]
    }

    async fn fill(&mut self, pipe: Option<impl AsyncRead + Unpin>) {
        let Some(mut pipe) = pipe else { return };
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf).await {
            if n == 0 {
                break;
            }
            self.push(&buf[..n]);
        }
    }
}

/// The running command and its process group. Dropping it (the handler future dropped at
/// shutdown) kills the group and leaves the reaping to the runtime, so nothing lingers.
struct Group {
    child: Option<tokio::process::Child>,
    pgid: Option<nix::unistd::Pid>,
    reaped: bool,
}

impl Group {
    fn new(child: tokio::process::Child) -> Self {
        // The child leads its own group (`process_group(0)`): its pid is the group id.
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw);
        Self {
            child: Some(child),
            pgid,
            reaped: false,
        }
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            return Err(std::io::Error::other("the command was already reaped"));
        };
        let status = child.wait().await;
        if status.is_ok() {
            self.reaped = true;
        }
        status
    }

    /// SIGKILL to every process still in the group.
    fn kill_rest(&self) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is empty) is the common case.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    async fn kill_and_reap(&mut self) {
        self.kill_rest();
        if !self.reaped
            && let Some(child) = self.child.as_mut()
        {
            let _ = child.wait().await;
            self.reaped = true;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        self.kill_rest();
        if let Some(mut child) = self.child.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = child.wait().await;
            });
        }
        // Without a runtime the child is dropped with `kill_on_drop`, which hands it to
        // tokio's own reaper.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_only_the_last_bytes() {
        let mut tail = Tail::new(4);
        for chunk in [&b"abc"[..], b"defgh", b"ij", b"klmnopqrstuvwxyz"] {
            tail.push(chunk);
            assert!(tail.buf.len() <= 8);
        }
        assert_eq!(tail.bytes(), b"wxyz");
        assert_eq!(tail.total, 26);
    }

    #[test]
    fn only_allowed_variables_pass_by_default_and_config_reads_never() {
        crate::secret::note_env_read("EXEC_TEST_READ_BY_CONFIG");
        for name in ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"] {
            assert!(InheritEnv::Allowlist.passes(name), "{name}");
        }
        for name in [
            "DATABASE_URL",
            "AWS_SECRET_ACCESS_KEY",
            "BOSUN__HTTP__LISTEN",
            "RUST_LOG",
        ] {
            assert!(!InheritEnv::Allowlist.passes(name), "{name}");
        }
        assert!(InheritEnv::All.passes("AWS_REGION"));
        for mode in [InheritEnv::Allowlist, InheritEnv::All, InheritEnv::None] {
            assert!(!mode.passes("EXEC_TEST_READ_BY_CONFIG"), "{mode:?}");
            assert!(!mode.passes("BOSUN__DATABASES__MAIN__URL"), "{mode:?}");
        }
        assert!(!InheritEnv::None.passes("PATH"));
    }

    #[test]
    fn inherit_env_takes_a_mode_or_a_boolean() {
        let parse = |value: &str| {
            let table: toml::Table =
                toml::from_str(&format!("command = [\"/bin/true\"]\n{value}")).unwrap();
            let options: ExecOptions = parse_options(&table).unwrap();
            settings(options).map(|s| s.inherit_env)
        };
        assert_eq!(parse("").ok(), Some(InheritEnv::Allowlist));
        assert_eq!(parse("inherit_env = true").ok(), Some(InheritEnv::All));
        assert_eq!(parse("inherit_env = false").ok(), Some(InheritEnv::None));
        assert_eq!(parse("inherit_env = \"all\"").ok(), Some(InheritEnv::All));
        assert_eq!(
            parse("inherit_env = \"allowlist\"").ok(),
            Some(InheritEnv::Allowlist)
        );
        assert!(parse("inherit_env = \"some\"").is_err());
    }

    #[test]
    fn header_names_become_env_names() {
        assert_eq!(header_env_name("x-tenant.id"), "BOSUN_HEADER_X_TENANT_ID");
    }
}
