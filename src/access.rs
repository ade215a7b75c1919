//! Who may use the admin API: bearer tokens with roles, checked before any handler runs.
//!
//! Every request must carry `Authorization: Bearer <token>`. The presented token is compared
//! with every configured one, in constant time over SHA-256 digests, so neither a token's
//! content nor its length (nor which token matched) leaks through timing. No match is
//! answered 401; failed authentications beyond a small budget are answered 429, counted in
//! `bosun_admin_auth_failures_total` and logged once per interval with their count, so a
//! flood costs neither CPU nor log volume. A token whose roles do not grant the route's
//! [`Permission`] is answered 403.
//!
//! With `auth = "trusted_header"` a request without a token is identified by the user and
//! groups headers of an auth proxy, believed only when the peer is one of the configured
//! proxies; with `auth = "none"` (loopback only) every caller is an admin. The identity
//! found is put in the request's extensions ([`Identity`]) for the audit trail.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::console::TrustedHeader;
use crate::config::{AccessToken, AdminAuth, HttpConfig};
use crate::roles::{Permission, Role};

/// Who is calling, and with which roles: a token's name, a proxy-named user, or
/// `anonymous` (with `auth = "none"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user: String,
    pub roles: Vec<Role>,
}

impl Identity {
    pub fn can(&self, permission: Permission) -> bool {
        Role::any_grants(&self.roles, permission)
    }
}

/// What the headers of a request without a token say about its caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Unauthenticated {
    /// The caller is known without a token (trusted proxy, or `auth = "none"`).
    Known(Identity),
    /// A user header came from a peer that is not a trusted proxy.
    UntrustedPeer,
    /// Nothing identifies the caller.
    Unknown,
}

/// Failed authentications allowed in a burst before answers turn to 429.
const AUTH_FAILURE_BURST: f64 = 10.0;
/// Failed authentications allowed per second, sustained.
const AUTH_FAILURES_PER_SECOND: f64 = 1.0;
/// At most one log line about failed authentications per interval.
const AUTH_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Counter: admin requests refused for a missing or wrong token (`limited` = "true" when
/// answered 429 because the failure budget was spent).
pub const AUTH_FAILURES_METRIC: &str = "bosun_admin_auth_failures_total";

/// The failed-authentication budget (a token bucket) and the count not yet logged.
struct AuthFailures {
    tokens: f64,
    refilled: Instant,
    unlogged: u64,
    logged: Option<Instant>,
}

impl AuthFailures {
    fn new() -> Self {
        Self {
            tokens: AUTH_FAILURE_BURST,
            refilled: Instant::now(),
            unlogged: 0,
            logged: None,
        }
    }

    /// Records one failure at `now`; true when it is within budget (answer 401), false when
    /// the budget is spent (answer 429). Returns the count to log, when a line is due.
    fn record(&mut self, now: Instant) -> (bool, Option<u64>) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * AUTH_FAILURES_PER_SECOND).min(AUTH_FAILURE_BURST);
        self.refilled = now;
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        }
        self.unlogged += 1;
        (allowed, self.flush(now))
    }

    /// The count not yet logged, when there is one and its interval is over.
    fn flush(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= AUTH_LOG_INTERVAL);
        (due && self.unlogged > 0).then(|| {
            self.logged = Some(now);
            std::mem::take(&mut self.unlogged)
        })
    }
}

/// The configured tokens (as digests, with their roles) and the failure budget, shared by
/// every guarded route of the admin listener.
#[derive(Clone)]
pub struct Access {
    inner: Arc<Inner>,
}

struct Inner {
    /// SHA-256 of each token, with its roles and name: what requests are compared against.
    tokens: Vec<([u8; 32], Vec<Role>, String)>,
    failures: Arc<Mutex<AuthFailures>>,
    auth: AdminAuth,
}

