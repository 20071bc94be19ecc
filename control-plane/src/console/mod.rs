//! The web console for tenants: webhooks, the test button, secrets and the delivery log in the
//! browser, on the same service layer as the gRPC API (the same validation, the same tenant
//! scoping: every call names the session's tenant).
//!
//! Server-rendered HTML (minijinja templates compiled into the binary, auto-escaped), HTML forms
//! posted and redirected, one small CSS file and one small script (confirmations and the live
//! view's Server-Sent Events), all served by Herald itself. Security: sessions in an `HttpOnly`,
//! `SameSite=Strict` cookie (`Secure` with TLS), a per-session CSRF token checked on every POST,
//! no secret in a URL after sign-in, and a strict content security policy on every response.

mod form;
mod pages;
pub mod session;
mod tls;
mod views;

use std::sync::LazyLock;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use session::{Notice, Session, Sessions};
pub use tls::TlsFiles;

use crate::service::Services;

/// The session cookie.
const SESSION_COOKIE: &str = "herald_session";
/// The sign-in form's CSRF cookie (double submit: there is no session yet).
const LOGIN_COOKIE: &str = "herald_login";
/// The largest form body accepted.
const MAX_FORM_BYTES: usize = 256 * 1024;

/// Every response carries it. `frame-ancestors 'self'` forbids embedding the console in another
/// site's page; a publisher that wants to frame it in its own admin panel needs a configurable
/// list of frame ancestors here (and a `SameSite=None; Secure` session cookie, since browsers
/// send no `Strict` cookie inside a cross-site frame). Until then, open the console link in a new
/// tab or window.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; frame-ancestors 'self'; form-action 'self'; \
     base-uri 'none'; object-src 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The templates, parsed once.
static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("login.html", include_str!("templates/login.html")),
        ("linked.html", include_str!("templates/linked.html")),
        ("webhooks.html", include_str!("templates/webhooks.html")),
        ("form.html", include_str!("templates/form.html")),
        ("new.html", include_str!("templates/new.html")),
        ("webhook.html", include_str!("templates/webhook.html")),
        ("delivery.html", include_str!("templates/delivery.html")),
        ("live.html", include_str!("templates/live.html")),
        ("error.html", include_str!("templates/error.html")),
    ] {
        // The templates are part of the binary; the unit tests render each of them.
        env.add_template(name, source)
            .unwrap_or_else(|err| panic!("console template {name}: {err}"));
    }
    env
});

/// What every handler shares.
#[derive(Clone)]
struct Console {
    services: Services,
    sessions: Sessions,
}

/// A signed-in request: the cookie value and its session.
#[derive(Clone)]
struct Signed {
    id: String,
    session: Session,
    /// The tenant's name, shown in the header (its id when it cannot be read).
    tenant_name: String,
}

/// What the layout shows on every signed-in page.
#[derive(Serialize)]
struct Chrome<'a> {
    tenant_id: &'a str,
    tenant_name: &'a str,
    csrf: &'a str,
    notice: Option<Notice>,
    nav: &'a str,
}

/// Serves the console on `listener` until `shutdown`: HTTPS with the API's certificate files when
/// `tls` is given (TLS on), plain HTTP otherwise. Sign-in links issued through `services.console`
/// point at this listener while it runs.
pub async fn serve(
    services: Services,
    listener: TcpListener,
    tls: Option<TlsFiles>,
    shutdown: CancellationToken,
) {
    let sessions = services.console.clone();
    if let Ok(addr) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        sessions.set_base_url(Some(format!("{scheme}://{}", reachable(addr))));
    }
    let app = router(Console {
        services,
        sessions: sessions.clone(),
    });
    let served = match tls {
        Some(files) => match tls::listen(listener, &files, shutdown.clone()) {
            Ok(listener) => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
            Err(err) => {
                tracing::error!(error = %err, "web console not started");
                Ok(())
            }
        },
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    };
    sessions.set_base_url(None);
    if let Err(err) = served {
        tracing::error!(error = %err, "web console stopped");
    }
}

/// Returns the address to put in links: an unspecified bind (0.0.0.0) becomes loopback.
fn reachable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            (std::net::Ipv4Addr::LOCALHOST, addr.port()).into()
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            (std::net::Ipv6Addr::LOCALHOST, addr.port()).into()
        }
        _ => addr,
    }
}

