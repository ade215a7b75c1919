//! The publish API: `POST /v1/publish` sends a message now or at a time, for applications
//! that cannot write an outbox row in their own transaction; `GET/DELETE /v1/scheduled/ID`
//! look at and cancel a scheduled one. Served on the admin listener, for tokens with the
//! `publisher` (or `admin`) role; the API's own description is `/v1/openapi.json`.
//!
//! - `request`: the two request forms (raw body, JSON envelope), checked;
//! - `records`: the idempotency records (one answer per message id per window);
//! - here: the sends themselves, their answers, and the routes.
//!
//! An immediate send goes through the broker's [`BrokerPublisher`] (confirms, `mandatory`)
//! and is answered 200 only once the broker confirmed it. A scheduled send is an outbox row
//! of the broker's scheduled outbox ([`crate::outbox::enqueue`]) whose `next_attempt_at` is
//! its due time, written in the transaction that records its answer, and answered 202 once
//! that committed; the outbox relay publishes it when due.

pub mod records;
pub mod request;

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;

use crate::access::Access;
use crate::config::{Config, PublishApiConfig};
use crate::outbox::Message;
use crate::outbox::store::Sending;
use crate::publish::{OutgoingMessage, PublishError};
use crate::publishers::BrokerPublisher;
use crate::resources::Resources;
use crate::roles::Permission;
use records::Records;
use request::{PublishRequest, RequestError, Schedule};

/// The API's description, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Room for the envelope's own fields beside a base64 body of `max_body_size`.
const ENVELOPE_ALLOWANCE: u64 = 128 * 1024;

/// `Retry-After` of a 503: the broker or database is unreachable now.
const RETRY_AFTER_SECONDS: u64 = 5;

/// How long a cancel waits for a row the relay holds (it is being published) before
/// answering 409.
const CANCEL_LOCK_WAIT: Duration = Duration::from_secs(5);

/// How often expired idempotency records are deleted, and how many per statement.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
const EXPIRE_BATCH: i64 = 1000;

/// Counter: publish API requests by result (`published`, `scheduled`, `replayed`,
/// `refused`: any 4xx, `unavailable`: 503).
pub const REQUESTS_METRIC: &str = "bosun_publish_api_requests_total";

/// The `result` label of an answer.
fn result_label(answer: &Answer) -> &'static str {
    match answer.status.as_u16() {
        _ if answer.replayed => "replayed",
        200 => "published",
        202 => "scheduled",
        503 => "unavailable",
        _ => "refused",
    }
}

/// A scheduled outbox: its name and table.
#[derive(Debug, Clone)]
struct Scheduled {
    outbox: String,
    table: String,
    /// The table's record of batches being sent: a row it names may be on the broker.
    sending: Sending,
}

/// The publish API of one configuration.
pub struct PublishApi {
    config: PublishApiConfig,
    pool: PgPool,
    records: Records,
    /// The brokers requests may name, each with its kind and its kept publisher.
    brokers: BTreeMap<String, (&'static str, BrokerPublisher)>,
    /// By broker name.
    scheduled: BTreeMap<String, Scheduled>,
    /// Requests holding a connection of `pool` at once: fewer than the pool has, so that
    /// requests stuck on a broker that does not confirm (a memory alarm) cannot take every
    /// connection from the outbox relays, listeners and dead-letter archives sharing it.
    in_flight: tokio::sync::Semaphore,
    /// Whether the records table is known to exist (created, or `migrate` off): a start
    /// while the database was down leaves it to the first request that reaches it.
    migrated: std::sync::atomic::AtomicBool,
}

/// Connections of the database's pool the publish API leaves to the rest of the process.
const POOL_RESERVE: u32 = 2;

/// An answer: status, JSON body, and whether it repeats an earlier one.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: serde_json::Value,
    /// The first answer to this message id, given again (`Idempotent-Replayed: true`).
    pub replayed: bool,
}

