//! The console's pages. Each handler reads through [`Ops`](crate::dead_letter::ops::Ops),
//! [`browse`] and [`operations`], and answers a whole HTML page.

use std::fmt::Write as _;

use axum::Extension;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::html::{self, csrf_field, cut, esc, opt_time, page, query, time};
use super::session::{self, LOGIN_COOKIE, Session};
use super::{Console, error_page, who};
use crate::config::AdminAuth;
use crate::dead_letter::DeadLetterError;
use crate::dead_letter::archive::{Row, Summary};
use crate::dead_letter::browse::{self, Filter, GroupBy};
use crate::dead_letter::operations::{self, Kind, Operation};
use crate::dead_letter::ops::parse_time;
use crate::roles::Permission;

/// Rows per messages page.
const PAGE_ROWS: i64 = 50;
/// Groups shown at most.
const MAX_GROUPS: i64 = 500;
/// Bodies are shown up to this many bytes.
const BODY_CAP: usize = 64 * 1024;
/// Most ids a selection may carry.
const MAX_SELECTED: usize = 1000;

fn html_ok(body: String) -> Response {
    Html(body).into_response()
}

fn db_error(e: &DeadLetterError) -> Response {
    let status = match e {
        DeadLetterError::Invalid(_) => StatusCode::BAD_REQUEST,
        DeadLetterError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error_page(status, &crate::redact::text(&e.to_string()))
}

// ---------------------------------------------------------------- login

#[derive(Deserialize)]
pub(crate) struct NextQuery {
    next: Option<String>,
}

/// Where to go after login: a console path only (never another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/ui".into(),
    }
}

fn login_page(csrf: &str, next: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let body = format!(
        "<div class=\"login\"><h1>Dead-letter console</h1>{error}\
         <form method=\"post\" action=\"/ui/login\">{}\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <label for=\"token\">Access token<input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus></label>\
         <button type=\"submit\">Log in</button></form>\
         <p class=\"muted\">A token from <code>[http.admin]</code> with the viewer, operator, editor or admin role.</p></div>",
        csrf_field(csrf),
        esc(next)
    );
    page("Log in", "", None, None, &body)
}

/// The login form; its CSRF token sits in a short-lived cookie until there is a session.
pub(crate) async fn login_form(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if !matches!(console.config.auth, AdminAuth::Tokens) {
        return Redirect::to(&next).into_response();
    }
    let existing = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| session::cookie(c, LOGIN_COOKIE))
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned);
    let csrf = existing.unwrap_or_else(session::random_token);
    let mut response = html_ok(login_page(&csrf, &next, None));
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        LOGIN_COOKIE,
        &csrf,
        console.config.secure_cookies,
        Some(std::time::Duration::from_secs(3600)),
    )) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    csrf: Option<String>,
    token: Option<String>,
    next: Option<String>,
}

pub(crate) async fn login(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let expected = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| session::cookie(c, LOGIN_COOKIE));
    let csrf_ok =
        matches!((form.csrf.as_deref(), expected), (Some(a), Some(b)) if session::same(a, b));
    if !csrf_ok {
        tracing::warn!("console login without a valid CSRF token refused");
        return error_page(
            StatusCode::FORBIDDEN,
            "this form has no valid CSRF token: reload the login page and try again",
        );
    }
    let identity = form
        .token
        .as_deref()
        .and_then(|t| console.access.token_identity(t));
    let Some(identity) = identity else {
        // Counted and limited like a wrong bearer token.
        let refused = console.access.refuse();
        let status = refused.status();
        let message = if status == StatusCode::TOO_MANY_REQUESTS {
            "too many failed logins; wait a moment"
        } else {
            "that token is not valid"
        };
        let csrf = expected.unwrap_or_default();
        return (status, Html(login_page(csrf, &next, Some(message)))).into_response();
    };
    tracing::info!(user = %identity.user, "console login");
    let (id, _) = console.sessions.create(identity);
    let mut response = Redirect::to(&next).into_response();
    for cookie in [
        session::set_cookie(session::COOKIE, &id, console.config.secure_cookies, None),
        session::set_cookie(
            LOGIN_COOKIE,
            "",
            console.config.secure_cookies,
            Some(std::time::Duration::ZERO),
        ),
    ] {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    response
}

pub(crate) async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
    Extension(s): Extension<Session>,
) -> Response {
    if let Some(id) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| session::cookie(c, session::COOKIE))
    {
        console.sessions.remove(id);
    }
    tracing::info!(user = %s.identity.user, "console logout");
    let mut response = Redirect::to("/ui/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        session::COOKIE,
        "",
        console.config.secure_cookies,
        Some(std::time::Duration::ZERO),
    )) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

// ---------------------------------------------------------------- overview

/// `bosun_consumer_backlog{consumer="NAME"} VALUE` lines of the metrics text.
fn backlogs(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("bosun_consumer_backlog{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let consumer = labels
            .split(',')
            .find_map(|l| l.strip_prefix("consumer=\""))
            .map(|v| v.trim_end_matches('"').to_owned());
        if let (Some(c), Ok(v)) = (consumer, value.trim().parse::<f64>()) {
            out.insert(c, v);
        }
    }
    out
}

