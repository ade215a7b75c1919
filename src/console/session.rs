//! Browser sessions of the console: a random id in an HttpOnly, SameSite=Strict cookie,
//! mapped in memory to who logged in and the session's CSRF token. Sessions end after the
//! configured idle time, on logout, and with the process (operators log in again after a
//! restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::access::Identity;

/// The session cookie's name.
pub const COOKIE: &str = "bosun_session";
/// The cookie holding the login form's CSRF token before there is a session.
pub const LOGIN_COOKIE: &str = "bosun_login";
/// Sessions kept at most; the oldest are dropped beyond (a login flood cannot grow memory).
const MAX_SESSIONS: usize = 10_000;

/// 32 random bytes as hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Whether `a` and `b` are equal, compared in constant time.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[derive(Debug, Clone)]
pub struct Session {
    pub identity: Identity,
    /// Every form of the session carries it; a POST without it is refused.
    pub csrf: String,
    last_used: Instant,
}

/// The sessions of one console.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Session>>>,
    ttl: Duration,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Arc::default(),
            ttl,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Session>) -> R) -> R {
        match self.inner.lock() {
            Ok(mut map) => f(&mut map),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// A new session for `identity`: (session id, session).
    pub fn create(&self, identity: Identity) -> (String, Session) {
        let id = random_token();
        let session = Session {
            identity,
            csrf: random_token(),
            last_used: Instant::now(),
        };
        let ttl = self.ttl;
        self.with(|map| {
            let now = Instant::now();
            map.retain(|_, s| now.saturating_duration_since(s.last_used) < ttl);
            if map.len() >= MAX_SESSIONS
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
            map.insert(id.clone(), session.clone());
        });
        (id, session)
    }

    /// The live session `id`, its idle time restarted.
    pub fn get(&self, id: &str) -> Option<Session> {
        let ttl = self.ttl;
        self.with(|map| {
            let now = Instant::now();
            let session = map.get_mut(id)?;
            if now.saturating_duration_since(session.last_used) >= ttl {
                map.remove(id);
                return None;
            }
            session.last_used = now;
            Some(session.clone())
        })
    }

    pub fn remove(&self, id: &str) {
        self.with(|map| map.remove(id));
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A `Set-Cookie` value for the console (`Path=/ui`, HttpOnly, SameSite=Strict).
pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<Duration>) -> String {
    let mut out = format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        out.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    if secure {
        out.push_str("; Secure");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::Role;

    fn who() -> Identity {
        Identity {
            user: "ops".into(),
            roles: vec![Role::Viewer],
        }
    }

    #[test]
    fn sessions_end_after_their_idle_time() {
        let sessions = Sessions::new(Duration::from_millis(30));
        let (id, session) = sessions.create(who());
        assert_eq!(sessions.get(&id).map(|s| s.csrf), Some(session.csrf));
        std::thread::sleep(Duration::from_millis(40));
        assert!(sessions.get(&id).is_none());
        assert!(sessions.get("nonsense").is_none());
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = set_cookie(COOKIE, "abc", true, None);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Secure"));
        assert_eq!(cookie("a=1; bosun_session=xyz; b=2", COOKIE), Some("xyz"));
        assert_eq!(cookie("a=1", COOKIE), None);
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
