//! The tonic edge: authenticates, converts proto to domain and back, calls one service function,
//! maps its error. Only this module builds a `tonic::Status`.

mod admin;
pub mod agent;
mod auth;
mod convert;
mod deliveries;
mod events;
mod subscriptions;

use herald_proto::v1 as pb;
use tonic::Status;

use crate::service::{self, Services};

pub use admin::AdminApi;
pub use agent::AgentApi;
pub use deliveries::DeliveryApi;
pub use events::EventApi;
pub use subscriptions::SubscriptionApi;

impl From<service::Error> for Status {
    fn from(err: service::Error) -> Self {
        use service::Error as E;
        match err {
            E::Invalid(_) => Status::invalid_argument(err.to_string()),
            E::NotFound { .. } => Status::not_found(err.to_string()),
            E::Unauthenticated(_) => Status::unauthenticated(err.to_string()),
            E::PermissionDenied(_) => Status::permission_denied(err.to_string()),
            E::AlreadyExists(_) => Status::already_exists(err.to_string()),
            E::TooLarge(_) | E::RateLimited(_) => Status::resource_exhausted(err.to_string()),
            E::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
            E::Unavailable(_) => Status::unavailable(err.to_string()),
            E::Storage(crate::storage::Error::Conflict(_)) => Status::already_exists(
                "conflict: a concurrent request changed the same record; retry",
            ),
            // The writer logs the episode (and what to do) once; not every refused call.
            E::Storage(crate::storage::Error::Full(_)) => Status::resource_exhausted(
                "storage full: free space on the database volume; retry later with the same idempotency key",
            ),
            E::Storage(crate::storage::Error::Unavailable(detail)) => {
                tracing::debug!(error = %detail, "storage unavailable");
                Status::unavailable("storage unavailable; retry later")
            }
            E::Storage(crate::storage::Error::Internal(detail)) => internal(&detail),
        }
    }
}

/// A layer on the gRPC server that refuses every new call with `UNAVAILABLE` once the control
/// plane is stopping (calls already running go on; health still answers, `NOT_SERVING`), so
/// publishers and agents move to another replica at once.
#[derive(Clone)]
pub struct RefuseWhenStopping(pub tokio_util::sync::CancellationToken);

impl<S> tower::Layer<S> for RefuseWhenStopping {
    type Service = Refusing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Refusing {
            inner,
            stopping: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Refusing<S> {
    inner: S,
    stopping: tokio_util::sync::CancellationToken,
}

impl<S, B> tower::Service<http::Request<B>> for Refusing<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let health = request.uri().path().starts_with("/grpc.health.v1.Health/");
        if self.stopping.is_cancelled() && !health {
            let status =
                Status::unavailable("the control plane is shutting down; retry on another replica");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        Box::pin(self.inner.call(request))
    }
}

/// A layer on the gRPC server that counts every call ending in a status other than `OK`
/// (`herald_rpc_errors_total{method,code}`): from the response headers (a call refused before
/// any message, such as every failed unary call) or from the trailers that end a stream.
#[derive(Clone)]
pub struct CountErrors {
    counter: prometheus_client::metrics::family::Family<
        crate::metrics::Rpc,
        prometheus_client::metrics::counter::Counter,
    >,
    /// The paths the server serves (`/herald.v1.EventService/PublishEvent` → `PublishEvent`):
    /// any other path is counted as `unknown`, so callers cannot add label values.
    methods: std::sync::Arc<std::collections::HashMap<String, String>>,
}

impl CountErrors {
    /// Counts into `metrics.rpc_errors`, naming the methods of the services in `descriptor_sets`
    /// (encoded `FileDescriptorSet`s).
    pub fn new(metrics: &crate::metrics::Metrics, descriptor_sets: &[&[u8]]) -> Self {
        use prost::Message as _;
        let mut methods = std::collections::HashMap::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let service_name = service.name.unwrap_or_default();
                    for method in service.method {
                        let name = method.name.unwrap_or_default();
                        methods.insert(format!("/{package}.{service_name}/{name}"), name);
                    }
                }
            }
        }
        Self {
            counter: metrics.rpc_errors.clone(),
            methods: std::sync::Arc::new(methods),
        }
    }
}

impl<S> tower::Layer<S> for CountErrors {
    type Service = Counting<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counting {
            inner,
            counts: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counting<S> {
    inner: S,
    counts: CountErrors,
}

/// The name of a gRPC status code as the gRPC documentation spells it, `None` for `OK`.
fn code_name(code: &[u8]) -> Option<&'static str> {
    let code = std::str::from_utf8(code).ok()?.trim().parse::<i32>().ok()?;
    Some(match tonic::Code::from_i32(code) {
        tonic::Code::Ok => return None,
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    })
}

impl<S, B> tower::Service<http::Request<B>> for Counting<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use http_body_util::BodyExt as _;
        let method = self
            .counts
            .methods
            .get(request.uri().path())
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned());
        let counter = self.counts.counter.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let count = move |code: &'static str| {
                counter
                    .get_or_create(&crate::metrics::Rpc {
                        method: method.clone(),
                        code,
                    })
                    .inc();
            };
            if let Some(code) = response.headers().get("grpc-status") {
                // Trailers-only: the call ended before any message.
                if let Some(code) = code_name(code.as_bytes()) {
                    count(code);
                }
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    if let Some(code) = frame
                        .trailers_ref()
                        .and_then(|trailers| trailers.get("grpc-status"))
                        .and_then(|code| code_name(code.as_bytes()))
                    {
                        count(code);
                    }
                    frame
                }))
            }))
        })
    }
}

/// Returns an `INTERNAL` status whose message carries an id that is also logged.
pub fn internal(detail: &str) -> Status {
    let id = ulid::Ulid::new().to_string().to_ascii_lowercase();
    tracing::error!(error_id = %id, error = %detail, "internal error");
    Status::internal(format!("internal error (id {id})"))
}

/// The API services built on `services`, ready to add to a tonic router.
pub struct Api {
    pub admin: pb::admin_service_server::AdminServiceServer<AdminApi>,
    pub subscriptions: pb::subscription_service_server::SubscriptionServiceServer<SubscriptionApi>,
    pub events: pb::event_service_server::EventServiceServer<EventApi>,
    pub deliveries: pb::delivery_service_server::DeliveryServiceServer<DeliveryApi>,
}

impl Api {
    pub fn new(services: Services, max_message_bytes: usize) -> Self {
        Self {
            admin: pb::admin_service_server::AdminServiceServer::new(AdminApi(services.clone())),
            subscriptions: pb::subscription_service_server::SubscriptionServiceServer::new(
                SubscriptionApi(services.clone()),
            ),
            events: pb::event_service_server::EventServiceServer::new(EventApi(services.clone()))
                .max_decoding_message_size(max_message_bytes),
            deliveries: pb::delivery_service_server::DeliveryServiceServer::new(DeliveryApi(
                services,
            ))
            .max_decoding_message_size(max_message_bytes),
        }
    }
}