pub(crate) async fn overview(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
) -> Response {
    let mut body = String::from("<h1>Overview</h1>");
    let health = console.health.snapshot();
    let flows = console.flows.status();
    let metrics = crate::telemetry::render(&crate::telemetry::metrics_handle());
    let backlog = backlogs(&metrics);
    body.push_str("<h2>Components</h2><table><thead><tr><th scope=\"col\">Component</th><th scope=\"col\">State</th><th scope=\"col\" class=\"num\">In flight</th><th scope=\"col\" class=\"num\">Backlog</th><th scope=\"col\">Since</th><th scope=\"col\">Detail</th></tr></thead><tbody>");
    for (name, c) in &health {
        let flow = flows.consumers.get(name);
        let state = match flow {
            Some(f) if f.stopped.is_some() => "stopped",
            Some(f) if f.state == "paused" => "paused",
            _ if !c.ready => "reconnecting",
            _ => "running",
        };
        let detail = match flow {
            Some(f) if f.stopped.is_some() => f.stopped.clone().unwrap_or_default(),
            Some(f) if f.paused.is_some() || f.breaker.is_some() => {
                format!("breaker: {}", f.breaker.unwrap_or("closed"))
            }
            _ => c.reason.clone(),
        };
        let since = chrono::DateTime::from_timestamp(c.since as i64, 0);
        let _ = write!(
            body,
            "<tr><th scope=\"row\">{}</th><td class=\"state-{state}\">{state}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            flow.map(|f| f.in_flight.to_string())
                .unwrap_or_else(|| "-".into()),
            backlog
                .get(name)
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            opt_time(since),
            cut(&crate::redact::text(&detail), 160),
        );
    }
    body.push_str("</tbody></table>");
    let ops = console.ops.current();
    body.push_str("<h2>Dead letters, last 24 hours</h2>");
    match ops.target(None) {
        Ok(t) => match browse::last_day(&t.pool, &t.table, &t.processors).await {
            Ok(hours) => {
                let total: i64 = hours.iter().sum();
                let last_hour = hours.last().copied().unwrap_or(0);
                let _ = write!(
                    body,
                    "<p><span class=\"spark\" aria-hidden=\"true\">{}</span></p>\
                     <p><strong>{total}</strong> archived in the last 24 hours, <strong>{last_hour}</strong> in the last hour \
                     (per hour, oldest first: {}).</p><p><a href=\"/ui/groups\">See the failure groups</a></p>",
                    html::sparkline(&hours),
                    hours
                        .iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Err(e) => {
                let _ = write!(
                    body,
                    "<p class=\"error\">{}</p>",
                    esc(&crate::redact::text(&e.to_string()))
                );
            }
        },
        Err(e) => {
            let _ = write!(body, "<p class=\"notice\">{}</p>", esc(&e.to_string()));
        }
    }
    html_ok(page("Overview", "/ui", Some(who(&s)), None, &body))
}

// ---------------------------------------------------------------- groups

#[derive(Deserialize, Default)]
pub(crate) struct GroupsQuery {
    by: Option<String>,
    header: Option<String>,
    processor: Option<String>,
}

/// The link to the messages of a filter.
fn messages_link(f: &Filter) -> String {
    format!("/ui/messages{}", filter_query(f))
}

/// The query string of a filter (as the messages page reads it).
fn filter_query(f: &Filter) -> String {
    query(&[
        ("group", f.group.clone()),
        ("processor", f.processor.clone()),
        ("source", f.source.clone()),
        ("kind", f.kind.clone()),
        ("routing_key", f.routing_key.clone()),
        ("q", f.text.clone()),
        ("header", f.header.as_ref().map(|(k, v)| format!("{k}={v}"))),
        ("since", f.since.map(|t| t.to_rfc3339())),
        ("until", f.until.map(|t| t.to_rfc3339())),
        ("status", f.status.clone()),
        (
            "ids",
            f.ids
                .as_ref()
                .map(|ids| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
        ),
    ])
}

/// Hidden fields carrying a filter in a form.
fn filter_fields(f: &Filter) -> String {
    let mut out = String::new();
    let mut add = |name: &str, value: Option<String>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let _ = write!(
                out,
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                esc(&v)
            );
        }
    };
    add("group", f.group.clone());
    add("processor", f.processor.clone());
    add("source", f.source.clone());
    add("kind", f.kind.clone());
    add("routing_key", f.routing_key.clone());
    add("q", f.text.clone());
    add("header", f.header.as_ref().map(|(k, v)| format!("{k}={v}")));
    add("since", f.since.map(|t| t.to_rfc3339()));
    add("until", f.until.map(|t| t.to_rfc3339()));
    add("status", f.status.clone());
    add(
        "ids",
        f.ids
            .as_ref()
            .map(|ids| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")),
    );
    out
}

/// The form that asks for a dry run of a replay (and, for admins, a purge) of `filter`.
fn operation_form(s: &Session, filter: &Filter, label: &str) -> String {
    let can_replay = s.identity.can(Permission::ReplayDeadLetters);
    let can_purge = s.identity.can(Permission::PurgeDeadLetters);
    if !can_replay && !can_purge {
        return String::new();
    }
    let mut kinds = String::new();
    if can_replay {
        kinds.push_str("<option value=\"replay\">replay</option>");
    }
    if can_purge {
        kinds.push_str("<option value=\"purge\">purge</option>");
    }
    format!(
        "<form class=\"actions\" method=\"post\" action=\"/ui/operations/preview\" aria-label=\"{}\">{}{}\
         <label>Action<select name=\"op\">{kinds}</select></label>\
         <label>Rate<input name=\"rate\" size=\"8\" placeholder=\"50/s\" aria-label=\"Rate, e.g. 50/s\"></label>\
         <label>Batch<input name=\"batch_size\" size=\"5\" value=\"{}\"></label>\
         <button type=\"submit\">{}</button></form>",
        esc(label),
        csrf_field(&s.csrf),
        filter_fields(filter),
        operations::DEFAULT_BATCH,
        esc(label)
    )
}

pub(crate) async fn groups(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Query(q): Query<GroupsQuery>,
) -> Response {
    let by = GroupBy::parse(q.by.as_deref().unwrap_or("reason"), q.header.as_deref());
    let processor = q.processor.as_deref().filter(|p| !p.is_empty());
    let ops = console.ops.current();
    let t = match ops.target(processor) {
        Ok(t) => t,
        Err(e) => return db_error(&e),
    };
    let groups = match browse::groups(&t.pool, &t.table, &t.processors, &by, MAX_GROUPS).await {
        Ok(g) => g,
        Err(e) => return db_error(&e),
    };
    // The latest replay of each failure group, and what failed in it since.
    let mut replays = std::collections::HashMap::new();
    if by == GroupBy::Reason && !groups.is_empty() {
        let keys: Vec<String> = groups.iter().map(|g| g.key.clone()).collect();
        if let Ok(ops_rows) = operations::latest_group_replays(&ops, processor, &keys).await {
            for op in ops_rows {
                if let Some(key) = op.filter.group.clone() {
                    let fresh = browse::arrived_after(
                        &t.pool,
                        &t.table,
                        &t.processors,
                        &by.filter_for(&key),
                        op.max_id,
                    )
                    .await
                    .unwrap_or(0);
                    replays.insert(key, (op, fresh));
                }
            }
        }
    }
    let mut body = String::from("<h1>Failure groups</h1>");
    let options: String = [
        ("reason", "reason (kind and normalised error)"),
        ("original", "original queue or stream"),
        ("consumer", "consumer"),
        ("routing_key", "routing key"),
        ("header", "a header"),
    ]
    .iter()
    .map(|(v, label)| {
        let selected = if *v == by.name() { " selected" } else { "" };
        format!("<option value=\"{v}\"{selected}>{label}</option>")
    })
    .collect();
    let header_value = match &by {
        GroupBy::Header(h) => esc(h),
        _ => String::new(),
    };
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/ui/groups\">\
         <label>Group by<select name=\"by\">{options}</select></label>\
         <label>Header name<input name=\"header\" value=\"{header_value}\" placeholder=\"tenant\"></label>\
         <button type=\"submit\">Group</button></form>"
    );
    if groups.is_empty() {
        body.push_str("<p class=\"notice\">No archived dead letters. Nothing to do.</p>");
    } else {
        let _ = write!(
            body,
            "<table><thead><tr><th scope=\"col\">{}</th><th scope=\"col\">Kind</th><th scope=\"col\">Error (normalised)</th><th scope=\"col\">Original</th><th scope=\"col\">Processor</th><th scope=\"col\" class=\"num\">Count</th><th scope=\"col\">First failure</th><th scope=\"col\">Last failure</th><th scope=\"col\">Last replay</th><th scope=\"col\">Actions</th></tr></thead><tbody>",
            match by {
                GroupBy::Reason => "Group",
                _ => "Key",
            }
        );
        for g in &groups {
            let filter = by.filter_for(&g.key);
            let normalised =
                crate::dead_letter::group::normalize(g.sample_error.as_deref().unwrap_or(""));
            let last_replay = match replays.get(&g.key) {
                Some((op, fresh)) => {
                    let fresh = if *fresh > 0 {
                        format!(" <span class=\"new\">{fresh} new since it started</span>")
                    } else {
                        String::new()
                    };
                    format!(
                        "<a href=\"/ui/operations/{}\">#{}</a> <span class=\"state-{}\">{}</span> {}{fresh}",
                        op.id,
                        op.id,
                        esc(&op.state),
                        esc(&op.state),
                        time(op.created_at)
                    )
                }
                None => "-".into(),
            };
            let key_text = if g.key.is_empty() {
                "(none)"
            } else {
                g.key.as_str()
            };
            let _ = write!(
                body,
                "<tr><th scope=\"row\"><a href=\"{}\" class=\"mono\">{}</a></th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{last_replay}</td><td>{}</td></tr>",
                messages_link(&filter),
                esc(key_text),
                esc(&g.error_kind),
                cut(&normalised, 120),
                esc(g.original.as_deref().unwrap_or("-")),
                esc(&g.processors.join(", ")),
                g.count,
                time(g.first_seen),
                time(g.last_seen),
                operation_form(&s, &filter, "Replay group…"),
            );
        }
        body.push_str("</tbody></table>");
    }
    html_ok(page("Groups", "/ui/groups", Some(who(&s)), None, &body))
}

// ---------------------------------------------------------------- messages

/// The filter fields of the messages page and of operation forms (all text, as sent).
#[derive(Deserialize, Default, Debug)]
pub(crate) struct FilterForm {
    group: Option<String>,
    processor: Option<String>,
    source: Option<String>,
    kind: Option<String>,
    routing_key: Option<String>,
    q: Option<String>,
    header: Option<String>,
    since: Option<String>,
    until: Option<String>,
    status: Option<String>,
    ids: Option<String>,
    before: Option<String>,
}

fn given(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl FilterForm {
    fn filter(&self) -> Result<Filter, String> {
        let time = |v: &Option<String>| -> Result<_, String> {
            given(v)
                .map(|t| parse_time(&t).map_err(|e| e.to_string()))
                .transpose()
        };
        let header = match given(&self.header) {
            Some(h) => match h.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Some((k.trim().to_owned(), v.trim().to_owned()))
                }
                _ => return Err(format!("header filter `{h}` is not `name=value`")),
            },
            None => None,
        };
        let ids = match given(&self.ids) {
            Some(list) => {
                let ids: Result<Vec<i64>, _> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::parse::<i64>)
                    .collect();
                let ids = ids.map_err(|_| format!("`{list}` is not a list of row ids"))?;
                if ids.len() > MAX_SELECTED {
                    return Err(format!("at most {MAX_SELECTED} rows may be selected"));
                }
                Some(ids)
            }
            None => None,
        };
        Ok(Filter {
            ids,
            group: given(&self.group),
            processor: given(&self.processor),
            source: given(&self.source),
            kind: given(&self.kind),
            routing_key: given(&self.routing_key),
            text: given(&self.q),
            header,
            since: time(&self.since)?,
            until: time(&self.until)?,
            status: given(&self.status),
        })
    }
}

