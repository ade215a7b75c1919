//! Durations and sizes as the configuration and handler options write them ("30s",
//! "16MiB"). A leaf: both the configuration and the handlers parse with these.

use std::time::Duration;

/// Why a duration or size cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    #[error(transparent)]
    Duration(#[from] humantime::DurationError),
    #[error("{0:?} does not start with a number")]
    NoNumber(String),
    #[error("unknown unit {0:?} (use B, KiB, MiB or GiB)")]
    UnknownUnit(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("must not be negative")]
    Negative,
    #[error("must be longer than zero")]
    Zero,
}

/// Parses "500ms", "30s", "1m 30s", "2h"; a bare "0" is zero.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    Ok(humantime::parse_duration(text)?)
}

/// A size: bytes, optionally with a `B`, `KiB`, `MiB` or `GiB` unit ("16MiB", "4096").
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| UnitError::NoNumber(text.to_owned()))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(UnitError::UnknownUnit(other.to_owned())),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| UnitError::TooLarge(text.to_owned()))
}
