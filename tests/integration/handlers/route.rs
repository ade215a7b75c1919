//! `kind = "route"`: first matching rule wins, `default` takes the rest.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bosun::handler::{FailureKind, Handler, HeaderValue, Message, Outcome};

use super::{build_with, message, metric, support};

/// A target that answers with its own name, so the test sees which one ran.
struct Named(&'static str);

#[async_trait]
impl Handler for Named {
    async fn handle(&self, _message: &Message) -> Outcome {
        Outcome::Drop {
            reason: self.0.to_owned(),
        }
    }
}

fn targets() -> BTreeMap<String, Arc<dyn Handler>> {
    ["orders", "eu_orders", "audit", "fallback"]
        .into_iter()
        .map(|n| (n.to_owned(), Arc::new(Named(n)) as Arc<dyn Handler>))
        .collect()
}

const TABLE: &str = r#"
routes = [
    { routing_key = "order.*.eu", handler = "eu_orders" },
    { routing_key = "order.#", handler = "orders" },
    { header = { name = "x-kind", value = "audit" }, handler = "audit" },
    { routing_key = "billing.*", header = { name = "x-priority" }, handler = "audit" },
]
"#;

fn routed(
    handler: &Arc<dyn Handler>,
    routing_key: Option<&str>,
    headers: &[(&str, &str)],
) -> impl Future<Output = Outcome> {
    let mut msg = message("{}");
    msg.source.routing_key = routing_key.map(str::to_owned);
    for (k, v) in headers {
        msg.headers
            .insert((*k).to_owned(), HeaderValue::String((*v).to_owned()));
    }
    let handler = handler.clone();
    async move { handler.handle(&msg).await }
}

fn went_to(name: &str) -> Outcome {
    Outcome::Drop {
        reason: name.to_owned(),
    }
}

#[tokio::test]
async fn first_matching_rule_wins_and_default_takes_the_rest() {
    let name = support::unique("route_table");
    let route = build_with(
        "route",
        &name,
        &format!("{TABLE}\ndefault = \"fallback\""),
        &targets(),
    );
    assert_eq!(
        routed(&route, Some("order.created.eu"), &[]).await,
        went_to("eu_orders")
    );
    assert_eq!(
        routed(&route, Some("order.created"), &[]).await,
        went_to("orders")
    );
    assert_eq!(routed(&route, Some("order"), &[]).await, went_to("orders"));
    assert_eq!(
        routed(
            &route,
            Some("order.created.us.east"),
            &[("x-kind", "audit")]
        )
        .await,
        went_to("orders")
    );
    assert_eq!(
        routed(&route, Some("user.created"), &[("X-Kind", "audit")]).await,
        went_to("audit")
    );
    assert_eq!(
        routed(&route, None, &[("x-kind", "audit")]).await,
        went_to("audit")
    );
    assert_eq!(
        routed(&route, Some("user.created"), &[("x-kind", "other")]).await,
        went_to("fallback")
    );
    assert_eq!(
        routed(&route, Some("billing.paid"), &[("x-priority", "")]).await,
        went_to("audit")
    );
    assert_eq!(
        routed(&route, Some("billing.paid"), &[]).await,
        went_to("fallback")
    );
    assert_eq!(routed(&route, None, &[]).await, went_to("fallback"));
    assert_eq!(
        metric(
            "bosun_route_total",
            &[&format!("handler=\"{name}\""), "target=\"fallback\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            "bosun_route_total",
            &[&format!("handler=\"{name}\""), "target=\"orders\""]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn no_match_without_default_dead_letters() {
    let name = support::unique("route_nodefault");
    let route = build_with("route", &name, TABLE, &targets());
    match routed(&route, Some("user.created"), &[]).await {
        Outcome::DeadLetter {
            reason,
            kind: FailureKind::Permanent,
        } => {
            assert!(
                reason.contains("no rule matches") && reason.contains("user.created"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        metric(
            "bosun_route_total",
            &[&format!("handler=\"{name}\""), "target=\"unmatched\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn route_to_real_handlers_from_a_config_file() {
    let text = r#"
[handlers.split]
kind = "route"
routes = [{ routing_key = "order.*", handler = "job" }]
default = "drain"

[handlers.job]
kind = "exec"
command = ["/bin/sh", "-c", "exit 65"]

[handlers.drain]
kind = "noop"
"#;
    let config = bosun::config::load_str(
        text,
        "test.toml",
        &bosun::handler::HandlerKinds::builtin(),
        &bosun::config::Env::default(),
    )
    .unwrap();
    let handlers = bosun::handler::build_all(&config.handlers).unwrap();
    let split = &handlers["split"];
    assert!(matches!(
        routed(split, Some("order.created"), &[]).await,
        Outcome::DeadLetter { .. }
    ));
    assert_eq!(routed(split, Some("user.created"), &[]).await, Outcome::Ack);
}

#[test]
fn missing_targets_cycles_and_bad_rules_are_config_errors() {
    let error = super::load_error(
        "[handlers.split]\nkind = \"route\"\nroutes = [{ routing_key = \"#\", handler = \"nowhere\" }]\n",
    );
    assert!(
        error.starts_with("test.toml:1:")
            && error.contains("refers to handler `nowhere`, which is not defined"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.a]\nkind = \"route\"\nroutes = []\ndefault = \"b\"\n\n[handlers.b]\nkind = \"route\"\nroutes = []\ndefault = \"a\"\n",
    );
    assert!(error.contains("cycle: a -> b -> a"), "{error}");
    let error = super::load_error(
        "[handlers.split]\nkind = \"route\"\nroutes = [\n  { handler = \"x\" },\n]\n",
    );
    assert!(
        error.starts_with("test.toml:4:")
            && error.contains("needs `routing_key`, `header` or both"),
        "{error}"
    );
    let error = super::load_error("[handlers.split]\nkind = \"route\"\nroutes = []\n");
    assert!(
        error.starts_with("test.toml:3:") && error.contains("at least one rule"),
        "{error}"
    );
    let error = super::load_error(
        "[handlers.split]\nkind = \"route\"\nroutes = [{ routing_key = \"#\", handler = \"x\", weight = 2 }]\n",
    );
    assert!(error.contains("unknown field `weight`"), "{error}");
}
