//! The documentation holds: every TOML snippet in README.md and docs/ is read by bosun's own
//! configuration loader, so a documented key that does not exist fails here, and every
//! relative link points to a file that exists (and, with an anchor, to one of its headings).
//!
//! Snippets are fenced code blocks whose info string starts with `toml`:
//! - ` ```toml ` is a fragment: it is merged into [`BASE`] (its tables over the base's, key by
//!   key) and the result must load. The base defines the brokers `rabbit` (amqp) and `cache`
//!   (redis), the database `main`, and `noop` handlers named as the snippets use them.
//! - ` ```toml complete ` is a whole file and must load as it is.
//! - ` ```toml parse-only ` only has to be TOML (for a snippet that names files that do not
//!   exist here).
//!
//! Every `${VAR}` a snippet names is given a value. A `token_env` variable is read by its
//! handler from the process's environment, not from the loader's: a snippet may leave it
//! unset, and nothing else.

use crate::support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bosun::config::{Env, Secrets, WarningKind, load_str_with};
use bosun::handler::HandlerKinds;
use regex::Regex;

const BASE: &str = r#"
[brokers.rabbit]
kind = "amqp"
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[brokers.cache]
kind = "redis"
url = "redis://127.0.0.1:6379/"

[databases.main]
url = "postgres://postgres@127.0.0.1:5432/test"

[handlers.orders]
kind = "noop"

[handlers.audit]
kind = "noop"

[handlers.eu_orders]
kind = "noop"

[handlers.drain]
kind = "noop"

