//! bosun: a message worker daemon.
//!
//! bosun reads one TOML file and runs, under one supervisor:
//! - **consumers** of RabbitMQ queues and Redis Streams consumer groups, which hand each
//!   message to a [`handler`] and settle it at its source only once its outcome is durable;
//! - a **retry topology** ([`retry`]): delayed retries with backoff and a dead-letter
//!   destination when attempts run out or a failure is permanent;
//! - **outbox relays** that move rows committed to PostgreSQL onto a broker;
//! - **dead-letter processors** that replay, archive or drop dead letters by rule.
//!
//! How the pieces fit:
//! - [`config`] loads and validates the file into a [`config::Config`];
//! - [`runtime`] builds components from it ([`components`], out of the shared [`resources`])
//!   and runs them under the [`supervisor`], which restarts failed components, drains on
//!   SIGTERM and reloads on SIGHUP ([`reload`]);
//! - [`health`] and [`telemetry`] feed the HTTP listener in [`http`] (`/metrics`,
//!   `/healthz`, `/readyz`);
//! - [`consumers`] builds every consumer, and [`disposition`] decides, the same way for both
//!   brokers, what becomes of a message once its handler has answered;
//! - [`publishers`] turns a `[brokers.*]` table into a [`publish::Publisher`];
//! - [`cli`] is the `bosun` binary.
//!
//! The library can be embedded: build a [`Runtime`] with your own handler kinds.

pub mod amqp;
pub mod cli;
pub mod components;
pub mod config;
pub mod consumers;
pub mod database;
pub mod dead_letter;
pub mod disposition;
pub mod failure_headers;
pub mod handler;
pub mod health;
pub mod http;
pub mod outbox;
pub mod publish;
pub mod publishers;
pub mod redact;
pub mod redis_streams;
pub mod reload;
pub mod resources;
pub mod retry;
pub mod runtime;
pub mod secret;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
pub mod text;
pub mod units;

pub use handler::{Handler, Message, Outcome};
pub use runtime::{Runtime, RuntimeBuilder};
