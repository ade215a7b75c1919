//! `bosun publish`: publish one message through a configured broker, with confirms, and
//! print its message id.

use crate::trace_context;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;

use super::{CliError, ConfigArg, EXIT_OK};
use crate::Runtime;
use crate::amqp::AmqpPublisher;
use crate::config::{BrokerConfig, EntryLayout};
use crate::handler::HeaderValue;
use crate::publish::{OutgoingMessage, Publisher};

#[derive(clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The `[brokers.*]` entry to publish through.
    #[arg(long)]
    pub broker: String,
    /// amqp: the exchange ("" is the default exchange, which routes by queue name).
    #[arg(long)]
    pub exchange: Option<String>,
    /// amqp: the routing key.
    #[arg(long = "routing-key", default_value = "")]
    pub routing_key: String,
    /// redis: the stream to add the entry to.
    #[arg(long)]
    pub stream: Option<String>,
    /// redis: an entry field, `name=value`; repeatable.
    #[arg(long = "field", value_name = "NAME=VALUE")]
    pub fields: Vec<String>,
    /// A header, `name=value`; repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// The content type, e.g. `application/json`.
    #[arg(long = "content-type")]
    pub content_type: Option<String>,
    /// The message id (default: a new UUID v7).
    #[arg(long = "message-id")]
    pub message_id: Option<String>,
    /// The correlation id.
    #[arg(long = "correlation-id")]
    pub correlation_id: Option<String>,
    /// File holding the body; `-` reads standard input. Without it the body is empty.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Publish at this time (RFC 3339), not before: stored in the broker's scheduled outbox
    /// (`[publish_api].scheduled`) and published by its relay when due.
    #[arg(long, value_name = "TIME", conflicts_with = "delay")]
    pub at: Option<String>,
    /// Publish after this delay ("15m"), like `--at`.
    #[arg(long = "in", value_name = "DURATION")]
    pub delay: Option<String>,
}

/// Splits `name=value`.
fn pair(text: &str, what: &str) -> Result<(String, String), CliError> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(CliError::Usage(format!(
            "{what} {text:?} is not of the form name=value"
        ))),
    }
}

fn body(file: Option<&PathBuf>) -> Result<Vec<u8>, CliError> {
    match file {
        None => Ok(Vec::new()),
        Some(path) if path.as_os_str() == "-" => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(|e| CliError::Other(anyhow::anyhow!("cannot read standard input: {e}")))?;
            Ok(body)
        }
        Some(path) => std::fs::read(path)
            .map_err(|e| CliError::Other(anyhow::anyhow!("cannot read {}: {e}", path.display()))),
    }
}

/// How long the command waits for its span to be exported before it exits.
const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

pub fn publish(runtime: &Runtime, args: PublishArgs) -> Result<u8, CliError> {
    let config = args.config.load(runtime)?;
    // Spans only (and warnings): the command's output is its own.
    if config.tracing.enabled {
        crate::telemetry::init_logging(
            config.service.log_format,
            "warn",
            &config.tracing,
            &config.service.name,
        )
        .map_err(|e| CliError::Other(e.into()))?;
    }
    if args.at.is_some() || args.delay.is_some() {
        return schedule(&config, &args);
    }
    let Some(broker) = config.brokers.get(&args.broker) else {
        let names: Vec<&str> = config.brokers.keys().map(String::as_str).collect();
        return Err(CliError::Usage(format!(
            "broker `{}` is not in {} (brokers: {})",
            args.broker,
            config.origin,
            names.join(", ")
        )));
    };
    let headers = args
        .headers
        .iter()
        .map(|h| pair(h, "--header").map(|(k, v)| (k, HeaderValue::String(v))))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    match broker {
        BrokerConfig::Redis(redis) => {
            if args.exchange.is_some() || !args.routing_key.is_empty() || !headers.is_empty() {
                return Err(CliError::Usage(
                    "--exchange, --routing-key and --header are for amqp brokers; use --stream and --field"
                        .into(),
                ));
            }
            let Some(stream) = args.stream.clone() else {
                return Err(CliError::Usage(format!(
                    "broker `{}` is redis: give --stream",
                    args.broker
                )));
            };
            let mut fields: Vec<(String, Vec<u8>)> = args
                .fields
                .iter()
                .map(|f| pair(f, "--field").map(|(k, v)| (k, v.into_bytes())))
                .collect::<Result<_, _>>()?;
            let format = &redis.format;
            if format.layout == EntryLayout::Fields {
                // A flat entry: the body, when given, is a JSON object, one field per key.
                if args.content_type.is_some() {
                    return Err(CliError::Usage(format!(
                        "broker `{}` writes flat entries (entry_format = \"fields\"): they have no content type",
                        args.broker
                    )));
                }
                if args.file.is_some() {
                    let members =
                        crate::redis_streams::formats::object_fields(&body(args.file.as_ref())?)
                            .map_err(|e| CliError::Usage(e.0))?;
                    fields.extend(members);
                }
            } else {
                // The body is the payload field: from --file, or empty (an entry without it
                // is invalid to a consumer) unless a --field gives it.
                let given = fields.iter().any(|(k, _)| *k == format.payload_field);
                if args.file.is_some() || !given {
                    fields.push((format.payload_field.clone(), body(args.file.as_ref())?));
                }
            }
            let message_id = args
                .message_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            if !fields.iter().any(|(k, _)| *k == format.id_field) {
                fields.push((format.id_field.clone(), message_id.clone().into_bytes()));
            }
            for (field, value) in [
                (
                    crate::redis_streams::fields::CONTENT_TYPE,
                    &args.content_type,
                ),
                (
                    crate::redis_streams::fields::CORRELATION_ID,
                    &args.correlation_id,
                ),
            ] {
                if let Some(value) = value {
                    fields.push((field.to_owned(), value.clone().into_bytes()));
                }
            }
            // The entry's PRODUCER span: under a `traceparent` field given, else a new trace;
            // the span's own context goes on the entry.
            let span = trace_context::producer_span(trace_context::Produced {
                system: trace_context::System::Redis,
                destination: &stream,
                message_id: Some(&message_id),
                parent: trace_context::extract(|name| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
                }),
                link: None,
                root: true,
            });
            let own = trace_context::headers_of(&span);
            if !own.is_empty() {
                fields.retain(|(k, _)| !trace_context::is_trace_header(k));
                fields.extend(own.into_iter().map(|(k, v)| (k.to_owned(), v.into_bytes())));
            }
            let redis = redis.clone();
            let entry = super::block_on(async move {
                let entry =
                    crate::redis_streams::producer::publish_fields(&redis, &stream, &fields, None)
                        .await;
                drop(span);
                crate::otlp::flush(FLUSH_WITHIN).await;
                entry
            })?
            .map_err(|e| CliError::Other(anyhow::anyhow!("publish to redis failed: {e}")))?;
            eprintln!("entry id {entry}");
            println!("{message_id}");
            Ok(EXIT_OK)
        }
        BrokerConfig::Amqp(amqp) => {
            if args.stream.is_some() || !args.fields.is_empty() {
                return Err(CliError::Usage(
                    "--stream and --field are for redis brokers; use --exchange and --routing-key"
                        .into(),
                ));
            }
            let Some(exchange) = args.exchange.clone() else {
                return Err(CliError::Usage(format!(
                    "broker `{}` is amqp: give --exchange (\"\" for the default exchange)",
                    args.broker
                )));
            };
            let mut message = OutgoingMessage::new(
                exchange,
                args.routing_key.clone(),
                body(args.file.as_ref())?,
            );
            if let Some(id) = &args.message_id {
                message.message_id = id.clone();
            }
            message.correlation_id = args.correlation_id.clone();
            message.content_type = args.content_type.clone();
            message.headers = headers;
            let name = crate::amqp::connection_name(amqp, &config.service.name, "publish");
            let publisher = AmqpPublisher::new(args.broker.clone(), amqp.clone(), name);
            super::block_on(async move {
                let result = publisher.publish(&message).await;
                publisher.close().await;
                crate::otlp::flush(FLUSH_WITHIN).await;
                match result {
                    Ok(()) => {
                        println!("{}", message.message_id);
                        Ok(EXIT_OK)
                    }
                    Err(e) => Err(CliError::Other(anyhow::anyhow!(
                        "message {} was not published: {e}",
                        message.message_id
                    ))),
                }
            })?
        }
    }
}

