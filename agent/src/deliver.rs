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
use tracing::{Span, debug, instrument, warn};
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
        })
    }

    /// Executes one job and returns its result; never fails: every failure is a classified
    /// result. Reads at most 4 KiB of the response body.
    #[instrument(skip_all, fields(
        delivery_id = %job.delivery_id,
        attempt = job.attempt,
        agent_id = %self.agent_id,
        status_code = tracing::field::Empty,
    ))]
    pub(crate) async fn deliver(&self, job: pb::Job) -> pb::JobResult {
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
            .map_err(|refusal| Failure::refused(format!("destination refused: {refusal}")))?;
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
    let chain: Vec<&(dyn StdError + 'static)> =
        std::iter::successors(Some(err), |e| (*e).source()).collect();
    let root = chain.last().map(|e| e.to_string()).unwrap_or_default();
    if let Some(resolve) = chain.iter().find_map(|e| find::<ResolveError>(*e)) {
        return match resolve {
            ResolveError::Refused { .. } => {
                Failure::refused(format!("destination refused: {resolve}"))
            }
            ResolveError::Lookup { .. } | ResolveError::NoAddresses { .. } => {
                Failure::new(pb::AttemptError::Dns, format!("dns: {resolve}"))
            }
        };
    }
    if chain.iter().any(|e| find::<rustls::Error>(*e).is_some()) {
        return Failure::new(pb::AttemptError::Tls, format!("tls: {root}"));
    }
    let timed_out = chain.iter().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_timeout)
            || find::<io::Error>(*e).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
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

/// Finds a `T` in one link of a source chain, looking inside `io::Error`s too: their `source()`
/// skips the error they wrap, which is where tokio-rustls puts its `rustls::Error`.
fn find<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    err.downcast_ref::<T>().or_else(|| {
        err.downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<T>())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