impl Access {
    /// The admin listener's access: `[http.admin]`'s own token (named `admin`), the named
    /// tokens, and the configured `auth` mode.
    pub fn for_http(http: &HttpConfig) -> Self {
        let mut named: Vec<(String, AccessToken)> = http
            .admin_token
            .iter()
            .map(|token| {
                (
                    "admin".to_owned(),
                    AccessToken {
                        token: token.clone(),
                        roles: vec![Role::Admin],
                    },
                )
            })
            .collect();
        named.extend(http.tokens.iter().map(|(n, t)| (n.clone(), t.clone())));
        Self::build(&named, http.console.auth.clone())
    }

    fn build(tokens: &[(String, AccessToken)], auth: AdminAuth) -> Self {
        let failures = Arc::new(Mutex::new(AuthFailures::new()));
        flush_failure_counts(Arc::downgrade(&failures));
        metrics::describe_counter!(
            AUTH_FAILURES_METRIC,
            "Admin API requests refused for a missing or wrong token (limited=\"true\": answered 429)."
        );
        // Present from the start, so that `increase(...)` sees the first failure.
        for limited in ["false", "true"] {
            metrics::counter!(AUTH_FAILURES_METRIC, "limited" => limited).increment(0);
        }
        Self {
            inner: Arc::new(Inner {
                tokens: tokens
                    .iter()
                    .map(|(name, t)| {
                        (
                            digest(t.token.expose().as_bytes()),
                            t.roles.clone(),
                            name.clone(),
                        )
                    })
                    .collect(),
                failures,
                auth,
            }),
        }
    }

    /// The identity of `token`, or `None` when it matches no configured token (the
    /// console's login form asks this).
    pub fn token_identity(&self, token: &str) -> Option<Identity> {
        self.identity(&digest(token.trim().as_bytes()))
    }

    /// Who a request without a token is, from its peer address and headers.
    pub fn without_token(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Unauthenticated {
        match &self.inner.auth {
            AdminAuth::Tokens => Unauthenticated::Unknown,
            AdminAuth::None => Unauthenticated::Known(Identity {
                user: "anonymous".into(),
                roles: vec![Role::Admin],
            }),
            AdminAuth::TrustedHeader(t) => proxied(t, peer, headers),
        }
    }

    /// Records a failed authentication (a wrong token at the login form); the answer to
    /// give, as for a wrong bearer token.
    pub fn refuse(&self) -> Response {
        refuse(self)
    }

    /// `routes`, each answered only for a token whose roles grant `permission`.
    pub fn guard<S: Clone + Send + Sync + 'static>(
        &self,
        routes: Router<S>,
        permission: Permission,
    ) -> Router<S> {
        routes.route_layer(middleware::from_fn_with_state(
            (self.clone(), permission),
            authorize,
        ))
    }

    /// The identity of the token presented, or `None` when it matches no configured token.
    /// Every token is compared, whichever matches, so timing tells nothing.
    fn identity(&self, presented: &[u8; 32]) -> Option<Identity> {
        let mut found: Option<Identity> = None;
        for (digest, roles, name) in &self.inner.tokens {
            if bool::from(presented.ct_eq(digest)) {
                let identity = found.get_or_insert_with(|| Identity {
                    user: name.clone(),
                    roles: Vec::new(),
                });
                identity.roles.extend(roles);
            }
        }
        found
    }
}

