//! The dead-letter console in a real headless Chromium (Debian's `chromium` driven through
//! `chromedriver`'s WebDriver protocol) against a `bosun run` daemon with real Redis and
//! PostgreSQL: failures are produced, the groups page and a message are opened, the group is
//! replayed at a rate and its progress watched to the end, and the handler receives every
//! message. Access is checked over plain HTTP too: no page without a session, a viewer
//! cannot replay, a form without its CSRF token is refused.
//!
//! Screenshots of each page go to `$CARGO_TARGET_TMPDIR/console-screenshots` (or
//! `BOSUN_SCREENSHOTS`); the ones in docs/console/ come from there.

use crate::support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use redis::AsyncCommands as _;
use serde_json::{Value, json};
use support::*;

const ADMIN_VAR: &str = "BOSUN_TEST_CONSOLE_ADMIN";
const OPERATOR_VAR: &str = "BOSUN_TEST_CONSOLE_OPERATOR";
const VIEWER_VAR: &str = "BOSUN_TEST_CONSOLE_VIEWER";
const ADMIN: &str = "console-admin-token-0123456789abcdef";
const OPERATOR: &str = "console-operator-token-0123456789abcd";
const VIEWER: &str = "console-viewer-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(60);

/// A WebDriver session on a chromedriver of its own, with a fresh profile.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver)");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let base = format!("http://127.0.0.1:{port}");
        let ready = wait_for_async(Duration::from_secs(30), || {
            let http = http.clone();
            let url = format!("{base}/status");
            async move {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                v["value"]["ready"].as_bool().filter(|r| *r)
            }
        })
        .await;
        assert!(ready.is_some(), "chromedriver did not come up");
        let profile = tempfile::tempdir().expect("profile dir");
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let v: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session JSON");
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        let shots = std::env::var("BOSUN_SCREENSHOTS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
            });
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        Browser {
            http,
            session: format!("{base}/session/{id}"),
            driver,
            shots,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let v: Value = req
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("webdriver JSON");
        if let Some(e) = v["value"]["error"].as_str() {
            panic!("webdriver {path}: {e}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    /// Clicks a link or a form's button and waits for the page it leads to: every click in
    /// these tests navigates, and chromedriver may answer before the new page is loaded.
    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            // The clicked element goes stale once the next page has replaced this one.
            let v: Value = self
                .http
                .get(format!("{}/element/{id}/enabled", self.session))
                .send()
                .await
                .expect("webdriver")
                .json()
                .await
                .expect("webdriver JSON");
            let gone = v["value"]["error"].as_str().is_some();
            let loaded = self
                .cmd(
                    reqwest::Method::POST,
                    "/execute/sync",
                    Some(json!({ "script": "return document.readyState", "args": [] })),
                )
                .await;
            if gone && loaded.as_str() == Some("complete") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no page after clicking {css}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn screenshot(&self, name: &str) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write screenshot");
    }

    async fn login(&self, base: &str, token: &str) {
        self.goto(&format!("{base}/ui/login")).await;
        self.type_into("#token", token).await;
        self.click("form[action='/ui/login'] button").await;
    }
}

/// A client that keeps no cookies and follows no redirects: it sees exactly what the
/// console answers.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A form body, URL-encoded.
fn enc<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        form.append_pair(k.as_ref(), v.as_ref());
    }
    form.finish()
}

/// The value of cookie `name` set by `response`.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let first = v.split(';').next()?;
            let (k, value) = first.split_once('=')?;
            (k == name).then(|| value.to_owned())
        })
}

fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_owned())
}

/// Logs in over plain HTTP: (session cookie, the session's CSRF token).
async fn http_login(client: &reqwest::Client, base: &str, token: &str) -> (String, String) {
    let form = client
        .get(format!("{base}/ui/login"))
        .send()
        .await
        .expect("login form");
    let login_cookie = set_cookie(&form, "bosun_login").expect("login CSRF cookie");
    let page = form.text().await.expect("login page");
    let csrf = hidden(&page, "csrf").expect("CSRF field in the login form");
    assert_eq!(csrf, login_cookie);
    let done = client
        .post(format!("{base}/ui/login"))
        .header("cookie", format!("bosun_login={login_cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(enc(&[
            ("csrf", csrf.as_str()),
            ("token", token),
            ("next", "/ui"),
        ]))
        .send()
        .await
        .expect("login");
    assert_eq!(done.status().as_u16(), 303, "login redirects");
    let session = set_cookie(&done, "bosun_session").expect("session cookie");
    let cookie_line = done
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("bosun_session="))
        .expect("session cookie")
        .to_owned();
    assert!(
        cookie_line.contains("HttpOnly") && cookie_line.contains("SameSite=Strict"),
        "{cookie_line}"
    );
    let overview = client
        .get(format!("{base}/ui"))
        .header("cookie", format!("bosun_session={session}"))
        .send()
        .await
        .expect("overview");
    assert_eq!(overview.status().as_u16(), 200);
    let csp = overview
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let page = overview.text().await.expect("overview page");
    assert!(
        !page.contains("<script>") && !page.contains(" style=\""),
        "no inline script or style"
    );
    let csrf = hidden(&page, "csrf").expect("CSRF field in the logout form");
    (session, csrf)
}

