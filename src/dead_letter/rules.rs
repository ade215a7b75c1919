//! The rules engine: ordered rules, first match wins, the processor's default otherwise.

use std::time::Duration;

use super::copy::check_destination;
use super::letter::DeadLetter;
use crate::config::{Action, DeadLetterConfig, Matcher};

/// What to do with one dead letter, after the replay limit and the replay target are taken
/// into account.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Republish to the original queue or stream, after `delay`.
    Replay { delay: Duration },
    /// Store in the archive table; `note` says why when a replay was turned into this.
    Archive { note: Option<String> },
    /// Settle without keeping it; counted.
    Drop,
    /// Publish to another exchange (amqp) or stream (redis).
    Forward {
        target: String,
        routing_key: Option<String>,
    },
}

impl Decision {
    /// The `action` label of `bosun_dead_letters_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Replay { .. } => "replay",
            Decision::Archive { .. } => "archive",
            Decision::Drop => "drop",
            Decision::Forward { .. } => "forward",
        }
    }
}

/// Whether every condition `matcher` gives holds for `letter`. An empty matcher matches all.
pub fn matches(matcher: &Matcher, letter: &DeadLetter) -> bool {
    let in_list = |list: &[String], value: Option<&str>| {
        list.is_empty() || value.is_some_and(|v| list.iter().any(|item| item == v))
    };
    in_list(&matcher.source, Some(letter.writer.as_str()))
        && in_list(&matcher.error_kind, Some(&letter.error_kind))
        && matcher
            .error
            .as_ref()
            .is_none_or(|re| re.is_match(letter.error.as_deref().unwrap_or("")))
        && in_list(&matcher.original, letter.original.as_deref())
        && in_list(&matcher.reason, letter.reason.as_deref())
        && matcher.attempts_below.is_none_or(|n| letter.attempts < n)
        && matcher
            .attempts_at_least
            .is_none_or(|n| letter.attempts >= n)
}

