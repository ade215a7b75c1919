//! `bosun probe`: GET a health endpoint and exit 0 only on HTTP 200.
//!
//! Container images built from `debian:*-slim` have no curl; this lets a Docker HEALTHCHECK
//! (or any exec probe) use the binary that is already there. The listener speaks plain
//! HTTP/1.1, so a minimal client over a TCP stream is all it takes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{CliError, EXIT_FAILURE, EXIT_OK};

/// The response is read up to this size: a health answer is a few bytes.
const MAX_RESPONSE: u64 = 64 * 1024;

#[derive(clap::Args, Clone)]
pub struct ProbeArgs {
    /// The URL to GET; only `http://` (the listener has no TLS).
    #[arg(
        long,
        env = "BOSUN_PROBE_URL",
        default_value = "http://127.0.0.1:9090/healthz"
    )]
    pub url: String,
    /// Time allowed for connecting and for the whole answer ("5s", "500ms").
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// Why a probe got no usable answer, or could not ask; the text is what it prints.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Timeout(#[from] crate::units::UnitError),
    #[error("the timeout must be above zero")]
    ZeroTimeout,
    #[error("invalid --url {url:?}: {source}")]
    Url {
        url: String,
        source: url::ParseError,
    },
    #[error("invalid --url {0:?}: only http:// is supported (the listener has no TLS)")]
    NotHttp(String),
    #[error("invalid --url {0:?}: no host")]
    NoHost(String),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    NoAnswer(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("cannot send the request: {0}")]
    Send(std::io::Error),
    #[error("cannot read the answer: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Answer(#[from] NotAnAnswer),
}

/// A reply that is not HTTP: its first line, cut to 80 characters.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("not an HTTP answer: {0:?}")]
struct NotAnAnswer(String);

fn parse_timeout(text: &str) -> Result<Duration, ProbeError> {
    match crate::config::parse_duration(text)? {
        d if d.is_zero() => Err(ProbeError::ZeroTimeout),
        d => Ok(d),
    }
}

pub fn probe(args: &ProbeArgs) -> Result<u8, CliError> {
    let target = Target::parse(&args.url).map_err(|e| CliError::Usage(e.to_string()))?;
    let url = args.url.clone();
    let timeout = args.timeout;
    let outcome = super::block_on(async move {
        match tokio::time::timeout(timeout, get(&target)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::NoAnswer(timeout)),
        }
    })?;
    match outcome {
        Ok((200, _)) => {
            println!("{url}: 200");
            Ok(EXIT_OK)
        }
        Ok((status, body)) => {
            eprintln!("{url}: {status} {}", body.trim());
            Ok(EXIT_FAILURE)
        }
        Err(e) => {
            eprintln!("{url}: {e}");
            Ok(EXIT_FAILURE)
        }
    }
}

/// Where to connect and what to ask for.
struct Target {
    host: url::Host<String>,
    port: u16,
    /// Value of the `Host` header.
    authority: String,
    /// Path and query.
    request_target: String,
}

impl Target {
    fn parse(text: &str) -> Result<Self, ProbeError> {
        let url = url::Url::parse(text).map_err(|source| ProbeError::Url {
            url: text.to_owned(),
            source,
        })?;
        if url.scheme() != "http" {
            return Err(ProbeError::NotHttp(text.to_owned()));
        }
        let host = url
            .host()
            .map(|h| h.to_owned())
            .ok_or_else(|| ProbeError::NoHost(text.to_owned()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let mut request_target = url.path().to_owned();
        if let Some(query) = url.query() {
            request_target.push('?');
            request_target.push_str(query);
        }
        Ok(Self {
            host,
            port,
            authority,
            request_target,
        })
    }

    async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        match &self.host {
            url::Host::Ipv4(ip) => {
                tokio::net::TcpStream::connect(SocketAddr::from((*ip, self.port))).await
            }
            url::Host::Ipv6(ip) => {
                tokio::net::TcpStream::connect(SocketAddr::from((*ip, self.port))).await
            }
            url::Host::Domain(name) => {
                tokio::net::TcpStream::connect((name.as_str(), self.port)).await
            }
        }
    }
}

/// One GET: (status, body) or why there was no answer.
async fn get(target: &Target) -> Result<(u16, String), ProbeError> {
    let mut stream = target.connect().await.map_err(ProbeError::Connect)?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bosun-probe\r\nConnection: close\r\n\r\n",
        target.request_target, target.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Send)?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE)
        .read_to_end(&mut response)
        .await
        .map_err(ProbeError::Read)?;
    Ok(parse_response(&response)?)
}

fn parse_response(response: &[u8]) -> Result<(u16, String), NotAnAnswer> {
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| NotAnAnswer(status_line.chars().take(80).collect()))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.chars().take(512).collect())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:9090/healthz").expect("parse");
        assert_eq!(t.port, 9090);
        assert_eq!(t.authority, "127.0.0.1:9090");
        assert_eq!(t.request_target, "/healthz");
        let t = Target::parse("http://[::1]:8080/readyz?x=1").expect("parse");
        assert_eq!(t.authority, "[::1]:8080");
        assert_eq!(t.request_target, "/readyz?x=1");
        let t = Target::parse("http://localhost").expect("parse");
        assert_eq!((t.port, t.request_target.as_str()), (80, "/"));
        assert!(Target::parse("https://localhost/healthz").is_err());
        assert!(Target::parse("127.0.0.1:9090").is_err());
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Ok((200, "ok".into()))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n{}"),
            Ok((503, "{}".into()))
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_response(b"").is_err());
    }
}
