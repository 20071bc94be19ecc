//! Bearer tokens from request metadata.

use tonic::{Request, Status};

use crate::service::Services;
use crate::service::auth::Caller;

/// Returns the bearer token of a request's `authorization` metadata.
pub fn bearer<T>(request: &Request<T>) -> Result<&str, Status> {
    let value = request.metadata().get("authorization").ok_or_else(|| {
        Status::unauthenticated("authorization: missing; send `authorization: Bearer <token>`")
    })?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization: expected `Bearer <token>`"))
}

/// Authenticates a request's caller.
pub async fn caller<T>(services: &Services, request: &Request<T>) -> Result<Caller, Status> {
    let token = bearer(request)?;
    let peer = request.remote_addr().map(|addr| addr.ip());
    Ok(services.auth.authenticate(token, peer).await?)
}