/// The user an auth proxy names, when the peer is one of the trusted proxies.
fn proxied(t: &TrustedHeader, peer: Option<SocketAddr>, headers: &HeaderMap) -> Unauthenticated {
    let Some(user) = headers
        .get(t.user_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|u| !u.is_empty())
    else {
        return Unauthenticated::Unknown;
    };
    let trusted = peer.is_some_and(|p| {
        let ip = p.ip().to_canonical();
        t.proxies.iter().any(|proxy| proxy.to_canonical() == ip)
    });
    if !trusted {
        return Unauthenticated::UntrustedPeer;
    }
    let mut roles: Vec<Role> = Vec::new();
    for group in headers
        .get_all(t.groups_header.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        for role in t.group_roles.get(group).into_iter().flatten() {
            if !roles.contains(role) {
                roles.push(*role);
            }
        }
    }
    Unauthenticated::Known(Identity {
        user: user.chars().take(200).collect(),
        roles,
    })
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The peer address of a request served with connect info.
pub fn peer(request: &Request) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

async fn authorize(
    State((access, permission)): State<(Access, Permission)>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| digest(t.trim().as_bytes()));
    let identity = match presented {
        Some(d) => access.identity(&d),
        None => match access.without_token(peer(&request), request.headers()) {
            Unauthenticated::Known(identity) => Some(identity),
            Unauthenticated::UntrustedPeer => {
                tracing::warn!(peer = ?peer(&request), "user header from a peer that is not a trusted proxy refused");
                None
            }
            Unauthenticated::Unknown => None,
        },
    };
    match identity {
        Some(identity) if identity.can(permission) => {
            request.extensions_mut().insert(identity);
            next.run(request).await
        }
        Some(identity) => {
            let names: Vec<&str> = identity.roles.iter().map(|r| r.name()).collect();
            (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({
                    "error": format!("this token's roles ({}) do not allow this request", names.join(", "))
                })),
            )
                .into_response()
        }
        None => refuse(&access),
    }
}

/// The answer to a missing or wrong token: 401 within the failure budget, 429 beyond it.
fn refuse(access: &Access) -> Response {
    let (allowed, to_log) = match access.inner.failures.lock() {
        Ok(mut failures) => failures.record(Instant::now()),
        Err(poisoned) => poisoned.into_inner().record(Instant::now()),
    };
    metrics::counter!(AUTH_FAILURES_METRIC, "limited" => if allowed { "false" } else { "true" })
        .increment(1);
    if let Some(count) = to_log {
        tracing::warn!(
            refused = count,
            interval_s = AUTH_LOG_INTERVAL.as_secs(),
            "admin requests refused: missing or wrong token"
        );
    }
    if allowed {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({ "error": "unauthorized" })),
        )
            .into_response()
    } else {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            Json(serde_json::json!({ "error": "too many failed authentications; slow down" })),
        )
            .into_response()
    }
}

/// Logs failures still uncounted in a line once their interval is over, so the last ones of
/// a burst are reported too; stops when the routes are dropped.
fn flush_failure_counts(failures: std::sync::Weak<Mutex<AuthFailures>>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(AUTH_LOG_INTERVAL);
        loop {
            tick.tick().await;
            let Some(failures) = failures.upgrade() else {
                return;
            };
            let count = match failures.lock() {
                Ok(mut f) => f.flush(Instant::now()),
                Err(poisoned) => poisoned.into_inner().flush(Instant::now()),
            };
            if let Some(count) = count {
                tracing::warn!(
                    refused = count,
                    interval_s = AUTH_LOG_INTERVAL.as_secs(),
                    "admin requests refused: missing or wrong token"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_authentications_beyond_the_burst_are_limited_and_logged_in_aggregate() {
        let mut failures = AuthFailures::new();
        let start = Instant::now();
        let mut limited = 0;
        let mut logged = Vec::new();
        for _ in 0..100 {
            let (allowed, to_log) = failures.record(start);
            limited += usize::from(!allowed);
            logged.extend(to_log);
        }
        assert_eq!(limited, 100 - AUTH_FAILURE_BURST as usize);
        assert_eq!(
            logged,
            vec![1],
            "one line at first, the rest waits for the interval"
        );
        // The budget refills, and the next line carries the count since the last one.
        let later = start + AUTH_LOG_INTERVAL;
        let (allowed, to_log) = failures.record(later);
        assert!(allowed);
        assert_eq!(to_log, Some(100));
        // Failures after the last line are flushed once their interval is over.
        failures.record(later);
        assert_eq!(failures.flush(later), None);
        assert_eq!(failures.flush(later + AUTH_LOG_INTERVAL), Some(1));
        assert_eq!(failures.flush(later + 3 * AUTH_LOG_INTERVAL), None);
    }
}
