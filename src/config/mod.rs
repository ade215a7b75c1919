//! Configuration: one TOML file, read, interpolated, overridden from the environment and
//! validated into [`Config`].
//!
//! The pipeline, in order:
//! 1. read the file (size-capped, must be UTF-8) and parse it as TOML: syntax errors carry the
//!    parser's own line and column;
//! 2. apply `BOSUN__<SECTION>__<NAME>__<KEY>` environment overrides (through the `config` crate);
//! 3. interpolate `${VAR}` / `${VAR:-default}` inside string values;
//! 4. deserialize into the raw structs of [`raw`], which deny unknown fields;
//! 5. validate into [`model`]: parse durations, URLs and addresses, fill defaults, check
//!    cross-references.
//!
//! Steps 2 to 5 report key paths; [`locate`] maps each path back to a line and column of the
//! original file (or to the environment variable that set it).

pub mod console;
mod interpolate;
mod issue;
mod lint;
mod locate;
pub mod model;
pub(crate) mod raw;
pub mod redis_keys;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

pub use crate::retry::{Backoff, RetryPolicy};
pub(crate) use crate::secret::{ENV_PREFIX, note_env_read};
pub(crate) use crate::units::parse_duration;
pub use console::{AdminAuth, ConsoleConfig};
pub(crate) use interpolate::interpolate;
pub use issue::{Issue, WarningKind};
pub use locate::Position;
pub(crate) use locate::position;
pub use model::*;
pub use validate::Secrets;
pub(crate) use validate::{default_consumer_name, is_missing_secret, valid_sql_identifier};

use crate::handler::HandlerKinds;

/// Files larger than this are refused before parsing: a config file is a few kilobytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// Where a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A line and column in the file.
    File(Position),
    /// A value set by an environment override.
    Env(String),
    /// Somewhere in the file, position unknown.
    Unknown,
}

/// One problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub location: Location,
    /// Dotted key path, e.g. `consumers.orders.retry.initial`; empty for file-level problems.
    pub path: String,
    pub message: String,
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub problems: Vec<ConfigProblem>,
}

impl ConfigError {
    fn single(origin: &str, location: Location, path: &str, message: impl Into<String>) -> Self {
        Self {
            origin: origin.to_owned(),
            problems: vec![ConfigProblem {
                location,
                path: path.to_owned(),
                message: message.into(),
            }],
        }
    }
}

impl ConfigProblem {
    /// `origin:line:column: message (at `path`)`, as every problem and warning is shown.
    pub fn display<'a>(&'a self, origin: &'a str) -> impl fmt::Display + 'a {
        struct Shown<'a>(&'a ConfigProblem, &'a str);
        impl fmt::Display for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let (p, origin) = (self.0, self.1);
                match &p.location {
                    Location::File(pos) => write!(f, "{origin}:{}:{}: ", pos.line, pos.column)?,
                    Location::Env(var) => write!(f, "{origin} (environment variable {var}): ")?,
                    Location::Unknown => write!(f, "{origin}: ")?,
                }
                f.write_str(&p.message)?;
                if !p.path.is_empty() && !p.message.contains(" in [") {
                    write!(f, " (at `{}`)", p.path)?;
                }
                Ok(())
            }
        }
        Shown(self, origin)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", p.display(&self.origin))?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The process environment, captured once so loading is deterministic and testable.
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// The current process environment (variables that are not UTF-8 are skipped).
    pub fn from_process() -> Self {
        Self(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        )
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// Reads and validates the file at `path` against the process environment.
pub fn load_file(path: &Path, kinds: &HandlerKinds) -> Result<Config, ConfigError> {
    load_file_with_env(path, kinds, &Env::from_process())
}

/// Reads and validates the file at `path` against `env`.
pub fn load_file_with_env(
    path: &Path,
    kinds: &HandlerKinds,
    env: &Env,
) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = read_text(path, &origin)?;
    load_str(&text, &origin, kinds, env)
}

/// The file's text: size-capped, UTF-8.
fn read_text(path: &Path, origin: &str) -> Result<String, ConfigError> {
    let bytes = read_capped(path)
        .map_err(|e| ConfigError::single(origin, Location::Unknown, "", e.to_string()))?;
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let pos = position(&String::from_utf8_lossy(&bytes[..valid]), valid);
            Err(ConfigError::single(
                origin,
                Location::File(pos),
                "",
                "the file is not valid UTF-8 text (is it a binary file?)",
            ))
        }
    }
}