fn summary_rows(rows: &[Summary]) -> String {
    let mut out = String::from(
        "<table><thead><tr><th scope=\"col\">Id</th><th scope=\"col\">Archived</th><th scope=\"col\">Status</th><th scope=\"col\">Kind</th><th scope=\"col\">Original</th><th scope=\"col\">Message id</th><th scope=\"col\" class=\"num\">Attempts</th><th scope=\"col\">Error</th></tr></thead><tbody>",
    );
    for r in rows {
        let _ = write!(
            out,
            "<tr><th scope=\"row\"><a href=\"/ui/messages/{}\">{}</a></th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            r.id,
            r.id,
            time(r.archived_at),
            esc(&r.status),
            esc(&r.failure.error_kind),
            esc(r.original.as_deref().unwrap_or("-")),
            cut(r.message_id.as_deref().unwrap_or("-"), 40),
            r.failure.attempts,
            cut(r.failure.error.as_deref().unwrap_or("-"), 120),
        );
    }
    out.push_str("</tbody></table>");
    out
}

pub(crate) async fn messages(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Query(form): Query<FilterForm>,
) -> Response {
    let filter = match form.filter() {
        Ok(f) => f,
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e),
    };
    let before = given(&form.before).and_then(|b| b.parse::<i64>().ok());
    let ops = console.ops.current();
    let t = match ops.target(filter.processor.as_deref()) {
        Ok(t) => t,
        Err(e) => return db_error(&e),
    };
    let rows =
        match browse::page(&t.pool, &t.table, &t.processors, &filter, before, PAGE_ROWS).await {
            Ok(r) => r,
            Err(e) => return db_error(&e),
        };
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or(""));
    let statuses: String = ["", "archived", "scheduled", "replayed", "failed", "purged"]
        .iter()
        .map(|st| {
            let selected = if form.status.as_deref().unwrap_or("") == *st {
                " selected"
            } else {
                ""
            };
            let label = if st.is_empty() { "all but purged" } else { st };
            format!("<option value=\"{st}\"{selected}>{label}</option>")
        })
        .collect();
    let mut body = String::from("<h1>Messages</h1>");
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/ui/messages\" role=\"search\">\
         <label>Text (error, reason, message or correlation id)<input name=\"q\" value=\"{}\"></label>\
         <label>Group<input name=\"group\" value=\"{}\" size=\"18\"></label>\
         <label>Original queue/stream<input name=\"source\" value=\"{}\"></label>\
         <label>Kind<input name=\"kind\" value=\"{}\" size=\"10\"></label>\
         <label>Header name=value<input name=\"header\" value=\"{}\"></label>\
         <label>Since (RFC 3339 or 2h)<input name=\"since\" value=\"{}\" size=\"14\"></label>\
         <label>Until<input name=\"until\" value=\"{}\" size=\"14\"></label>\
         <label>Status<select name=\"status\">{statuses}</select></label>\
         <button type=\"submit\">Filter</button> <a href=\"/ui/messages\">Clear</a></form>",
        v(&form.q),
        v(&form.group),
        v(&form.source),
        v(&form.kind),
        v(&form.header),
        v(&form.since),
        v(&form.until),
    );
    let _ = write!(
        body,
        "<p class=\"muted\">Filter: {}. Newest first; {} per page.</p>",
        esc(&filter.describe()),
        PAGE_ROWS
    );
    if rows.is_empty() {
        body.push_str("<p class=\"notice\">No dead letters match.</p>");
    } else {
        body.push_str(&summary_rows(&rows));
        let mut selection = filter.clone();
        selection.ids = Some(rows.iter().map(|r| r.id).collect());
        let _ = write!(
            body,
            "<h2>Act on these</h2><p class=\"muted\">Everything matching the filter, or only the rows on this page. A dry-run count comes first.</p>{}{}",
            operation_form(&s, &filter, "Everything matching…"),
            operation_form(&s, &selection, "This page…")
        );
        if rows.len() as i64 == PAGE_ROWS
            && let Some(last) = rows.last()
        {
            let mut next = filter_query(&filter);
            next.push_str(if next.is_empty() { "?" } else { "&amp;" });
            let _ = write!(
                body,
                "<nav class=\"pager\" aria-label=\"Pages\"><a href=\"/ui/messages{next}before={}\" rel=\"next\">Older →</a></nav>",
                last.id
            );
        }
    }
    html_ok(page("Messages", "/ui/messages", Some(who(&s)), None, &body))
}