impl Answer {
    fn new(status: StatusCode, body: serde_json::Value) -> Self {
        Self {
            status,
            body,
            replayed: false,
        }
    }

    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, json!({ "error": message.into() }))
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::error(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    fn refused(e: RequestError) -> Self {
        match e {
            RequestError::Invalid(m) => Self::error(StatusCode::BAD_REQUEST, m),
            e @ RequestError::TooLarge { .. } => {
                Self::error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
        }
    }

    /// The message id this answer carries, if any.
    pub fn message_id(&self) -> Option<&str> {
        self.body.get("message_id").and_then(|v| v.as_str())
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        if self.replayed {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

/// A database error as an answer: data the database refuses (SQLSTATE classes 22, 23) is
/// the request's fault (400); anything else is an outage (503).
fn database_answer(e: &sqlx::Error) -> Answer {
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    let e = crate::redact::text(&e.to_string()).into_owned();
    match code.as_deref() {
        Some(c) if c.starts_with("22") || c.starts_with("23") => Answer::error(
            StatusCode::BAD_REQUEST,
            format!("the database refused the message: {e}"),
        ),
        _ => Answer::unavailable(format!("database unavailable: {e}")),
    }
}

/// A refused publish as an answer: what no retry can change is a 4xx; a connection failure
/// (the message may or may not have arrived; send it again with the same id) or a nack (the
/// broker cannot keep it for now, e.g. a full queue) a 503.
fn publish_answer(e: &PublishError) -> Answer {
    let status = match e {
        PublishError::Unroutable(_) | PublishError::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
        PublishError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        PublishError::Invalid(_) => StatusCode::BAD_REQUEST,
        PublishError::Connection(_) | PublishError::Nacked(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    Answer::error(status, crate::redact::text(&e.to_string()).into_owned())
}

impl PublishApi {
    /// The API for `config`'s `[publish_api]`, or `None` when there is none.
    pub fn build(config: &Config, resources: &Resources) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(api) = &config.publish_api else {
            return Ok(None);
        };
        let pool = resources.database(&api.database)?;
        Self::new(config, pool).map(Some)
    }

    /// The API for `config`'s `[publish_api]` over `pool` (its database).
    pub fn new(config: &Config, pool: PgPool) -> anyhow::Result<Arc<Self>> {
        let api = config
            .publish_api
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the configuration has no `[publish_api]`"))?;
        let mut brokers = BTreeMap::new();
        for name in &api.brokers {
            let broker = config
                .brokers
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("broker `{name}` is not defined"))?;
            let publisher =
                BrokerPublisher::new(name, broker, &config.service.name, "publish-api", None);
            brokers.insert(name.clone(), (broker.kind(), publisher));
        }
        let mut scheduled = BTreeMap::new();
        for (broker, outbox) in &api.scheduled {
            let table = config
                .outboxes
                .get(outbox)
                .map(|o| o.table.clone())
                .ok_or_else(|| anyhow::anyhow!("outbox `{outbox}` is not defined"))?;
            scheduled.insert(
                broker.clone(),
                Scheduled {
                    outbox: outbox.clone(),
                    sending: Sending::new(&table),
                    table,
                },
            );
        }
        let permits = pool
            .options()
            .get_max_connections()
            .saturating_sub(POOL_RESERVE)
            .max(1);
        let built = Arc::new(Self {
            in_flight: tokio::sync::Semaphore::new(permits as usize),
            migrated: std::sync::atomic::AtomicBool::new(!api.migrate),
            config: api.clone(),
            records: Records::new(&api.idempotency_table),
            pool,
            brokers,
            scheduled,
        });
        expire_records(Arc::downgrade(&built));
        metrics::describe_counter!(
            REQUESTS_METRIC,
            "Publish API requests by result: published, scheduled, replayed (a repeated message id), refused (4xx), unavailable (503)."
        );
        for result in [
            "published",
            "scheduled",
            "replayed",
            "refused",
            "unavailable",
        ] {
            metrics::counter!(REQUESTS_METRIC, "result" => result).increment(0);
        }
        Ok(built)
    }

    /// Creates the idempotency table when `migrate` is on and it was not created yet (the
    /// scheduled outboxes' tables are their relays' to create).
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        use std::sync::atomic::Ordering;
        if !self.migrated.load(Ordering::Acquire) {
            records::migrate(&self.pool, &self.config.idempotency_table).await?;
            self.migrated.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Sends or schedules `request`, once per message id per window. A refusal carries the
    /// message id the client gave, and a 503 the id to send again with (generated or given).
    pub async fn publish(&self, request: &PublishRequest) -> Answer {
        let mut message_id = request
            .message_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut answer = self.send(request, &mut message_id).await;
        let tell = request.message_id.is_some() || answer.status == StatusCode::SERVICE_UNAVAILABLE;
        if !answer.status.is_success() && tell && answer.body.get("message_id").is_none() {
            answer.body["message_id"] = json!(message_id);
        }
        answer
    }

    /// [`Self::publish`] of `request` under `message_id`, which a scheduled send puts in its
    /// canonical form.
    async fn send(&self, request: &PublishRequest, message_id: &mut String) -> Answer {
        let Some((kind, publisher)) = self.brokers.get(&request.broker) else {
            let names: Vec<&str> = self.brokers.keys().map(String::as_str).collect();
            return Answer::error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "broker `{}` is not one the publish API sends to (brokers: {})",
                    request.broker,
                    names.join(", ")
                ),
            );
        };
        match (*kind, request.stream) {
            ("amqp", true) => {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "broker `{}` is amqp: give `exchange`, not `stream`",
                        request.broker
                    ),
                );
            }
            ("redis", false) => {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "broker `{}` is redis: give `stream`, not `exchange`",
                        request.broker
                    ),
                );
            }
            _ => {}
        }
        let due = match request.schedule() {
            Ok(due) => due,
            Err(e) => return Answer::refused(e),
        };
        let headers = match request.header_values() {
            Ok(headers) => headers,
            Err(e) => return Answer::refused(e),
        };
        let scheduled = match due {
            None => None,
            Some(at) => {
                let Some(outbox) = self.scheduled.get(&request.broker) else {
                    return Answer::error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!(
                            "broker `{}` has no scheduled outbox (`[publish_api].scheduled`): only immediate sends",
                            request.broker
                        ),
                    );
                };
                let Ok(uuid) = uuid::Uuid::parse_str(message_id) else {
                    return Answer::error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "a scheduled message's id must be a UUID (the outbox keeps it as one); {message_id:?} is not"
                        ),
                    );
                };
                if request.correlation_id.is_some() {
                    return Answer::error(
                        StatusCode::BAD_REQUEST,
                        "a scheduled message keeps no `correlation_id`; send it as a header",
                    );
                }
                // One id, one spelling: `{A1B2...}`, `urn:uuid:...` and the plain form name
                // the same row, so they are one idempotency key, answered in the form the
                // row and `GET /v1/scheduled/ID` show.
                *message_id = uuid.hyphenated().to_string();
                Some((outbox, uuid, at))
            }
        };

        let Ok(Ok(_permit)) =
            tokio::time::timeout(self.config.publish_timeout, self.in_flight.acquire()).await
        else {
            return Answer::unavailable(format!(
                "too many publish requests in flight (each holds a database connection while the broker confirms); send again with message_id {message_id:?}"
            ));
        };
        if let Err(e) = self.migrate().await {
            return database_answer(&e);
        }
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return database_answer(&e),
        };
        // A concurrent request with the same id waits for this one's answer at most this
        // long; beyond it, it is answered 503 and may try again.
        let wait = self.config.publish_timeout + Duration::from_secs(5);
        let set = format!("SET LOCAL lock_timeout = {}", wait.as_millis());
        if let Err(e) = sqlx::query(&set).execute(&mut *tx).await {
            return database_answer(&e);
        }
        let fingerprint = request.fingerprint();
        match self
            .records
            .claim(
                &mut tx,
                message_id,
                &fingerprint,
                self.config.idempotency_window,
            )
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(Some(earlier))) => {
                let _ = tx.rollback().await;
                if earlier.fingerprint != fingerprint {
                    return Answer::error(
                        StatusCode::CONFLICT,
                        format!(
                            "message id {message_id:?} was already used for a different request"
                        ),
                    );
                }
                return Answer {
                    status: StatusCode::from_u16(earlier.status).unwrap_or(StatusCode::OK),
                    body: earlier.answer,
                    replayed: true,
                };
            }
            Ok(Err(None)) => {
                return Answer::unavailable(
                    "the message id's earlier record is expiring; try again",
                );
            }
            Err(e) => return database_answer(&e),
        }

        let message = OutgoingMessage {
            destination: request.destination.clone(),
            routing_key: request.routing_key.clone(),
            message_id: message_id.clone(),
            correlation_id: request.correlation_id.clone(),
            content_type: request.content_type.clone(),
            headers,
            body: request.body.clone(),
            timestamp_ms: None,
            // A `traceparent` the client sent among the headers: its trace goes on.
            trace: crate::publish::TraceLink::Continue,
        };
        let answer = match scheduled {
            Some((outbox, uuid, at)) => {
                // What the relay's publish would refuse later is refused now.
                if let Err(e) = publisher.check(&message).await {
                    let _ = tx.rollback().await;
                    let mut answer = publish_answer(&e);
                    answer.body["message_id"] = json!(message_id);
                    return answer;
                }
                let message = Message::new(request.routing_key.clone(), request.body.to_vec())
                    .table(outbox.table.clone())
                    .message_id(uuid)
                    .destination(request.destination.clone());
                // Due times are the database's: the relay compares them with its `now()`.
                let mut message = match at {
                    Schedule::In(delay) => message.deliver_in(delay),
                    Schedule::At(at) => {
                        let now: DateTime<Utc> =
                            match sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await {
                                Ok(now) => now,
                                Err(e) => return database_answer(&e),
                            };
                        match request::not_past(at, now) {
                            Ok(at) => message.deliver_at(at),
                            Err(e) => {
                                let _ = tx.rollback().await;
                                return Answer::refused(e);
                            }
                        }
                    }
                };
                message.headers = request.headers.clone();
                message.content_type = request.content_type.clone();
                let enqueued = crate::outbox::enqueue(&mut tx, &message).await;
                // The relay measures and parses the stored `headers::text`, which can be
                // longer than the request's JSON (jsonb writes `1e300` out in full).
                let stored = match &enqueued {
                    Ok(row) => stored_headers(&mut tx, &outbox.table, row.id).await,
                    Err(_) => Ok(None),
                };
                match stored {
                    Ok(Some(e)) => {
                        let _ = tx.rollback().await;
                        return Answer::new(
                            StatusCode::BAD_REQUEST,
                            json!({ "error": format!("headers as stored: {e}"), "message_id": message_id }),
                        );
                    }
                    Ok(None) => {}
                    Err(e) => return database_answer(&e),
                }
                match enqueued {
                    Ok(row) => Answer::new(
                        StatusCode::ACCEPTED,
                        json!({
                            "message_id": message_id,
                            "status": "scheduled",
                            "deliver_at": row.deliver_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                            "outbox": outbox.outbox,
                        }),
                    ),
                    Err(crate::outbox::OutboxError::Database(e)) => return database_answer(&e),
                    Err(e) => return Answer::unavailable(e.to_string()),
                }
            }
            None => {
                let sent = tokio::time::timeout(self.config.publish_timeout, async {
                    let publisher = publisher
                        .connect()
                        .await
                        .map_err(|e| PublishError::Connection(e.to_string()))?;
                    publisher.publish(&message).await
                })
                .await;
                match sent {
                    Ok(Ok(())) => Answer::new(
                        StatusCode::OK,
                        json!({ "message_id": message_id, "status": "published" }),
                    ),
                    Ok(Err(e)) => {
                        let _ = tx.rollback().await;
                        let mut answer = publish_answer(&e);
                        answer.body["message_id"] = json!(message_id);
                        return answer;
                    }
                    Err(_) => {
                        let _ = tx.rollback().await;
                        return Answer::unavailable(format!(
                            "the broker did not confirm within {:?}; send again with message_id {message_id:?}",
                            self.config.publish_timeout
                        ));
                    }
                }
            }
        };
        let recorded = async {
            self.records
                .answer(&mut tx, message_id, answer.status.as_u16(), &answer.body)
                .await?;
            tx.commit().await
        }
        .await;
        match recorded {
            Ok(()) => answer,
            // Sent and confirmed, but not remembered: a repeat would send again (a duplicate
            // with the same id). Still a success.
            Err(e) if answer.status == StatusCode::OK => {
                tracing::warn!(message_id = %message_id, error = %e,
                    "message published, but its idempotency record was not stored");
                answer
            }
            // Nothing of a scheduled send is durable until this commit.
            Err(e) => database_answer(&e),
        }
    }

    /// The scheduled message `id`, in whichever scheduled outbox holds it.
    pub async fn scheduled(&self, id: &str) -> Answer {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Answer::error(
                StatusCode::NOT_FOUND,
                format!("no scheduled message {id:?} (scheduled ids are UUIDs)"),
            );
        };
        for scheduled in self.scheduled.values() {
            let statement = format!(
                "SELECT destination, routing_key, created_at, next_attempt_at, attempts, last_error,
                        published_at, failed_at
                 FROM {} WHERE message_id = $1 ORDER BY id LIMIT 1",
                scheduled.table
            );
            type Row = (
                Option<String>,
                String,
                DateTime<Utc>,
                DateTime<Utc>,
                i32,
                Option<String>,
                Option<DateTime<Utc>>,
                Option<DateTime<Utc>>,
            );
            let row: Option<Row> = match sqlx::query_as(&statement)
                .bind(uuid)
                .fetch_optional(&self.pool)
                .await
            {
                Ok(row) => row,
                Err(e) => return database_answer(&e),
            };
            let Some((
                destination,
                routing_key,
                created_at,
                next,
                attempts,
                last_error,
                published,
                failed,
            )) = row
            else {
                continue;
            };
            let time = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            let sending = match (published, failed) {
                (None, None) => match self.in_doubt(scheduled, uuid).await {
                    Ok(sending) => sending,
                    Err(e) => return database_answer(&e),
                },
                _ => false,
            };
            let status = match (published, failed, attempts) {
                (Some(_), _, _) => "published",
                (None, Some(_), _) => "failed",
                _ if sending => "sending",
                (None, None, 0) => "scheduled",
                (None, None, _) => "retrying",
            };
            return Answer::new(
                StatusCode::OK,
                json!({
                    "message_id": uuid.to_string(),
                    "status": status,
                    "outbox": scheduled.outbox,
                    "destination": destination,
                    "routing_key": routing_key,
                    "created_at": time(created_at),
                    "next_attempt_at": time(next),
                    "attempts": attempts,
                    "last_error": last_error,
                    "published_at": published.map(time),
                    "failed_at": failed.map(time),
                }),
            );
        }
        Answer::error(
            StatusCode::NOT_FOUND,
            format!(
                "no scheduled message {id:?} (never scheduled, cancelled, or published and deleted after retention)"
            ),
        )
    }

    /// Whether the pending row of message `uuid` in `scheduled` is being sent or was sent
    /// without a known outcome.
    async fn in_doubt(&self, scheduled: &Scheduled, uuid: uuid::Uuid) -> Result<bool, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {} WHERE message_id = $1 AND published_at IS NULL AND failed_at IS NULL",
            scheduled.table
        ))
        .bind(uuid)
        .fetch_all(&mut *conn)
        .await?;
        scheduled.sending.names_any(&mut conn, &ids).await
    }

    /// Cancels the scheduled message `id` if no publish of it has started: deleted, so no
    /// relay can take it (200). A message being published now, or whose publish ended
    /// without a known outcome (a confirm lost with the connection, a timeout, a crash), may
    /// be on the broker and will be published (again): 409, never 200. One a relay holds is
    /// waited for up to 5 s, for the outcome.
    pub async fn cancel(&self, id: &str) -> Answer {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Answer::error(
                StatusCode::NOT_FOUND,
                format!("no scheduled message {id:?} (scheduled ids are UUIDs)"),
            );
        };
        for scheduled in self.scheduled.values() {
            match self.cancel_in(scheduled, uuid).await {
                Ok(Cancel::NotPending) => {}
                Ok(Cancel::Cancelled) => {
                    return Answer::new(
                        StatusCode::OK,
                        json!({ "message_id": uuid.to_string(), "status": "cancelled", "outbox": scheduled.outbox }),
                    );
                }
                Ok(Cancel::InDoubt) => {
                    return Answer::new(
                        StatusCode::CONFLICT,
                        json!({
                            "message_id": uuid.to_string(),
                            "status": "sending",
                            "outbox": scheduled.outbox,
                            "error": format!(
                                "message {id} is being published, or a publish of it ended without the broker's confirm: the broker may have it, and it will be published (again); it can no longer be cancelled"
                            ),
                        }),
                    );
                }
                Err(e)
                    if e.as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == "55P03") =>
                {
                    return Answer::new(
                        StatusCode::CONFLICT,
                        json!({
                            "message_id": uuid.to_string(),
                            "status": "sending",
                            "outbox": scheduled.outbox,
                            "error": format!(
                                "message {id} is being published now; it can no longer be cancelled"
                            ),
                        }),
                    );
                }
                Err(e) => return database_answer(&e),
            }
        }
        // Nothing pending: say what became of it.
        let found = self.scheduled(id).await;
        if found.status != StatusCode::OK {
            return found;
        }
        let status = found.body["status"]
            .as_str()
            .unwrap_or("published")
            .to_owned();
        let mut body = found.body;
        body["error"] = json!(format!(
            "message {id} is {status}; only a message not yet published can be cancelled"
        ));
        Answer::new(StatusCode::CONFLICT, body)
    }

    /// One scheduled outbox's part of [`Self::cancel`], in one transaction:
    /// 1. lock the message's pending rows, waiting up to 5 s for a relay that holds them (a
    ///    relay's claim skips rows locked here, so none starts sending them meanwhile);
    /// 2. in a new statement, whose snapshot sees every record a relay committed before it
    ///    let go of them: a row a record of batches being sent names may be on the broker;
    /// 3. otherwise delete them.
    async fn cancel_in(
        &self,
        scheduled: &Scheduled,
        uuid: uuid::Uuid,
    ) -> Result<Cancel, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "SET LOCAL lock_timeout = {}",
            CANCEL_LOCK_WAIT.as_millis()
        ))
        .execute(&mut *tx)
        .await?;
        let ids: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT id FROM {} WHERE message_id = $1 AND published_at IS NULL AND failed_at IS NULL
             FOR UPDATE",
            scheduled.table
        ))
        .bind(uuid)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(Cancel::NotPending);
        }
        if scheduled.sending.names_any(&mut tx, &ids).await? {
            tx.rollback().await?;
            return Ok(Cancel::InDoubt);
        }
        sqlx::query(&format!(
            "DELETE FROM {} WHERE id = ANY($1)",
            scheduled.table
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Cancel::Cancelled)
    }
}

