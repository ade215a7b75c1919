//! Span export over OTLP/HTTP (protobuf), through bosun's own reqwest/rustls stack.
//!
//! The SDK's batch processor exports from a thread of its own, outside any async runtime, so
//! the HTTP client here runs each request on a one-thread runtime kept for the exporter:
//! exports go on while the daemon's runtime drains at shutdown, and no second HTTP or TLS
//! stack (blocking reqwest, gRPC) is linked in.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::TracingConfig;

/// The most of a collector's reply that is read: replies are status lines and short
/// partial-success notes.
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Export timeout when neither `[tracing].timeout` nor `OTEL_EXPORTER_OTLP_*TIMEOUT` is set.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why span export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("cannot start the span exporter's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build the span exporter's HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(opentelemetry_otlp::ExporterBuildError),
}

/// The exporter's runtime and the provider, kept for the life of the process (a runtime
/// must not be dropped inside another one, and the provider flushes at shutdown).
static PROVIDER: OnceLock<(tokio::runtime::Runtime, SdkTracerProvider)> = OnceLock::new();

/// The reqwest client the exporter sends through, run on the exporter's runtime.
#[derive(Debug)]
struct Client {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let exchange = async move {
            let mut response = client.execute(request).await?;
            let mut reply = Response::builder().status(response.status());
            if let Some(headers) = reply.headers_mut() {
                *headers = std::mem::take(response.headers_mut());
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                let room = MAX_REPLY_BYTES.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if room <= chunk.len() {
                    break;
                }
            }
            Ok::<_, HttpError>(reply.body(Bytes::from(body))?)
        };
        self.runtime.spawn(exchange).await?
    }
}

/// The export timeout: `[tracing].timeout`, else the OTLP variables (milliseconds), else
/// 10 s. The client enforces it on the whole exchange.
fn timeout(config: &TracingConfig) -> Duration {
    config.timeout.unwrap_or_else(|| {
        [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TIMEOUT)
    })
}

/// Builds the exporter and the provider from `config` (keys it leaves out come from the
/// `OTEL_*` variables) and returns the tracer bosun's spans go to. `service` is
/// `[service].name`, the `service.name` when neither the file nor `OTEL_SERVICE_NAME` sets one.
pub fn install(config: &TracingConfig, service: &str) -> Result<SdkTracer, OtlpError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bosun-otlp")
        .enable_all()
        .build()
        .map_err(OtlpError::Runtime)?;
    let timeout = timeout(config);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(OtlpError::Client)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Client {
            client,
            runtime: runtime.handle().clone(),
        })
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout);
    if let Some(endpoint) = &config.endpoint {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    if !config.headers.is_empty() {
        let headers: HashMap<String, String> = config
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_owned()))
            .collect();
        exporter = exporter.with_headers(headers);
    }
    let exporter = exporter.build().map_err(OtlpError::Exporter)?;

    // The builder starts from the SDK's detectors: `OTEL_SERVICE_NAME` and
    // `OTEL_RESOURCE_ATTRIBUTES` are read there; the file's values win over them.
    let mut resource = Resource::builder();
    if let Some(name) = &config.service_name {
        resource = resource.with_service_name(name.clone());
    } else if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    resource = resource.with_attributes(
        config
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    // Without a ratio in the file the SDK reads `OTEL_TRACES_SAMPLER(_ARG)`.
    if let Some(ratio) = config.sample_ratio {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(ratio),
        )));
    }
    let provider = provider.build();
    let tracer = provider.tracer("bosun");
    let _ = PROVIDER.set((runtime, provider));
    Ok(tracer)
}

/// Exports every span ended so far, waiting at most `within`: the last step of a shutdown
/// drain. Nothing to do when tracing is off.
pub async fn flush(within: Duration) {
    let Some((_, provider)) = PROVIDER.get() else {
        return;
    };
    let provider = provider.clone();
    // `force_flush` blocks until the exporter thread answers.
    let flush = tokio::task::spawn_blocking(move || provider.force_flush());
    match tokio::time::timeout(within, flush).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "exporting the last spans failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the span flush task failed"),
        Err(_) => tracing::warn!(
            timeout = ?within,
            "exporting the last spans took too long; they are lost"
        ),
    }
}
