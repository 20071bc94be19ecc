//! Executes one job: the HTTP POST to a receiver through the SSRF guard, and its classified result.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use herald_proto::v1 as pb;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::time::{Instant, timeout_at};
use tracing::{Instrument as _, Span, debug, warn};
use url::Url;

use crate::Error;
use crate::guard::{Guard, Refused};

/// The most response headers kept per attempt.
const MAX_RESPONSE_HEADERS: usize = 16;
/// The most bytes of response header names and values kept per attempt.
const MAX_RESPONSE_HEADER_BYTES: usize = 4096;
/// The most bytes of the response body read and kept per attempt.
const MAX_EXCERPT_BYTES: usize = 4096;
/// The timeout of a job whose `timeout_ms` is 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest `error_message`, in bytes.
const MAX_ERROR_MESSAGE_BYTES: usize = 300;

/// Sends jobs to receivers: one HTTP client (connection pool, TLS roots, guarded resolver) shared
/// by every job of the agent.
#[derive(Debug, Clone)]
pub(crate) struct Deliverer {
    client: reqwest::Client,
    guard: Arc<Guard>,
    agent_id: String,
    metrics: Option<crate::telemetry::AgentMetrics>,
}

/// An HTTP answer: whatever a receiver said, it is a received status.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<pb::Header>,
    excerpt: String,
}

/// Why no HTTP status was received.
#[derive(Debug)]
struct Failure {
    class: pb::AttemptError,
    message: String,
}

/// A resolution failure, told apart from the rest by `classify` walking the source chain.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("{host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host}: no addresses")]
    NoAddresses { host: String },
    #[error("{host} resolves only to refused addresses ({refusal})")]
    Refused { host: String, refusal: Refused },
}

/// Resolves through the system resolver and keeps only the addresses the guard allows, so a
/// connection only ever goes to an address that was checked.
#[derive(Debug)]
struct GuardedResolver {
    guard: Arc<Guard>,
}

