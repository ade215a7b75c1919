//! HTML building blocks: escaping, the page frame, times, query strings. Pages are plain
//! strings put together with `format!`; every value from outside goes through [`esc`].

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use crate::access::Identity;

/// `text` escaped for HTML text and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for a query-string value.
pub fn qs(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A query string from (name, value) pairs, empty values left out: `?a=1&b=2` or "".
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            let v = v.as_deref().filter(|v| !v.is_empty())?;
            Some(format!("{k}={}", qs(v)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&amp;"))
    }
}

/// A time: UTC in the text and on hover; the console's script shows it in the viewer's
/// time zone.
pub fn time(t: DateTime<Utc>) -> String {
    let utc = t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    format!(
        "<time datetime=\"{}\" title=\"{utc}\">{utc}</time>",
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

pub fn opt_time(t: Option<DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "-".into())
}

/// `text` cut to `max` characters (with an ellipsis), escaped.
pub fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        esc(text)
    } else {
        let head: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{}…", esc(&head))
    }
}

/// A hidden CSRF field for a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// The navigation entries: (path, label).
const NAV: [(&str, &str); 4] = [
    ("/ui", "Overview"),
    ("/ui/groups", "Groups"),
    ("/ui/messages", "Messages"),
    ("/ui/operations", "Operations"),
];

/// A whole page: head, navigation (with the current entry marked), who is logged in and
/// the logout form, then `body`. `refresh` reloads the page every that many seconds (a
/// running operation's progress, without script).
pub fn page(
    title: &str,
    current: &str,
    who: Option<(&Identity, &str)>,
    refresh: Option<u32>,
    body: &str,
) -> String {
    let mut nav = String::new();
    if who.is_some() {
        for (path, label) in NAV {
            let aria = if path == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(nav, "<a href=\"{path}\"{aria}>{label}</a>");
        }
    }
    let user = match who {
        Some((identity, csrf)) => {
            let roles: Vec<&str> = identity.roles.iter().map(|r| r.name()).collect();
            format!(
                "<span class=\"who\"><span>{} <span class=\"muted\">({})</span></span>\
                 <form method=\"post\" action=\"/ui/logout\">{}<button class=\"secondary\" type=\"submit\">Log out</button></form></span>",
                esc(&identity.user),
                esc(&roles.join(", ")),
                csrf_field(csrf)
            )
        }
        None => String::new(),
    };
    let refresh = refresh
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">"))
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{refresh}\
<title>{} · bosun</title><link rel=\"stylesheet\" href=\"/ui/static/console.css\">\
<script src=\"/ui/static/console.js\" defer></script></head><body>\
<a class=\"skip\" href=\"#main\">Skip to content</a>\
<header class=\"top\"><span class=\"brand\">bosun</span><nav aria-label=\"Main\">{nav}</nav>{user}</header>\
<main id=\"main\">{body}</main></body></html>",
        esc(title)
    )
}

/// Eight levels of a text sparkline.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// `values` as a sparkline (no style, no script).
pub fn sparkline(values: &[i64]) -> String {
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    values
        .iter()
        .map(|v| {
            if *v <= 0 {
                ' '
            } else {
                BARS[((v * 7) / max).clamp(0, 7) as usize]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_values_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(cut("abcdef", 4), "abc…");
    }

    #[test]
    fn query_strings_leave_out_empty_values_and_encode_the_rest() {
        assert_eq!(
            query(&[
                ("a", Some("x y&z".into())),
                ("b", None),
                ("c", Some(String::new()))
            ]),
            "?a=x+y%26z"
        );
        assert_eq!(sparkline(&[0, 1, 7]), " ▂█");
    }
}