[consumers.orders]
source = "rabbit"
queue = "orders"
handler = "orders"
"#;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut out = vec![repo().join("README.md")];
    walk(&repo().join("docs"), &mut out);
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn shown(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A fenced code block: its info string, first line number and text.
struct Fence {
    info: String,
    line: usize,
    text: String,
}

fn fences(markdown: &str) -> Vec<Fence> {
    let mut out = Vec::new();
    let mut open: Option<Fence> = None;
    for (i, line) in markdown.lines().enumerate() {
        match open.take() {
            None => {
                if let Some(info) = line.strip_prefix("```") {
                    open = Some(Fence {
                        info: info.trim().to_owned(),
                        line: i + 2,
                        text: String::new(),
                    });
                }
            }
            Some(mut fence) => {
                if line.trim_start().starts_with("```") {
                    out.push(fence);
                } else {
                    fence.text.push_str(line);
                    fence.text.push('\n');
                    open = Some(fence);
                }
            }
        }
    }
    assert!(open.is_none(), "a code fence is never closed");
    out
}

/// The text outside fenced code blocks, with line breaks kept so line numbers hold.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Tables of `snippet` merged over those of `base`, key by key.
fn merge(base: &mut toml::Table, snippet: toml::Table) {
    for (key, value) in snippet {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => merge(into, from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A value for every variable `text` reads: for a `*_URL` a URL of the kind its name says
/// (PostgreSQL unless it names RabbitMQ or Redis), otherwise a token long enough for any token.
fn env_for(text: &str) -> Env {
    let interpolated = Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)").expect("regex");
    let names: BTreeSet<String> = interpolated
        .captures_iter(text)
        .map(|c| c[1].to_owned())
        .collect();
    Env::from_pairs(names.into_iter().map(|name| {
        let url = name.ends_with("_URL");
        let value = if url && (name.contains("RABBIT") || name.contains("AMQP")) {
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        } else if url && name.contains("REDIS") {
            "redis://127.0.0.1:6379/"
        } else if url {
            "postgres://postgres@127.0.0.1:5432/test"
        } else {
            "0123456789abcdef0123456789abcdef0123456789abcdef"
        };
        (name, value.to_owned())
    }))
}

/// What is wrong with one snippet, if anything.
fn check_snippet(info: &str, text: &str) -> Result<(), String> {
    let mut words = info.split_whitespace();
    let mode = match (words.next(), words.next()) {
        (Some("toml"), None) => "fragment",
        (Some("toml"), Some(mode @ ("complete" | "parse-only"))) => mode,
        _ => return Err(format!("unknown toml fence `{info}`")),
    };
    let table: toml::Table = toml::from_str(text).map_err(|e| format!("not TOML: {e}"))?;
    let whole = match mode {
        "parse-only" => return Ok(()),
        "complete" => text.to_owned(),
        _ => {
            let mut base: toml::Table = toml::from_str(BASE).expect("the base is TOML");
            merge(&mut base, table);
            toml::to_string(&base).map_err(|e| format!("cannot render the merged file: {e}"))?
        }
    };
    let loaded = load_str_with(
        &whole,
        "snippet",
        &HandlerKinds::builtin(),
        &env_for(text),
        Secrets::Optional,
    )
    .map_err(|e| format!("{e}\n--- as loaded:\n{whole}"))?;
    let token_env = Regex::new(r#"token_env\s*=\s*"([^"]+)""#).expect("regex");
    let token_vars: Vec<String> = token_env
        .captures_iter(text)
        .map(|c| format!("`{}`", &c[1]))
        .collect();
    for warning in loaded.warnings {
        let message = &warning.problem.message;
        let unset_token = warning.kind == WarningKind::MissingSecret
            && token_vars.iter().any(|v| message.contains(v));
        if warning.kind == WarningKind::MissingSecret && !unset_token {
            return Err(format!("{message}\n--- as loaded:\n{whole}"));
        }
    }
    Ok(())
}

#[test]
fn every_toml_snippet_is_a_valid_configuration() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for path in documents() {
        for fence in fences(&read(&path)) {
            if fence.info.split_whitespace().next() != Some("toml") {
                continue;
            }
            checked += 1;
            if let Err(e) = check_snippet(&fence.info, &fence.text) {
                problems.push(format!("{}:{}: {e}", shown(&path), fence.line));
            }
        }
    }
    assert!(checked >= 12, "only {checked} toml snippets were found");
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn a_snippet_with_a_key_bosun_does_not_know_fails() {
    let unknown = "[consumers.orders]\nprefech = 10\n";
    let err = check_snippet("toml", unknown).expect_err("an unknown key passed");
    assert!(err.contains("prefech"), "{err}");
    let bad_value =
        "[handlers.orders_hook]\nkind = \"http\"\nurl = \"http://x/\"\ntimeout = \"soon\"\n";
    assert!(check_snippet("toml", bad_value).is_err());
    assert!(check_snippet("toml complete", "[handlers.x]\nkind = \"noop\"\n").is_ok());
    assert!(check_snippet("toml complete", "[consumers.x]\nqueue = \"q\"\n").is_err());
    assert!(check_snippet("toml parse-only", "[anything]\nat = \"all\"\n").is_ok());
    assert!(check_snippet("toml parse-only", "not = toml = at all\n").is_err());
    assert!(check_snippet("toml sometimes", "").is_err());
    let unset =
        "[handlers.x]\nkind = \"exec\"\ncommand = [\"true\"]\ncwd = \"${DOCS_TEST_UNSET:-/}\"\n";
    assert!(check_snippet("toml", unset).is_ok());
    let file = "[handlers.x]\nkind = \"http\"\nurl = \"http://x/\"\ntoken_file = \"/nonexistent/docs-token\"\n";
    assert!(
        check_snippet("toml", file).is_err(),
        "a missing token file passed"
    );
}

/// GitHub's anchors for the headings of `markdown`.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(markdown).lines() {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#').trim();
        let base: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// Relative links of the document at `path` that lead nowhere.
fn broken_links(path: &Path, markdown: &str) -> Vec<String> {
    let code = Regex::new(r"`[^`]*`").expect("regex");
    let link = Regex::new(r"\]\(([^)\s]+)\)").expect("regex");
    let dir = path.parent().expect("a document has a directory");
    let mut out = Vec::new();
    for (i, line) in prose(markdown).lines().enumerate() {
        let line = code.replace_all(line, "");
        for c in link.captures_iter(&line) {
            let target = &c[1];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if file.is_empty() {
                path.to_path_buf()
            } else {
                dir.join(file)
            };
            let at = format!("{}:{}: `{target}`", shown(path), i + 1);
            if !resolved.exists() {
                out.push(format!("{at}: no such file"));
            } else if !anchor.is_empty() {
                let is_markdown = resolved.extension().is_some_and(|e| e == "md");
                if !is_markdown || !anchors(&read(&resolved)).contains(anchor) {
                    out.push(format!("{at}: no heading with that anchor"));
                }
            }
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let mut problems = Vec::new();
    for path in documents() {
        problems.extend(broken_links(&path, &read(&path)));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn link_check_reports_missing_files_and_anchors() {
    let readme = repo().join("README.md");
    let text = "[a](docs/metrics.md) [b](docs/nothing.md) [c](docs/metrics.md#always)\n\
                [d](docs/metrics.md#never) `[e](nowhere.md)` [f](https://example.com/x)\n\
                [g](#the-two-commands) [h](#no-such-heading)\n";
    let broken = broken_links(&readme, text);
    assert_eq!(broken.len(), 3, "{broken:#?}");
    assert!(broken[0].contains("docs/nothing.md"), "{broken:#?}");
    assert!(broken[1].contains("#never"), "{broken:#?}");
    assert!(broken[2].contains("#no-such-heading"), "{broken:#?}");
    assert!(
        anchors("## `[http.admin]` and the admin API\n").contains("httpadmin-and-the-admin-api")
    );
    assert!(anchors("## `per_key` ordering\n").contains("per_key-ordering"));
}

/// The migration guide's complete files pass `bosun check` as they are, and the guide is
/// linked from README.md.
#[test]
fn the_migration_guides_complete_files_pass_bosun_check() {
    let guide = repo().join("docs/migrating-from-python-workers.md");
    let mut checked = 0;
    for fence in fences(&read(&guide)) {
        if fence.info != "toml complete" {
            continue;
        }
        checked += 1;
        let file = support::ConfigFile::new(&fence.text);
        let path = file.path.to_str().expect("utf-8 path");
        let (code, out, err) = support::bosun_output(&["check", "--config", path], &[]);
        assert_eq!(code, 0, "line {}:\n{out}{err}", fence.line);
        assert!(out.contains("configuration is valid"), "{out}");
    }
    assert!(checked >= 1, "the guide has no complete file");
    assert!(read(&repo().join("README.md")).contains("(docs/migrating-from-python-workers.md)"));
}
