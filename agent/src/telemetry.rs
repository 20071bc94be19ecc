//! Logs, traces and metrics for Herald's processes: the `tracing` subscriber (text or JSON,
//! level from `RUST_LOG`), OpenTelemetry export over OTLP/gRPC when an endpoint is configured,
//! W3C trace context in and out, and a Prometheus `/metrics` endpoint. The agent owns this
//! module; the control plane, which links the agent as its built-in one, uses it too.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prometheus_client::registry::Registry;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The process-wide tracing setup; keep it alive, and call [`Telemetry::shutdown`] at exit so
/// buffered spans are exported.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter: {0}")]
pub struct Error(String);

/// Installs the global subscriber: logs as `json` or text, and, with `otlp` set, an
/// OpenTelemetry layer exporting spans over OTLP/gRPC (endpoint and options from the standard
/// `OTEL_*` variables) for `service`.
pub fn init(service: &'static str, json: bool, otlp: bool) -> Result<Telemetry, Error> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (text, json_layer) = if json {
        (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
        )
    } else {
        (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours only for a person at a terminal: a file or a journal gets plain text.
                    .with_ansi(std::io::stderr().is_terminal()),
            ),
            None,
        )
    };
    let provider = if otlp {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|err| Error(err.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        Some(
            opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json_layer)
        .with(otel)
        .init();
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            eprintln!("telemetry: {err}");
        }
    }
}

/// Makes the W3C `traceparent` the parent of `span` (ignored when malformed or when no
/// OpenTelemetry layer is installed).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// Returns the W3C `traceparent` of `span`, or `None` when it has no OpenTelemetry context
/// (tracing export is off).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// A Prometheus registry shared by a process's parts; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry::with_prefix("herald"))),
        }
    }
}

impl Metrics {
    /// Registers metrics through `f`.
    pub fn register<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Returns the Prometheus text exposition of every metric, process metrics included.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode_registry(&mut text, &registry).is_err() {
            text.clear();
        }
        drop(registry);
        text.push_str(&process_metrics());
        text.push_str("# EOF\n");
        text
    }

    /// Serves `GET /metrics` on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = self.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::warn!(error = %err, "metrics endpoint stopped");
        }
    }
}

/// Binds the metrics listener (before anything else starts, so a bad address stops the start).
pub async fn bind_metrics(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// CPU time and resident memory of this process, from /proc (Linux).
fn process_metrics() -> String {
    let mut text = String::new();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(after_name) = stat.rsplit_once(')').map(|(_, rest)| rest)
    {
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat (12 and 13 after the name), in clock
        // ticks of 1/100 s on Linux.
        let ticks: u64 = fields
            .get(11..13)
            .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
        text.push_str("# TYPE process_cpu_seconds counter\n");
        text.push_str(&format!(
            "process_cpu_seconds_total {}\n",
            ticks as f64 / 100.0
        ));
    }
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
    {
        text.push_str("# TYPE process_resident_memory_bytes gauge\n");
        text.push_str(&format!("process_resident_memory_bytes {}\n", pages * 4096));
    }
    text
}

/// The agent's own metrics.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub reconnects: prometheus_client::metrics::counter::Counter,
    pub requests: prometheus_client::metrics::family::Family<
        StatusClass,
        prometheus_client::metrics::counter::Counter,
    >,
    pub request_duration: RequestDuration,
}

/// Duration of the agent's HTTP requests, in seconds.
#[derive(Clone, Debug)]
pub struct RequestDuration(pub prometheus_client::metrics::histogram::Histogram);

impl Default for RequestDuration {
    fn default() -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
        ))
    }
}

/// The label of a request's outcome: `2xx`, `4xx`, `5xx`, … or the error class (`timeout`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct StatusClass {
    pub status_class: String,
}

impl StatusClass {
    /// Returns the class of an HTTP status (0 = none, then `error` names the failure).
    pub fn of(status_code: u32, error: &str) -> Self {
        let status_class = match status_code {
            100..=599 => format!("{}xx", status_code / 100),
            _ => error.to_ascii_lowercase(),
        };
        Self { status_class }
    }
}

impl AgentMetrics {
    /// Creates the agent's metrics in `metrics`.
    pub fn register(metrics: &Metrics) -> Self {
        let agent = Self::default();
        metrics.register(|registry| {
            registry.register(
                "agent_reconnects",
                "Streams to a control plane opened again",
                agent.reconnects.clone(),
            );
            registry.register(
                "agent_requests",
                "HTTP requests sent to receivers, by status class",
                agent.requests.clone(),
            );
            registry.register(
                "agent_request_duration_seconds",
                "Duration of HTTP requests sent to receivers",
                agent.request_duration.0.clone(),
            );
        });
        agent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(204, "").status_class, "2xx");
        assert_eq!(StatusClass::of(503, "").status_class, "5xx");
        assert_eq!(StatusClass::of(0, "TIMEOUT").status_class, "timeout");
    }

    #[test]
    fn rendering_includes_registered_and_process_metrics() {
        let metrics = Metrics::default();
        let agent = AgentMetrics::register(&metrics);
        agent.reconnects.inc();
        let text = metrics.render();
        assert!(text.contains("herald_agent_reconnects_total 1"), "{text}");
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn traceparent_is_none_without_an_otel_layer() {
        let span = tracing::info_span!("x");
        set_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(traceparent(&span), None);
    }
}
