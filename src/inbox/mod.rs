//! The inbox: a record per (consumer, key) that makes a consumer's handler run once per key.
//!
//! Before a handler runs, its consumer claims the message's key ([`Inbox::admit`]) in one
//! store operation that either takes the key (a new claim, or one whose lease expired: a
//! takeover), finds it done (a duplicate, settled per `on_duplicate` without the handler), or
//! finds a live claim held elsewhere (the message goes back to its source without using an
//! attempt, so one key never runs in two handlers at once). Once the consumer has made the
//! outcome durable, the claim ([`Ticket`]) is finished: `done` for an ack, a drop or a
//! confirmed dead-letter copy; deleted (compare-and-delete on its token) for a retry or a
//! release, so a failed attempt never becomes a duplicate of itself.
//!
//! A handler outside the process (http, exec) gets the key and the claim's token
//! (`bosun-inbox-key`, `bosun-inbox-token`) and may complete the record itself, inside its
//! own transaction, with the SQL function `bosun_inbox_complete` ([`postgres::Schema`]):
//! its effect and the record then commit together, and a message that comes again after a
//! crash is found done and settled without calling the handler.
//!
//! Stores: [`postgres`] (a table) and [`redis`] (keys with a lease, then the window's TTL).
//! The consumers see [`Inbox`], [`Admission`] and [`Ticket`] only.

pub mod key;
pub mod postgres;
pub mod redis;
pub(crate) mod sweep;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{Counter, Histogram};

use crate::config::{ConsumerInbox, OnDuplicate};
use crate::disposition::Decision;
use crate::handler::{FailureKind, InboxClaim, Message};
use crate::retry::ExponentialBackoff;
use crate::telemetry::inbox_metric as metric;

/// Tries of a finishing write (done, release) before it is given up and logged.
const FINISH_TRIES: u32 = 4;
/// Pauses between those tries: 100 ms doubling to 1 s.
const FINISH_RETRY: ExponentialBackoff =
    ExponentialBackoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// Why an inbox store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox database: {0}")]
    Database(#[from] sqlx::Error),
    /// The error of a statement that answered a whole batch of claims or completions.
    #[error("inbox database: {0}")]
    Batch(std::sync::Arc<sqlx::Error>),
    #[error("inbox redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("inbox redis: {0}")]
    Connect(String),
    #[error("`{0}` is not a plain SQL identifier")]
    InvalidIdentifier(String),
    #[error(
        "the claim on {consumer}/{key} is not held by this token (released, or taken over after its lease)"
    )]
    NotHeld { consumer: String, key: String },
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The key was free: this claim holds it.
    New,
    /// The key held an expired claim (its holder died or hung): this claim took it over.
    TakenOver,
    /// The key is done: the message is a duplicate.
    Done,
    /// Another claim holds the key and its lease has not expired.
    Busy,
}

/// One record, as `bosun inbox show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// `claimed` or `done`.
    pub status: String,
    pub token: String,
    /// When the record was claimed (or, for redis, `-`).
    pub claimed_at: String,
    /// When it was done, if it is.
    pub done_at: Option<String>,
    /// Claims taken over on this key.
    pub takeovers: i64,
}

/// Where records live: the postgres table or the redis keys.
#[async_trait]
pub trait Store: Send + Sync {
    /// Claims `key` for `consumer` with `token`, in one operation.
    async fn claim(&self, consumer: &str, key: &str, token: &str) -> Result<Claimed, InboxError>;
    /// Marks the claim done (idempotent: a record the handler completed itself stays done).
    async fn complete(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError>;
    /// Deletes the claim if `token` still holds it and it is not done.
    async fn release(&self, consumer: &str, key: &str, token: &str) -> Result<(), InboxError>;
    /// The record of `key`, if any.
    async fn show(&self, consumer: &str, key: &str) -> Result<Option<Record>, InboxError>;
    /// Deletes the record of `key`, whatever its state; true when there was one.
    async fn forget(&self, consumer: &str, key: &str) -> Result<bool, InboxError>;
}

struct Metrics {
    duplicates: Counter,
    takeovers: Counter,
    claim_duration: Histogram,
}

impl Metrics {
    fn new(consumer: &str) -> Self {
        let duplicates = metrics::counter!(metric::DUPLICATES, "consumer" => consumer.to_owned());
        let takeovers = metrics::counter!(metric::TAKEOVERS, "consumer" => consumer.to_owned());
        duplicates.increment(0);
        takeovers.increment(0);
        Self {
            duplicates,
            takeovers,
            claim_duration: metrics::histogram!(metric::CLAIM_DURATION, "consumer" => consumer.to_owned()),
        }
    }
}

/// A consumer's inbox: where its keys come from, what a duplicate becomes, and the store.
pub struct Inbox {
    consumer: String,
    config: ConsumerInbox,
    store: Arc<dyn Store>,
    metrics: Metrics,
}

/// What a consumer does with a message after its claim.
pub enum Admission {
    /// Run the handler, then finish the ticket (none without an inbox).
    Run(Option<Ticket>),
    /// Settle it this way without running the handler: a duplicate, or a message without
    /// the key field (dead-lettered as `invalid`).
    Settle(Decision),
    /// Hand it back without using an attempt: another process holds the key, or the store
    /// cannot answer now.
    Postpone(String),
}

impl Inbox {
    pub fn new(consumer: &str, config: ConsumerInbox, store: Arc<dyn Store>) -> Self {
        Self {
            consumer: consumer.to_owned(),
            config,
            store,
            metrics: Metrics::new(consumer),
        }
    }

