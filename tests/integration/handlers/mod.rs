//! The `http`, `exec` and `route` handler kinds, driven through the public handler API
//! against a real HTTP server (axum on port 0) and real scripts in `tests/fixtures/`.

use crate::support;

mod exec;
mod http;
mod route;

use std::collections::BTreeMap;
use std::sync::Arc;

use bosun::handler::{BuildContext, Handler, HandlerKinds, Message, Source};

/// Parses `options` (a TOML handler table without `kind`) with the built-in kind `kind` and
/// builds the handler as `name`, with `others` available as dependencies.
pub fn build_with(
    kind: &str,
    name: &str,
    options: &str,
    others: &BTreeMap<String, Arc<dyn Handler>>,
) -> Arc<dyn Handler> {
    // Install the recorder before any handler records a metric.
    bosun::metrics_handle();
    let table: toml::Table = toml::from_str(options).expect("test options are TOML");
    let kinds = HandlerKinds::builtin();
    let factory = kinds
        .get(kind)
        .expect("built-in kind")
        .parse(name, &table)
        .expect("options are valid");
    factory
        .build(&BuildContext {
            name,
            handlers: others,
        })
        .expect("handler builds")
}

pub fn build(kind: &str, name: &str, options: &str) -> Arc<dyn Handler> {
    build_with(kind, name, options, &BTreeMap::new())
}

/// The error `kind` reports for `options`: (path, message).
pub fn option_error(kind: &str, options: &str) -> (String, String) {
    let table: toml::Table = toml::from_str(options).expect("test options are TOML");
    match HandlerKinds::builtin()
        .get(kind)
        .expect("built-in kind")
        .parse("bad", &table)
    {
        Ok(_) => panic!("options were accepted: {options}"),
        Err(e) => (e.path.join("."), e.message),
    }
}

/// Loads a whole config file text; returns the rendered error.
pub fn load_error(text: &str) -> String {
    match bosun::config::load_str(
        text,
        "test.toml",
        &HandlerKinds::builtin(),
        &bosun::config::Env::default(),
    ) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

pub fn message(body: &str) -> Message {
    Message {
        message_id: Some(support::unique("msg")),
        correlation_id: Some("corr-1".into()),
        headers: BTreeMap::new(),
        content_type: Some("application/json".into()),
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        attempt: 1,
        redelivered: false,
        inbox: None,
        source: Source {
            broker: "rabbit".into(),
            consumer: "orders".into(),
            queue: "orders.q".into(),
            exchange: Some("events".into()),
            routing_key: Some("order.created".into()),
            entry_id: None,
        },
    }
}

/// The value of a metric sample in the process-wide recorder.
pub fn metric(name: &str, labels: &[&str]) -> Option<f64> {
    support::metric_value(&bosun::metrics_handle().render(), name, labels)
}