impl Deliverer {
    /// Builds the HTTP client: rustls on ring with the platform's roots plus `extra_ca`, no
    /// redirects, no proxies from the environment, and the guarded resolver.
    pub(crate) fn new(
        agent_id: String,
        guard: Guard,
        extra_ca: Option<&Path>,
        metrics: Option<crate::telemetry::AgentMetrics>,
    ) -> Result<Self, Error> {
        let extra_roots = match extra_ca {
            Some(path) => load_extra_roots(path)?,
            None => Vec::new(),
        };
        let guard = Arc::new(guard);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(extra_roots)?)
            .dns_resolver(GuardedResolver {
                guard: guard.clone(),
            })
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(Error::HttpClient)?;
        Ok(Self {
            client,
            guard,
            agent_id,
            metrics,
        })
    }

    /// Executes one job and returns its result; never fails: every failure is a classified
    /// result. Reads at most 4 KiB of the response body.
    pub(crate) async fn deliver(&self, mut job: pb::Job) -> pb::JobResult {
        let span = tracing::info_span!(
            "deliver",
            delivery_id = %job.delivery_id,
            subscription_id = %job.subscription_id,
            event_id = %job.event_id,
            attempt = job.attempt,
            agent_id = %self.agent_id,
            status_code = tracing::field::Empty,
        );
        // Joins the publisher's trace before the span starts; with tracing export on, the
        // receiver sees this span as the parent of its own work.
        if let Some(header) = job
            .headers
            .iter_mut()
            .find(|h| h.name.eq_ignore_ascii_case("traceparent"))
        {
            crate::telemetry::set_parent(&span, &header.value);
            if let Some(own) = crate::telemetry::traceparent(&span) {
                header.value = own;
            }
        }
        self.deliver_in_span(job).instrument(span).await
    }

    async fn deliver_in_span(&self, job: pb::Job) -> pb::JobResult {
        let started_at = Utc::now();
        let start = Instant::now();
        let timeout = match job.timeout_ms {
            0 => DEFAULT_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let mut result = pb::JobResult {
            delivery_id: job.delivery_id.clone(),
            lease_id: job.lease_id.clone(),
            started_at: Some(herald_proto::timestamp(started_at)),
            ..Default::default()
        };
        let outcome = self.attempt(job, start + timeout, timeout).await;
        result.duration_ms = u32::try_from(start.elapsed().as_millis()).unwrap_or(u32::MAX);
        if let Some(metrics) = &self.metrics {
            metrics
                .request_duration
                .0
                .observe(start.elapsed().as_secs_f64());
            let error = match &outcome {
                Ok(_) => "",
                Err(failure) => failure
                    .class
                    .as_str_name()
                    .trim_start_matches("ATTEMPT_ERROR_"),
            };
            let status = outcome
                .as_ref()
                .map_or(0, |answer| u32::from(answer.status));
            metrics
                .requests
                .get_or_create(&crate::telemetry::StatusClass::of(status, error))
                .inc();
        }
        match outcome {
            Ok(answer) => {
                Span::current().record("status_code", answer.status);
                debug!(duration_ms = result.duration_ms, "receiver answered");
                result.status_code = u32::from(answer.status);
                result.response_headers = answer.headers;
                result.response_excerpt = answer.excerpt;
                result.set_error(pb::AttemptError::None);
            }
            Err(failure) => {
                debug!(
                    duration_ms = result.duration_ms,
                    error = failure.class.as_str_name(),
                    message = %failure.message,
                    "attempt failed"
                );
                result.set_error(failure.class);
                result.error_message = failure.message;
            }
        }
        result
    }

    async fn attempt(
        &self,
        job: pb::Job,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Answer, Failure> {
        let url = Url::parse(&job.url).map_err(|err| Failure::refused(format!("url: {err}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Failure::refused("url: scheme must be http or https"));
        }
        // reqwest does not call the resolver for IP literals: check them here.
        self.guard
            .check_literal_host(&url)
            .map_err(|refusal| Failure::refused(refused_message(&refusal, &refusal.to_string())))?;
        let headers = header_map(&job.headers)?;
        let request = self.client.post(url).headers(headers).body(job.body);
        let mut response = match timeout_at(deadline, request.send()).await {
            Err(_elapsed) => return Err(Failure::timeout(timeout)),
            Ok(Err(err)) => return Err(classify(&err)),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let headers = capture_headers(response.headers());
        let excerpt = read_excerpt(&mut response, deadline).await;
        Ok(Answer {
            status,
            headers,
            excerpt,
        })
    }
}

impl Failure {
    fn new(class: pb::AttemptError, message: impl Into<String>) -> Self {
        let mut message = message.into();
        // One line, bounded: the message comes from the error chain, which names addresses and
        // causes but never header values or body bytes.
        message = message.replace(['\r', '\n'], " ");
        truncate_at_char_boundary(&mut message, MAX_ERROR_MESSAGE_BYTES);
        Self { class, message }
    }

    fn refused(message: impl Into<String>) -> Self {
        Self::new(pb::AttemptError::DestinationRefused, message)
    }

    fn timeout(timeout: Duration) -> Self {
        Self::new(
            pb::AttemptError::Timeout,
            format!("timeout: no response within {} ms", timeout.as_millis()),
        )
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let lookup = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(|addrs| addrs.collect::<Vec<SocketAddr>>());
            let resolved = match lookup {
                Ok(resolved) => resolved,
                Err(source) => return Err(ResolveError::Lookup { host, source }.into()),
            };
            let allowed = keep_allowed(&guard, host, resolved)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Keeps the resolved addresses the guard allows; fails when there were none, or none allowed.
fn keep_allowed(
    guard: &Guard,
    host: String,
    resolved: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, ResolveError> {
    if resolved.is_empty() {
        return Err(ResolveError::NoAddresses { host });
    }
    let mut refusal = None;
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|addr| match guard.check(addr.ip()) {
            Ok(()) => true,
            Err(refused) => {
                refusal.get_or_insert(refused);
                false
            }
        })
        .collect();
    match refusal {
        Some(refusal) if allowed.is_empty() => Err(ResolveError::Refused { host, refusal }),
        _ => Ok(allowed),
    }
}

/// The error of a refused destination: what was refused, and the agent setting that allows it
/// (a test on one machine delivers to 127.0.0.1, which a remote agent refuses by default).
fn refused_message(refusal: &Refused, what: &str) -> String {
    let network = match refusal.ip {
        std::net::IpAddr::V4(ip) => format!("{ip}/32"),
        std::net::IpAddr::V6(ip) => format!("{ip}/128"),
    };
    format!(
        "destination refused: {what}; HERALD_ALLOW_DESTINATIONS on the agent allows it (e.g. {network})"
    )
}

/// Reads the PEM certificates of `HERALD_EXTRA_CA`; an unreadable file or one without a valid
/// certificate is an error, so a typo does not silently fall back to the platform roots only.
pub(crate) fn load_extra_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let invalid = |reason: String| Error::ExtraCa {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| invalid(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(err.to_string()))?;
    if certs.is_empty() {
        return Err(invalid("no PEM certificate found".to_owned()));
    }
    let mut store = rustls::RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|err| invalid(err.to_string()))?;
    }
    Ok(certs)
}

/// Builds the receivers' TLS configuration on ring: the platform's roots plus `extra_roots`, or
/// Mozilla's bundled roots plus `extra_roots` on a machine without a usable root store.
fn tls_config(extra_roots: Vec<CertificateDer<'static>>) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> =
        match rustls_platform_verifier::Verifier::new_with_extra_roots(
            extra_roots.iter().cloned(),
            provider.clone(),
        ) {
            Ok(verifier) => Arc::new(verifier),
            Err(err) => {
                warn!(error = %err, "no platform root certificates; using the bundled Mozilla roots");
                let mut roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                roots.add_parsable_certificates(extra_roots);
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(Error::TlsRoots)?
            }
        };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Converts the job's headers, in order, duplicates kept. The control plane validated them; a
/// header that still does not convert makes the request impossible, so it is refused (naming
/// the header, never its value).
fn header_map(headers: &[pb::Header]) -> Result<HeaderMap, Failure> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for header in headers {
        let name = HeaderName::from_bytes(header.name.as_bytes())
            .map_err(|_| Failure::refused("request: invalid header name"))?;
        let value = HeaderValue::from_str(&header.value)
            .map_err(|_| Failure::refused(format!("request: {name}: invalid header value")))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Keeps the first response headers: at most 16, at most 4 KiB of names and values.
fn capture_headers(headers: &HeaderMap) -> Vec<pb::Header> {
    let mut kept = Vec::new();
    let mut bytes = 0;
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        bytes += name.as_str().len() + value.len();
        if kept.len() == MAX_RESPONSE_HEADERS || bytes > MAX_RESPONSE_HEADER_BYTES {
            break;
        }
        kept.push(pb::Header {
            name: name.as_str().to_owned(),
            value: value.into_owned(),
        });
    }
    kept
}

/// Reads the body until 4 KiB, its end, an error or the deadline, whichever comes first; then
/// the response is dropped, so a large body is never read (its connection is not reused).
async fn read_excerpt(response: &mut reqwest::Response, deadline: Instant) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_EXCERPT_BYTES {
        match timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let take = chunk.len().min(MAX_EXCERPT_BYTES - body.len());
                body.extend_from_slice(&chunk[..take]);
            }
            // The status was received: a body that ends badly or late still leaves an answer.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
        }
    }
    excerpt(&body)
}

/// Converts body bytes to text (lossy UTF-8) of at most 4 KiB, dropping a character cut in two
/// by the byte limit rather than showing it as a replacement character.
fn excerpt(body: &[u8]) -> String {
    let body = if body.len() >= MAX_EXCERPT_BYTES {
        trim_incomplete_tail(body)
    } else {
        body
    };
    let mut text = String::from_utf8_lossy(body).into_owned();
    truncate_at_char_boundary(&mut text, MAX_EXCERPT_BYTES);
    text
}

/// Drops the last UTF-8 sequence when it is incomplete.
fn trim_incomplete_tail(bytes: &[u8]) -> &[u8] {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xc0 == 0x80 {
            continue; // a continuation byte: the sequence starts further back
        }
        let needed = match byte {
            0xf0.. => 4,
            0xe0.. => 3,
            0xc0.. => 2,
            _ => 1,
        };
        return if needed > back {
            &bytes[..bytes.len() - back]
        } else {
            bytes
        };
    }
    bytes
}

fn truncate_at_char_boundary(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Tells DNS, TLS, connect and response failures apart by walking the error's source chain.
fn classify(err: &(dyn StdError + 'static)) -> Failure {
    let chain = source_chain(err);
    let root = chain.last().map(|e| e.to_string()).unwrap_or_default();
    if let Some(resolve) = chain.iter().find_map(|e| e.downcast_ref::<ResolveError>()) {
        return match resolve {
            ResolveError::Refused { refusal, .. } => {
                Failure::refused(refused_message(refusal, &resolve.to_string()))
            }
            ResolveError::Lookup { .. } | ResolveError::NoAddresses { .. } => {
                Failure::new(pb::AttemptError::Dns, format!("dns: {resolve}"))
            }
        };
    }
    if chain.iter().any(|e| e.is::<rustls::Error>()) {
        return Failure::new(pb::AttemptError::Tls, format!("tls: {root}"));
    }
    let timed_out = chain.iter().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout)
            || e.downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
    });
    if timed_out {
        return Failure::new(pb::AttemptError::Timeout, format!("timeout: {root}"));
    }
    if let Some(hyper) = chain.iter().find_map(|e| e.downcast_ref::<hyper::Error>())
        && (hyper.is_parse()
            || hyper.is_parse_status()
            || hyper.is_parse_too_large()
            || hyper.is_incomplete_message())
    {
        return Failure::new(pb::AttemptError::Response, format!("response: {root}"));
    }
    Failure::new(pb::AttemptError::Connect, format!("connect: {root}"))
}