    /// Claims the message's key; on success the claim is put on the message
    /// ([`Message::inbox`]) so the handler can see it.
    pub async fn admit(&self, message: &mut Message) -> Admission {
        let key = match key::of(&self.config.key, message) {
            Ok(key) => key,
            Err(missing) => {
                tracing::warn!(consumer = %self.consumer, message_id = ?message.message_id, key = %self.config.key, reason = %missing, "message has no inbox key; dead-lettering it as invalid");
                return Admission::Settle(Decision::DeadLetter {
                    kind: FailureKind::Invalid,
                    reason: format!("no inbox key ({}): {missing}", self.config.key),
                });
            }
        };
        let token = uuid::Uuid::now_v7().to_string();
        let started = Instant::now();
        let claimed = self.store.claim(&self.consumer, &key, &token).await;
        self.metrics
            .claim_duration
            .record(started.elapsed().as_secs_f64());
        match claimed {
            Ok(Claimed::New | Claimed::TakenOver) => {
                if matches!(claimed, Ok(Claimed::TakenOver)) {
                    self.metrics.takeovers.increment(1);
                    tracing::info!(consumer = %self.consumer, key = %key, "took over an inbox claim whose lease expired");
                }
                message.inbox = Some(InboxClaim {
                    consumer: self.consumer.clone(),
                    key: key.clone(),
                    token: token.clone(),
                });
                Admission::Run(Some(Ticket {
                    store: self.store.clone(),
                    consumer: self.consumer.clone(),
                    key,
                    token,
                    finished: false,
                }))
            }
            Ok(Claimed::Done) => {
                self.metrics.duplicates.increment(1);
                tracing::info!(consumer = %self.consumer, key = %key, on_duplicate = ?self.config.on_duplicate, "duplicate: the inbox holds this key as done");
                let reason = format!("duplicate: inbox key {key:?} is already done");
                Admission::Settle(match self.config.on_duplicate {
                    OnDuplicate::Ack => Decision::Ack,
                    OnDuplicate::Drop => Decision::Drop { reason },
                    OnDuplicate::DeadLetter => Decision::DeadLetter {
                        kind: FailureKind::Permanent,
                        reason,
                    },
                })
            }
            Ok(Claimed::Busy) => {
                tracing::debug!(consumer = %self.consumer, key = %key, "inbox key claimed elsewhere; handing the message back");
                Admission::Postpone(format!("inbox key {key:?} is being handled elsewhere"))
            }
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, key = %key, error = %e, "cannot claim the inbox key; handing the message back");
                Admission::Postpone(format!("inbox unavailable: {e}"))
            }
        }
    }
}

/// Claims the message's key in `inbox`, or lets it run unclaimed when the consumer has none.
pub async fn admit(inbox: Option<&Inbox>, message: &mut Message) -> Admission {
    match inbox {
        Some(inbox) => inbox.admit(message).await,
        None => Admission::Run(None),
    }
}

/// How a claim ends, once the message's outcome is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Acked, dropped or dead-lettered: repeats are duplicates.
    Done,
    /// Retried or released: the key is free again, so the next attempt can claim it.
    Release,
}

/// A claim held while the handler runs. One dropped without being finished (its handler
/// future dropped when a session ends, a settlement that did not happen) is released in the
/// background, so its message's next delivery need not wait for the lease; a handler outside
/// the process that completed the record meanwhile keeps it done (release deletes only a
/// claim).
pub struct Ticket {
    store: Arc<dyn Store>,
    consumer: String,
    key: String,
    token: String,
    /// Set by [`finish`](Self::finish): nothing left for `Drop` to do.
    finished: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let (consumer, key, token) = (
            std::mem::take(&mut self.consumer),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            if let Err(e) = store.release(&consumer, &key, &token).await {
                tracing::debug!(consumer = %consumer, key = %key, error = %e, "cannot release an abandoned inbox claim; it expires after its lease");
            }
        });
    }
}

impl Ticket {
    /// Writes how the claim ended, trying a few times. A done record that cannot be written
    /// leaves the claim to expire (a later repeat then runs again: at-least-once); a release
    /// that cannot be written makes the next attempt wait for the lease.
    pub async fn finish(mut self, finish: Finish) {
        self.finished = true;
        let mut backoff = FINISH_RETRY;
        for attempt in 1..=FINISH_TRIES {
            let result = match finish {
                Finish::Done => {
                    self.store
                        .complete(&self.consumer, &self.key, &self.token)
                        .await
                }
                Finish::Release => {
                    self.store
                        .release(&self.consumer, &self.key, &self.token)
                        .await
                }
            };
            match result {
                Ok(()) => return,
                Err(e @ InboxError::NotHeld { .. }) => {
                    tracing::warn!(consumer = %self.consumer, key = %self.key, error = %e, finish = ?finish, "inbox claim lost before it finished");
                    return;
                }
                Err(e) if attempt == FINISH_TRIES => {
                    tracing::error!(consumer = %self.consumer, key = %self.key, error = %e, finish = ?finish, "cannot finish the inbox claim; it expires after its lease");
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.consumer, key = %self.key, error = %e, "cannot finish the inbox claim; trying again");
                    tokio::time::sleep(backoff.failed()).await;
                }
            }
        }
    }
}