// ---------------------------------------------------------------- message detail

/// The body for a page: pretty JSON, text, or hex for binary; capped.
fn render_body(row: &Row) -> String {
    let Some(bytes) = row.body.as_deref() else {
        return "<p class=\"muted\">No body (purged, or empty).</p>".into();
    };
    let capped = &bytes[..bytes.len().min(BODY_CAP)];
    let note = if bytes.len() > BODY_CAP {
        format!(
            "<p class=\"muted\">Showing the first {BODY_CAP} of {} bytes.</p>",
            bytes.len()
        )
    } else {
        format!("<p class=\"muted\">{} bytes.</p>", bytes.len())
    };
    if bytes.len() <= BODY_CAP
        && let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes)
        && let Ok(pretty) = serde_json::to_string_pretty(&value)
    {
        return format!("{note}<p>JSON</p><pre>{}</pre>", esc(&pretty));
    }
    match std::str::from_utf8(capped) {
        Ok(text) => format!("{note}<p>Text</p><pre>{}</pre>", esc(text)),
        Err(_) => {
            let mut dump = String::new();
            for (i, chunk) in capped.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let ascii: String = chunk
                    .iter()
                    .map(|b| {
                        if b.is_ascii_graphic() || *b == b' ' {
                            *b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                let _ = writeln!(dump, "{:08x}  {:<47}  {}", i * 16, hex.join(" "), ascii);
            }
            format!("{note}<p>Binary (hex)</p><pre>{}</pre>", esc(&dump))
        }
    }
}

/// The trace id of a W3C `traceparent` header.
fn trace_id(headers: &serde_json::Value) -> Option<String> {
    let tp = headers.get("traceparent")?.as_str()?;
    let id = tp.split('-').nth(1)?;
    (id.len() == 32).then(|| id.to_owned())
}

pub(crate) async fn message(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
) -> Response {
    let ops = console.ops.current();
    let row = match ops.show(None, id).await {
        Ok(r) => r,
        Err(e) => return db_error(&e),
    };
    let d = &row.details;
    let mut body = format!("<h1>Dead letter {id}</h1>");
    let prop = |name: &str, value: String| format!("<dt>{name}</dt><dd>{value}</dd>");
    let text = |v: &Option<String>| esc(v.as_deref().unwrap_or("-"));
    let headers_value = match &row.headers {
        crate::dead_letter::archive::StoredJson::Value(v) => v.clone(),
        crate::dead_letter::archive::StoredJson::Undecodable(_) => serde_json::Value::Null,
    };
    let trace = trace_id(&headers_value);
    let mut props = String::new();
    for (k, v) in [
        ("Status", esc(&row.status)),
        ("Processor", esc(&d.processor)),
        ("Broker", esc(&d.broker)),
        ("Source (dead-letter queue)", esc(&d.source)),
        ("Original queue/stream", text(&d.original)),
        ("Original exchange", text(&d.original_exchange)),
        ("Routing key", text(&d.routing_key)),
        (
            "Message id",
            format!(
                "<span class=\"mono\">{}</span>",
                text(&row.text("message_id", &d.message_id))
            ),
        ),
        (
            "Correlation id",
            format!("<span class=\"mono\">{}</span>", text(&d.correlation_id)),
        ),
        ("Content type", text(&d.content_type)),
        (
            "Trace id",
            format!(
                "<span class=\"mono\">{}</span>",
                esc(trace.as_deref().unwrap_or("-"))
            ),
        ),
        (
            "Group",
            format!(
                "<a class=\"mono\" href=\"/ui/messages?group={}\">{}</a>",
                html::qs(&d.failure.group_key),
                esc(&d.failure.group_key)
            ),
        ),
        ("Note", text(&row.note)),
    ] {
        props.push_str(&prop(k, v));
    }
    let _ = write!(body, "<h2>Properties</h2><dl class=\"props\">{props}</dl>");
    let _ = write!(
        body,
        "<h2>Failure</h2><dl class=\"props\">{}{}{}{}{}{}{}{}{}</dl>",
        prop("Error kind", esc(&d.failure.error_kind)),
        prop(
            "Error",
            format!(
                "<span class=\"mono\">{}</span>",
                text(&row.text("error", &d.failure.error))
            )
        ),
        prop("Reason", text(&d.failure.reason)),
        prop("Attempts", d.failure.attempts.to_string()),
        prop("Replays so far", d.failure.replay_count.to_string()),
        prop("First failure", opt_time(d.first_failed_at)),
        prop("Archived", time(row.archived_at)),
        prop("Replayed", opt_time(row.replayed_at)),
        prop("Last replay error", text(&row.last_error)),
    );
    body.push_str("<h2>Headers</h2>");
    match &headers_value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            body.push_str("<table><thead><tr><th scope=\"col\">Name</th><th scope=\"col\">Value</th></tr></thead><tbody>");
            for (k, v) in map {
                let shown = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = write!(
                    body,
                    "<tr><th scope=\"row\" class=\"mono\">{}</th><td class=\"mono\">{}</td></tr>",
                    esc(k),
                    cut(&crate::redact::text(&shown), 2000)
                );
            }
            body.push_str("</tbody></table>");
        }
        _ => body.push_str("<p class=\"muted\">No headers.</p>"),
    }
    body.push_str("<h2>Body</h2>");
    let hidden = console.config.redact_bodies && !s.identity.can(Permission::ReplayDeadLetters);
    if hidden {
        body.push_str("<p class=\"notice\">Bodies are hidden from viewers (<code>redact_bodies = true</code>).</p>");
    } else {
        body.push_str(&render_body(&row));
    }
    if let Some(message_id) = row.text("message_id", &d.message_id) {
        let t = ops.target(None);
        if let Ok(t) = t
            && let Ok(history) =
                browse::same_message(&t.pool, &t.table, &t.processors, &message_id, 50).await
        {
            body.push_str("<h2>Failure history of this message id</h2><p class=\"muted\">Every archive row with the same message id: earlier failures and the failures of its replays.</p>");
            body.push_str(&summary_rows(&history));
        }
    }
    let selection = Filter {
        ids: Some(vec![id]),
        ..Filter::default()
    };
    let actions = operation_form(&s, &selection, "Replay this message…");
    if !actions.is_empty() {
        let _ = write!(body, "<h2>Actions</h2>{actions}");
    }
    html_ok(page(
        &format!("Dead letter {id}"),
        "/ui/messages",
        Some(who(&s)),
        None,
        &body,
    ))
}