/// Returns `err` and its sources, outermost first. An `io::Error`'s `source()` skips the error
/// it wraps (where tokio-rustls puts its `rustls::Error`, sometimes inside a second
/// `io::Error`), so the walk steps into the wrapped error instead.
fn source_chain<'a>(err: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    const MAX_LINKS: usize = 32;
    let mut chain = Vec::new();
    let mut next = Some(err);
    while let Some(link) = next {
        if chain.len() == MAX_LINKS {
            break;
        }
        chain.push(link);
        next = match link.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => link.source(),
        };
    }
    chain
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::TcpListener as StdListener;

    use crate::testing::{Receiver, Reply, job, response, within};

    use super::*;

    fn deliverer(allow: &[&str]) -> Deliverer {
        let allow = allow.iter().map(|net| net.parse().unwrap()).collect();
        Deliverer::new("agent-test".into(), Guard::new(allow), None, None).unwrap()
    }

    /// A guard that allows the loopback receivers of these tests.
    fn loopback() -> Deliverer {
        deliverer(&["127.0.0.0/8"])
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A listener nobody serves: `accept` tells whether anything connected to it.
    fn silent_listener() -> StdListener {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    }

    #[track_caller]
    fn assert_no_connection(listener: &StdListener) {
        // A connect completes its handshake in the kernel before the client goes on, so a
        // connection made during the attempt is already waiting in the backlog here.
        match listener.accept() {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("unexpected connection from {peer}"),
            Err(err) => panic!("accept failed: {err}"),
        }
    }

    #[tokio::test]
    async fn body_bytes_and_headers_arrive_exactly() {
        let mut receiver = Receiver::start(Reply::Raw(response("204 No Content", &[], b""))).await;
        let body = b"{\"a\": 1,\n  \"caf\xc3\xa9\": [true, null]}  \n".to_vec();
        let headers = [
            ("content-type", "application/json"),
            ("user-agent", "Herald/0.1.0"),
            ("x-api-key", "k3y-v4lue"),
            ("webhook-id", "evt_01J"),
            ("webhook-timestamp", "1700000000"),
            (
                "webhook-signature",
                "v1,c2lnbmF0dXJlMQ== v1,c2lnbmF0dXJlMg==",
            ),
            ("x-dup", "first"),
            ("x-dup", "second"),
        ];
        let mut job = job("1", &receiver.url(), 5000);
        job.body = body.clone().into();
        job.headers = headers
            .iter()
            .map(|(name, value)| pb::Header {
                name: (*name).into(),
                value: (*value).into(),
            })
            .collect();

        let result = loopback().deliver(job).await;
        let got = receiver.next_request().await;

        assert_eq!(got.method, "POST");
        assert_eq!(got.target, "/hook");
        assert_eq!(got.body, body);
        for name in [
            "content-type",
            "user-agent",
            "x-api-key",
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "x-dup",
        ] {
            let expected: Vec<&str> = headers
                .iter()
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .collect();
            assert_eq!(header(&got.headers, name), expected, "{name}");
        }
        assert_eq!(
            header(&got.headers, "content-length"),
            vec![body.len().to_string()]
        );
        assert!(header(&got.headers, "accept-encoding").is_empty());
        assert_eq!(result.delivery_id, "dlv_1");
        assert_eq!(result.lease_id, "lease_1");
        assert_eq!(result.status_code, 204);
        assert_eq!(result.error(), pb::AttemptError::None);
        assert!(result.error_message.is_empty());
        assert!(result.started_at.is_some());
    }

    #[tokio::test]
    async fn captures_status_headers_and_a_four_kib_excerpt() {
        let body = "é".repeat(5000); // 10,000 bytes, cut inside a character at 4 KiB
        let mut receiver = Receiver::start(Reply::Raw(response(
            "503 Service Unavailable",
            &[("retry-after", "120"), ("x-request-id", "req-42")],
            body.as_bytes(),
        )))
        .await;
        let result = loopback().deliver(job("1", &receiver.url(), 5000)).await;
        receiver.next_request().await;

        assert_eq!(result.status_code, 503);
        assert_eq!(result.error(), pb::AttemptError::None);
        let headers: Vec<(&str, &str)> = result
            .response_headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()))
            .collect();
        assert!(headers.contains(&("retry-after", "120")), "{headers:?}");
        assert!(headers.contains(&("x-request-id", "req-42")), "{headers:?}");
        assert_eq!(result.response_excerpt.len(), 4096);
        assert!(result.response_excerpt.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn reads_no_more_than_the_excerpt_of_a_large_body() {
        // The receiver promises a 1 MiB body, sends 8 KiB and then nothing: an agent that read
        // the whole body would wait for the 60 s timeout.
        let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
        head.extend_from_slice(&[b'x'; 8192]);
        let mut receiver = Receiver::start(Reply::RawThenHold(head)).await;
        let result = within(
            "the attempt to finish",
            loopback().deliver(job("1", &receiver.url(), 60_000)),
        )
        .await;
        receiver.next_request().await;
        assert_eq!(result.status_code, 200);
        assert_eq!(result.response_excerpt, "x".repeat(4096));
    }

    #[tokio::test]
    async fn a_receiver_that_never_answers_times_out() {
        let mut receiver = Receiver::start(Reply::Never).await;
        let result = loopback().deliver(job("1", &receiver.url(), 300)).await;
        receiver.next_request().await;
        assert_eq!(result.error(), pb::AttemptError::Timeout);
        assert_eq!(result.status_code, 0);
        assert!(result.duration_ms >= 300, "{}", result.duration_ms);
        assert_eq!(result.error_message, "timeout: no response within 300 ms");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/");
        let result = loopback().deliver(job("1", &url, 5000)).await;
        assert_eq!(
            result.error(),
            pb::AttemptError::Connect,
            "{}",
            result.error_message
        );
        assert!(
            result.error_message.starts_with("connect: "),
            "{}",
            result.error_message
        );
        assert!(!result.error_message.contains('\n'));
    }

    #[tokio::test]
    async fn a_malformed_response_is_a_response_error() {
        let mut receiver = Receiver::start(Reply::Raw(b"SMTP ready\r\n\r\n".to_vec())).await;
        let result = loopback().deliver(job("1", &receiver.url(), 5000)).await;
        receiver.next_request().await;
        assert_eq!(
            result.error(),
            pb::AttemptError::Response,
            "{}",
            result.error_message
        );
        assert_eq!(result.status_code, 0);
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let elsewhere = silent_listener();
        let location = format!("http://{}/", elsewhere.local_addr().unwrap());
        let mut receiver = Receiver::start(Reply::Raw(response(
            "302 Found",
            &[("location", &location)],
            b"",
        )))
        .await;
        let result = loopback().deliver(job("1", &receiver.url(), 5000)).await;
        receiver.next_request().await;
        assert_eq!(result.status_code, 302);
        assert_eq!(result.error(), pb::AttemptError::None);
        assert_no_connection(&elsewhere);
    }

    #[tokio::test]
    async fn refuses_loopback_in_every_spelling_without_connecting() {
        let listener = silent_listener();
        let port = listener.local_addr().unwrap().port();
        let guarded = deliverer(&[]);
        for host in [
            "127.0.0.1",
            "localhost",
            "127.1",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "[::ffff:127.0.0.1]",
            "[::1]",
        ] {
            let url = format!("http://{host}:{port}/");
            let result = guarded.deliver(job("1", &url, 5000)).await;
            assert_eq!(
                result.error(),
                pb::AttemptError::DestinationRefused,
                "{url}: {}",
                result.error_message
            );
            assert!(
                result.error_message.starts_with("destination refused: "),
                "{url}: {}",
                result.error_message
            );
            // The error names the setting that would allow it.
            assert!(
                result
                    .error_message
                    .contains("HERALD_ALLOW_DESTINATIONS on the agent allows it (e.g. "),
                "{url}: {}",
                result.error_message
            );
            assert_eq!(result.status_code, 0);
        }
        assert_no_connection(&listener);
    }

    #[tokio::test]
    async fn the_allow_list_lets_loopback_through_by_name_too() {
        let mut receiver = Receiver::start(Reply::Raw(response("200 OK", &[], b"ok"))).await;
        let url = format!("http://localhost:{}/hook", receiver.addr.port());
        let result = loopback().deliver(job("1", &url, 5000)).await;
        receiver.next_request().await;
        assert_eq!(result.status_code, 200, "{}", result.error_message);
    }

    #[tokio::test]
    async fn refuses_urls_it_cannot_send() {
        for url in ["ftp://example.com/", "not a url", "file:///etc/passwd"] {
            let result = loopback().deliver(job("1", url, 5000)).await;
            assert_eq!(
                result.error(),
                pb::AttemptError::DestinationRefused,
                "{url}"
            );
            assert!(result.error_message.starts_with("url: "), "{url}");
        }
    }

    #[tokio::test]
    async fn plain_http_on_an_https_url_is_a_tls_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 512];
            let _ = socket.read(&mut hello).await;
            let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        let url = format!("https://{addr}/");
        let result = loopback().deliver(job("1", &url, 5000)).await;
        assert_eq!(
            result.error(),
            pb::AttemptError::Tls,
            "{}",
            result.error_message
        );
        assert!(
            result.error_message.starts_with("tls: "),
            "{}",
            result.error_message
        );
        server.await.unwrap();
    }

    /// A CA and a certificate for 127.0.0.1 that it signed.
    struct TestPki {
        ca_pem: String,
        acceptor: tokio_rustls::TlsAcceptor,
    }

    fn test_pki() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Herald test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        TestPki {
            ca_pem: ca_cert.pem(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }

    #[tokio::test]
    async fn trusts_an_extra_ca_besides_the_platform_roots() {
        let pki = test_pki();
        let mut receiver =
            Receiver::start_tls(Reply::Raw(response("200 OK", &[], b"secure")), pki.acceptor).await;
        let url = format!("https://{}/hook", receiver.addr);
        let allow = vec!["127.0.0.0/8".parse().unwrap()];

        let platform_only =
            Deliverer::new("a".into(), Guard::new(allow.clone()), None, None).unwrap();
        let result = platform_only.deliver(job("1", &url, 5000)).await;
        assert_eq!(
            result.error(),
            pb::AttemptError::Tls,
            "{}",
            result.error_message
        );

        let mut ca_file = tempfile::NamedTempFile::new().unwrap();
        ca_file.write_all(pki.ca_pem.as_bytes()).unwrap();
        let with_extra_ca =
            Deliverer::new("a".into(), Guard::new(allow), Some(ca_file.path()), None).unwrap();
        let result = with_extra_ca.deliver(job("2", &url, 5000)).await;
        assert_eq!(result.status_code, 200, "{}", result.error_message);
        assert_eq!(result.response_excerpt, "secure");
        assert_eq!(receiver.next_request().await.body, b"{\"id\":\"2\"}");
    }

    #[test]
    fn an_extra_ca_file_without_certificates_is_an_error() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"not a certificate").unwrap();
        let err = load_extra_roots(file.path()).unwrap_err();
        assert!(
            err.to_string().contains("no PEM certificate found"),
            "{err}"
        );
    }

    #[test]
    fn the_resolver_keeps_only_allowed_addresses() {
        let addrs = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        let guard = Guard::default();
        let kept = keep_allowed(
            &guard,
            "mixed.example".into(),
            addrs(&["[::1]:0", "127.0.0.1:0", "93.184.215.14:0", "10.0.0.1:0"]),
        )
        .unwrap();
        assert_eq!(kept, addrs(&["93.184.215.14:0"]));

        let refused = keep_allowed(
            &guard,
            "internal.example".into(),
            addrs(&["10.0.0.1:0", "[fd00::1]:0"]),
        )
        .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "internal.example resolves only to refused addresses (10.0.0.1 is private (10.0.0.0/8))"
        );
        assert!(matches!(
            keep_allowed(&guard, "empty.example".into(), vec![]),
            Err(ResolveError::NoAddresses { .. })
        ));
    }

    /// An error that wraps another, as reqwest and hyper do.
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Box<dyn StdError + Send + Sync>);

    #[test]
    fn classifies_errors_by_their_source_chain() {
        let check =
            |err: Box<dyn StdError + Send + Sync>, class: pb::AttemptError, prefix: &str| {
                let failure = classify(&Outer(err));
                assert_eq!(failure.class, class, "{}", failure.message);
                assert!(failure.message.starts_with(prefix), "{}", failure.message);
            };
        let lookup = ResolveError::Lookup {
            host: "nowhere.example".into(),
            source: io::Error::other("Name or service not known"),
        };
        check(
            Box::new(lookup),
            pb::AttemptError::Dns,
            "dns: nowhere.example: ",
        );
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        check(
            Box::new(tls),
            pb::AttemptError::Tls,
            "tls: invalid peer certificate",
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        check(Box::new(refused), pb::AttemptError::Connect, "connect: ");
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        check(Box::new(timed_out), pb::AttemptError::Timeout, "timeout: ");
    }

    /// Runs in a child process of this test binary (see `environment_proxies_are_ignored`),
    /// whose environment points every proxy variable at a local listener.
    #[tokio::test]
    #[ignore = "run by environment_proxies_are_ignored in a child process"]
    async fn proxy_child() {
        let Ok(receiver_url) = std::env::var("HERALD_TEST_RECEIVER_URL") else {
            return;
        };
        // Control: a client that honours the environment does go through the proxy here.
        let honours_env = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(Vec::new()).unwrap())
            .build()
            .unwrap();
        let via_env = honours_env
            .post(&receiver_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(via_env, "from the proxy");
        // The agent's client goes straight to the receiver.
        let result = loopback().deliver(job("1", &receiver_url, 5000)).await;
        assert_eq!(result.status_code, 200, "{}", result.error_message);
        assert_eq!(result.response_excerpt, "from the receiver");
    }

    /// `set_var` is banned and the environment is process-wide, so this runs `proxy_child` in a
    /// child process of the test binary with `HTTP_PROXY` (and friends) set.
    #[tokio::test]
    async fn environment_proxies_are_ignored() {
        let mut receiver =
            Receiver::start(Reply::Raw(response("200 OK", &[], b"from the receiver"))).await;
        let mut proxy =
            Receiver::start(Reply::Raw(response("200 OK", &[], b"from the proxy"))).await;
        let proxy_url = format!("http://{}", proxy.addr);
        let output = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "deliver::tests::proxy_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("HERALD_TEST_RECEIVER_URL", receiver.url())
            .env("HTTP_PROXY", &proxy_url)
            .env("http_proxy", &proxy_url)
            .env("HTTPS_PROXY", &proxy_url)
            .env("https_proxy", &proxy_url)
            .env("ALL_PROXY", &proxy_url)
            .env("all_proxy", &proxy_url)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("1 passed"), "{stdout}");
        // The control request went to the proxy, the agent's to the receiver.
        assert!(proxy.next_request().await.target.starts_with("http://"));
        assert_eq!(receiver.next_request().await.target, "/hook");
    }

    #[test]
    fn excerpt_keeps_short_bodies_whole() {
        assert_eq!(excerpt(b"{\"ok\":true}"), "{\"ok\":true}");
        assert_eq!(excerpt(b"caf\xc3\xa9"), "café");
        assert_eq!(excerpt(b"bad \xff byte"), "bad \u{fffd} byte");
    }

    #[test]
    fn excerpt_drops_a_character_cut_by_the_limit() {
        let mut body = vec![b'a'; MAX_EXCERPT_BYTES - 1];
        body.push(0xc3); // first byte of "é", its second byte is past the limit
        let text = excerpt(&body);
        assert_eq!(text.len(), MAX_EXCERPT_BYTES - 1);
        assert!(text.bytes().all(|b| b == b'a'));

        let mut body = vec![b'a'; MAX_EXCERPT_BYTES - 3];
        body.extend_from_slice("€".as_bytes()); // exactly at the limit: kept
        assert!(excerpt(&body).ends_with('€'));
    }

    #[test]
    fn excerpt_of_invalid_bytes_stays_within_the_limit() {
        let text = excerpt(&[0xff; MAX_EXCERPT_BYTES]);
        assert!(text.len() <= MAX_EXCERPT_BYTES);
    }

    #[test]
    fn captures_at_most_sixteen_headers_and_four_kib() {
        let mut many = HeaderMap::new();
        for i in 0..20 {
            many.insert(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert_eq!(capture_headers(&many).len(), 16);

        let mut large = HeaderMap::new();
        let big = "v".repeat(3000);
        large.insert("x-a", HeaderValue::from_str(&big).unwrap());
        large.insert("x-b", HeaderValue::from_str(&big).unwrap());
        let kept = capture_headers(&large);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].name, "x-a");
    }

    #[test]
    fn invalid_request_headers_are_refused_without_their_value() {
        let failure = header_map(&[pb::Header {
            name: "x-secret".into(),
            value: "top\nsecret".into(),
        }])
        .unwrap_err();
        assert_eq!(failure.class, pb::AttemptError::DestinationRefused);
        assert!(!failure.message.contains("secret\n") && !failure.message.contains("top"));
    }
}
