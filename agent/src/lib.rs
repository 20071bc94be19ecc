//! Herald's delivery agent: keeps a stream open to a control plane, receives signed jobs, POSTs
//! them to receivers through the SSRF guard and reports every outcome on the same stream.
//!
//! The control plane embeds this library as its built-in agent through [`run`], so the library
//! installs no global state: no tracing subscriber, no rustls crypto provider (it hands rustls
//! the ring provider explicitly). The `herald-agent` binary does both.

pub mod config;
mod connection;
mod deliver;
pub mod guard;
pub mod health;
pub mod link;
pub mod telemetry;
#[cfg(test)]
mod testing;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{ClientTlsConfig, Endpoint};
use tracing::{Instrument, error, info, info_span, warn};

pub use config::Config;
pub use link::{InProcess, InProcessLink};

use crate::connection::Ended;
use crate::deliver::Deliverer;
use crate::guard::Guard;
use crate::link::Link;

/// The first reconnection delay; it doubles after every failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest reconnection delay (before jitter).
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Jitter applied to every reconnection delay, as a fraction (±20%).
const BACKOFF_JITTER: f64 = 0.2;
/// How long a TCP (and TLS) connection to a control plane may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an HTTP/2 keep-alive ping may go unanswered before the stream counts as broken.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the agent could not start; once running, it only stops on shutdown.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control_planes: at least one control plane url is required")]
    NoControlPlane,
    #[error("control_planes: {url}: {reason}")]
    ControlPlaneUrl { url: String, reason: String },
    #[error("capacity: must be between 1 and 65536")]
    Capacity,
    #[error("token: must be non-empty visible ASCII")]
    Token,
    #[error("extra_ca: {}: {reason}", path.display())]
    ExtraCa { path: PathBuf, reason: String },
    #[error("tls: {0}")]
    Tls(#[source] rustls::Error),
    #[error("tls: no usable root certificates: {0}")]
    TlsRoots(#[source] rustls::client::VerifierBuilderError),
    #[error("http client: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// What one stream needs from the configuration, checked once.
#[derive(Debug)]
struct Agent {
    control_planes: Vec<Link>,
    session: connection::Settings,
    deliverer: Arc<Deliverer>,
    metrics: Option<telemetry::AgentMetrics>,
}

/// Runs the agent until `shutdown` is cancelled: connects to the control planes in turn, starting
/// at a random one, with exponential backoff and jitter between attempts, serves jobs, and
/// reconnects (to the next control plane) after a drain or a broken stream. On shutdown it
/// finishes its in-flight jobs (at most `config.shutdown_grace`), reports them and returns
/// `Ok(())`. Fails only on an invalid configuration, before connecting.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    Agent::new(config)?.run(shutdown).await;
    Ok(())
}

impl Agent {
    fn new(config: Config) -> Result<Self, Error> {
        if !(1..=config::MAX_CAPACITY).contains(&config.capacity) {
            return Err(Error::Capacity);
        }
        let control_planes = match &config.in_process {
            Some(link) => vec![Link::InProcess(link.clone())],
            None => {
                if config.control_planes.is_empty() {
                    return Err(Error::NoControlPlane);
                }
                let endpoints = config
                    .control_planes
                    .iter()
                    .map(|url| Ok((url.clone(), endpoint(url, &config)?)))
                    .collect::<Result<Vec<_>, Error>>()?;
                if config.token.is_empty() {
                    return Err(Error::Token);
                }
                let mut authorization: AsciiMetadataValue =
                    MetadataValue::try_from(format!("Bearer {}", config.token))
                        .map_err(|_| Error::Token)?;
                // Keeps it out of `Debug` output and out of HPACK's index.
                authorization.set_sensitive(true);
                endpoints
                    .into_iter()
                    .map(|(url, endpoint)| Link::Grpc {
                        url,
                        endpoint: Box::new(endpoint),
                        authorization: authorization.clone(),
                    })
                    .collect()
            }
        };
        let deliverer = Deliverer::new(
            config.agent_id.clone(),
            Guard::new(config.allow_destinations.clone()),
            config.extra_ca.as_deref(),
            config.metrics.clone(),
        )?;
        Ok(Self {
            control_planes,
            session: connection::Settings {
                agent_id: config.agent_id,
                region: config.region,
                capacity: config.capacity,
                version: config.version,
                heartbeat_interval: config.heartbeat_interval,
                shutdown_grace: config.shutdown_grace,
                connected: config.connected,
            },
            deliverer: Arc::new(deliverer),
            metrics: config.metrics,
        })
    }

    async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        // Agents configured alike spread over the replicas: each starts at a random one, and
        // after a drain or a broken stream goes on to the next.
        let first = rand::rng().random_range(0..self.control_planes.len());
        for link in self.control_planes.iter().cycle().skip(first) {
            let span =
                info_span!("control_plane", url = %link.name(), agent_id = %self.session.agent_id);
            let outcome = connection::run(link, &self.session, self.deliverer.clone(), &shutdown)
                .instrument(span.clone())
                .await;
            if let Some(connected) = &self.session.connected {
                connected.send_replace(false);
            }
            failures = match outcome {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Drained) => {
                    info!(parent: &span, "drained; reconnecting");
                    0
                }
                Ok(Ended::Closed) => {
                    warn!(parent: &span, "control plane closed the stream; reconnecting");
                    0
                }
                Err(err) => {
                    if err.is_credential_refusal() {
                        error!(parent: &span, error = %err, "control plane refused the agent credential; check the agent token");
                    } else {
                        warn!(parent: &span, error = %err, "stream to control plane failed");
                    }
                    if err.after_welcome() {
                        0
                    } else {
                        failures.saturating_add(1)
                    }
                }
            };
            if let Some(metrics) = &self.metrics {
                metrics.reconnects.inc();
            }
            let delay = backoff(failures, &mut rand::rng());
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Builds the gRPC endpoint of one control plane URL; `https://` verifies the control plane
/// against `tls_ca` (or the platform's roots) and presents the client certificate, if any.
fn endpoint(url: &str, config: &Config) -> Result<Endpoint, Error> {
    let heartbeat_interval = config.heartbeat_interval;
    let invalid = |reason: String| Error::ControlPlaneUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|err| invalid(err.to_string()))?;
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|err| invalid(err.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(heartbeat_interval.max(Duration::from_secs(1)))
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match parsed.scheme() {
        "http" => Ok(endpoint),
        "https" => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|err| invalid(format!("{}: {err}", path.display())))
            };
            let mut tls = ClientTlsConfig::new();
            tls = match &config.tls_ca {
                Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?)),
                None => tls.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&config.tls_client_cert, &config.tls_client_key) {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert)?,
                    read(key)?,
                ));
            }
            endpoint
                .tls_config(tls)
                .map_err(|err| invalid(err.to_string()))
        }
        _ => Err(invalid("scheme must be http or https".to_owned())),
    }
}

