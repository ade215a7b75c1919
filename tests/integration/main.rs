//! The integration tests, in one test binary: each module drives bosun (the library through
//! its public API, or the `bosun` binary) against the real services. One binary links bosun
//! once; the tests run as threads of one process, so none of them may change process-wide
//! state (environment variables, signal dispositions, the working directory) and every
//! broker, database and metric name is unique to its test (`support::unique`).
//!
//! `cargo test --test integration MODULE::` runs one module, e.g. `outbox::` or `handlers::exec::`.

mod checker;
mod support;

mod amqp;
mod amqp_cli;
mod amqp_nodes;
mod artifacts;
mod backlog;
mod config;
mod config_fuzz;
mod console;
mod daemon;
mod dead_letters;
mod docs;
mod first_hour;
mod flow_control;
mod handler_kinds;
mod handlers;
mod hostile_amqp;
mod hostile_secrets;
mod inbox;
mod metrics;
mod ops_cli;
mod ordering;
mod outbox;
mod publish_api;
mod redis_cluster;
mod redis_producer;
mod redis_streams;
mod redis_tls;
mod reliability;
mod reload;
mod single_active;
mod singletons;
mod systemd;
mod traces;
