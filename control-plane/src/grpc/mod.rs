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
