//! `[http.admin]`'s identification of callers (`auth`) and the dead-letter console's
//! options, validated from their TOML form.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::raw::RawAdmin;
use crate::roles::Role;

/// How the admin listener (API and console) identifies a caller.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum AdminAuth {
    /// Bearer tokens, each with its roles; the console's login form takes a token.
    #[default]
    Tokens,
    /// An auth proxy in front names the user (and groups) in headers; believed only from
    /// the listed proxy addresses. Bearer tokens keep working beside it.
    TrustedHeader(TrustedHeader),
    /// Everyone is an admin: only allowed on a loopback listener.
    None,
}

/// `auth = "trusted_header"`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustedHeader {
    /// Peers whose headers are believed; any other peer is refused.
    pub proxies: Vec<IpAddr>,
    /// Lowercase header name holding the user.
    pub user_header: String,
    /// Lowercase header name holding the groups, comma-separated.
    pub groups_header: String,
    /// Roles given by each group; a user without a mapped group has no rights.
    pub group_roles: BTreeMap<String, Vec<Role>>,
}

/// The console and its sessions.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleConfig {
    /// How callers are identified.
    pub auth: AdminAuth,
    /// Serve the pages under `/ui` (on the admin listener).
    pub enabled: bool,
    /// Viewers see no message bodies.
    pub redact_bodies: bool,
    /// Editors may edit and replay (off unless enabled).
    pub edit_and_replay: bool,
    /// The session cookie is marked `Secure`.
    pub secure_cookies: bool,
    /// A session unused this long ends.
    pub session_ttl: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            auth: AdminAuth::Tokens,
            enabled: true,
            redact_bodies: false,
            edit_and_replay: false,
            secure_cookies: false,
            session_ttl: DEFAULT_SESSION_TTL,
        }
    }
}

/// A console session unused for this long ends.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// The console options of `admin` (absent: the defaults), reporting problems to `issue`.
pub(crate) fn build(
    admin: Option<&RawAdmin>,
    listen: SocketAddr,
    issue: &mut dyn FnMut(&[&str], String),
) -> ConsoleConfig {
    let mut out = ConsoleConfig::default();
    let Some(admin) = admin else {
        return out;
    };
    let at = |key: &'static str| -> [&'static str; 3] { ["http", "admin", key] };
    out.enabled = admin.console.unwrap_or(true);
    out.redact_bodies = admin.redact_bodies.unwrap_or(false);
    out.edit_and_replay = admin.edit_and_replay.unwrap_or(false);
    if out.edit_and_replay {
        issue(
            &at("edit_and_replay"),
            "edit-and-replay is not available in this version: leave `edit_and_replay` out (or false)".into(),
        );
    }
    out.secure_cookies = admin.secure_cookies.unwrap_or(false);
    if let Some(ttl) = &admin.session_ttl {
        match super::parse_duration(ttl) {
            Ok(d) if !d.is_zero() => out.session_ttl = d,
            _ => issue(
                &at("session_ttl"),
                format!("invalid duration {ttl:?} (expected e.g. \"8h\")"),
            ),
        }
    }
    let proxy_keys = !admin.trusted_proxies.is_empty()
        || admin.user_header.is_some()
        || admin.groups_header.is_some()
        || !admin.group_roles.is_empty();
    out.auth = match admin.auth.as_deref().unwrap_or("tokens") {
        "tokens" | "none" if proxy_keys => {
            issue(
                &at("auth"),
                "`trusted_proxies`, `user_header`, `groups_header` and `group_roles` only apply with `auth = \"trusted_header\"`".into(),
            );
            AdminAuth::Tokens
        }
        "tokens" => AdminAuth::Tokens,
        "none" => {
            if !listen.ip().is_loopback() {
                issue(
                    &at("auth"),
                    format!(
                        "`auth = \"none\"` makes every caller an admin: it is only allowed when `[http.admin].listen` is a loopback address, not {listen}"
                    ),
                );
            }
            AdminAuth::None
        }
        "trusted_header" => AdminAuth::TrustedHeader(trusted_header(admin, issue)),
        other => {
            issue(
                &at("auth"),
                format!(
                    "unknown auth mode {other:?} (expected \"tokens\", \"trusted_header\" or \"none\")"
                ),
            );
            AdminAuth::Tokens
        }
    };
    out
}