// ---------------------------------------------------------------- operations

fn operation_row(op: &Operation) -> String {
    let progress = if op.total > 0 {
        format!(
            "<progress value=\"{}\" max=\"{}\" aria-label=\"progress of operation {}\"></progress> ",
            op.done + op.failed,
            op.total,
            op.id
        )
    } else {
        String::new()
    };
    format!(
        "<tr><th scope=\"row\"><a href=\"/ui/operations/{}\">#{}</a></th><td>{}</td><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{progress}<span class=\"state-{}\">{}</span></td><td>{}</td><td>{}</td></tr>",
        op.id,
        op.id,
        esc(&op.kind),
        messages_link(&op.filter),
        cut(&op.filter.describe(), 80),
        esc(&op.requested_by),
        op.rate_per_second
            .map(|r| format!("{r}/s"))
            .unwrap_or_else(|| "unlimited".into()),
        op.total,
        op.done,
        op.failed,
        esc(&op.state),
        esc(&op.state),
        time(op.created_at),
        opt_time(op.finished_at),
    )
}

const OPERATION_HEAD: &str = "<table><thead><tr><th scope=\"col\">Operation</th><th scope=\"col\">Kind</th><th scope=\"col\">Filter</th><th scope=\"col\">Requested by</th><th scope=\"col\">Rate</th><th scope=\"col\" class=\"num\">Total</th><th scope=\"col\" class=\"num\">Done</th><th scope=\"col\" class=\"num\">Failed</th><th scope=\"col\">State</th><th scope=\"col\">Started</th><th scope=\"col\">Finished</th></tr></thead><tbody>";