/// Why the file's bytes could not be had.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("cannot read the config file: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the file is larger than {} MiB; a bosun config is a few kilobytes",
        MAX_CONFIG_BYTES / (1024 * 1024)
    )]
    TooLarge,
}

fn read_capped(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

/// Whether reloads check the file's permissions like the start did (set by `bosun run`,
/// unless `--allow-insecure-config`; off for programs embedding the library).
static ENFORCE_PERMISSIONS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes every later [`check_permissions_on_reload`] check the file (or not).
pub(crate) fn enforce_permissions(on: bool) {
    ENFORCE_PERMISSIONS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// [`check_permissions`], when the process enforces it.
pub(crate) fn check_permissions_on_reload(path: &Path) -> Result<(), ConfigError> {
    if ENFORCE_PERMISSIONS.load(std::sync::atomic::Ordering::Relaxed) {
        check_permissions(path)
    } else {
        Ok(())
    }
}

/// Refuses a configuration file that users other than its owner may change: whoever can
/// write it chooses the commands `exec` handlers run and where messages go.
pub(crate) fn check_permissions(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let origin = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| {
        ConfigError::single(
            &origin,
            Location::Unknown,
            "",
            format!("cannot read the config file: {e}"),
        )
    })?;
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "its group and every other user",
            (true, false) => "its group",
            _ => "every other user",
        };
        return Err(ConfigError::single(
            &origin,
            Location::Unknown,
            "",
            format!(
                "the config file is writable by {who} (mode {:04o}); make it writable by its owner only (`chmod go-w {origin}`), or pass --allow-insecure-config",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Validates TOML `text`; `origin` names it in messages.
///
/// No message shows a value that came from the environment: every value `${VAR}` put into
/// the file is shown as `${VAR}` again, and URLs and secret-looking values are redacted.
pub fn load_str(
    text: &str,
    origin: &str,
    kinds: &HandlerKinds,
    env: &Env,
) -> Result<Config, ConfigError> {
    load_str_with(text, origin, kinds, env, Secrets::Required).map(|loaded| loaded.config)
}

/// A configuration read for `bosun check`, with what it found worth a warning.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Missing secrets (when they are optional), unused handlers, exchanges nothing declares.
    pub warnings: Vec<Warning>,
}

/// A problem that does not stop the file from being used (or, for a missing secret, only
/// stops `bosun run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub problem: ConfigProblem,
    pub kind: WarningKind,
}

/// Reads and validates the file at `path` for `bosun check`: missing secrets are warnings
/// unless `secrets` is `Required`.
pub(crate) fn load_file_for_check(
    path: &Path,
    kinds: &HandlerKinds,
    env: &Env,
    secrets: Secrets,
) -> Result<Loaded, ConfigError> {
    let origin = path.display().to_string();
    let text = read_text(path, &origin)?;
    load_str_with(&text, &origin, kinds, env, secrets)
}

/// Validates TOML `text` and lists its warnings; `origin` names it in messages. As in
/// [`load_str`], no message shows a value that came from the environment.
pub fn load_str_with(
    text: &str,
    origin: &str,
    kinds: &HandlerKinds,
    env: &Env,
    secrets: Secrets,
) -> Result<Loaded, ConfigError> {
    let mut interpolated = Vec::new();
    let result = load_str_recording(text, origin, kinds, env, secrets, &mut interpolated);
    // Longest value first, so a value containing another is put back whole.
    interpolated.sort_by_key(|(_, value): &(String, String)| std::cmp::Reverse(value.len()));
    let mask = |problem: &mut ConfigProblem| {
        let mut message = problem.message.clone();
        for (name, value) in &interpolated {
            if value.len() >= 3 && message.contains(value.as_str()) {
                message = message.replace(value.as_str(), &format!("${{{name}}}"));
            }
        }
        problem.message = crate::redact::text(&message).into_owned();
    };
    match result {
        Ok(mut loaded) => {
            for warning in &mut loaded.warnings {
                mask(&mut warning.problem);
            }
            Ok(loaded)
        }
        Err(mut e) => {
            e.problems.iter_mut().for_each(mask);
            Err(e)
        }
    }
}

fn load_str_recording(
    text: &str,
    origin: &str,
    kinds: &HandlerKinds,
    env: &Env,
    secrets: Secrets,
    interpolated: &mut Vec<(String, String)>,
) -> Result<Loaded, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let location = e
            .span()
            .map(|s| Location::File(position(text, s.start)))
            .unwrap_or(Location::Unknown);
        ConfigError::single(
            origin,
            location,
            "",
            format!("invalid TOML: {}", e.message().trim()),
        )
    })?;

    let (mut table, overridden) = apply_env_overrides(text, table, env).map_err(|e| {
        ConfigError::single(origin, Location::Env(e.var.clone()), "", e.to_string())
    })?;

    let locate = |path: &[String]| -> Location {
        let dotted = path.join(".");
        if let Some((_, var)) = overridden
            .iter()
            .find(|(p, _)| dotted == **p || dotted.starts_with(&format!("{p}.")))
        {
            return Location::Env(var.clone());
        }
        match locate::locate(text, path) {
            Some(span) => Location::File(position(text, span.start)),
            None => Location::Unknown,
        }
    };

    for var in overridden.values() {
        if let Some(value) = env.get(var) {
            interpolated.push((var.clone(), value));
        }
    }
    let mut problems = Vec::new();
    let recording = Recording {
        env,
        read: std::cell::RefCell::new(Vec::new()),
    };
    interpolate_table(&mut table, &mut Vec::new(), &recording, &mut problems);
    interpolated.extend(recording.read.into_inner());
    // A value that could not be interpolated is unknown: problems with it are not reported
    // again by validation. A missing secret is only a warning when secrets are optional.
    let unchecked: Vec<Vec<String>> = problems.iter().map(|i| i.path.clone()).collect();
    let mut missing_secrets: Vec<Issue> = Vec::new();
    if secrets == Secrets::Optional {
        let (missing, rest): (Vec<Issue>, Vec<Issue>) = problems
            .into_iter()
            .partition(|issue| is_missing_secret(&issue.message));
        problems = rest;
        missing_secrets = missing;
    }

    // Every unknown key is reported, not just the first: each one found is noted and taken
    // out, and the rest of the file is read again, so a typo never hides other problems.
    let mut unknown: Vec<ConfigProblem> = problems
        .into_iter()
        .map(|issue| ConfigProblem {
            location: locate(&issue.path),
            path: issue.path.join("."),
            message: issue.message,
        })
        .collect();
    let raw: raw::RawConfig = loop {
        match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(raw) => break raw,
            Err(e) => {
                let (path, message, field) = deserialize_problem(&e, &table);
                let problem = ConfigProblem {
                    location: locate(&path),
                    path: path.join("."),
                    message,
                };
                let removed = field.is_some()
                    && unknown.len() < MAX_UNKNOWN_KEYS
                    && remove_path(&mut table, &path);
                if !removed {
                    unknown.push(problem);
                    return Err(ConfigError {
                        origin: origin.to_owned(),
                        problems: unknown,
                    });
                }
                unknown.push(problem);
            }
        }
    };

    let (validated, secret_issues) =
        validate::validate_with(raw, origin, kinds, secrets, unchecked);
    missing_secrets.extend(secret_issues);
    let issues = match validated {
        Ok(config) if unknown.is_empty() => {
            let mut warnings: Vec<Warning> = missing_secrets
                .into_iter()
                .map(|issue| Warning {
                    problem: ConfigProblem {
                        location: locate(&issue.path),
                        path: issue.path.join("."),
                        message: format!(
                            "{}; the value cannot be checked, and `bosun run` refuses the file until it is set",
                            issue.message
                        ),
                    },
                    kind: WarningKind::MissingSecret,
                })
                .collect();
            warnings.extend(
                lint::lint(&config)
                    .into_iter()
                    .map(|(issue, kind)| Warning {
                        problem: ConfigProblem {
                            location: locate(&issue.path),
                            path: issue.path.join("."),
                            message: issue.message,
                        },
                        kind,
                    }),
            );
            return Ok(Loaded { config, warnings });
        }
        Ok(_) => Vec::new(),
        Err(issues) => issues,
    };
    let mut problems = unknown;
    problems.extend(issues.into_iter().map(|issue| ConfigProblem {
        location: locate(&issue.path),
        path: issue.path.join("."),
        message: explain_unknown_field(&issue.message, &[]),
    }));
    Err(ConfigError {
        origin: origin.to_owned(),
        problems,
    })
}