fn trusted_header(admin: &RawAdmin, issue: &mut dyn FnMut(&[&str], String)) -> TrustedHeader {
    let mut proxies = Vec::new();
    for text in &admin.trusted_proxies {
        match text.trim().parse::<IpAddr>() {
            Ok(ip) => proxies.push(ip),
            Err(_) => issue(
                &["http", "admin", "trusted_proxies"],
                format!("{text:?} is not an IP address (e.g. \"127.0.0.1\")"),
            ),
        }
    }
    if admin.trusted_proxies.is_empty() {
        issue(
            &["http", "admin", "trusted_proxies"],
            "`auth = \"trusted_header\"` needs the addresses of the auth proxies (`trusted_proxies = [\"10.0.0.5\"]`): a user header from anyone else is refused".into(),
        );
    }
    let header = |value: &Option<String>,
                  default: &str,
                  key: &'static str,
                  issue: &mut dyn FnMut(&[&str], String)| {
        let name = value
            .as_deref()
            .unwrap_or(default)
            .trim()
            .to_ascii_lowercase();
        if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            issue(
                &["http", "admin", key],
                format!("{name:?} is not a header name"),
            );
        }
        name
    };
    let user_header = header(&admin.user_header, "x-forwarded-user", "user_header", issue);
    let groups_header = header(
        &admin.groups_header,
        "x-forwarded-groups",
        "groups_header",
        issue,
    );
    let mut group_roles = BTreeMap::new();
    for (group, names) in &admin.group_roles {
        let mut roles = Vec::new();
        for name in names {
            match Role::parse(name) {
                Some(role) => roles.push(role),
                None => {
                    let known: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                    issue(
                        &["http", "admin", "group_roles", group.as_str()],
                        format!("unknown role {name:?} (roles: {})", known.join(", ")),
                    );
                }
            }
        }
        group_roles.insert(group.clone(), roles);
    }
    TrustedHeader {
        proxies,
        user_header,
        groups_header,
        group_roles,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, listen: &str) -> (ConsoleConfig, Vec<String>) {
        let admin: RawAdmin = toml::from_str(text).expect("raw admin");
        let mut issues = Vec::new();
        let config = build(Some(&admin), listen.parse().expect("addr"), &mut |at, m| {
            issues.push(format!("{}: {m}", at.join(".")))
        });
        (config, issues)
    }

    #[test]
    fn auth_none_is_refused_unless_the_listener_is_loopback() {
        let (config, issues) = check("auth = \"none\"", "127.0.0.1:9091");
        assert_eq!(config.auth, AdminAuth::None);
        assert!(issues.is_empty(), "{issues:?}");
        let (_, issues) = check("auth = \"none\"", "0.0.0.0:9091");
        assert!(issues[0].contains("only allowed when"), "{issues:?}");
        let (_, issues) = check("auth = \"none\"", "[::1]:9091");
        assert!(issues.is_empty(), "{issues:?}");
    }

    #[test]
    fn trusted_header_needs_proxies_and_known_roles() {
        let (_, issues) = check("auth = \"trusted_header\"", "0.0.0.0:9091");
        assert!(issues[0].contains("trusted_proxies"), "{issues:?}");
        let (config, issues) = check(
            "auth = \"trusted_header\"\ntrusted_proxies = [\"10.0.0.5\"]\nuser_header = \"X-Auth-User\"\n[group_roles]\nops = [\"operator\"]\nboss = [\"root\"]\n",
            "0.0.0.0:9091",
        );
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].contains("unknown role \"root\""), "{issues:?}");
        let AdminAuth::TrustedHeader(t) = config.auth else {
            panic!("trusted header expected");
        };
        assert_eq!(t.user_header, "x-auth-user");
        assert_eq!(t.group_roles["ops"], vec![Role::Operator]);
    }

    #[test]
    fn proxy_settings_without_trusted_header_and_unknown_modes_are_refused() {
        let (_, issues) = check("trusted_proxies = [\"10.0.0.5\"]", "127.0.0.1:9091");
        assert!(issues[0].contains("only apply"), "{issues:?}");
        let (_, issues) = check("auth = \"basic\"", "127.0.0.1:9091");
        assert!(issues[0].contains("unknown auth mode"), "{issues:?}");
    }
}
