//! The gRPC health service (`grpc.health.v1`) of Herald's processes: the agent's own listener
//! (`HERALD_HEALTH_LISTEN`, `SERVING` while a control plane holds its stream) and the client
//! behind the `health` subcommands of `herald-agent` and `herald-control-plane`, which container
//! health checks and service managers run.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as Status;

/// How long a health check may take, connection included.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a health check did not answer `SERVING`.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{target}: cannot connect: {reason}")]
    Connect { target: String, reason: String },
    #[error("{target}: the health check failed: {code:?}: {message}")]
    Call {
        target: String,
        code: tonic::Code,
        message: String,
    },
    #[error("{target}: {status}")]
    NotServing {
        target: String,
        status: &'static str,
    },
    #[error("{target}: no answer within {} s", CHECK_TIMEOUT.as_secs())]
    Timeout { target: String },
}

/// Asks the health service behind `channel` (described as `target` in messages) for the
/// overall status; `Ok` only for `SERVING`.
pub async fn check(
    target: &str,
    channel: impl std::future::Future<Output = Result<tonic::transport::Channel, String>>,
) -> Result<(), CheckError> {
    let asked = async {
        let channel = channel.await.map_err(|reason| CheckError::Connect {
            target: target.to_owned(),
            reason,
        })?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let answer = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| CheckError::Call {
                target: target.to_owned(),
                code: status.code(),
                message: status.message().to_owned(),
            })?
            .into_inner();
        match Status::try_from(answer.status).unwrap_or(Status::Unknown) {
            Status::Serving => Ok(()),
            other => Err(CheckError::NotServing {
                target: target.to_owned(),
                status: other.as_str_name(),
            }),
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| {
            Err(CheckError::Timeout {
                target: target.to_owned(),
            })
        })
}

/// Connects in plaintext to `addr` (an unspecified address such as `0.0.0.0` means this
/// machine's loopback).
pub async fn plaintext_channel(addr: SocketAddr) -> Result<tonic::transport::Channel, String> {
    let url = format!("http://{}", loopback_of(addr));
    tonic::transport::Endpoint::from_shared(url)
        .map_err(|err| err.to_string())?
        .connect_timeout(CHECK_TIMEOUT)
        .connect()
        .await
        .map_err(|err| with_sources(&err))
}

/// Returns the address to reach a listener on this machine (an unspecified bind becomes loopback).
pub fn loopback_of(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// An error and its sources on one line (tonic's transport errors say little at the top).
pub fn with_sources(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Serves the agent's health on `listener` until `shutdown`: `SERVING` while `connected` says a
/// control plane holds the agent's stream, `NOT_SERVING` before the first welcome, between
/// streams and once shutting down.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut connected: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let follow = {
        let shutdown = shutdown.clone();
        async move {
            loop {
                let status = if *connected.borrow_and_update() && !shutdown.is_cancelled() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                tokio::select! {
                    changed = connected.changed() => if changed.is_err() { break },
                    () = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                }
            }
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
        }
    };
    tokio::spawn(follow);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    if let Err(err) = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
    {
        tracing::warn!(error = %err, "health endpoint stopped");
    }
}