/// Unknown keys reported before the rest of the file is given up on.
const MAX_UNKNOWN_KEYS: usize = 100;

/// A deserialization error as a key path and a message; for an unknown key, the path names
/// the key itself and `Some(key)` is returned with it.
fn deserialize_problem(
    e: &serde_path_to_error::Error<toml::de::Error>,
    table: &toml::Table,
) -> (Vec<String>, String, Option<String>) {
    let mut path: Vec<String> =
        e.path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
    let mut message = e.inner().message().trim().to_owned();
    let Some(field) = unknown_field_name(&message) else {
        if message.starts_with("missing field") && !path.is_empty() {
            message = format!("{message} in [{}]", path.join("."));
        }
        return (path, message, None);
    };
    // Point at the misspelt key itself and name the table it sits in.
    if path.last() == Some(&field) {
        path.pop();
    }
    let not_for_this_kind = other_kind_keys(table, &path);
    message = explain_unknown_field(&message, not_for_this_kind);
    let table_path = path.join(".");
    if !table_path.is_empty() {
        message = message.replacen(
            &format!("`{field}`"),
            &format!("`{field}` in [{table_path}]"),
            1,
        );
    }
    path.push(field.clone());
    (path, message, Some(field))
}

/// Keys a `[consumers.*]` or `[dead_letters.*]` table accepts only for the other broker kind
/// than the one its `source` names: left out of the keys an unknown key is compared with.
fn other_kind_keys(table: &toml::Table, path: &[String]) -> &'static [&'static str] {
    const AMQP_CONSUMER: &[&str] = &["queue", "queue_type", "bindings", "declare", "prefetch"];
    const REDIS_CONSUMER: &[&str] = &[
        "stream",
        "group",
        "consumer",
        "start_id",
        "batch",
        "block",
        "claim_idle",
        "claim_interval",
        "max_deliveries",
        "trim",
    ];
    const AMQP_DEAD_LETTER: &[&str] = &["queue"];
    const REDIS_DEAD_LETTER: &[&str] = &["stream", "group"];
    let [section, name] = path else {
        return &[];
    };
    let kind = get_path(table, &[section.clone(), name.clone(), "source".into()])
        .and_then(toml::Value::as_str)
        .and_then(|source| get_path(table, &["brokers".into(), source.into(), "kind".into()]))
        .and_then(toml::Value::as_str);
    match (section.as_str(), kind) {
        ("consumers", Some("amqp")) => REDIS_CONSUMER,
        ("consumers", Some("redis")) => AMQP_CONSUMER,
        ("dead_letters", Some("amqp")) => REDIS_DEAD_LETTER,
        ("dead_letters", Some("redis")) => AMQP_DEAD_LETTER,
        _ => &[],
    }
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" so it lists only the keys
/// that apply (`exclude` names those that do not) and suggests the closest one.
fn explain_unknown_field(message: &str, exclude: &[&str]) -> String {
    let Some(field) = unknown_field_name(message) else {
        return message.to_owned();
    };
    let Some((_, expected)) = message.split_once(", expected ") else {
        return message.to_owned();
    };
    let valid: Vec<&str> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|key| !exclude.contains(key))
        .collect();
    if valid.is_empty() {
        return format!("unknown field `{field}`: this table takes no keys");
    }
    let listed: Vec<String> = valid.iter().map(|k| format!("`{k}`")).collect();
    let mut out = format!(
        "unknown field `{field}`, expected one of {}",
        listed.join(", ")
    );
    if let Some(best) = closest(&field, &valid) {
        out = format!("{out}; did you mean `{best}`?");
    }
    out
}

