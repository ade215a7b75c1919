//! `kind = "route"`: hands each message to one of several handlers, by routing key pattern
//! or header, so one consumer can fan out to several endpoints.
//!
//! Rules are tried in order and the first match wins; `default` takes the rest. Targets are
//! declared as dependencies, so a missing target or a cycle is a load-time error.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    BuildContext, FailureKind, Handler, HandlerFactory, HandlerKind, Message, OptionError, Outcome,
    parse_options,
};

/// `[handlers.NAME]` with `kind = "route"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteOptions {
    /// The rules, tried in order; the first that matches picks the handler.
    routes: Vec<RuleOptions>,
    /// The handler for a message no rule matches. Without it such a message is
    /// dead-lettered (kind `permanent`) with a reason naming its routing key.
    default: Option<String>,
}

/// One entry of `routes`. With both `routing_key` and `header`, both must match.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleOptions {
    /// An AMQP topic pattern: words separated by `.`, `*` matches exactly one word, `#` zero
    /// or more. A message without a routing key (a stream entry) matches only `#`.
    routing_key: Option<String>,
    /// A header condition: `{ name = "x-kind", value = "audit" }`; without `value`, the
    /// header only has to be present. Names compare ignoring ASCII case, values exactly.
    header: Option<HeaderOptions>,
    /// The `[handlers.NAME]` that gets the message.
    handler: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOptions {
    name: String,
    value: Option<String>,
}

/// A compiled topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(Vec<Word>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Literal(String),
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Any,
}

impl TopicPattern {
    pub fn new(pattern: &str) -> Self {
        Self(
            pattern
                .split('.')
                .map(|w| match w {
                    "*" => Word::One,
                    "#" => Word::Any,
                    _ => Word::Literal(w.to_owned()),
                })
                .collect(),
        )
    }

    /// AMQP topic matching, in O(pattern x key) time whatever the number of `#`s.
    pub fn matches(&self, routing_key: Option<&str>) -> bool {
        let Some(key) = routing_key else {
            return self.0.iter().all(|w| *w == Word::Any);
        };
        let words: Vec<&str> = key.split('.').collect();
        // reachable[j]: the pattern so far can consume exactly the first j words.
        let mut reachable = vec![false; words.len() + 1];
        reachable[0] = true;
        for word in &self.0 {
            let mut next = vec![false; words.len() + 1];
            match word {
                Word::Any => {
                    let mut seen = false;
                    for j in 0..=words.len() {
                        seen |= reachable[j];
                        next[j] = seen;
                    }
                }
                Word::One => {
                    next[1..].copy_from_slice(&reachable[..words.len()]);
                }
                Word::Literal(literal) => {
                    for j in 0..words.len() {
                        next[j + 1] = reachable[j] && words[j] == literal;
                    }
                }
            }
            reachable = next;
        }
        reachable[words.len()]
    }
}

#[derive(Debug, Clone)]
struct Rule {
    routing_key: Option<TopicPattern>,
    header: Option<(String, Option<String>)>,
    handler: String,
}

impl Rule {
    fn matches(&self, message: &Message) -> bool {
        if let Some(pattern) = &self.routing_key
            && !pattern.matches(message.source.routing_key.as_deref())
        {
            return false;
        }
        if let Some((name, expected)) = &self.header {
            let found = message
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name));
            let ok = match (found, expected) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some((_, value)), Some(expected)) => {
                    value.as_text().as_deref() == Some(expected.as_str())
                }
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

pub(super) struct RouteKind;