/// What a cancel found in one scheduled outbox.
enum Cancel {
    /// No pending row of the message here.
    NotPending,
    /// Deleted before any publish of it started.
    Cancelled,
    /// Being sent, or sent without a known outcome: kept, to be published (again).
    InDoubt,
}

/// Why the headers of row `id` of `table`, as stored, would fail the relay's check (the
/// same bounds, on the same `headers::text`); `None` when they pass.
async fn stored_headers(
    tx: &mut sqlx::PgConnection,
    table: &str,
    id: i64,
) -> Result<Option<String>, sqlx::Error> {
    let limit = crate::outbox::headers::MAX_BYTES as i32 + 1;
    let (length, text): (i32, String) = sqlx::query_as(&format!(
        "SELECT octet_length(headers::text), left(headers::text, $2) FROM {table} WHERE id = $1"
    ))
    .bind(id)
    .bind(limit)
    .fetch_one(tx)
    .await?;
    let length = usize::try_from(length).unwrap_or(usize::MAX);
    Ok(crate::outbox::headers::parse_sized(&text, length)
        .err()
        .map(|e| e.to_string()))
}

/// Deletes expired idempotency records now and then; stops when the API is dropped.
fn expire_records(api: Weak<PublishApi>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(EXPIRE_EVERY);
        // The first tick is immediate: skip it, so the table is migrated before it is used.
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(api) = api.upgrade() else {
                return;
            };
            loop {
                match api.records.expire(&api.pool, EXPIRE_BATCH).await {
                    Ok(n) if n as i64 >= EXPIRE_BATCH => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot delete expired publish API records");
                        break;
                    }
                }
            }
        }
    });
}

