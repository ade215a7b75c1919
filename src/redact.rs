//! Redaction: secrets out of every text that leaves the process.
//!
//! Three layers, from the most to the least precise:
//! - values bosun knows are secret (every [`Secret`](crate::config::Secret) and the password of
//!   every [`SecretUrl`](crate::config::SecretUrl) built in this process register themselves)
//!   are replaced wherever they appear;
//! - every URL in a text loses its password and the values of secret-bearing query
//!   parameters (`password`, `sslpassword`, `token`, `secret`, `key`, `access_token`, ...);
//! - `Authorization`-like values (`authorization: ...` lines and JSON fields, bearer tokens,
//!   API keys, `password=...` pairs) are masked.
//!
//! [`text`] applies all three. It runs on log lines (the log writer), `/readyz` reasons,
//! `/metrics`, configuration errors and reasons taken from endpoint responses.

use std::borrow::Cow;
use std::sync::{LazyLock, RwLock};

use regex::{Captures, Regex};

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Known secrets shorter than this are not scrubbed from text: a one-letter "secret" would
/// mangle every log line, and is refused where it matters (the admin token).
const MIN_KNOWN_LEN: usize = 6;
/// Bound on the registry: reloads add secrets, nothing removes them.
const MAX_KNOWN: usize = 1024;

static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers `value` as a secret: [`text`] replaces it wherever it appears from now on.
pub fn register(value: &str) {
    if value.len() < MIN_KNOWN_LEN {
        return;
    }
    let mut known = match KNOWN.write() {
        Ok(known) => known,
        Err(poisoned) => poisoned.into_inner(),
    };
    if known.iter().any(|k| k == value) || known.len() >= MAX_KNOWN {
        return;
    }
    known.push(value.to_owned());
    // Longest first, so a secret containing another is replaced whole.
    known.sort_by_key(|k| std::cmp::Reverse(k.len()));
}

/// Whether a query parameter, header or field of this name carries a secret.
pub fn is_secret_name(name: &str) -> bool {
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const PARTS: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "credential",
        "signature",
        "auth",
        "cookie",
        "session",
        "privatekey",
    ];
    const WHOLE: &[&str] = &["key", "pwd", "pass", "sig", "code"];
    PARTS.iter().any(|p| name.contains(p))
        || WHOLE.contains(&name.as_str())
        || name.ends_with("key")
}

/// `url` as it may be shown: no password, no values of secret query parameters or of a
/// fragment that holds one (`#access_token=...`).
pub fn url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some(MASK));
    }
    if shown.query().is_some() && shown.query_pairs().any(|(k, _)| is_secret_name(&k)) {
        let pairs: Vec<(String, String)> = shown
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_secret_name(&k) {
                    MASK.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    if shown.fragment().is_some_and(|f| f.contains('=')) {
        shown.set_fragment(Some(MASK));
    }
    shown.to_string()
}

/// Registers the secret parts of `url` (its password, the values of secret query
/// parameters) so that [`text`] finds them anywhere, even outside a URL.
pub fn register_url(url: &url::Url) {
    if let Some(password) = url.password() {
        register(password);
        if let Ok(decoded) = urlencoding_decode(password) {
            register(&decoded);
        }
    }
    for (k, v) in url.query_pairs() {
        if is_secret_name(&k) {
            register(&v);
        }
    }
}

fn urlencoding_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes: Vec<u8> = url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned().into_bytes())
        .unwrap_or_default();
    String::from_utf8(bytes)
}

/// The patterns are constants; one that did not compile would simply match nothing.
type Pattern = LazyLock<Option<Regex>>;

