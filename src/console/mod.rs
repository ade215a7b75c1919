//! The dead-letter console: server-rendered pages under `/ui` on the admin listener, for
//! operators who look at failures and replay or purge them.
//!
//! - [`session`]: login with a token (or an auth proxy's headers), the session cookie
//!   (HttpOnly, SameSite=Strict) and its CSRF token;
//! - [`html`]: escaping and the page frame;
//! - [`pages`]: overview, groups, messages, message detail, operations.
//!
//! Every response carries a Content-Security-Policy that allows no inline script and
//! nothing from another origin; the CSS and the one small script are compiled into the
//! binary. Every page reads without JavaScript. Every form carries the session's CSRF
//! token, and a POST without it is refused before any handler runs. Replays and purges are
//! recorded operations ([`crate::dead_letter::operations`]), audited with who asked.
//!
//! Architecture Invariant: no `/ui` route but the login form and the static files answers
//! without a session.

pub mod html;
mod pages;
pub mod session;

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::access::{Access, Identity, Unauthenticated};
use crate::config::{AdminAuth, ConsoleConfig};
use crate::dead_letter::admin::AdminOps;
use crate::flow_control::Flows;
use crate::health::Health;
use session::{COOKIE, Session, Sessions};

/// Largest form body accepted (a filter and a few fields; an edited body when enabled).
const MAX_FORM_BYTES: usize = 256 * 1024;

/// The policy every console response carries: same-origin files only, no inline script,
/// no framing, forms only to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the pages work with.
#[derive(Clone)]
pub struct Console {
    pub(crate) ops: AdminOps,
    pub(crate) access: Access,
    pub(crate) sessions: Sessions,
    pub(crate) config: ConsoleConfig,
    pub(crate) health: Health,
    pub(crate) flows: Flows,
}

impl Console {
    pub fn new(
        ops: AdminOps,
        access: Access,
        config: ConsoleConfig,
        health: Health,
        flows: Flows,
    ) -> Self {
        Self {
            sessions: Sessions::new(config.session_ttl),
            ops,
            access,
            config,
            health,
            flows,
        }
    }
}

/// The console's routes: the login form and static files open, everything else behind a
/// session (and, for POSTs, its CSRF token).
pub fn routes(console: Console) -> Router {
    let open = Router::new()
        .route("/ui/login", get(pages::login_form).post(pages::login))
        .route("/ui/static/console.css", get(css))
        .route("/ui/static/console.js", get(js));
    let guarded = Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(pages::overview))
        .route("/ui/groups", get(pages::groups))
        .route("/ui/messages", get(pages::messages))
        .route("/ui/messages/{id}", get(pages::message))
        .route(
            "/ui/operations",
            get(pages::operations).post(pages::start_operation),
        )
        .route("/ui/operations/preview", post(pages::preview_operation))
        .route("/ui/operations/{id}", get(pages::operation))
        .route("/ui/operations/{id}/cancel", post(pages::cancel_operation))
        .route("/ui/logout", post(pages::logout))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            authenticate,
        ));
    open.merge(guarded)
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/console.css"),
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        include_str!("assets/console.js"),
    )
        .into_response()
}

/// Adds the security headers to every console response.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// An error page with `status`.
pub(crate) fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/ui\">Back to the overview</a></p>",
        status.as_u16(),
        html::esc(message)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html::page("Error", "", None, None, &body),
    )
        .into_response()
}

/// The session of a request, found or (with an auth proxy or `auth = "none"`) made; a GET
/// without one goes to the login form, anything else is refused. A POST must carry the
/// session's CSRF token in its form.
async fn authenticate(State(console): State<Console>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let cookie_id = request
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| session::cookie(c, COOKIE))
        .map(str::to_owned);
    let existing = cookie_id.as_deref().and_then(|id| console.sessions.get(id));
    let mut new_cookie = None;
    let session = match (&console.config.auth, existing) {
        // Behind an auth proxy the proxy's word is checked on every request: a session
        // opened for another user is not reused.
        (AdminAuth::TrustedHeader(_), existing) => {
            match console.access.without_token(peer, request.headers()) {
                Unauthenticated::Known(identity) => match existing {
                    Some(s) if s.identity == identity => s,
                    _ => {
                        let (id, s) = console.sessions.create(identity);
                        new_cookie = Some(id);
                        s
                    }
                },
                Unauthenticated::UntrustedPeer => {
                    tracing::warn!(peer = ?peer, "console: user header from a peer that is not a trusted proxy refused");
                    return error_page(
                        StatusCode::FORBIDDEN,
                        "this address is not a trusted proxy",
                    );
                }
                Unauthenticated::Unknown => match existing {
                    Some(s) => s,
                    None => return no_session(&request),
                },
            }
        }
        (_, Some(s)) => s,
        (AdminAuth::None, None) => match console.access.without_token(peer, request.headers()) {
            Unauthenticated::Known(identity) => {
                let (id, s) = console.sessions.create(identity);
                new_cookie = Some(id);
                s
            }
            _ => return no_session(&request),
        },
        (AdminAuth::Tokens, None) => return no_session(&request),
    };
    let request = if request.method() == Method::POST {
        match checked_form(request, &session).await {
            Ok(request) => request,
            Err(response) => return response,
        }
    } else {
        request
    };
    let mut request = request;
    request.extensions_mut().insert(session);
    let mut response = next.run(request).await;
    if let Some(id) = new_cookie
        && let Ok(value) = HeaderValue::from_str(&session::set_cookie(
            COOKIE,
            &id,
            console.config.secure_cookies,
            None,
        ))
    {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// No session: a GET is sent to the login form (and back after it), anything else refused.
fn no_session(request: &Request) -> Response {
    if request.method() == Method::GET {
        let next = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/ui".into());
        Redirect::to(&format!("/ui/login?next={}", html::qs(&next))).into_response()
    } else {
        error_page(StatusCode::UNAUTHORIZED, "log in first")
    }
}

/// The request with its form body read, once the form's `csrf` field matches the session's
/// token; otherwise the 403 to answer.
async fn checked_form(request: Request, session: &Session) -> Result<Request, Response> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| error_page(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"))?;
    let token = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned());
    match token {
        Some(t) if session::same(&t, &session.csrf) => {
            Ok(Request::from_parts(parts, Body::from(bytes)))
        }
        _ => {
            tracing::warn!(user = %session.identity.user, path = %parts.uri.path(), "console form without a valid CSRF token refused");
            Err(error_page(
                StatusCode::FORBIDDEN,
                "this form has no valid CSRF token: reload the page and try again",
            ))
        }
    }
}

/// The identity and CSRF token of the page's session, for the frame.
pub(crate) fn who(session: &Session) -> (&Identity, &str) {
    (&session.identity, session.csrf.as_str())
}