pub(crate) async fn operations(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
) -> Response {
    let ops = console.ops.current();
    let list = match operations::list(&ops, None, 100).await {
        Ok(l) => l,
        Err(e) => return db_error(&e),
    };
    let running = list.iter().any(|o| !o.finished());
    let mut body = String::from("<h1>Operations</h1>");
    if list.is_empty() {
        body.push_str("<p class=\"notice\">No replay or purge has run yet. Start one from the groups or messages page.</p>");
    } else {
        body.push_str(OPERATION_HEAD);
        for op in &list {
            body.push_str(&operation_row(op));
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Audit trail</h2>");
    match operations::audit_log(&ops, None, 100).await {
        Ok(entries) if !entries.is_empty() => {
            body.push_str("<table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">Who</th><th scope=\"col\">What</th><th scope=\"col\">Filter</th><th scope=\"col\" class=\"num\">Count</th><th scope=\"col\">Detail</th></tr></thead><tbody>");
            for a in entries {
                let filter = a
                    .filter
                    .and_then(|f| serde_json::from_value::<Filter>(f).ok())
                    .map(|f| f.describe())
                    .unwrap_or_else(|| "-".into());
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    time(a.at),
                    esc(&a.actor),
                    esc(&a.action),
                    cut(&filter, 80),
                    a.count.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    esc(a.detail.as_deref().unwrap_or(""))
                );
            }
            body.push_str("</tbody></table>");
        }
        Ok(_) => body.push_str("<p class=\"muted\">Nothing yet.</p>"),
        Err(e) => {
            let _ = write!(body, "<p class=\"error\">{}</p>", esc(&e.to_string()));
        }
    }
    html_ok(page(
        "Operations",
        "/ui/operations",
        Some(who(&s)),
        running.then_some(3),
        &body,
    ))
}

pub(crate) async fn operation(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
) -> Response {
    let ops = console.ops.current();
    let op = match operations::get(&ops, None, id).await {
        Ok(op) => op,
        Err(e) => return db_error(&e),
    };
    let mut body = format!("<h1>Operation #{id}: {}</h1>", esc(&op.kind));
    let _ = write!(
        body,
        "<p><progress value=\"{}\" max=\"{}\" aria-label=\"progress\"></progress> \
         <strong id=\"progress\">{} of {}</strong> done, {} failed — <span id=\"state\" class=\"state-{}\">{}</span></p>",
        op.done + op.failed,
        op.total.max(1),
        op.done,
        op.total,
        op.failed,
        esc(&op.state),
        esc(&op.state),
    );
    body.push_str(OPERATION_HEAD);
    body.push_str(&operation_row(&op));
    body.push_str("</tbody></table>");
    if let Some(e) = &op.last_error {
        let _ = write!(
            body,
            "<p class=\"error\">Last error: {}</p>",
            esc(&crate::redact::text(e))
        );
    }
    if let Some(by) = &op.cancelled_by {
        let _ = write!(body, "<p class=\"notice\">Cancelled by {}.</p>", esc(by));
    }
    if !op.finished() {
        body.push_str(
            "<p class=\"muted\">This page reloads every 2 seconds while the operation runs.</p>",
        );
        if s.identity.can(Permission::ReplayDeadLetters) {
            let _ = write!(
                body,
                "<form method=\"post\" action=\"/ui/operations/{id}/cancel\">{}<button class=\"danger\" type=\"submit\">Cancel</button></form>",
                csrf_field(&s.csrf)
            );
        }
    }
    let _ = write!(
        body,
        "<p><a href=\"{}\">Rows of this filter</a> · <a href=\"/ui/operations\">All operations</a></p>",
        messages_link(&op.filter)
    );
    html_ok(page(
        &format!("Operation {id}"),
        "/ui/operations",
        Some(who(&s)),
        (!op.finished()).then_some(2),
        &body,
    ))
}

/// A replay or purge request from a form: the filter, the kind, the pace.
#[derive(Deserialize, Debug)]
pub(crate) struct OperationForm {
    op: Option<String>,
    rate: Option<String>,
    batch_size: Option<String>,
    #[serde(flatten)]
    filter: FilterForm,
}

struct Planned {
    kind: Kind,
    filter: Filter,
    rate: Option<f64>,
    batch: i64,
}

/// The operation a form asks for, once the session may run it.
/// A refused plan's page, boxed: a `Response` is large and the plan is the common case.
fn refusal(status: StatusCode, message: &str) -> Box<Response> {
    Box::new(error_page(status, message))
}

fn plan(s: &Session, form: &OperationForm) -> Result<Planned, Box<Response>> {
    let kind = form
        .op
        .as_deref()
        .and_then(Kind::parse)
        .ok_or_else(|| refusal(StatusCode::BAD_REQUEST, "choose replay or purge"))?;
    let needed = match kind {
        Kind::Replay => Permission::ReplayDeadLetters,
        Kind::Purge => Permission::PurgeDeadLetters,
    };
    if !s.identity.can(needed) {
        tracing::warn!(user = %s.identity.user, kind = kind.name(), "console operation refused: role does not allow it");
        return Err(refusal(
            StatusCode::FORBIDDEN,
            &format!("your roles do not allow a {}", kind.name()),
        ));
    }
    let filter = form
        .filter
        .filter()
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, &e))?;
    let rate = given(&form.rate)
        .map(|r| operations::parse_rate(&r))
        .transpose()
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, &e))?;
    let batch = match given(&form.batch_size) {
        Some(b) => b
            .parse::<i64>()
            .ok()
            .filter(|b| (1..=operations::MAX_BATCH).contains(b))
            .ok_or_else(|| {
                refusal(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "the batch size is a number from 1 to {}",
                        operations::MAX_BATCH
                    ),
                )
            })?,
        None => operations::DEFAULT_BATCH,
    };
    Ok(Planned {
        kind,
        filter,
        rate,
        batch,
    })
}

