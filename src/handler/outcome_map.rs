//! Outcomes named in configuration: the values of `http`'s `status_overrides` and `exec`'s
//! `exit_codes`, and the shared helpers both kinds use to shape a failure reason.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{FailureKind, OptionError, Outcome};

/// Longest failure reason a handler hands back: it ends up in the `bosun-error` header, and
/// every header of a dead-letter copy must fit one AMQP frame.
pub const MAX_REASON_BYTES: usize = 2048;

/// An outcome as written in a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeName {
    Ack,
    Retry,
    DeadLetter,
    Drop,
}

impl OutcomeName {
    /// The outcome, with `reason` for the failing ones and `after` for a retry.
    pub fn outcome(self, reason: String, after: Option<Duration>) -> Outcome {
        match self {
            OutcomeName::Ack => Outcome::Ack,
            OutcomeName::Retry => Outcome::Retry { after, reason },
            OutcomeName::DeadLetter => Outcome::DeadLetter {
                reason,
                kind: FailureKind::Permanent,
            },
            OutcomeName::Drop => Outcome::Drop { reason },
        }
    }
}

/// Turns a table of numeric keys (`"409" = "ack"`) into a map by number, checking each key is
/// an integer inside `range`. `at` is the table's option name, for the error path.
pub fn numeric_keys(
    at: &str,
    raw: &BTreeMap<String, OutcomeName>,
    range: std::ops::RangeInclusive<i32>,
    what: &str,
) -> Result<BTreeMap<i32, OutcomeName>, OptionError> {
    let mut map = BTreeMap::new();
    for (key, outcome) in raw {
        match key.trim().parse::<i32>() {
            Ok(code) if range.contains(&code) => {
                map.insert(code, *outcome);
            }
            _ => {
                return Err(OptionError::new(
                    &[at, key],
                    format!(
                        "`{key}` is not {what} ({} to {})",
                        range.start(),
                        range.end()
                    ),
                ));
            }
        }
    }
    Ok(map)
}

/// Decodes the bytes as UTF-8 (invalid sequences replaced), dropping a character cut in half
/// at the start: `bytes` is the tail of a longer stream.
pub fn tail_text(bytes: &[u8]) -> String {
    let skip = bytes
        .iter()
        .take(3)
        .take_while(|b| (**b & 0b1100_0000) == 0b1000_0000)
        .count();
    String::from_utf8_lossy(&bytes[skip..]).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_text_drops_a_split_leading_character() {
        let text = "é and more".as_bytes();
        assert_eq!(tail_text(&text[1..]), "and more");
    }

    #[test]
    fn numeric_keys_reject_out_of_range_and_non_numbers() {
        let raw: BTreeMap<String, OutcomeName> = [("600".to_owned(), OutcomeName::Ack)].into();
        let err = numeric_keys("status_overrides", &raw, 100..=599, "an HTTP status").unwrap_err();
        assert_eq!(err.path, vec!["status_overrides", "600"]);
        let raw: BTreeMap<String, OutcomeName> = [("4xx".to_owned(), OutcomeName::Ack)].into();
        assert!(numeric_keys("status_overrides", &raw, 100..=599, "an HTTP status").is_err());
        let raw: BTreeMap<String, OutcomeName> = [("409".to_owned(), OutcomeName::Ack)].into();
        assert_eq!(
            numeric_keys("status_overrides", &raw, 100..=599, "an HTTP status")
                .unwrap()
                .get(&409),
            Some(&OutcomeName::Ack)
        );
    }
}
