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

mod interpolate;
mod locate;
pub mod model;
pub mod raw;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::RwLock;

pub use interpolate::interpolate;
pub use locate::{Position, position};
pub use model::*;
pub use validate::{Issue, default_consumer_name, parse_duration, valid_sql_identifier};

use crate::handler::HandlerKinds;

/// Files larger than this are refused before parsing: a config file is a few kilobytes.
pub const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

/// Prefix of environment variables that override file values.
pub const ENV_PREFIX: &str = "BOSUN__";

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

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match &p.location {
                Location::File(pos) => write!(f, "{}:{}:{}: ", self.origin, pos.line, pos.column)?,
                Location::Env(var) => write!(f, "{} (environment variable {var}): ", self.origin)?,
                Location::Unknown => write!(f, "{}: ", self.origin)?,
            }
            f.write_str(&p.message)?;
            if !p.path.is_empty() && !p.message.contains(" in [") {
                write!(f, " (at `{}`)", p.path)?;
            }
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
    let bytes =
        read_capped(path).map_err(|e| ConfigError::single(&origin, Location::Unknown, "", e))?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let pos = position(&String::from_utf8_lossy(&bytes[..valid]), valid);
            return Err(ConfigError::single(
                &origin,
                Location::File(pos),
                "",
                "the file is not valid UTF-8 text (is it a binary file?)",
            ));
        }
    };
    load_str(&text, &origin, kinds, env)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read the config file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the config file: {e}"))?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "the file is larger than {} MiB; a bosun config is a few kilobytes",
            MAX_CONFIG_BYTES / (1024 * 1024)
        ));
    }
    Ok(bytes)
}

/// Names of the environment variables configurations loaded in this process read (through
/// `${VAR}`, `token_env`, or as `BOSUN__*` overrides). Child processes never inherit them.
static CONFIG_ENV: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// Records that the configuration read environment variable `name`.
pub fn note_env_read(name: &str) {
    match CONFIG_ENV.write() {
        Ok(mut names) => names.insert(name.to_owned()),
        Err(poisoned) => poisoned.into_inner().insert(name.to_owned()),
    };
}

/// Whether a configuration loaded in this process read environment variable `name`.
pub fn env_read_by_config(name: &str) -> bool {
    name.starts_with(ENV_PREFIX)
        || match CONFIG_ENV.read() {
            Ok(names) => names.contains(name),
            Err(poisoned) => poisoned.into_inner().contains(name),
        }
}

/// Whether reloads check the file's permissions like the start did (set by `bosun run`,
/// unless `--allow-insecure-config`; off for programs embedding the library).
static ENFORCE_PERMISSIONS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes every later [`check_permissions_on_reload`] check the file (or not).
pub fn enforce_permissions(on: bool) {
    ENFORCE_PERMISSIONS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// [`check_permissions`], when the process enforces it.
pub fn check_permissions_on_reload(path: &Path) -> Result<(), ConfigError> {
    if ENFORCE_PERMISSIONS.load(std::sync::atomic::Ordering::Relaxed) {
        check_permissions(path)
    } else {
        Ok(())
    }
}

/// Refuses a configuration file that users other than its owner may change: whoever can
/// write it chooses the commands `exec` handlers run and where messages go.
pub fn check_permissions(path: &Path) -> Result<(), ConfigError> {
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
    let mut interpolated = Vec::new();
    load_str_recording(text, origin, kinds, env, &mut interpolated).map_err(|mut e| {
        // Longest value first, so a value containing another is put back whole.
        interpolated.sort_by_key(|(_, value): &(String, String)| std::cmp::Reverse(value.len()));
        for problem in &mut e.problems {
            let mut message = problem.message.clone();
            for (name, value) in &interpolated {
                if value.len() >= 3 && message.contains(value.as_str()) {
                    message = message.replace(value.as_str(), &format!("${{{name}}}"));
                }
            }
            problem.message = crate::redact::text(&message).into_owned();
        }
        e
    })
}

fn load_str_recording(
    text: &str,
    origin: &str,
    kinds: &HandlerKinds,
    env: &Env,
    interpolated: &mut Vec<(String, String)>,
) -> Result<Config, ConfigError> {
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

    let (mut table, overridden) = apply_env_overrides(text, table, env)
        .map_err(|(var, message)| ConfigError::single(origin, Location::Env(var), "", message))?;

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
    if !problems.is_empty() {
        return Err(ConfigError {
            origin: origin.to_owned(),
            problems: problems
                .into_iter()
                .map(|issue: Issue| ConfigProblem {
                    location: locate(&issue.path),
                    path: issue.path.join("."),
                    message: issue.message,
                })
                .collect(),
        });
    }

    let raw: raw::RawConfig =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let mut path: Vec<String> = e
                .path()
                .iter()
                .filter_map(|segment| match segment {
                    serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                    serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                    serde_path_to_error::Segment::Enum { .. }
                    | serde_path_to_error::Segment::Unknown => None,
                })
                .collect();
            let mut message = e.inner().message().trim().to_owned();
            if let Some(field) = unknown_field_name(&message) {
                // Point at the misspelt key itself and name the table it sits in.
                if path.last() == Some(&field) {
                    path.pop();
                }
                let table_path = path.join(".");
                if !table_path.is_empty() {
                    message = message.replacen(
                        &format!("`{field}`"),
                        &format!("`{field}` in [{table_path}]"),
                        1,
                    );
                }
                path.push(field);
            } else if message.starts_with("missing field") && !path.is_empty() {
                message = format!("{message} in [{}]", path.join("."));
            }
            ConfigError::single(origin, locate(&path), &path.join("."), message)
        })?;

    validate::validate(raw, origin, kinds).map_err(|issues| ConfigError {
        origin: origin.to_owned(),
        problems: issues
            .into_iter()
            .map(|issue| ConfigProblem {
                location: locate(&issue.path),
                path: issue.path.join("."),
                message: issue.message,
            })
            .collect(),
    })
}

/// The name inside "unknown field `name`, expected ...".
fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

/// Layers `BOSUN__...` variables over the file with the `config` crate. Returns the merged
/// table and, for each overridden key path, the variable that set it.
fn apply_env_overrides(
    text: &str,
    table: toml::Table,
    env: &Env,
) -> Result<(toml::Table, BTreeMap<String, String>), (String, String)> {
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
        .map_err(|e| {
            (
                first_var.clone(),
                format!("cannot apply environment overrides: {e}"),
            )
        })?;
    let mut merged: toml::Table = merged.try_deserialize().map_err(|e| {
        (
            first_var,
            format!("cannot apply environment overrides: {e}"),
        )
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
            Err(message) => problems.push(Issue {
                path: path.clone(),
                message,
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