/// A dead-letter entry as the redis consumer writes it.
fn dead(id: &str, stream: &str, error: &str) -> Vec<(String, String)> {
    [
        ("payload", format!("{{\"order\":\"{id}\",\"amount\":12.5}}")),
        ("message_id", id.to_owned()),
        ("content_type", "application/json".to_owned()),
        ("bosun-attempt", "5".to_owned()),
        ("bosun-orig-stream", stream.to_owned()),
        ("bosun-orig-id", "1-0".to_owned()),
        ("bosun-group", "orig".to_owned()),
        ("bosun-consumer", "orders-1".to_owned()),
        ("bosun-deliveries", "5".to_owned()),
        ("bosun-error", error.to_owned()),
        ("bosun-error-kind", "exhausted".to_owned()),
        ("bosun-failed-at", "2026-01-02T03:04:05.000Z".to_owned()),
        ("tenant", "acme".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn logged_handled(daemon: &Daemon, handler: &str, message_id: &str) -> bool {
    daemon.logs().lines().any(|l| {
        l.contains(&format!("\"handler\":\"{handler}\""))
            && l.contains(&format!("\"message_id\":\"{message_id}\""))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_replays_a_group_at_a_rate_in_a_real_browser_with_access_enforced() {
    let stream = unique("console_orig");
    let dlq = format!("{stream}:dlq");
    let table = unique("console_archive");
    let port = free_port();
    let admin_port = free_port();
    let config = ConfigFile::new(&format!(
        r#"
[service]
name = "console-test"
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[http.admin]
listen = "127.0.0.1:{admin_port}"
token_env = "{ADMIN_VAR}"
redact_bodies = true

[http.admin.tokens.night-operator]
token_env = "{OPERATOR_VAR}"
roles = ["operator"]

[http.admin.tokens.auditor]
token_env = "{VIEWER_VAR}"
roles = ["viewer"]

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[databases.main]
url = "{PG_URL}"
max_connections = 4

[handlers.seen]
kind = "log"

[consumers.orig]
source = "cache"
handler = "seen"
stream = "{stream}"
group = "orig"

[dead_letters.dl]
source = "cache"
stream = "{dlq}"
archive = "main"
table = "{table}"
"#
    ));
    let (code, out, err) = bosun_output(
        &["dlq", "migrate", "--config", &config.path.to_string_lossy()],
        &[
            (ADMIN_VAR, ADMIN),
            (OPERATOR_VAR, OPERATOR),
            (VIEWER_VAR, VIEWER),
        ],
    );
    assert_eq!(code, 0, "migrate: {err}{out}");

    // 30 failures of one kind, 3 of another.
    let mut conn = redis::Client::open(REDIS_URL)
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let slow: Vec<String> = (0..30).map(|i| unique(&format!("slow{i}"))).collect();
    for (i, id) in slow.iter().enumerate() {
        let fields = dead(id, &stream, &format!("timeout after {} ms", 100 + i));
        let pairs: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _: String = conn.xadd(&dlq, "*", &pairs).await.expect("XADD");
    }
    for i in 0..3 {
        let fields = dead(&unique("bad"), &stream, &format!("customer 'c{i}' unknown"));
        let pairs: Vec<(&str, &str)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _: String = conn.xadd(&dlq, "*", &pairs).await.expect("XADD");
    }

    let daemon = Daemon::start_with_env(
        &config.path,
        port,
        &[
            (ADMIN_VAR, ADMIN),
            (OPERATOR_VAR, OPERATOR),
            (VIEWER_VAR, VIEWER),
        ],
    );
    let pool = pg().await;
    let archived = wait_for_async(WAIT, || {
        let pool = pool.clone();
        let table = table.clone();
        async move {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .ok()?;
            (n == 33).then_some(n)
        }
    })
    .await;
    assert!(
        archived.is_some(),
        "33 rows archived; logs:\n{}",
        daemon.logs()
    );
    let group: String = sqlx::query_scalar(&format!(
        "SELECT group_key FROM {table} WHERE message_id = $1"
    ))
    .bind(&slow[0])
    .fetch_one(&pool)
    .await
    .expect("group key");
    let base = format!("http://127.0.0.1:{admin_port}");

    // No page without a session: every page sends a browser to the login form, and a
    // form post is refused.
    let client = raw_client();
    for path in [
        "/ui",
        "/ui/groups",
        "/ui/messages",
        "/ui/messages/1",
        "/ui/operations",
        "/ui/operations/1",
    ] {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("page");
        assert_eq!(r.status().as_u16(), 303, "{path} without a session");
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        assert!(location.starts_with("/ui/login"), "{path} -> {location}");
    }
    let r = client
        .post(format!("{base}/ui/operations"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(enc(&[("op", "replay"), ("group", group.as_str())]))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 401, "a post without a session");
    let r = client
        .get(format!("{base}/ui"))
        .header("cookie", "bosun_session=forged")
        .send()
        .await
        .expect("page");
    assert_eq!(r.status().as_u16(), 303, "a forged session cookie");

    // A form without its CSRF token is refused, with a session; so is one with another's.
    let (operator_session, operator_csrf) = http_login(&client, &base, OPERATOR).await;
    let cookie = format!("bosun_session={operator_session}");
    for csrf in [None, Some("0".repeat(64))] {
        let mut form = vec![("op", "replay".to_owned()), ("group", group.clone())];
        if let Some(c) = &csrf {
            form.push(("csrf", c.clone()));
        }
        let r = client
            .post(format!("{base}/ui/operations"))
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(enc(&form))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), 403, "CSRF token {csrf:?}");
    }
    let r = client
        .post(format!("{base}/ui/operations/preview"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(enc(&[
            ("csrf", operator_csrf.as_str()),
            ("op", "replay"),
            ("group", group.as_str()),
        ]))
        .send()
        .await
        .expect("post");
    assert_eq!(
        r.status().as_u16(),
        200,
        "with its token the form is served"
    );
    let r = client
        .post(format!("{base}/ui/operations/preview"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(enc(&[
            ("csrf", operator_csrf.as_str()),
            ("op", "purge"),
            ("group", group.as_str()),
        ]))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403, "an operator cannot purge");

    // A viewer cannot replay (nor start one by posting the form itself).
    let (viewer_session, viewer_csrf) = http_login(&client, &base, VIEWER).await;
    let r = client
        .post(format!("{base}/ui/operations"))
        .header("cookie", format!("bosun_session={viewer_session}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(enc(&[
            ("csrf", viewer_csrf.as_str()),
            ("op", "replay"),
            ("group", group.as_str()),
        ]))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403, "a viewer cannot replay");
    // A wrong token at the login form is refused.
    let form = client
        .get(format!("{base}/ui/login"))
        .send()
        .await
        .expect("login form");
    let login_cookie = set_cookie(&form, "bosun_login").expect("cookie");
    let r = client
        .post(format!("{base}/ui/login"))
        .header("cookie", format!("bosun_login={login_cookie}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(enc(&[
            ("csrf", login_cookie.as_str()),
            ("token", "not-a-token"),
        ]))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status().as_u16(), 401);
    assert!(set_cookie(&r, "bosun_session").is_none());

    // The browser.
    let browser = Browser::start().await;
    browser.goto(&format!("{base}/ui/groups")).await;
    assert!(
        browser.url().await.contains("/ui/login"),
        "the browser is sent to the login form"
    );
    browser.screenshot("login").await;

    // The viewer sees groups and no replay button; bodies are hidden from viewers.
    browser.login(&base, VIEWER).await;
    browser.goto(&format!("{base}/ui/groups")).await;
    let page = browser.source().await;
    assert!(page.contains(&group), "the group is listed");
    assert!(
        !page.contains("Replay group"),
        "no replay form for a viewer"
    );
    let first_id: i64 =
        sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE message_id = $1"))
            .bind(&slow[0])
            .fetch_one(&pool)
            .await
            .expect("row id");
    browser
        .goto(&format!("{base}/ui/messages/{first_id}"))
        .await;
    let page = browser.source().await;
    assert!(
        page.contains("Bodies are hidden from viewers"),
        "redacted body"
    );
    assert!(!page.contains("&quot;amount&quot;") && !page.contains("\"amount\""));
    browser
        .click("header form[action='/ui/logout'] button")
        .await;
    assert!(browser.url().await.contains("/ui/login"));

    // The operator: overview, groups, the group's messages, one message.
    browser.login(&base, OPERATOR).await;
    let page = browser.source().await;
    assert!(
        page.contains("Overview") && page.contains("orig"),
        "overview lists components"
    );
    browser.screenshot("overview").await;
    browser.goto(&format!("{base}/ui/groups")).await;
    let page = browser.source().await;
    assert!(
        page.contains("timeout after &lt;n&gt; ms"),
        "normalised reason shown"
    );
    assert!(page.contains(">30<"), "the group's count");
    browser.screenshot("groups").await;
    browser
        .goto(&format!("{base}/ui/groups?by=header&header=tenant"))
        .await;
    assert!(
        browser.source().await.contains(">33<"),
        "grouped by a header"
    );
    browser.goto(&format!("{base}/ui/groups")).await;
    browser
        .click(&format!("a[href='/ui/messages?group={group}']"))
        .await;
    let page = browser.source().await;
    assert!(
        browser.url().await.contains(&format!("group={group}")),
        "shareable filter URL"
    );
    assert!(
        page.contains(&slow[29]) && !page.contains("customer"),
        "only the group's rows"
    );
    browser.screenshot("messages").await;
    browser
        .click(&format!("a[href='/ui/messages/{first_id}']"))
        .await;
    let page = browser.source().await;
    assert!(
        page.contains("&quot;amount&quot;: 12.5") || page.contains("\"amount\": 12.5"),
        "pretty JSON body"
    );
    assert!(
        page.contains("orders-1") && page.contains("tenant"),
        "headers shown"
    );
    browser.screenshot("message").await;

    // Replay the group at 10/s: the dry run counts 30, the operation's page shows progress
    // until it is done.
    browser.goto(&format!("{base}/ui/groups")).await;
    browser
        .type_into(
            "form[action='/ui/operations/preview'] input[name='rate']",
            "10/s",
        )
        .await;
    browser
        .click("form[action='/ui/operations/preview'] button")
        .await;
    let page = browser.source().await;
    assert!(
        page.contains("<strong id=\"dry-run-count\">30</strong>"),
        "dry-run count: {page}"
    );
    browser.screenshot("confirm").await;
    // A failure of the group that arrives now is not swept into the replay.
    let late = unique("late");
    let fields = dead(&late, &stream, "timeout after 999 ms");
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    browser.click("form[action='/ui/operations'] button").await;
    let started = Instant::now();
    assert!(
        browser.url().await.contains("/ui/operations/"),
        "on the operation's page"
    );
    let _: String = conn.xadd(&dlq, "*", &pairs).await.expect("XADD");
    let mut saw_progress = false;
    let mut finished = false;
    while started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(700)).await;
        browser.goto(&browser.url().await).await;
        let page = browser.source().await;
        if page.contains("class=\"state-running\">running") && !saw_progress {
            saw_progress = true;
            browser.screenshot("operation-running").await;
        }
        if page.contains("id=\"state\" class=\"state-done\"") {
            assert!(
                page.contains("<strong id=\"progress\">30 of 30</strong>"),
                "{page}"
            );
            finished = true;
            break;
        }
    }
    assert!(saw_progress, "the running operation's progress was visible");
    assert!(finished, "the replay finished");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "10/s paces 30 rows: took {took:?}"
    );
    browser.screenshot("operation-done").await;

    // The handler received every replayed message.
    let all = wait_for(WAIT, || {
        slow.iter()
            .all(|id| logged_handled(&daemon, "seen", id))
            .then_some(())
    });
    assert!(
        all.is_some(),
        "every replayed message handled; logs:\n{}",
        daemon.logs()
    );

    // The late failure is still archived and shown as new since the replay started.
    let late_seen = wait_for_async(WAIT, || {
        let pool = pool.clone();
        let table = table.clone();
        let late = late.clone();
        async move {
            let s: String =
                sqlx::query_scalar(&format!("SELECT status FROM {table} WHERE message_id = $1"))
                    .bind(&late)
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (s == "archived").then_some(())
        }
    })
    .await;
    assert!(
        late_seen.is_some(),
        "the late failure is archived, not replayed"
    );
    browser.goto(&format!("{base}/ui/groups")).await;
    let page = browser.source().await;
    assert!(
        page.contains("1 new since it started"),
        "new failures after the replay shown"
    );
    browser.screenshot("groups-after-replay").await;

    // The operations page: the operation and its audit trail, by the token's name.
    browser.goto(&format!("{base}/ui/operations")).await;
    let page = browser.source().await;
    assert!(
        page.contains("night-operator") && page.contains("replay done"),
        "audit trail"
    );
    browser.screenshot("operations").await;
    let (state, done, by): (String, i64, String) = sqlx::query_as(&format!(
        "SELECT state, done, requested_by FROM {table}_operations ORDER BY id DESC LIMIT 1"
    ))
    .fetch_one(&pool)
    .await
    .expect("operation row");
    assert_eq!(
        (state.as_str(), done, by.as_str()),
        ("done", 30, "night-operator")
    );
}
