//! What becomes of a message once its handler has answered or panicked: one decision, taken
//! the same way by every consumer, which then makes it durable in its broker's terms (a copy
//! to a delay queue or a scheduled re-add, a dead-letter copy, an ack, a release).
//!
//! [`handle`] runs a handler with its panics caught; [`decide`] turns what it gave, the
//! attempt that was made and the retry policy into a [`Decision`]. The decision is pure, so
//! every branch is tested here and not in each broker.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt as _;

use crate::handler::{FailureKind, Handler, HeaderValue, Message, Outcome};
use crate::retry::RetryPolicy;
use crate::trace_context::{self, Consumed, System, TraceMode};

/// A handler that panicked instead of answering, with the panic's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked(pub String);

/// What a handler gave for one message.
pub type Handled = Result<Outcome, Panicked>;

/// Runs `handler` on `message`, catching a panic so that one bad message cannot end the
/// consumer's task.
pub async fn handle(handler: &dyn Handler, message: &Message) -> Handled {
    AssertUnwindSafe(handler.handle(message))
        .catch_unwind()
        .await
        .map_err(|panic| Panicked(panic_text(panic.as_ref())))
}

/// The span `message` is handled in, under the producer's context its headers carry as
/// `mode` says ([`trace_context::consumer_span`]); a disabled span while tracing is off. Both
/// consumers run the handler and make its outcome durable inside it.
pub fn span(message: &Message, system: System, mode: TraceMode) -> tracing::Span {
    if !trace_context::enabled() {
        return tracing::Span::none();
    }
    let parent =
        trace_context::extract(|name| message.headers.get(name).and_then(HeaderValue::as_text));
    trace_context::consumer_span(Consumed {
        system,
        destination: &message.source.queue,
        consumer: &message.source.consumer,
        message_id: message.message_id.as_deref(),
        attempt: message.attempt,
        parent,
        mode,
    })
}

/// The trace context a copy of `message` made under `span` (a retry, a dead letter) must add
/// so that its next attempt stays in the same trace: none when the message carries its
/// producer's `traceparent` (kept on every copy, so attempts are siblings), else the span's
/// own, whose trace the message started.
pub fn trace_for_copy(message: &Message, span: &tracing::Span) -> Vec<(&'static str, String)> {
    if span.is_none()
        || message
            .headers
            .keys()
            .any(|name| trace_context::is_trace_header(name))
    {
        return Vec::new();
    }
    trace_context::headers_of(span)
}

/// The text a panic was raised with (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// The outcome a handler's answer stands for: a panic is a transient failure whose reason
/// keeps the panic's text (it reaches `bosun-error` if the message is dead-lettered).
pub fn outcome(handled: Handled) -> Outcome {
    handled.unwrap_or_else(|Panicked(text)| Outcome::Retry {
        after: None,
        reason: format!("handler panicked: {text}"),
    })
}

/// How a consumer settles a message, once made durable.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Done: settle it.
    Ack,
    /// Settle it without a copy, on the handler's word.
    Drop { reason: String },
    /// Try again: attempt `attempt` (the one after the failed one) after `delay`.
    Retry {
        delay: Duration,
        attempt: u32,
        reason: String,
    },
    /// Copy it to the dead-letter destination with `kind` and `reason`, then settle it.
    DeadLetter { kind: FailureKind, reason: String },
    /// Hand it back to its source unsettled, without using an attempt.
    Release { reason: String },
}