static URL_RE: Pattern =
    LazyLock::new(|| Regex::new(r#"(?i)\b[a-z][a-z0-9+.\-]{1,15}://[^\s"'<>`\\]+"#).ok());
static USERINFO_RE: Pattern = LazyLock::new(|| Regex::new(r"://([^:/@\s]*):[^@/\s]*@").ok());
static HEADER_RE: Pattern = LazyLock::new(|| {
    Regex::new(
        r#"(?i)(\b(?:proxy-)?authorization|\bx-api-key|\bapi-key|\bx-auth-token|\bset-cookie|\bcookie)(["']?\s*[:=]\s*)("(?:[^"\\]|\\.)*"|'[^']*'|[^\r\n,;}"\\]*)"#,
    )
    .ok()
});
static BEARER_RE: Pattern =
    LazyLock::new(|| Regex::new(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{8,}").ok());
static JSON_FIELD_RE: Pattern = LazyLock::new(|| {
    Regex::new(
        r#"(?i)"([a-z0-9_\-]*(?:password|passwd|secret|token|api_?key|credential)[a-z0-9_\-]*)"(\s*:\s*)"(?:[^"\\]|\\.)*""#,
    )
    .ok()
});
static PAIR_RE: Pattern = LazyLock::new(|| {
    Regex::new(
        r#"(?i)\b([a-z0-9_\-]*(?:password|passwd|secret|token|api_?key)|pwd|sig|signature)(\s*[=:]\s*)([^\s&;,"'}\\]+)"#,
    )
    .ok()
});
/// One cheap test before the real work: most log lines hold none of these.
static HINT_RE: Pattern = LazyLock::new(|| {
    Regex::new(r"(?i)://|authorization|bearer|api-key|auth-token|cookie|password|passwd|pwd|secret|token|api_?key|sig")
        .ok()
});

/// `input` with every secret this module can recognise masked.
pub fn text(input: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(input);
    {
        let known = match KNOWN.read() {
            Ok(known) => known,
            Err(poisoned) => poisoned.into_inner(),
        };
        for secret in known.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
    }
    if !HINT_RE.as_ref().is_some_and(|re| re.is_match(&out)) {
        return out;
    }
    let mut owned = out.into_owned();
    owned = replace(&URL_RE, &owned, |c| {
        let found = &c[0];
        match url::Url::parse(found) {
            Ok(parsed) => {
                let shown = url(&parsed);
                if shown == parsed.as_str() {
                    found.to_owned()
                } else {
                    shown
                }
            }
            Err(_) => match USERINFO_RE.as_ref() {
                Some(re) => re.replace_all(found, "://$1:***@").into_owned(),
                None => found.to_owned(),
            },
        }
    });
    owned = replace(&HEADER_RE, &owned, |c| {
        let quoted = c[3].starts_with('"');
        format!(
            "{}{}{}",
            &c[1],
            &c[2],
            if quoted { "\"***\"" } else { MASK }
        )
    });
    owned = replace(&BEARER_RE, &owned, |c| format!("{} {MASK}", &c[1]));
    owned = replace(&JSON_FIELD_RE, &owned, |c| {
        format!("\"{}\"{}\"{MASK}\"", &c[1], &c[2])
    });
    owned = replace(&PAIR_RE, &owned, |c| {
        if &c[3] == MASK || c[3].starts_with("***") {
            c[0].to_owned()
        } else {
            format!("{}{}{MASK}", &c[1], &c[2])
        }
    });
    Cow::Owned(owned)
}

fn replace(re: &Pattern, input: &str, f: impl Fn(&Captures<'_>) -> String) -> String {
    match re.as_ref() {
        Some(re) => re.replace_all(input, |c: &Captures<'_>| f(c)).into_owned(),
        None => input.to_owned(),
    }
}

/// A log writer that passes every line through [`text`] before it reaches `inner`.
pub struct Writer<W> {
    inner: W,
}

impl<W: std::io::Write> std::io::Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(s) => {
                let cleaned = text(s);
                self.inner.write_all(cleaned.as_bytes())?;
            }
            Err(_) => self.inner.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `tracing_subscriber` writer factory over stderr, redacting.
#[derive(Clone, Copy, Default)]
pub struct Stderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Writer<std::io::StderrLock<'static>>;

    fn make_writer(&'a self) -> Self::Writer {
        Writer {
            inner: std::io::stderr().lock(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(s: &str) -> String {
        text(s).into_owned()
    }

    #[test]
    fn url_passwords_and_secret_query_parameters_are_masked() {
        let out = redacted(
            "cannot connect to postgres://app:hunter2pw@db.internal:5432/orders?sslmode=require&sslpassword=keypass1&password=other1",
        );
        assert!(!out.contains("hunter2pw"), "{out}");
        assert!(!out.contains("keypass1"), "{out}");
        assert!(!out.contains("other1"), "{out}");
        assert!(out.contains("db.internal:5432/orders"), "{out}");
        assert!(out.contains("sslmode=require"), "{out}");
    }

    #[test]
    fn webhook_tokens_in_query_strings_are_masked() {
        for (input, secret) in [
            ("https://hooks.example.com/x?token=abcdef123", "abcdef123"),
            ("https://h.example.com/x?access_token=zzz999", "zzz999"),
            ("https://h.example.com/x?key=AIzaSy123", "AIzaSy123"),
            ("https://h.example.com/x?secret=s3s3s3", "s3s3s3"),
            ("https://h.example.com/cb#access_token=frag123", "frag123"),
        ] {
            let out = redacted(&format!("POST {input} failed"));
            assert!(!out.contains(secret), "{input} -> {out}");
        }
    }

    #[test]
    fn authorization_like_values_are_masked() {
        for (input, secret) in [
            ("Authorization: Bearer abc.def.ghi", "abc.def.ghi"),
            ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
            (
                r#"{"headers":{"authorization":"Bearer tok-1234"}}"#,
                "tok-1234",
            ),
            ("echo: bearer eyJhbGciOi.x.y", "eyJhbGciOi"),
            ("X-Api-Key: k-998877", "k-998877"),
            (r#"{"api_key": "k-112233", "ok": true}"#, "k-112233"),
            (r#"{"password":"pw-9"}"#, "pw-9"),
            ("host=db password=libpqpw1 user=app", "libpqpw1"),
            ("Cookie: session=abc123def", "abc123def"),
            (r#"{"access_token":"at-5566"}"#, "at-5566"),
        ] {
            let out = redacted(input);
            assert!(!out.contains(secret), "{input} -> {out}");
        }
    }

    #[test]
    fn a_redacted_json_log_line_stays_valid_json() {
        let line = serde_json::json!({
            "message": "endpoint rejected the message",
            "reason": "HTTP 400: POST /x?token=tk-123456 HTTP/1.1\r\nx-api-key: k-998877\r\nauthorization: Bearer abcdefgh123\r\nhost: h",
            "url": "postgres://u:pw-123456@h/db\\more",
            "target": "bosun::handler::http"
        })
        .to_string();
        let out = redacted(&line);
        let parsed: serde_json::Value = serde_json::from_str(&out).expect(&out);
        assert_eq!(parsed["target"], "bosun::handler::http", "{out}");
        for secret in ["tk-123456", "k-998877", "abcdefgh123", "pw-123456"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(
            parsed["reason"]
                .as_str()
                .is_some_and(|r| r.contains("host: h")),
            "{out}"
        );
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for input in [
            "HTTP 500 Internal Server Error: upstream unavailable",
            "consumer orders: amqp queue orders on rabbit -> handler hook",
            "https://example.com/path?page=2&sort=asc",
            "connection refused (os error 111)",
            "admin requests refused: missing or wrong bearer token",
        ] {
            assert_eq!(redacted(input), input);
        }
    }

    #[test]
    fn registered_secrets_are_masked_anywhere() {
        register("registered-secret-value-42");
        let out = redacted("the handler said registered-secret-value-42 somewhere");
        assert_eq!(out, "the handler said *** somewhere");
        // Too short to scrub safely.
        register("ab");
        assert_eq!(redacted("ab cd"), "ab cd");
    }

    #[test]
    fn secret_names_are_recognised() {
        for name in [
            "password",
            "sslpassword",
            "token",
            "access_token",
            "secret",
            "key",
            "api-key",
            "X-Api-Key",
            "Authorization",
            "cookie",
            "client_secret",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "sslmode",
            "page",
            "user",
            "host",
            "content-type",
            "x-tenant",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
