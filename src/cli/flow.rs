//! `bosun pause`, `bosun resume` and `bosun status`: a running daemon's consumers stopped,
//! started again and listed, through its admin API (address and token from the same
//! configuration file the daemon runs).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

use super::{CliError, ConfigArg, EXIT_OK};
use crate::Runtime;

/// Time allowed for one admin request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `pause` and `resume` act on.
#[derive(clap::Args, Clone)]
pub struct TargetArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The consumer (its `[consumers.NAME]`).
    #[arg(required_unless_present = "handler", conflicts_with = "handler")]
    pub consumer: Option<String>,
    /// A handler instead: every consumer calling it (a route defers its messages for it).
    #[arg(long)]
    pub handler: Option<String>,
}

#[derive(clap::Args, Clone)]
pub struct PauseArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Resume on its own after this long ("10m"); without it, until `bosun resume`.
    #[arg(long = "for", value_parser = parse_for)]
    pub duration: Option<String>,
    /// Why, shown by `bosun status` and `/healthz?verbose`.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(clap::Args, Clone)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(clap::Args, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the admin API's JSON as it is.
    #[arg(long)]
    pub json: bool,
}

fn parse_for(text: &str) -> Result<String, crate::units::UnitError> {
    match crate::config::parse_duration(text)? {
        d if d.is_zero() => Err(crate::units::UnitError::Zero),
        _ => Ok(text.to_owned()),
    }
}

/// The admin API of the daemon the file configures.
struct Admin {
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Admin {
    fn from_config(runtime: &Runtime, arg: &ConfigArg) -> Result<Self, CliError> {
        let config = arg.load(runtime)?;
        let Some(token) = &config.http.admin_token else {
            return Err(CliError::Usage(
                "the admin API is off in this configuration: set `[http.admin] token` (or \
                 `token_env`/`token_file`) and restart the daemon"
                    .into(),
            ));
        };
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Self {
            base: format!("http://{}", reachable(config.http.admin_listen)),
            token: token.expose().to_owned(),
            client,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = response.status();
        let value: serde_json::Value = response.json().await.unwrap_or_default();
        if !status.is_success() {
            let error = value
                .get("error")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("no reason given");
            anyhow::bail!("the admin API answered {status}: {error}");
        }
        Ok(value)
    }
}

/// Where to reach a listener bound to `listen` from this host (an unspecified address
/// means every interface, loopback included).
fn reachable(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        let loopback: std::net::IpAddr = if listen.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        SocketAddr::new(loopback, listen.port())
    } else {
        listen
    }
}

/// `consumers/NAME` or `handlers/NAME`, with the name made safe for a path.
fn target(args: &TargetArgs) -> Result<String, CliError> {
    let (kind, name) = match (args.consumer.as_deref(), args.handler.as_deref()) {
        (Some(c), None) => ("consumers", c),
        (None, Some(h)) => ("handlers", h),
        _ => {
            return Err(CliError::Usage(
                "name a consumer, or a handler with --handler".into(),
            ));
        }
    };
    let encoded: String = name
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    Ok(format!("{kind}/{encoded}"))
}

pub fn pause(runtime: &Runtime, args: PauseArgs) -> Result<u8, CliError> {
    let admin = Admin::from_config(runtime, &args.target.config)?;
    let target = target(&args.target)?;
    let mut body = serde_json::Map::new();
    if let Some(d) = &args.duration {
        body.insert("for".into(), d.clone().into());
    }
    let reason = args
        .reason
        .unwrap_or_else(|| "paused with `bosun pause`".into());
    body.insert("reason".into(), reason.into());
    let path = format!("/admin/{target}/pause");
    super::block_on(admin.call(reqwest::Method::POST, &path, Some(body.into())))??;
    match &args.duration {
        Some(d) => println!("{target} paused for {d}"),
        None => println!("{target} paused until resumed"),
    }
    Ok(EXIT_OK)
}

pub fn resume(runtime: &Runtime, args: ResumeArgs) -> Result<u8, CliError> {
    let admin = Admin::from_config(runtime, &args.target.config)?;
    let target = target(&args.target)?;
    let path = format!("/admin/{target}/resume");
    let answer = super::block_on(admin.call(reqwest::Method::POST, &path, None))??;
    let was = answer
        .get("was_paused")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    if was {
        println!("{target} resumed");
    } else {
        println!("{target} was not paused");
    }
    Ok(EXIT_OK)
}

pub fn status(runtime: &Runtime, args: StatusArgs) -> Result<u8, CliError> {
    let admin = Admin::from_config(runtime, &args.config)?;
    let status = super::block_on(admin.call(reqwest::Method::GET, "/admin/status", None))??;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Ok(EXIT_OK);
    }
    print!("{}", render(&status));
    Ok(EXIT_OK)
}

/// The status as two tables: consumers, then handlers with flow control.
fn render(status: &serde_json::Value) -> String {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:<8} {:<10} {:>9}  {}\n",
        "CONSUMER", "STATE", "BREAKER", "IN FLIGHT", "WHY"
    ));
    if let Some(consumers) = status["consumers"].as_object() {
        for (name, c) in consumers {
            out.push_str(&format!(
                "{:<28} {:<8} {:<10} {:>9}  {}\n",
                format!("consumer:{name}"),
                text(&c["state"]),
                text(&c["breaker"]),
                text(&c["in_flight"]),
                text(&c["stopped"]),
            ));
        }
    }
    out.push_str(&format!(
        "\n{:<28} {:<10} {:>8} {:>10} {:>10}  {}\n",
        "HANDLER", "BREAKER", "OPEN S", "RATE/S", "THROTTLE S", "PAUSED"
    ));
    if let Some(handlers) = status["handlers"].as_object() {
        for (name, h) in handlers {
            out.push_str(&format!(
                "{:<28} {:<10} {:>8} {:>10} {:>10}  {}\n",
                name,
                text(&h["breaker"]),
                text(&h["open_for_s"]),
                text(&h["rate_limit_per_second"]),
                text(&h["throttled_for_s"]),
                text(&h["paused"]["reason"]),
            ));
        }
    }
    out
}