/// The decision for a message whose attempt `attempt` (1-based) gave `outcome`, under
/// `policy`: a retry while attempts remain (the handler's own delay capped at the policy's
/// longest, else the policy's delay with jitter), a dead letter of kind `exhausted` after
/// the last attempt.
pub fn decide(outcome: Outcome, attempt: u32, policy: &RetryPolicy) -> Decision {
    match outcome {
        Outcome::Ack => Decision::Ack,
        Outcome::Drop { reason } => Decision::Drop { reason },
        Outcome::Retry { after, reason } if policy.should_retry(attempt) => Decision::Retry {
            delay: policy.next_delay(attempt, after),
            attempt: attempt.saturating_add(1),
            reason,
        },
        Outcome::Retry { reason, .. } => Decision::DeadLetter {
            kind: FailureKind::Exhausted,
            reason,
        },
        Outcome::DeadLetter { reason, kind } => Decision::DeadLetter { kind, reason },
        Outcome::Release { reason } => Decision::Release { reason },
        // The same attempt again: a deferral is not a try. Its delay is the pause's, cut to
        // the policy's longest like any handler-given delay.
        Outcome::Defer { after, reason } => Decision::Retry {
            delay: policy.next_delay(attempt, Some(after)),
            attempt,
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Backoff;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            backoff: Backoff::Fixed(Duration::from_secs(5)),
            jitter: 0.0,
        }
    }

    fn retry(after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            after,
            reason: "busy".into(),
        }
    }

    #[test]
    fn a_deferral_comes_back_on_the_same_attempt_even_after_the_last() {
        for attempt in [1, 3] {
            let outcome = Outcome::Defer {
                after: Duration::from_secs(2),
                reason: "breaker open".into(),
            };
            assert_eq!(
                decide(outcome, attempt, &policy(3)),
                Decision::Retry {
                    delay: Duration::from_secs(2),
                    attempt,
                    reason: "breaker open".into()
                }
            );
        }
        let long = Outcome::Defer {
            after: Duration::from_secs(3600),
            reason: "paused".into(),
        };
        assert_eq!(
            decide(long, 1, &policy(3)),
            Decision::Retry {
                delay: Duration::from_secs(5),
                attempt: 1,
                reason: "paused".into()
            }
        );
    }

    #[test]
    fn ack_drop_and_release_pass_through_whatever_the_attempt() {
        for attempt in [1, 3, 99] {
            assert_eq!(decide(Outcome::Ack, attempt, &policy(3)), Decision::Ack);
            assert_eq!(
                decide(
                    Outcome::Drop {
                        reason: "dup".into()
                    },
                    attempt,
                    &policy(3)
                ),
                Decision::Drop {
                    reason: "dup".into()
                }
            );
            assert_eq!(
                decide(
                    Outcome::Release {
                        reason: "stopping".into()
                    },
                    attempt,
                    &policy(3)
                ),
                Decision::Release {
                    reason: "stopping".into()
                }
            );
        }
    }

    #[test]
    fn a_retry_with_attempts_left_takes_the_policy_delay_and_the_next_attempt() {
        assert_eq!(
            decide(retry(None), 2, &policy(3)),
            Decision::Retry {
                delay: Duration::from_secs(5),
                attempt: 3,
                reason: "busy".into()
            }
        );
    }

    #[test]
    fn a_handler_delay_is_kept_up_to_the_policy_longest() {
        let short = decide(retry(Some(Duration::from_secs(1))), 1, &policy(3));
        assert!(matches!(short, Decision::Retry { delay, .. } if delay == Duration::from_secs(1)));
        let long = decide(retry(Some(Duration::from_secs(86_400))), 1, &policy(3));
        assert!(matches!(long, Decision::Retry { delay, .. } if delay == Duration::from_secs(5)));
    }

    #[test]
    fn a_retry_of_the_last_attempt_is_dead_lettered_as_exhausted() {
        assert_eq!(
            decide(retry(Some(Duration::ZERO)), 3, &policy(3)),
            Decision::DeadLetter {
                kind: FailureKind::Exhausted,
                reason: "busy".into()
            }
        );
        assert!(matches!(
            decide(retry(None), 1, &policy(1)),
            Decision::DeadLetter {
                kind: FailureKind::Exhausted,
                ..
            }
        ));
    }

    #[test]
    fn a_dead_letter_keeps_the_handler_kind_even_with_attempts_left() {
        for kind in [FailureKind::Permanent, FailureKind::Invalid] {
            assert_eq!(
                decide(
                    Outcome::DeadLetter {
                        reason: "bad".into(),
                        kind
                    },
                    1,
                    &policy(5)
                ),
                Decision::DeadLetter {
                    kind,
                    reason: "bad".into()
                }
            );
        }
    }

    #[test]
    fn a_panic_is_a_transient_failure_that_keeps_its_text() {
        let panicked = outcome(Err(Panicked("index out of bounds".into())));
        assert_eq!(
            decide(panicked.clone(), 1, &policy(2)),
            Decision::Retry {
                delay: Duration::from_secs(5),
                attempt: 2,
                reason: "handler panicked: index out of bounds".into()
            }
        );
        assert_eq!(
            decide(panicked, 2, &policy(2)),
            Decision::DeadLetter {
                kind: FailureKind::Exhausted,
                reason: "handler panicked: index out of bounds".into()
            }
        );
        assert_eq!(outcome(Ok(Outcome::Ack)), Outcome::Ack);
    }

    #[test]
    fn panic_text_reads_str_and_string_payloads() {
        let s: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(panic_text(s.as_ref()), "static");
        let s: Box<dyn Any + Send> = Box::new(String::from("owned"));
        assert_eq!(panic_text(s.as_ref()), "owned");
        let s: Box<dyn Any + Send> = Box::new(7u8);
        assert_eq!(panic_text(s.as_ref()), "unknown panic payload");
    }

    struct Boom;

    #[async_trait::async_trait]
    impl Handler for Boom {
        async fn handle(&self, message: &Message) -> Outcome {
            panic!("boom on {}", message.attempt)
        }
    }

    #[tokio::test]
    async fn handle_catches_a_panic_with_its_text() {
        let message = Message {
            message_id: None,
            correlation_id: None,
            headers: Default::default(),
            content_type: None,
            body: bytes::Bytes::from_static(b"x"),
            attempt: 1,
            redelivered: false,
            inbox: None,
            source: Default::default(),
        };
        assert_eq!(
            handle(&Boom, &message).await,
            Err(Panicked("boom on 1".into()))
        );
    }
}