pub(crate) async fn preview_operation(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Form(form): Form<OperationForm>,
) -> Response {
    let p = match plan(&s, &form) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let ops = console.ops.current();
    let processor = p.filter.processor.clone();
    let count = match operations::dry_run(&ops, p.kind, processor.as_deref(), &p.filter).await {
        Ok(c) => c,
        Err(e) => return db_error(&e),
    };
    if let Err(e) = operations::audit(
        &ops,
        processor.as_deref(),
        &s.identity.user,
        &format!("{} dry run", p.kind.name()),
        Some(&p.filter),
        Some(count),
        None,
    )
    .await
    {
        return db_error(&e);
    }
    let pace = match p.rate {
        Some(r) => format!("at {r} per second"),
        None => "as fast as the broker confirms".into(),
    };
    let button = match p.kind {
        Kind::Replay => "<button type=\"submit\">Start the replay</button>",
        Kind::Purge => "<button class=\"danger\" type=\"submit\">Start the purge</button>",
    };
    let body = format!(
        "<h1>Confirm: {kind} {count} dead letters</h1>\
         <p class=\"notice\">Dry run: <strong id=\"dry-run-count\">{count}</strong> dead letters match <em>{}</em> now; \
         they would be {past} {pace}, {} per batch. Failures that arrive after the start are left for you to see.</p>\
         <form method=\"post\" action=\"/ui/operations\">{}{}\
         <input type=\"hidden\" name=\"op\" value=\"{kind}\">\
         <input type=\"hidden\" name=\"rate\" value=\"{}\">\
         <input type=\"hidden\" name=\"batch_size\" value=\"{}\">{button} <a href=\"{}\">Back</a></form>",
        esc(&p.filter.describe()),
        p.batch,
        csrf_field(&s.csrf),
        filter_fields(&p.filter),
        esc(form.rate.as_deref().unwrap_or("")),
        p.batch,
        messages_link(&p.filter),
        kind = p.kind.name(),
        past = match p.kind {
            Kind::Replay => "replayed",
            Kind::Purge => "purged",
        },
    );
    html_ok(page(
        "Confirm",
        "/ui/operations",
        Some(who(&s)),
        None,
        &body,
    ))
}