impl HandlerKind for RouteKind {
    fn parse(
        &self,
        _name: &str,
        options: &toml::Table,
    ) -> Result<Arc<dyn HandlerFactory>, OptionError> {
        let options: RouteOptions = parse_options(options)?;
        if options.routes.is_empty() && options.default.is_none() {
            return Err(OptionError::new(
                &["routes"],
                "needs at least one rule, or a `default`",
            ));
        }
        let mut rules = Vec::with_capacity(options.routes.len());
        for (i, raw) in options.routes.into_iter().enumerate() {
            let i = i.to_string();
            if raw.routing_key.is_none() && raw.header.is_none() {
                return Err(OptionError::new(
                    &["routes", &i],
                    "a rule needs `routing_key`, `header` or both",
                ));
            }
            if raw.handler.trim().is_empty() {
                return Err(OptionError::new(
                    &["routes", &i, "handler"],
                    "must name a handler",
                ));
            }
            if let Some(header) = &raw.header
                && header.name.trim().is_empty()
            {
                return Err(OptionError::new(
                    &["routes", &i, "header", "name"],
                    "must not be empty",
                ));
            }
            rules.push(Rule {
                routing_key: raw.routing_key.as_deref().map(TopicPattern::new),
                header: raw.header.map(|h| (h.name, h.value)),
                handler: raw.handler,
            });
        }
        if let Some(default) = &options.default
            && default.trim().is_empty()
        {
            return Err(OptionError::new(&["default"], "must name a handler"));
        }
        Ok(Arc::new(RouteFactory {
            rules,
            default: options.default,
        }))
    }
}

struct RouteFactory {
    rules: Vec<Rule>,
    default: Option<String>,
}

impl HandlerFactory for RouteFactory {
    fn dependencies(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .rules
            .iter()
            .map(|r| r.handler.clone())
            .chain(self.default.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn build(&self, ctx: &BuildContext<'_>) -> anyhow::Result<Arc<dyn Handler>> {
        let resolve = |name: &str| -> anyhow::Result<Arc<dyn Handler>> {
            ctx.handlers
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("route target `{name}` is not built"))
        };
        let rules = self
            .rules
            .iter()
            .map(|rule| Ok((rule.clone(), resolve(&rule.handler)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let default = match &self.default {
            Some(name) => Some((name.clone(), resolve(name)?)),
            None => None,
        };
        Ok(Arc::new(RouteHandler {
            name: ctx.name.to_owned(),
            rules,
            default,
        }))
    }
}

/// The `route` handler.
pub struct RouteHandler {
    name: String,
    rules: Vec<(Rule, Arc<dyn Handler>)>,
    default: Option<(String, Arc<dyn Handler>)>,
}

#[async_trait]
impl Handler for RouteHandler {
    async fn handle(&self, message: &Message) -> Outcome {
        let chosen = self
            .rules
            .iter()
            .find(|(rule, _)| rule.matches(message))
            .map(|(rule, handler)| (rule.handler.as_str(), handler))
            .or_else(|| {
                self.default
                    .as_ref()
                    .map(|(name, handler)| (name.as_str(), handler))
            });
        let Some((target, handler)) = chosen else {
            metrics::counter!("bosun_route_total", "handler" => self.name.clone(), "target" => "unmatched").increment(1);
            let routing_key = message.source.routing_key.as_deref().unwrap_or("");
            tracing::warn!(handler = %self.name, message_id = message.message_id.as_deref().unwrap_or(""), routing_key, "no route matches and no default; dead-lettering");
            return Outcome::DeadLetter {
                reason: format!(
                    "route `{}`: no rule matches (routing key `{routing_key}`) and there is no default",
                    self.name
                ),
                kind: FailureKind::Permanent,
            };
        };
        metrics::counter!("bosun_route_total", "handler" => self.name.clone(), "target" => target.to_owned()).increment(1);
        tracing::trace!(handler = %self.name, target, "routed");
        handler.handle(message).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_follow_amqp_rules() {
        let cases = [
            ("order.*", "order.created", true),
            ("order.*", "order", false),
            ("order.*", "order.created.eu", false),
            ("order.#", "order", true),
            ("order.#", "order.created.eu", true),
            ("#", "anything.at.all", true),
            ("#", "", true),
            ("*.created", "order.created", true),
            ("#.eu", "order.created.eu", true),
            ("#.eu", "order.created.us", false),
            ("a.#.b.#.c", "a.x.b.y.z.c", true),
            ("a.#.b.#.c", "a.b.c", true),
            ("a.#.b.#.c", "a.c", false),
            ("order.created", "order.created", true),
            ("order.crea*", "order.created", false),
        ];
        for (pattern, key, expected) in cases {
            assert_eq!(
                TopicPattern::new(pattern).matches(Some(key)),
                expected,
                "{pattern} vs {key}"
            );
        }
        assert!(TopicPattern::new("#").matches(None));
        assert!(!TopicPattern::new("*").matches(None));
    }
}
