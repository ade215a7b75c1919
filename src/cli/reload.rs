//! `bosun reload`: ask a running daemon to reload its configuration (SIGHUP).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{CliError, EXIT_OK};

/// Which daemon to signal.
#[derive(clap::Args, Clone)]
#[group(required = true, multiple = false)]
pub struct ReloadArgs {
    /// The daemon's pid file (`[service].pid_file`).
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// The daemon's configuration file: its `[service].pid_file` names the daemon.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's process id.
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
}

pub fn reload(args: &ReloadArgs) -> Result<u8, CliError> {
    let from_config = match &args.config {
        Some(config) => Some(pid_file_of(config)?),
        None => None,
    };
    let pid_file = args.pid_file.clone().or(from_config);
    let (pid, origin) = match (&pid_file, args.pid) {
        (Some(file), None) => (read_pid_file(file)?, format!(" (from {})", file.display())),
        (None, Some(pid)) => (pid, String::new()),
        // clap's argument group already refuses these; kept for callers that build the
        // arguments themselves.
        _ => {
            return Err(CliError::Usage(
                "give exactly one of --pid-file FILE or --pid PID".into(),
            ));
        }
    };
    // 0 and negative ids address process groups: `kill -HUP 0` would hit this very shell's
    // group. Only a single positive pid is ever signalled.
    if pid <= 0 {
        let message = format!("process id {pid}{origin} does not name a single process");
        return Err(if args.pid.is_some() {
            CliError::Usage(message)
        } else {
            CliError::Other(anyhow::anyhow!(message))
        });
    }
    check_is_bosun(pid, &origin)?;
    match kill(Pid::from_raw(pid), Signal::SIGHUP) {
        Ok(()) => {
            println!("sent SIGHUP to process {pid}{origin}; the daemon logs the reload's result");
            Ok(EXIT_OK)
        }
        Err(Errno::ESRCH) => Err(CliError::Other(anyhow::anyhow!(
            "process {pid}{origin} is not running (a stale pid file? is bosun running?)"
        ))),
        Err(Errno::EPERM) => Err(CliError::Other(anyhow::anyhow!(
            "not permitted to signal process {pid}{origin}; run as the daemon's user or root"
        ))),
        Err(e) => Err(CliError::Other(anyhow::anyhow!(
            "cannot signal process {pid}{origin}: {e}"
        ))),
    }
}

/// `[service].pid_file` of the configuration at `config` (a `BOSUN__SERVICE__PID_FILE`
/// override wins). Only that key is read: reloading needs no secrets.
fn pid_file_of(config: &Path) -> Result<PathBuf, CliError> {
    if let Ok(file) = std::env::var(format!("{}SERVICE__PID_FILE", crate::config::ENV_PREFIX)) {
        return Ok(PathBuf::from(file));
    }
    let text = std::fs::read_to_string(config).map_err(|e| {
        CliError::Other(anyhow::anyhow!(
            "cannot read the config file {}: {e}",
            config.display()
        ))
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        CliError::Usage(format!(
            "{} is not valid TOML: {}",
            config.display(),
            e.message().trim()
        ))
    })?;
    let file = table
        .get("service")
        .and_then(|s| s.get("pid_file"))
        .and_then(toml::Value::as_str)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{} sets no `[service].pid_file`; give --pid-file or --pid",
                config.display()
            ))
        })?;
    let file = crate::config::interpolate(file, &|name| std::env::var(name).ok())
        .map_err(|e| CliError::Usage(format!("`[service].pid_file`: {e}")))?;
    Ok(PathBuf::from(file))
}

fn read_pid_file(file: &Path) -> Result<i32, CliError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            " (is bosun running, with `[service].pid_file` set to this path?)"
        } else {
            ""
        };
        CliError::Other(anyhow::anyhow!(
            "cannot read the pid file {}: {e}{hint}",
            file.display()
        ))
    })?;
    let trimmed = text.trim();
    trimmed.parse::<i32>().map_err(|_| {
        CliError::Other(anyhow::anyhow!(
            "the pid file {} does not hold a process id (it holds {:?})",
            file.display(),
            truncate(trimmed, 40)
        ))
    })
}

/// A stale pid file may name a process id that now belongs to another program, for which
/// SIGHUP usually means "terminate". Where `/proc` tells, refuse unless that process runs the
/// same program as this command.
fn check_is_bosun(pid: i32, origin: &str) -> Result<(), CliError> {
    let Ok(ours) = std::fs::read_to_string("/proc/self/comm") else {
        return Ok(());
    };
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(theirs) if theirs.trim() == ours.trim() => Ok(()),
        Ok(theirs) => Err(CliError::Other(anyhow::anyhow!(
            "process {pid}{origin} is `{}`, not `{}`; the pid file is stale or names another program, so no signal was sent",
            theirs.trim(),
            ours.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(CliError::Other(anyhow::anyhow!(
                "process {pid}{origin} is not running (a stale pid file? is bosun running?)"
            )))
        }
        // Hidden by /proc mount options: let kill() decide.
        Err(_) => Ok(()),
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}
