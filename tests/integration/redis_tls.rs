//! `rediss://` brokers against a real Redis serving TLS: a `redis-server` of the test's own on
//! a free port, with a CA, server and client certificates made by `openssl` for the test.

use crate::support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun::supervisor::ExitStatus;
use bosun::{Handler, Message, Outcome};
use support::{InProcess, unique};

const WAIT: Duration = Duration::from_secs(20);

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        run(&[
            &["req", "-x509", "-nodes", "-days", "2"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=bosun test CA",
            ],
        ]
        .concat());
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        std::fs::write(
            d.join("client.ext"),
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        )
        .expect("ext");
        for who in ["server", "client"] {
            run(&[
                &["req", "-new", "-nodes"][..],
                &ec,
                &[
                    "-keyout",
                    &format!("{who}.key"),
                    "-out",
                    &format!("{who}.csr"),
                    "-subj",
                    &format!("/CN={who}"),
                ],
            ]
            .concat());
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.pem"),
            ]);
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `redis-server` serving only TLS on `port`.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(certs: &Certs, require_client_cert: bool) -> Self {
        let port = support::free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(certs.path("server.pem"))
            .arg("--tls-key-file")
            .arg(certs.path("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(certs.path("ca.pem"))
            .args([
                "--tls-auth-clients",
                if require_client_cert { "yes" } else { "no" },
            ])
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(certs.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server with TLS");
        let up = support::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(up.is_some(), "redis-server never listened on {port}");
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    /// A client of the test's own, with the client certificate.
    async fn client(&self, certs: &Certs) -> redis::aio::MultiplexedConnection {
        let read = |name: &str| std::fs::read(certs.path(name)).expect("read cert");
        redis::Client::build_with_tls(
            self.url(),
            redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: read("client.pem"),
                    client_key: read("client.key"),
                }),
                root_cert: Some(read("ca.pem")),
            },
        )
        .expect("tls client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect over TLS")
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records the message ids it handles.
#[derive(Default)]
struct Recorder {
    ids: Mutex<Vec<String>>,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Outcome {
        if let Ok(mut ids) = self.ids.lock() {
            ids.push(message.message_id.clone().unwrap_or_default());
        }
        Outcome::Ack
    }
}

fn config_text(url: &str, tls: &str, stream: &str, port: u16) -> String {
    format!(
        r#"
[service]
name = "redis-tls-test"
shutdown_timeout = "10s"
log_level = "warn"

[http]
listen = "127.0.0.1:{port}"

[brokers.secure]
kind = "redis"
url = "{url}"
tls = {{ {tls} }}

[handlers.h]
kind = "test"

[consumers.c]
source = "secure"
handler = "h"
stream = "{stream}"
group = "g"
start_id = "0"
block = "200ms"
"#
    )
}

fn tls_files(certs: &Certs, client: bool) -> String {
    let mut text = format!("ca_file = {:?}", certs.path("ca.pem"));
    if client {
        text.push_str(&format!(
            ", cert_file = {:?}, key_file = {:?}",
            certs.path("client.pem"),
            certs.path("client.key")
        ));
    }
    text
}

/// With the CA and a client certificate, `bosun publish` adds entries over TLS and the
/// consumer reads and acknowledges every one of them, on a server that demands client
/// certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_over_mutual_tls() {
    let certs = Certs::make();
    let server = TlsRedis::start(&certs, true);
    let stream = unique("tls_s");
    let port = support::free_port();
    let file = support::ConfigFile::new(&config_text(
        &server.url(),
        &tls_files(&certs, true),
        &stream,
        port,
    ));
    // The binary knows no `test` handler: it publishes with the broker alone.
    let publish_file = support::ConfigFile::new(&format!(
        "[service]\nname = \"redis-tls-publish\"\n[brokers.secure]\nkind = \"redis\"\nurl = \"{}\"\ntls = {{ {} }}\n",
        server.url(),
        tls_files(&certs, true)
    ));
    let config = publish_file.path.to_string_lossy().into_owned();
    let body = publish_file.dir.path().join("body");
    std::fs::write(&body, "over TLS").expect("body");
    let body = body.to_string_lossy().into_owned();
    for i in 0..5 {
        let id = format!("tls-{i}");
        let mut args = vec![
            "publish",
            "--config",
            &config,
            "--broker",
            "secure",
            "--stream",
            &stream,
            "--message-id",
            &id,
        ];
        // The first has no --file: an empty `payload`, still a valid entry.
        if i > 0 {
            args.extend(["--file", &body]);
        }
        let (code, stdout, stderr) = support::bosun_output(&args, &[]);
        assert_eq!(code, 0, "publish over TLS: {stdout}{stderr}");
    }

    let recorder = Arc::new(Recorder::default());
    let running = InProcess::start(&file.path, recorder.clone());
    let deadline = Instant::now() + WAIT;
    while recorder.ids.lock().map(|ids| ids.len()).unwrap_or(0) < 5 {
        assert!(
            Instant::now() < deadline,
            "the consumer never read over TLS: {:?}",
            support::http_get(&format!("http://127.0.0.1:{port}/readyz"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = server.client(&certs).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("g")
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        if matches!(&pending, redis::Value::Array(p) if matches!(p.first(), Some(redis::Value::Int(0))))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries never acked: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let mut ids = recorder.ids.lock().expect("lock").clone();
    ids.sort();
    assert_eq!(ids, (0..5).map(|i| format!("tls-{i}")).collect::<Vec<_>>());
}

/// A server whose certificate the configured CA did not sign, or one that wants a client
/// certificate bosun does not have, leaves the consumer not ready with a reason, and the
/// daemon running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_or_a_missing_client_certificate_is_not_ready() {
    let certs = Certs::make();
    let other = Certs::make();
    let server = TlsRedis::start(&certs, true);
    for (case, tls, why) in [
        (
            "untrusted server",
            tls_files(&other, false),
            "invalid peer certificate",
        ),
        (
            "no client certificate",
            tls_files(&certs, false),
            "CertificateRequired",
        ),
    ] {
        let port = support::free_port();
        let file =
            support::ConfigFile::new(&config_text(&server.url(), &tls, &unique("tls_bad"), port));
        let recorder = Arc::new(Recorder::default());
        let running = InProcess::start(&file.path, recorder.clone());
        let url = format!("http://127.0.0.1:{port}/readyz");
        let reason = support::wait_for(WAIT, || {
            support::http_get(&url)
                .filter(|(status, body)| *status == 503 && body.contains("cannot connect to redis"))
        });
        let (_, body) = reason.unwrap_or_else(|| panic!("{case}: /readyz never said why"));
        assert!(body.contains(why), "{case}: {body}");
        assert!(recorder.ids.lock().expect("lock").is_empty());
        assert_eq!(running.stop().await, ExitStatus::Clean, "{case}");
    }
}
