//! bosun: a message worker daemon.
//!
//! bosun reads one TOML file and runs, under one supervisor:
//! - **consumers** of RabbitMQ queues and Redis Streams consumer groups, which hand each
//!   message to a [`handler`] and settle it at its source only once its outcome is durable;
//! - a **retry topology** (`retry`): delayed retries with backoff and a dead-letter
//!   destination when attempts run out or a failure is permanent;
//! - **outbox relays** that move rows committed to PostgreSQL onto a broker;
//! - **dead-letter processors** that replay, archive or drop dead letters by rule.
//!
//! How the pieces fit:
//! - [`config`] loads and validates the file into a [`config::Config`];
//! - `runtime` builds components from it (`components`, out of the shared `resources`)
//!   and runs them under the [`supervisor`], which restarts failed components, drains on
//!   SIGTERM and reloads on SIGHUP (`reload`);
//! - `health` and `telemetry` feed the HTTP listener in `http` (`/metrics`,
//!   `/healthz`, `/readyz`);
//! - `consumers` builds every consumer, and `disposition` decides, the same way for both
//!   brokers, what becomes of a message once its handler has answered;
//! - `publishers` turns a `[brokers.*]` table into a `publish::Publisher`;
//! - [`cli`] is the `bosun` binary.
//!
//! The library can be embedded: build a [`Runtime`] with your own handler kinds and
//! components (docs/embedding.md). The public API is [`Runtime`] and [`RuntimeBuilder`], the
//! [`handler`] API, [`supervisor::Component`], [`config`] loading, [`cli::main_with`],
//! [`metrics_handle`], [`OutboxSchema`], [`InboxSchema`] and [`outbox::enqueue`] (an outbox row
//! written in the application's own transaction); every other module is crate-private.

// The public API (see "API boundary" in ARCHITECTURE.md): what a program embedding bosun
// uses. Everything else is crate-private, free to change without breaking embedders.
pub mod cli;
pub mod config;
pub mod handler;
pub mod outbox;
pub mod supervisor;

pub use handler::{Handler, Message, Outcome};
pub use inbox::InboxError;
pub use inbox::postgres::Schema as InboxSchema;
pub use outbox::{OutboxError, Schema as OutboxSchema};
pub use runtime::{Runtime, RuntimeBuilder};
pub use telemetry::metrics_handle;

mod access;
mod activity;
mod amqp;
mod components;
mod console;
mod consumers;
mod database;
mod dead_letter;
mod disposition;
mod failure_headers;
mod flow_control;
mod health;
mod http;
mod inbox;
mod ordering;
mod otlp;
mod publish;
mod publish_api;
mod publishers;
mod redact;
mod redis_streams;
mod reload;
mod resources;
mod retry;
mod roles;
mod runtime;
mod secret;
mod systemd;
mod telemetry;
mod text;
mod trace_context;
mod units;

// Unit tests that drive a module against the real services share the integration tests'
// helpers, and name the crate `bosun` as those tests do.
#[cfg(test)]
extern crate self as bosun;
#[cfg(test)]
mod testing;