pub(crate) async fn start_operation(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Form(form): Form<OperationForm>,
) -> Response {
    let p = match plan(&s, &form) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let ops = console.ops.current();
    let request = operations::Request {
        kind: p.kind,
        processor: p.filter.processor.clone(),
        filter: p.filter,
        rate: p.rate,
        batch_size: p.batch,
        requested_by: s.identity.user.clone(),
    };
    let op = match operations::start(&ops, &request).await {
        Ok(op) => op,
        Err(e) => return db_error(&e),
    };
    spawn_run(ops, request.processor, op.id);
    Redirect::to(&format!("/ui/operations/{}", op.id)).into_response()
}

/// Runs operation `id` in the background; its row shows the progress.
pub(crate) fn spawn_run(ops: crate::dead_letter::ops::Ops, processor: Option<String>, id: i64) {
    tokio::spawn(async move {
        if let Err(e) = operations::run(&ops, processor.as_deref(), id, |_| {}).await {
            tracing::error!(operation = id, error = %e, "dead-letter operation stopped");
        }
    });
}

#[derive(Deserialize)]
pub(crate) struct CsrfOnly {
    #[allow(dead_code)]
    csrf: Option<String>,
}

pub(crate) async fn cancel_operation(
    State(console): State<Console>,
    Extension(s): Extension<Session>,
    Path(id): Path<i64>,
    Form(_): Form<CsrfOnly>,
) -> Response {
    if !s.identity.can(Permission::ReplayDeadLetters) {
        return error_page(StatusCode::FORBIDDEN, "your roles do not allow cancelling");
    }
    let ops = console.ops.current();
    match operations::cancel(&ops, None, id, &s.identity.user).await {
        Ok(_) => Redirect::to(&format!("/ui/operations/{id}")).into_response(),
        Err(e) => db_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_only_returns_to_console_pages() {
        assert_eq!(
            safe_next(Some("/ui/groups?by=original")),
            "/ui/groups?by=original"
        );
        assert_eq!(safe_next(Some("https://evil.example/")), "/ui");
        assert_eq!(safe_next(Some("//evil.example/ui")), "/ui");
        assert_eq!(safe_next(None), "/ui");
    }

    #[test]
    fn filter_forms_become_filters() {
        let form = FilterForm {
            header: Some("tenant = acme".into()),
            ids: Some("3, 4".into()),
            since: Some("2h".into()),
            q: Some("  ".into()),
            ..FilterForm::default()
        };
        let f = form.filter().expect("filter");
        assert_eq!(f.header, Some(("tenant".into(), "acme".into())));
        assert_eq!(f.ids, Some(vec![3, 4]));
        assert!(f.since.is_some());
        assert_eq!(f.text, None);
        let bad = FilterForm {
            header: Some("no-equals".into()),
            ..FilterForm::default()
        };
        assert!(bad.filter().is_err());
    }

    #[test]
    fn backlog_lines_are_read_from_the_metrics_text() {
        let text = "bosun_consumer_backlog{consumer=\"orders\"} 12\nbosun_other 1\n";
        assert_eq!(backlogs(text).get("orders"), Some(&12.0));
    }
}
