//! The typed Rust client of Herald's gRPC API: bearer authentication, time-outs, and retries of
//! idempotent calls on `UNAVAILABLE`. A publish it retries carries an idempotency key (the
//! caller's, or one it generated), so a retry never publishes twice.

use std::future::Future;
use std::time::Duration;

use herald_proto::v1 as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

pub use herald_proto::v1;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("token: not a valid header value")]
    Token,
    #[error("{setting}: {reason}")]
    Tls {
        setting: &'static str,
        reason: String,
    },
}

/// TLS towards the control plane (used for `https://` addresses).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM file of the CA the control plane's certificate is verified against; unset: the
    /// platform's roots.
    pub ca: Option<std::path::PathBuf>,
    /// PEM files of a client certificate and its key (mTLS).
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// Client options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Time-out of each call.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts of an idempotent call that keeps failing with `UNAVAILABLE`.
    pub max_attempts: u32,
    pub tls: Tls,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 4,
            tls: Tls::default(),
        }
    }
}

/// A client of one control plane; cheap to clone.
#[derive(Clone)]
pub struct HeraldClient {
    channel: Channel,
    bearer: Bearer,
    options: Options,
}

impl HeraldClient {
    /// Connects lazily to `addr` (`http://127.0.0.1:50051`) with `token`.
    pub fn connect(addr: &str, token: &str) -> Result<Self, Error> {
        Self::with_options(addr, token, Options::default())
    }

    pub fn with_options(addr: &str, token: &str, options: Options) -> Result<Self, Error> {
        Self::from_endpoint(endpoint(addr, &options)?, token, options)
    }

    /// Builds a client on a prepared endpoint (e.g. with TLS settings).
    pub fn from_endpoint(endpoint: Endpoint, token: &str, options: Options) -> Result<Self, Error> {
        let bearer = if token.is_empty() {
            Bearer(None)
        } else {
            Bearer(Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| Error::Token)?,
            ))
        };
        Ok(Self {
            channel: endpoint.connect_lazy(),
            bearer,
            options,
        })
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn admin(&self) -> pb::admin_service_client::AdminServiceClient<Authed> {
        pb::admin_service_client::AdminServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn subscriptions(
        &self,
    ) -> pb::subscription_service_client::SubscriptionServiceClient<Authed> {
        pb::subscription_service_client::SubscriptionServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    pub fn events(&self) -> pb::event_service_client::EventServiceClient<Authed> {
        pb::event_service_client::EventServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(256 << 20)
    }

    pub fn deliveries(&self) -> pb::delivery_service_client::DeliveryServiceClient<Authed> {
        pb::delivery_service_client::DeliveryServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer.clone(),
        )
    }

    /// Runs an idempotent call, retrying with backoff while it fails with `UNAVAILABLE`.
    pub async fn idempotent<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Self) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let result = tokio::time::timeout(self.options.timeout, call(self.clone()))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("the call timed out")));
            match result {
                Ok(response) => return Ok(response.into_inner()),
                Err(status)
                    if status.code() == Code::Unavailable
                        && attempt < self.options.max_attempts =>
                {
                    let jitter = rand::random_range(0.8..1.2);
                    tokio::time::sleep(delay.mul_f64(jitter)).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
                Err(status) => return Err(status),
            }
        }
    }

    /// Publishes one event; with no idempotency key it makes one, so its retries are safe.
    pub async fn publish(
        &self,
        mut request: pb::PublishEventRequest,
    ) -> Result<pb::PublishEventResponse, Status> {
        if request.idempotency_key.is_empty() {
            request.idempotency_key = new_idempotency_key();
        }
        self.idempotent(|client| {
            let request = request.clone();
            async move { client.events().publish_event(request).await }
        })
        .await
    }

    /// Publishes up to 500 events, all or nothing, with a key on each.
    pub async fn publish_many(
        &self,
        mut request: pb::PublishEventsRequest,
    ) -> Result<pb::PublishEventsResponse, Status> {
        for event in &mut request.events {
            if event.idempotency_key.is_empty() {
                event.idempotency_key = new_idempotency_key();
            }
        }
        self.idempotent(|client| {
            let request = request.clone();
            async move { client.events().publish_events(request).await }
        })
        .await
    }
}

/// Returns a fresh idempotency key.
pub fn new_idempotency_key() -> String {
    format!(
        "idem_{}",
        ulid::Ulid::new().to_string().to_ascii_lowercase()
    )
}

fn endpoint(addr: &str, options: &Options) -> Result<Endpoint, Error> {
    let err = |reason: String| Error::Address {
        addr: addr.to_owned(),
        reason,
    };
    let with_scheme = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(with_scheme.clone())
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if !with_scheme.starts_with("https://") {
        return Ok(endpoint);
    }
    let read = |setting: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Error::Tls {
            setting,
            reason: format!("{}: {e}", path.display()),
        })
    };
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match &options.tls.ca {
        Some(ca) => {
            tls.ca_certificate(tonic::transport::Certificate::from_pem(read("tls_ca", ca)?))
        }
        None => tls.with_native_roots(),
    };
    if let Some((cert, key)) = &options.tls.client_cert {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read("tls_client_cert", cert)?,
            read("tls_client_key", key)?,
        ));
    }
    endpoint.tls_config(tls).map_err(|e| Error::Tls {
        setting: "tls",
        reason: e.to_string(),
    })
}