/// The known name closest to `typo`, if any is close enough to be a likely misspelling.
fn closest<'k>(typo: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(typo, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// Removes the key at `path` (through tables and array indices); false when it is not there.
fn remove_path(table: &mut toml::Table, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => table.remove(last).is_some(),
        [first, rest @ ..] => table
            .get_mut(first)
            .is_some_and(|value| remove_in_value(value, rest)),
    }
}

fn remove_in_value(value: &mut toml::Value, path: &[String]) -> bool {
    match (value, path) {
        (toml::Value::Table(t), _) => remove_path(t, path),
        (toml::Value::Array(items), [index, rest @ ..]) if !rest.is_empty() => index
            .parse::<usize>()
            .ok()
            .and_then(|i| items.get_mut(i))
            .is_some_and(|item| remove_in_value(item, rest)),
        _ => false,
    }
}

/// The name inside "unknown field `name`, expected ...".
fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// Environment overrides that cannot be layered over the file; `var` is the first of them.
#[derive(Debug, thiserror::Error)]
#[error("cannot apply environment overrides: {source}")]
struct OverrideError {
    var: String,
    /// Boxed: the `config` crate's error is large, and this one travels in a `Result`.
    source: Box<config::ConfigError>,
}

/// Layers `BOSUN__...` variables over the file with the `config` crate. Returns the merged
/// table and, for each overridden key path, the variable that set it.
fn apply_env_overrides(
    text: &str,
    table: toml::Table,
    env: &Env,
) -> Result<(toml::Table, BTreeMap<String, String>), OverrideError> {
    let vars: BTreeMap<String, String> = env
        .0
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if vars.is_empty() {
        return Ok((table, BTreeMap::new()));
    }
    let first_var = vars.keys().next().cloned().unwrap_or_default();
    let merged = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("BOSUN")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars.clone().into_iter().collect())),
        )
        .build()
        .map_err(|source| OverrideError {
            var: first_var.clone(),
            source: Box::new(source),
        })?;
    let mut merged: toml::Table = merged.try_deserialize().map_err(|source| OverrideError {
        var: first_var,
        source: Box::new(source),
    })?;

    let mut overridden = BTreeMap::new();
    for (var, value) in &vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_lowercase)
            .collect();
        // A key the file holds as a string stays a string, even when the value looks like a
        // number ("5672", "true"): the file's type is the intent.
        if let Some(toml::Value::String(_)) = get_path(&table, &path) {
            set_path(&mut merged, &path, toml::Value::String(value.clone()));
        }
        overridden.insert(path.join("."), var.clone());
    }
    Ok((merged, overridden))
}

