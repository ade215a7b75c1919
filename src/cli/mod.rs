//! The `bosun` command line: `run`, `check`, `version`, and the operational commands of the
//! other modules.
//!
//! Exit codes follow sysexits: 0 ok, 64 bad command line, 78 configuration error, 1 other.

mod check;
mod dlq;
mod flow;
mod inbox;
mod outbox;
mod pid_file;
mod probe;
mod publish;
mod reload;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::Runtime;
use crate::config::ConfigError;

pub(crate) const EXIT_OK: u8 = 0;
pub(crate) const EXIT_FAILURE: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 64;
pub(crate) const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "bosun",
    version,
    about = "A message worker daemon: consumers, retries, dead letters and outbox relays for RabbitMQ, Redis Streams and PostgreSQL."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config`, shared by every command that reads the file.
#[derive(clap::Args, Clone)]
pub(crate) struct ConfigArg {
    /// Path of the TOML configuration file.
    #[arg(
        long,
        short = 'c',
        env = "BOSUN_CONFIG",
        default_value = "/etc/bosun/bosun.toml"
    )]
    pub config: PathBuf,
    /// Accept a config file that its group or other users may write (refused by default:
    /// whoever can write it chooses what bosun runs).
    #[arg(long)]
    pub allow_insecure_config: bool,
}

impl ConfigArg {
    /// Checks the file's permissions (unless allowed otherwise), then loads it.
    pub fn load(&self, runtime: &Runtime) -> Result<crate::config::Config, CliError> {
        if !self.allow_insecure_config {
            crate::config::check_permissions(&self.config)?;
        }
        Ok(runtime.load(&self.config)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Also reload when the config file changes (checked every second), as on SIGHUP.
        #[arg(long)]
        watch_config: bool,
    },
    /// Validate the configuration and print what would run; warnings go to stderr.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Treat secrets that cannot be read (an unset `${VAR}` without default, an unset
        /// token variable, a missing token file) as errors, as `bosun run` does.
        #[arg(long)]
        strict: bool,
    },
    /// Dead-letter archive: schema, migrate, list, groups, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Publish one message with confirms and print its message id.
    Publish(Box<publish::PublishArgs>),
    /// Print every exchange, queue and binding the amqp consumers need; `--apply` declares them.
    Topology(topology::TopologyArgs),
    /// Print the version.
    Version,
    /// Ask a running daemon to reload its configuration (sends SIGHUP).
    Reload(reload::ReloadArgs),
    /// GET a health endpoint; exit 0 on HTTP 200 (for container health checks).
    Probe(probe::ProbeArgs),
    /// Stop a running daemon's consumer (or every consumer of a handler) from fetching.
    Pause(flow::PauseArgs),
    /// Let a paused consumer (or handler) fetch again.
    Resume(flow::ResumeArgs),
    /// Show a running daemon's consumers: state, breaker, in flight, why stopped.
    Status(flow::StatusArgs),
    /// Outbox tables: print or apply their DDL.
    #[command(subcommand)]
    Outbox(outbox::OutboxCommand),
    /// Inboxes: print their DDL, show or forget one consumer's record of a key.
    #[command(subcommand)]
    Inbox(inbox::InboxCommand),
}

/// A command's failure, mapped to an exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// The binary's entry point, with the default runtime.
pub fn main() -> ExitCode {
    main_with(Runtime::builder().build())
}

/// The binary's entry point for a program that registered its own handler kinds.
pub fn main_with(runtime: Runtime) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    let result = match cli.command {
        Command::Version => {
            println!("bosun {}", env!("CARGO_PKG_VERSION"));
            Ok(EXIT_OK)
        }
        Command::Check { config, strict } => check::check(&runtime, &config, strict),
        Command::Dlq { command } => dlq::run(&runtime, command),
        Command::Run {
            config,
            watch_config,
        } => run(runtime, &config, watch_config),
        Command::Reload(args) => reload::reload(&args),
        Command::Probe(args) => probe::probe(&args),
        Command::Outbox(command) => outbox::run(&runtime, command),
        Command::Inbox(command) => inbox::run(&runtime, command),
        Command::Publish(args) => publish::publish(&runtime, *args),
        Command::Topology(args) => topology::topology(&runtime, args),
        Command::Pause(args) => flow::pause(&runtime, args),
        Command::Resume(args) => flow::resume(&runtime, args),
        Command::Status(args) => flow::status(&runtime, args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Config(e)) => {
            eprintln!("configuration error:\n{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(CliError::Usage(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(CliError::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Runs an async command on a fresh multi-threaded runtime.
pub(crate) fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, CliError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(future))
}

fn run(runtime: Runtime, config_arg: &ConfigArg, watch_config: bool) -> Result<u8, CliError> {
    let path = config_arg.config.as_path();
    let config = config_arg.load(&runtime)?;
    // Reloads read the file again: they check it the same way.
    crate::config::enforce_permissions(!config_arg.allow_insecure_config);
    // Taken before logging starts or anything runs: a second daemon on the same pid file
    // stops here and leaves the first one's file alone.
    let pid_file = match &config.service.pid_file {
        Some(file) => Some(pid_file::PidFile::acquire(file)?),
        None => None,
    };
    crate::telemetry::init_logging(
        config.service.log_format,
        &config.service.log_level,
        &config.tracing,
        &config.service.name,
    )
    .map_err(|e| CliError::Other(e.into()))?;
    let result = block_on(async move {
        // Signal handlers go in before anything starts, so an early SIGTERM drains cleanly.
        let signals = crate::supervisor::os_signals()
            .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        let signals = if watch_config {
            use futures::StreamExt as _;
            let watcher =
                crate::reload::watch_file(path.to_path_buf(), std::time::Duration::from_secs(1));
            futures::stream::select(signals, watcher).boxed()
        } else {
            futures::StreamExt::boxed(signals)
        };
        // READY=1 goes out from the supervisor, after the handlers above are installed, so
        // a SIGHUP from `systemctl reload` never meets the default action (termination).
        let notify = Box::new(crate::systemd::SystemdNotify::from_env());
        let status = runtime
            .run_with(config, Some(path.to_path_buf()), signals, notify)
            .await?;
        Ok::<u8, CliError>(status.code() as u8)
    });
    // Removed only by its holder, while the lock is still held.
    drop(pid_file);
    result?
}