/// The publish API's routes (when `[publish_api]` is configured), for tokens granted
/// [`Permission::Publish`], and the admin API's description, for any valid token.
pub fn routes(api: Option<Arc<PublishApi>>, access: &Access) -> Router {
    let describe = access.guard(
        Router::new().route("/v1/openapi.json", get(openapi)),
        Permission::Describe,
    );
    let Some(api) = api else {
        return describe;
    };
    let publish = Router::new()
        .route("/v1/publish", post(publish))
        .route("/v1/scheduled/{id}", get(show).delete(cancel))
        .with_state(api);
    access.guard(publish, Permission::Publish).merge(describe)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn show(State(api): State<Arc<PublishApi>>, Path(id): Path<String>) -> Answer {
    api.scheduled(&id).await
}

async fn cancel(State(api): State<Arc<PublishApi>>, Path(id): Path<String>) -> Answer {
    api.cancel(&id).await
}

async fn publish(State(api): State<Arc<PublishApi>>, request: Request) -> Answer {
    let answer = answer_publish(&api, request).await;
    metrics::counter!(REQUESTS_METRIC, "result" => result_label(&answer)).increment(1);
    if answer.status.is_client_error() {
        tracing::info!(
            status = answer.status.as_u16(),
            error = answer.body["error"].as_str().unwrap_or(""),
            "publish API request refused"
        );
    }
    answer
}

async fn answer_publish(api: &PublishApi, request: Request) -> Answer {
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().unwrap_or("");
    let max = api.config.max_body_size;
    // Raw: the body is the message. Envelope: base64 (4 bytes per 3) and the other fields.
    let limit = if query.is_empty() {
        max.saturating_mul(4) / 3 + ENVELOPE_ALLOWANCE
    } else {
        max
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared
        && length > limit
    {
        return Answer::refused(RequestError::TooLarge { size: length, max });
    }
    let bytes = match axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX)).await
    {
        Ok(bytes) => bytes,
        Err(e) => {
            return Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body could not be read within the limit of {limit} bytes: {e}"
                ),
            );
        }
    };
    let request = if query.is_empty() {
        request::from_envelope(&bytes, max)
    } else {
        request::from_raw(query, &parts.headers, bytes, max)
    };
    match request {
        Ok(request) => api.publish(&request).await,
        Err(e) => Answer::refused(e),
    }
}
