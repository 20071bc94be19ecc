//! Observability: one trace from the publisher's call to the receiver, Prometheus metrics of
//! the control plane and of a separate agent, and nothing listening that was not asked for.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::harness::{self, TestDatabase};
use herald_tests::receiver::Reply;
use herald_tests::{Backend, Receiver, eventually};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use crate::delivery::user_new;

/// A span as the collector received it: (trace id in hex, span name).
type SeenSpans = Arc<Mutex<Vec<(String, String)>>>;

/// An OTLP/gRPC trace collector on 127.0.0.1 that keeps what it receives.
struct Collector(SeenSpans);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let trace_id: String =
                        span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    seen.push((trace_id, span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (String, SeenSpans) {
    let seen = SeenSpans::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(Collector(seen.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), seen)
}

fn base_env(database: &TestDatabase) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_RETRY_SCHEDULE", "100ms".to_owned()),
    ]
}

async fn tenant_client(url: &str) -> (String, herald_client::HeraldClient) {
    let admin = herald_client::HeraldClient::connect(url, harness::ADMIN_TOKEN).unwrap();
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (tenant.id, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_event_from_publisher_to_receiver() {
    let (endpoint, seen) = start_collector().await;
    let database = TestDatabase::new(Backend::Sqlite).await;
    let mut env = base_env(&database);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()));
    let mut cp = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", cp.addr.unwrap());
    let (tenant_id, admin) = tenant_client(&url).await;
    let receiver = Receiver::start().await;
    admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant_id.clone(),
            name: "traced".into(),
            url: receiver.url("/"),
            ..Default::default()
        })
        .await
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(pb::PublishEventRequest {
        tenant_id,
        ..user_new(1)
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    admin.events().publish_event(request).await.unwrap();

    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    let traceparent = got[0]
        .header("traceparent")
        .expect("the receiver gets a traceparent");
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(trace_id),
        "{traceparent}"
    );
    let names = eventually(
        "publish, dispatch and agent spans of the trace",
        Duration::from_secs(20),
        || {
            let names: HashSet<String> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(id, _)| id == trace_id)
                .map(|(_, name)| name.clone())
                .collect();
            async move {
                ["publish", "dispatch", "deliver"]
                    .iter()
                    .all(|n| names.contains(*n))
                    .then_some(names)
            }
        },
    )
    .await;
    assert!(names.contains("deliver"), "{names:?}");
    cp.terminate().await;
}

/// Returns a port that was free a moment ago (for a child process that cannot report its own).
pub async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// Scrapes `/metrics`, checks it parses as Prometheus text, and returns samples by
/// `name{label="value"}` (labels sorted), summed.
pub async fn scrape(port: u16) -> std::collections::HashMap<String, f64> {
    let body = reqwest_get(port).await;
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed =
        prometheus_parse::Scrape::parse(lines).expect("/metrics parses as Prometheus text");
    let mut samples = std::collections::HashMap::new();
    for sample in parsed.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        labels.sort();
        let key = if labels.is_empty() {
            sample.metric.clone()
        } else {
            format!("{}{{{}}}", sample.metric, labels.join(","))
        };
        let value = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        *samples.entry(key).or_insert(0.0) += value;
    }
    samples
}

/// A plain HTTP/1.1 GET of /metrics on 127.0.0.1:port.
pub async fn reqwest_get(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_control_plane_and_agent_count_what_happened() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let (cp_port, agent_port) = (free_port().await, free_port().await);
    let mut env = base_env(&database);
    env.push(("HERALD_BUILTIN_AGENT", "false".to_owned()));
    env.push(("HERALD_METRICS_LISTEN", format!("127.0.0.1:{cp_port}")));
    let mut cp = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", cp.addr.unwrap());
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", url.clone()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
        ("HERALD_METRICS_LISTEN", format!("127.0.0.1:{agent_port}")),
    ]);
    let (tenant_id, admin) = tenant_client(&url).await;
    let receiver = Receiver::start().await;
    receiver.script([Reply::from(500)]);
    admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant_id.clone(),
            name: "metered".into(),
            url: receiver.url("/"),
            max_concurrency: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..3 {
        admin
            .publish(pb::PublishEventRequest {
                tenant_id: tenant_id.clone(),
                ..user_new(i)
            })
            .await
            .unwrap();
    }
    receiver.wait_for(4, Duration::from_secs(20)).await;
    let cp_samples = eventually(
        "the control plane's counters",
        Duration::from_secs(10),
        || async move {
            let samples = scrape(cp_port).await;
            (samples.get("herald_deliveries_total{outcome=\"succeeded\"}") == Some(&3.0))
                .then_some(samples)
        },
    )
    .await;
    let get = |samples: &std::collections::HashMap<String, f64>, key: &str| {
        samples.get(key).copied().unwrap_or(0.0)
    };
    assert_eq!(get(&cp_samples, "herald_events_published_total"), 3.0);
    assert_eq!(
        get(&cp_samples, "herald_deliveries_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        get(&cp_samples, "herald_deliveries_total{outcome=\"dead\"}"),
        0.0
    );
    assert_eq!(
        get(&cp_samples, "herald_attempts_total{status_class=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        get(&cp_samples, "herald_attempts_total{status_class=\"5xx\"}"),
        1.0
    );
    assert_eq!(
        get(&cp_samples, "herald_attempt_duration_seconds_count"),
        4.0
    );
    assert_eq!(
        get(&cp_samples, "herald_agents_connected{region=\"default\"}"),
        1.0
    );
    assert_eq!(get(&cp_samples, "herald_leases_in_flight"), 0.0);
    assert!(get(&cp_samples, "herald_delivery_lag_seconds_count") >= 4.0);
    assert!(get(&cp_samples, "process_resident_memory_bytes") > 0.0);

    let agent_samples = scrape(agent_port).await;
    assert_eq!(
        get(
            &agent_samples,
            "herald_agent_requests_total{status_class=\"2xx\"}"
        ),
        3.0
    );
    assert_eq!(
        get(
            &agent_samples,
            "herald_agent_requests_total{status_class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &agent_samples,
            "herald_agent_request_duration_seconds_count"
        ),
        4.0
    );
    assert_eq!(get(&agent_samples, "herald_agent_reconnects_total"), 0.0);
    agent.terminate().await;
    cp.terminate().await;
}

/// Returns the TCP ports a process listens on (from /proc).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1 (ADDR:PORT in hex), st field 3 (0A = LISTEN), inode field 9.
            if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                let port = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_extra_listens_without_otlp_and_metrics() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let mut cp = harness::spawn_control_plane(&base_env(&database)).await;
    let ports = listening_ports(cp.child.id().unwrap());
    assert_eq!(
        ports,
        vec![cp.addr.unwrap().port()],
        "only the gRPC API listens"
    );
    cp.terminate().await;
}
