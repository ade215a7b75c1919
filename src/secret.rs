//! Secrets: values that never show themselves in logs, errors or `Debug` output, and the
//! environment variables the configuration read, which child processes must not inherit.
//!
//! A leaf: both the configuration and the handlers take these from here.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::RwLock;

/// Prefix of environment variables that override file values.
pub const ENV_PREFIX: &str = "BOSUN__";

/// A string that never shows itself in logs, errors or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`; it is also registered with [`crate::redact`], so that it is masked
    /// in any text that leaves the process, wherever it turns up.
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        crate::redact::register(&value);
        Self(value)
    }
    /// The secret itself: only for the place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A connection URL whose password is masked wherever it is displayed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(url::Url);

impl SecretUrl {
    /// Wraps `url`; its password and secret query values are registered with
    /// [`crate::redact`].
    pub fn new(url: url::Url) -> Self {
        crate::redact::register_url(&url);
        Self(url)
    }
    /// The full URL, password included: only for the connecting code.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
    pub fn url(&self) -> &url::Url {
        &self.0
    }
    /// The URL with any password and the values of secret query parameters (`password`,
    /// `sslpassword`, `token`, ...) replaced by `***`.
    pub fn redacted(&self) -> String {
        crate::redact::url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
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