fn router(console: Console) -> Router {
    let signed_in = Router::new()
        .route("/", get(pages::webhooks))
        .route("/webhooks", post(pages::create_webhook))
        .route("/webhooks/new", get(pages::new_webhook))
        .route("/webhooks/preview", post(pages::preview_new_webhook))
        .route("/webhooks/{id}/preview", post(pages::preview_webhook))
        .route(
            "/webhooks/{id}",
            get(pages::webhook).post(pages::update_webhook),
        )
        .route("/webhooks/{id}/test", post(pages::send_test))
        .route("/webhooks/{id}/secret", post(pages::reveal_secret))
        .route("/webhooks/{id}/rotate", post(pages::rotate_secret))
        .route("/webhooks/{id}/enable", post(pages::enable_webhook))
        .route("/webhooks/{id}/replay", post(pages::replay))
        .route("/webhooks/{id}/delete", post(pages::delete_webhook))
        .route("/deliveries/{id}", get(pages::delivery))
        .route("/deliveries/{id}/retry", post(pages::retry))
        .route("/live", get(pages::live))
        .route("/live/events", get(pages::live_events))
        .route("/logout", post(pages::logout))
        .route_layer(middleware::from_fn_with_state(
            console.clone(),
            require_session,
        ));
    Router::new()
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/login/link", get(pages::login_link))
        .route("/assets/console.css", get(|| asset(CSS, "text/css")))
        .route("/assets/console.js", get(|| asset(JS, "text/javascript")))
        .merge(signed_in)
        .fallback(|| async { failure(None, StatusCode::NOT_FOUND, "Page not found", "") })
        .with_state(console)
        .layer(middleware::map_response(security_headers))
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        HeaderValue::from_static("SAMEORIGIN"),
    );
    // Pages show secrets and tenant data: never kept by caches or the back-forward cache.
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Returns the value of cookie `name`.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Secure` when TLS is on.
fn set_cookie(name: &str, value: &str, path: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{name}={value}; Path={path}; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Lets signed-in requests through with their [`Signed`] session; checks the CSRF token of every
/// POST before any handler runs. Others go to the sign-in page (GET) or are refused.
async fn require_session(State(console): State<Console>, request: Request, next: Next) -> Response {
    let mut signed = match cookie(request.headers(), SESSION_COOKIE) {
        Some(id) => match console.sessions.get(&id).await {
            Ok(session) => session.map(|session| Signed {
                id,
                tenant_name: session.tenant_id.clone(),
                session,
            }),
            Err(err) => {
                tracing::warn!(error = %err, "console session not read");
                return failure(
                    None,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Try again",
                    "Herald could not reach its database to read your session. Try again in a \
                     moment.",
                );
            }
        },
        None => None,
    };
    // A session lasts only as long as the token that opened it.
    if let Some(current) = &signed
        && !console
            .services
            .auth
            .token_still_valid(&current.session.token_id)
            .await
    {
        if let Err(err) = console.sessions.end(&current.id).await {
            tracing::debug!(error = %err, "console session of a revoked token not deleted");
        }
        signed = None;
    }
    let Some(mut signed) = signed else {
        return if request.method() == Method::GET && request.uri().path() != "/live/events" {
            Redirect::to("/login").into_response()
        } else {
            failure(
                None,
                StatusCode::UNAUTHORIZED,
                "Signed out",
                "Your session has ended. Sign in again.",
            )
        };
    };
    match console
        .services
        .tenant_name(&signed.session.tenant_id)
        .await
    {
        Ok(name) => signed.tenant_name = name,
        Err(err) => tracing::debug!(error = %err, "tenant name not read; the header shows its id"),
    }
    let mut request = if request.method() == Method::POST {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
            return failure(
                Some(&signed),
                StatusCode::PAYLOAD_TOO_LARGE,
                "Form too large",
                "",
            );
        };
        let form = form::FormData::parse(&bytes);
        if !session::csrf_matches(&signed.session, form.get("csrf")) {
            tracing::debug!(path = %parts.uri.path(), "console form refused: CSRF token missing or wrong");
            return failure(
                Some(&signed),
                StatusCode::FORBIDDEN,
                "Form refused",
                "This form did not come from this console session (its security token is \
                 missing or out of date). Reload the page and try again.",
            );
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        request
    };
    request.extensions_mut().insert(signed);
    next.run(request).await
}

/// Renders `template` with `context` and the layout's values.
fn render(
    signed: Option<&Signed>,
    notice: Option<Notice>,
    nav: &str,
    status: StatusCode,
    template: &str,
    mut context: serde_json::Value,
) -> Response {
    let chrome = signed.map(|s| Chrome {
        tenant_id: &s.session.tenant_id,
        tenant_name: &s.tenant_name,
        csrf: &s.session.csrf,
        notice,
        nav,
    });
    if let (Some(map), Some(chrome)) = (context.as_object_mut(), chrome) {
        map.insert(
            "chrome".into(),
            serde_json::to_value(chrome).unwrap_or_default(),
        );
    }
    match TEMPLATES
        .get_template(template)
        .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&context))))
    {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(err) => {
            let id = ulid::Ulid::new().to_string().to_ascii_lowercase();
            tracing::error!(error_id = %id, template, error = %err, "console template failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error (id {id})"),
            )
                .into_response()
        }
    }
}

/// An error page.
fn failure(signed: Option<&Signed>, status: StatusCode, title: &str, message: &str) -> Response {
    render(
        signed,
        None,
        "",
        status,
        "error.html",
        serde_json::json!({ "title": title, "message": message, "status": status.as_u16() }),
    )
}

/// Returns the page for a service error that is not a form's field error.
fn service_failure(signed: &Signed, err: crate::service::Error) -> Response {
    use crate::service::Error as E;
    let (status, title) = match &err {
        E::NotFound { .. } => (StatusCode::NOT_FOUND, "Not found"),
        E::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid input"),
        E::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "Signed out"),
        E::PermissionDenied(_) => (StatusCode::FORBIDDEN, "Not allowed"),
        E::AlreadyExists(_) | E::FailedPrecondition(_) => {
            (StatusCode::CONFLICT, "Not possible now")
        }
        E::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "Too large"),
        E::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "Too many attempts"),
        E::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
        E::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "Storage error"),
    };
    let message = match &err {
        E::Storage(crate::storage::Error::Internal(detail)) => {
            let id = ulid::Ulid::new().to_string().to_ascii_lowercase();
            tracing::error!(error_id = %id, error = %detail, "console: internal error");
            format!("internal error (id {id})")
        }
        E::Storage(crate::storage::Error::Full(_)) => {
            "storage full: free space on the database volume; retry later".to_owned()
        }
        E::Storage(_) => "storage unavailable; retry later".to_owned(),
        _ => err.to_string(),
    };
    failure(Some(signed), status, title, &message)
}

/// A 303 to `to` (after a POST).
fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// The body of a POST that passed [`require_session`].
fn form_of(body: &Bytes) -> form::FormData {
    form::FormData::parse(body)
}

#[cfg(test)]
mod tests;