/// The decision for `letter`, and the index of the rule that made it (`None`: the default).
pub fn decide(config: &DeadLetterConfig, letter: &DeadLetter) -> (Option<usize>, Decision) {
    let (index, action) = match config
        .rules
        .iter()
        .enumerate()
        .find(|(_, rule)| matches(&rule.when, letter))
    {
        Some((i, rule)) => (Some(i), &rule.action),
        None => (None, &config.default_action),
    };
    let decision = match action {
        Action::Replay { delay, max_replays } => {
            if letter.replay_count >= *max_replays {
                Decision::Archive {
                    note: Some("replay limit reached".into()),
                }
            } else if let Err(e) = check_destination(letter, &config.replay_to) {
                Decision::Archive {
                    note: Some(format!("not replayed: {e}")),
                }
            } else {
                Decision::Replay { delay: *delay }
            }
        }
        Action::Archive => Decision::Archive { note: None },
        Action::Drop => Decision::Drop,
        Action::Forward {
            target,
            routing_key,
        } => Decision::Forward {
            target: target.clone(),
            routing_key: routing_key.clone(),
        },
    };
    (index, decision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeadLetterSource, Rule};
    use crate::dead_letter::letter::Writer;

    fn letter() -> DeadLetter {
        DeadLetter {
            message_id: Some("m".into()),
            correlation_id: None,
            content_type: None,
            headers: Default::default(),
            body: Default::default(),
            error_kind: "transient".into(),
            error: Some("timeout after 5 ms".into()),
            reason: None,
            original: Some("orders".into()),
            original_exchange: None,
            routing_key: None,
            attempts: 3,
            replay_count: 0,
            first_failed_at: None,
            source: "orders.dlq".into(),
            entry_id: None,
            timestamp_ms: None,
            writer: Writer::Bosun,
        }
    }

    fn config(rules: Vec<Rule>) -> DeadLetterConfig {
        DeadLetterConfig {
            source: "rabbit".into(),
            from: DeadLetterSource::Queue("orders.dlq".into()),
            archive: Some("db".into()),
            table: "dead_letters".into(),
            default_action: Action::Archive,
            rules,
            migrate: false,
            replay_to: vec!["orders".into()],
            fallback: None,
        }
    }

    fn rule(when: Matcher, action: Action) -> Rule {
        Rule { when, action }
    }

    #[test]
    fn every_matcher_field_is_checked() {
        let l = letter();
        let yes = |m: Matcher| assert!(matches(&m, &l), "{m:?} should match");
        let no = |m: Matcher| assert!(!matches(&m, &l), "{m:?} should not match");
        yes(Matcher::default());
        yes(Matcher {
            error_kind: vec!["permanent".into(), "transient".into()],
            ..Default::default()
        });
        no(Matcher {
            error_kind: vec!["permanent".into()],
            ..Default::default()
        });
        yes(Matcher {
            error: regex::Regex::new("^timeout").ok(),
            ..Default::default()
        });
        no(Matcher {
            error: regex::Regex::new("refused").ok(),
            ..Default::default()
        });
        yes(Matcher {
            original: vec!["orders".into()],
            ..Default::default()
        });
        no(Matcher {
            original: vec!["payments".into()],
            ..Default::default()
        });
        no(Matcher {
            reason: vec!["expired".into()],
            ..Default::default()
        });
        yes(Matcher {
            attempts_below: Some(4),
            ..Default::default()
        });
        no(Matcher {
            attempts_below: Some(3),
            ..Default::default()
        });
        yes(Matcher {
            attempts_at_least: Some(3),
            ..Default::default()
        });
        no(Matcher {
            attempts_at_least: Some(4),
            ..Default::default()
        });
        yes(Matcher {
            source: vec!["bosun".into()],
            ..Default::default()
        });
        no(Matcher {
            source: vec!["broker".into()],
            ..Default::default()
        });
        let expired = DeadLetter {
            reason: Some("expired".into()),
            ..letter()
        };
        assert!(matches(
            &Matcher {
                reason: vec!["maxlen".into(), "expired".into()],
                ..Default::default()
            },
            &expired
        ));
    }

    #[test]
    fn first_matching_rule_wins_else_default() {
        let c = config(vec![
            rule(
                Matcher {
                    error_kind: vec!["permanent".into()],
                    ..Default::default()
                },
                Action::Drop,
            ),
            rule(
                Matcher {
                    error_kind: vec!["transient".into()],
                    ..Default::default()
                },
                Action::Replay {
                    delay: Duration::from_secs(5),
                    max_replays: 2,
                },
            ),
            rule(Matcher::default(), Action::Drop),
        ]);
        assert_eq!(
            decide(&c, &letter()),
            (
                Some(1),
                Decision::Replay {
                    delay: Duration::from_secs(5)
                }
            )
        );
        let other = DeadLetter {
            error_kind: "invalid".into(),
            ..letter()
        };
        assert_eq!(decide(&c, &other), (Some(2), Decision::Drop));
        assert_eq!(
            decide(&config(vec![]), &other),
            (None, Decision::Archive { note: None })
        );
    }

    #[test]
    fn replays_past_the_limit_or_without_a_target_are_archived() {
        let c = config(vec![rule(
            Matcher::default(),
            Action::Replay {
                delay: Duration::ZERO,
                max_replays: 2,
            },
        )]);
        let done = DeadLetter {
            replay_count: 2,
            ..letter()
        };
        assert!(matches!(
            decide(&c, &done).1,
            Decision::Archive { note: Some(_) }
        ));
        let nowhere = DeadLetter {
            original: None,
            ..letter()
        };
        assert!(matches!(
            decide(&c, &nowhere).1,
            Decision::Archive { note: Some(_) }
        ));
        let elsewhere = DeadLetter {
            original: Some("payments".into()),
            ..letter()
        };
        assert!(matches!(
            decide(&c, &elsewhere).1,
            Decision::Archive { note: Some(n) } if n.contains("payments")
        ));
        let once = DeadLetter {
            replay_count: 1,
            ..letter()
        };
        assert_eq!(
            decide(&c, &once).1,
            Decision::Replay {
                delay: Duration::ZERO
            }
        );
    }
}