/// Returns the delay before the next connection attempt after `failures` consecutive failed
/// ones (0 after a stream that had been welcomed): 100 ms doubling up to 10 s, ±20% jitter.
fn backoff(failures: u32, rng: &mut impl Rng) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(BACKOFF_MAX);
    base.mul_f64(rng.random_range(1.0 - BACKOFF_JITTER..=1.0 + BACKOFF_JITTER))
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_10s_within_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        for (failures, base_ms) in [
            (0, 100.0),
            (1, 200.0),
            (2, 400.0),
            (6, 6400.0),
            (7, 10_000.0),
            (30, 10_000.0),
            (u32::MAX, 10_000.0),
        ] {
            for _ in 0..100 {
                let ms = backoff(failures, &mut rng).as_secs_f64() * 1000.0;
                assert!(
                    (base_ms * 0.8 - 1e-6..=base_ms * 1.2 + 1e-6).contains(&ms),
                    "{failures}: {ms}"
                );
            }
        }
    }

    #[test]
    fn backoff_jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..20).map(|_| backoff(3, &mut rng)).collect();
        assert!(delays.iter().any(|d| *d != delays[0]));
    }

    #[test]
    fn rejects_invalid_configuration_before_connecting() {
        let base = || Config {
            token: "t".into(),
            ..Config::default()
        };
        let check = |config: Config, expected: &str| {
            let err = Agent::new(config).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{err}");
        };
        check(
            Config {
                control_planes: vec![],
                ..base()
            },
            "control_planes:",
        );
        check(
            Config {
                control_planes: vec!["ftp://127.0.0.1:1".into()],
                ..base()
            },
            "control_planes: ftp://",
        );
        check(
            Config {
                capacity: 0,
                ..base()
            },
            "capacity:",
        );
        check(
            Config {
                token: String::new(),
                ..base()
            },
            "token:",
        );
        check(
            Config {
                token: "bad\ntoken".into(),
                ..base()
            },
            "token:",
        );
        check(
            Config {
                extra_ca: Some("/nonexistent/ca.pem".into()),
                ..base()
            },
            "extra_ca: /nonexistent/ca.pem",
        );
        assert!(Agent::new(base()).is_ok());
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let config = Config {
            token: "tok-very-secret".into(),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("very-secret"));
        let agent = Agent::new(config).unwrap();
        assert!(!format!("{agent:?}").contains("very-secret"));
    }
}