fn get_path<'t>(table: &'t toml::Table, path: &[String]) -> Option<&'t toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get(key)?.as_table()?;
    }
    table.get(last)
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = table;
    for key in parents {
        let Some(next) = table.get_mut(key).and_then(toml::Value::as_table_mut) else {
            return;
        };
        table = next;
    }
    table.insert(last.clone(), value);
}

/// The environment as interpolation sees it, remembering every variable it hands out.
struct Recording<'e> {
    env: &'e Env,
    read: std::cell::RefCell<Vec<(String, String)>>,
}

impl Recording<'_> {
    fn get(&self, name: &str) -> Option<String> {
        note_env_read(name);
        let value = self.env.get(name)?;
        self.read
            .borrow_mut()
            .push((name.to_owned(), value.clone()));
        Some(value)
    }
}

fn interpolate_table(
    table: &mut toml::Table,
    path: &mut Vec<String>,
    env: &Recording<'_>,
    problems: &mut Vec<Issue>,
) {
    for (key, value) in table.iter_mut() {
        path.push(key.clone());
        interpolate_value(value, path, env, problems);
        path.pop();
    }
}

fn interpolate_value(
    value: &mut toml::Value,
    path: &mut Vec<String>,
    env: &Recording<'_>,
    problems: &mut Vec<Issue>,
) {
    match value {
        toml::Value::String(s) => match interpolate(s, &|name| env.get(name)) {
            Ok(replaced) => *s = replaced,
            Err(e) => problems.push(Issue {
                path: path.clone(),
                message: e.to_string(),
            }),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(i.to_string());
                interpolate_value(item, path, env, problems);
                path.pop();
            }
        }
        toml::Value::Table(t) => interpolate_table(t, path, env, problems),
        _ => {}
    }
}
