//! The handler interface: built-in kinds, and kinds a Rust program registers itself.

use crate::support;

use std::sync::Arc;

use async_trait::async_trait;
use bosun::Runtime;
use bosun::handler::{
    Handler, HandlerKinds, HeaderValue, Message, OptionError, Outcome, Source, build_all,
};
use serde::Deserialize;
use support::ConfigFile;

fn message(body: &[u8]) -> Message {
    Message {
        message_id: Some("m-1".into()),
        correlation_id: None,
        headers: [("tenant".to_owned(), HeaderValue::String("acme".into()))]
            .into_iter()
            .collect(),
        content_type: Some("application/octet-stream".into()),
        body: bytes::Bytes::copy_from_slice(body),
        attempt: 1,
        redelivered: false,
        inbox: None,
        source: Source {
            broker: "rabbit".into(),
            consumer: "orders".into(),
            queue: "orders".into(),
            ..Source::default()
        },
    }
}

#[tokio::test]
async fn builtin_noop_and_log_acknowledge() {
    let text = "[handlers.a]\nkind = \"noop\"\n[handlers.b]\nkind = \"log\"\n";
    let config = bosun::config::load_str(
        text,
        "t.toml",
        &HandlerKinds::builtin(),
        &Default::default(),
    )
    .expect("valid");
    let handlers = build_all(&config.handlers).expect("built");
    for name in ["a", "b"] {
        assert_eq!(
            handlers[name].handle(&message(&[0xff, 0x00, 0x80])).await,
            Outcome::Ack
        );
    }
}

/// Dead-letters bodies longer than `max_len`; the option is checked at load time.
struct Limit {
    max_len: usize,
}

#[async_trait]
impl Handler for Limit {
    async fn handle(&self, message: &Message) -> Outcome {
        if message.body.len() > self.max_len {
            Outcome::dead_letter(format!("body over {} bytes", self.max_len))
        } else {
            Outcome::Ack
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitOptions {
    max_len: usize,
}

fn runtime() -> Runtime {
    Runtime::builder()
        .handler_fn("limit", |_name, options| {
            let options: LimitOptions = bosun::handler::parse_options(options)?;
            if options.max_len == 0 {
                return Err(OptionError::new(&["max_len"], "must be at least 1"));
            }
            Ok(Arc::new(Limit {
                max_len: options.max_len,
            }) as Arc<dyn Handler>)
        })
        .build()
}

#[tokio::test]
async fn a_registered_kind_is_configured_from_toml_and_handles_messages() {
    let runtime = runtime();
    let file = ConfigFile::new("[handlers.small]\nkind = \"limit\"\nmax_len = 3\n");
    let config = runtime.load(&file.path).expect("valid");
    let handlers = build_all(&config.handlers).expect("built");
    assert_eq!(
        handlers["small"].handle(&message(b"abc")).await,
        Outcome::Ack
    );
    assert_eq!(
        handlers["small"].handle(&message(b"abcd")).await,
        Outcome::dead_letter("body over 3 bytes")
    );
}

#[test]
fn a_registered_kind_reports_its_option_errors_with_location() {
    let runtime = runtime();
    let file = ConfigFile::new("[handlers.small]\nkind = \"limit\"\nmax_len = 0\n");
    let err = runtime.load(&file.path).expect_err("rejected").to_string();
    assert!(err.contains(":3:1: must be at least 1"), "{err}");
    let file = ConfigFile::new("[handlers.small]\nkind = \"limit\"\nmaxlen = 1\n");
    let err = runtime.load(&file.path).expect_err("rejected").to_string();
    assert!(err.contains(":3:1: unknown field `maxlen`"), "{err}");
    // The default runtime does not know the kind.
    let err = bosun::config::load_file(&file.path, &HandlerKinds::builtin())
        .expect_err("rejected")
        .to_string();
    assert!(err.contains("unknown handler kind `limit`"), "{err}");
}