/// `--at` / `--in`: the publish API's scheduled send, run here against its database, so the
/// message is stored exactly as `POST /v1/publish` with `deliver_at` or `delay` stores it.
fn schedule(config: &crate::config::Config, args: &PublishArgs) -> Result<u8, CliError> {
    use crate::publish_api::request::{PublishRequest, When};

    let Some(api) = &config.publish_api else {
        return Err(CliError::Usage(format!(
            "--at and --in need `[publish_api]` with a scheduled outbox in {}",
            config.origin
        )));
    };
    let Some(database) = config.databases.get(&api.database) else {
        return Err(CliError::Usage(format!(
            "database `{}` is not defined",
            api.database
        )));
    };
    let when = match (&args.at, &args.delay) {
        (Some(at), _) => When::At(
            chrono::DateTime::parse_from_rfc3339(at.trim())
                .map_err(|e| {
                    CliError::Usage(format!(
                        "--at {at:?} is not an RFC 3339 time ({e}), e.g. 2026-11-29T18:00:00Z"
                    ))
                })?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(delay)) => When::In(delay.clone()),
        (None, None) => When::Now,
    };
    let (destination, stream, entries) = match (&args.exchange, &args.stream) {
        (Some(exchange), None) => (exchange.clone(), false, &args.headers),
        (None, Some(stream)) => (stream.clone(), true, &args.fields),
        _ => {
            return Err(CliError::Usage(
                "give --exchange (amqp) or --stream (redis)".into(),
            ));
        }
    };
    let headers = entries
        .iter()
        .map(|h| pair(h, "--header/--field").map(|(k, v)| (k, serde_json::Value::String(v))))
        .collect::<Result<serde_json::Map<_, _>, _>>()?;
    let request = PublishRequest {
        broker: args.broker.clone(),
        destination,
        stream,
        routing_key: args.routing_key.clone(),
        headers,
        content_type: args.content_type.clone(),
        correlation_id: args.correlation_id.clone(),
        message_id: Some(
            args.message_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        ),
        body: body(args.file.as_ref())?.into(),
        when,
    };
    let config = config.clone();
    let database = database.clone();
    let answer = super::block_on(async move {
        let pool = crate::database::lazy_pool(&database)?;
        let api = crate::publish_api::PublishApi::new(&config, pool)?;
        api.migrate().await?;
        Ok::<_, anyhow::Error>(api.publish(&request).await)
    })?
    .map_err(CliError::Other)?;
    if !answer.status.is_success() {
        let error = answer.body["error"]
            .as_str()
            .unwrap_or("refused")
            .to_owned();
        return Err(CliError::Other(anyhow::anyhow!(
            "not scheduled ({}): {error}",
            answer.status.as_u16()
        )));
    }
    if let Some(at) = answer.body["deliver_at"].as_str() {
        eprintln!("scheduled for {at}");
    }
    println!("{}", answer.message_id().unwrap_or_default());
    Ok(EXIT_OK)
}
