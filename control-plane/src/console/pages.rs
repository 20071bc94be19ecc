//! The console's pages and actions. Each handler reads the session's tenant, calls the service
//! layer, and renders a page or redirects; a field error re-renders the form with the problem
//! next to its field (HTTP 422) and changes nothing.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;

use super::form::{FormData, WebhookForm, parse_scheme, type_choices};
use super::session::{self, Notice, SESSION_TTL};
use super::views::{
    self, AttemptView, DeliveryView, FilterPreview, LiveAttempt, STATE_FILTERS, SubscriptionView,
};
use super::{
    Console, LOGIN_COOKIE, SESSION_COOKIE, Signed, cookie, failure, form_of, render, see_other,
    service_failure, set_cookie,
};
use crate::domain::model::{DeliveryState, PageRequest, Scope, SignatureScheme, Subscription};
use crate::service::Error;
use crate::service::deliveries::DEFAULT_PAGE_SIZE;

/// Subscriptions per page of the webhooks list.
const WEBHOOKS_PAGE: u32 = 50;
/// How long "Send test webhook" waits for the first attempt before showing the page.
const TEST_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize, Default)]
pub struct PageQuery {
    #[serde(default)]
    page: String,
}

#[derive(Debug, Deserialize, Default)]
pub struct LogQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    page: String,
}

#[derive(Debug, Deserialize, Default)]
pub struct LinkQuery {
    #[serde(default)]
    token: String,
}

#[derive(Debug, Deserialize, Default)]
pub struct LiveQuery {
    #[serde(default)]
    subscription: String,
}

// ---------------------------------------------------------------------------------------------
// Signing in and out

pub async fn login_form(State(console): State<Console>, headers: HeaderMap) -> Response {
    let signed_in = match cookie(&headers, SESSION_COOKIE) {
        Some(id) => matches!(console.sessions.get(&id).await, Ok(Some(_))),
        None => false,
    };
    if signed_in {
        return see_other("/");
    }
    login_page(&console, &headers, StatusCode::OK, "")
}

/// Renders the sign-in form with a fresh (or the current) double-submit CSRF cookie.
fn login_page(console: &Console, headers: &HeaderMap, status: StatusCode, error: &str) -> Response {
    let token = cookie(headers, LOGIN_COOKIE)
        .filter(|t| t.len() >= 32)
        .unwrap_or_else(session::random_token);
    let mut response = render(
        None,
        None,
        "",
        status,
        "login.html",
        serde_json::json!({ "csrf": token, "error": error }),
    );
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            LOGIN_COOKIE,
            &token,
            "/login",
            3600,
            console.sessions.secure_cookies(),
        ),
    );
    response
}

pub async fn login(State(console): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let form = FormData::parse(&body);
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    let submitted = form.text("csrf");
    if expected.is_empty() || !session::constant_time_eq(&expected, submitted) {
        return login_page(
            &console,
            &headers,
            StatusCode::FORBIDDEN,
            "The sign-in form expired. Please try again.",
        );
    }
    let token = form.text("token").trim();
    if token.is_empty() {
        return login_page(
            &console,
            &headers,
            StatusCode::UNPROCESSABLE_ENTITY,
            "token: enter a tenant API token",
        );
    }
    let (tenant_id, token_id) = match console.services.auth.authenticate(token, None).await {
        Ok(caller) => match caller.scope {
            Scope::Tenant(tenant_id) => (tenant_id, caller.token_id),
            Scope::Admin => {
                return login_page(
                    &console,
                    &headers,
                    StatusCode::FORBIDDEN,
                    "token: this is an admin token, and the console is for tenants. Sign in \
                     with a tenant token, or open a link from AdminService.CreateConsoleSession.",
                );
            }
        },
        Err(Error::Unauthenticated(_)) => {
            return login_page(
                &console,
                &headers,
                StatusCode::UNAUTHORIZED,
                "token: unknown or revoked token",
            );
        }
        Err(err) => {
            tracing::warn!(error = %err, "console sign-in failed");
            return login_page(
                &console,
                &headers,
                StatusCode::SERVICE_UNAVAILABLE,
                "Herald could not check the token right now; try again",
            );
        }
    };
    signed_in(&console, &tenant_id, &token_id, see_other("/")).await
}

/// Starts a session for `tenant_id`, bound to `token_id`, and sets its cookie on `response`.
async fn signed_in(
    console: &Console,
    tenant_id: &str,
    token_id: &str,
    mut response: Response,
) -> Response {
    let id = match console.sessions.start(tenant_id, token_id).await {
        Ok((id, _)) => id,
        Err(err) => {
            tracing::warn!(error = %err, "console session not stored");
            return session_store_failure();
        }
    };
    let secure = console.sessions.secure_cookies();
    let headers = response.headers_mut();
    headers.append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &id, "/", SESSION_TTL.as_secs(), secure),
    );
    headers.append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, "", "/login", 0, secure),
    );
    tracing::info!(tenant_id, "console sign-in");
    response
}

/// Exchanges a one-time console link for a session. The page it answers with moves on to `/` by
/// itself: a same-site navigation, so the `SameSite=Strict` cookie is sent even when the link was
/// opened from the publisher's site, and the link's token leaves the address bar.
pub async fn login_link(
    State(console): State<Console>,
    Query(query): Query<LinkQuery>,
) -> Response {
    match console.sessions.redeem_link(&query.token).await {
        Ok(Some((tenant_id, token_id))) => {
            let page = render(
                None,
                None,
                "",
                StatusCode::OK,
                "linked.html",
                serde_json::json!({}),
            );
            signed_in(&console, &tenant_id, &token_id, page).await
        }
        Err(err) => {
            tracing::warn!(error = %err, "console link not redeemed");
            session_store_failure()
        }
        Ok(None) => failure(
            None,
            StatusCode::FORBIDDEN,
            "Link expired",
            "This console link was already used or has expired. Ask for a new one, or sign in \
             with a tenant token.",
        ),
    }
}

pub async fn logout(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
) -> Response {
    if let Err(err) = console.sessions.end(&signed.id).await {
        tracing::warn!(error = %err, "console sign-out not stored");
        return session_store_failure();
    }
    let mut response = see_other("/login");
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            SESSION_COOKIE,
            "",
            "/",
            0,
            console.sessions.secure_cookies(),
        ),
    );
    response
}

/// The page shown when the session table cannot be read or written.
fn session_store_failure() -> Response {
    failure(
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again",
        "Herald could not reach its database to sign you in or out. Try again in a moment.",
    )
}

// ---------------------------------------------------------------------------------------------
// Webhooks

pub async fn webhooks(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Query(query): Query<PageQuery>,
) -> Response {
    let tenant = &signed.session.tenant_id;
    let page = match console
        .services
        .list_subscriptions(
            tenant,
            PageRequest::new(WEBHOOKS_PAGE, &query.page, WEBHOOKS_PAGE),
        )
        .await
    {
        Ok(page) => page,
        Err(err) => return service_failure(&signed, err),
    };
    let now = Utc::now();
    let webhooks: Vec<SubscriptionView> = page
        .items
        .iter()
        .map(|s| SubscriptionView::new(s, now))
        .collect();
    let notice = console
        .sessions
        .take_notice(&signed.id, &signed.session)
        .await;
    render(
        Some(&signed),
        notice,
        "webhooks",
        StatusCode::OK,
        "webhooks.html",
        serde_json::json!({ "webhooks": webhooks, "next_page": page.next_page_token, "paged": !query.page.is_empty() }),
    )
}

/// The event types the tenant published, for the picker (empty when they cannot be read).
async fn published_types(console: &Console, tenant: &str) -> Vec<(String, u64)> {
    console
        .services
        .list_event_types(tenant)
        .await
        .unwrap_or_else(|err| {
            tracing::warn!(error = %err, "console: could not list event types");
            Vec::new()
        })
}

async fn new_page(
    console: &Console,
    signed: &Signed,
    webhook: WebhookForm,
    preview: Option<FilterPreview>,
    status: StatusCode,
) -> Response {
    let published = published_types(console, &signed.session.tenant_id).await;
    let choices = type_choices(&published, &webhook.event_types);
    render(
        Some(signed),
        None,
        "webhooks",
        status,
        "new.html",
        serde_json::json!({ "form": webhook, "choices": choices, "preview": preview }),
    )
}

pub async fn new_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
) -> Response {
    new_page(
        &console,
        &signed,
        WebhookForm::blank(),
        None,
        StatusCode::OK,
    )
    .await
}

/// How many of the tenant's latest events the filter editor's preview runs against.
const PREVIEW_EVENTS: u32 = 50;

/// Runs the form's filters against the tenant's latest events; a filter that does not parse
/// becomes the form's field error (and no preview).
async fn filter_preview(
    console: &Console,
    signed: &Signed,
    webhook: &mut WebhookForm,
) -> Result<Option<FilterPreview>, Response> {
    match console
        .services
        .preview_filters(
            &signed.session.tenant_id,
            &webhook.all_event_types(),
            &webhook.payload_filter,
            PREVIEW_EVENTS,
        )
        .await
    {
        Ok(events) => Ok(Some(FilterPreview::new(&events, Utc::now()))),
        Err(Error::Invalid(invalid)) => {
            webhook.set_error(&invalid);
            Ok(None)
        }
        Err(err) => Err(service_failure(signed, err)),
    }
}

fn preview_status(webhook: &WebhookForm) -> StatusCode {
    if webhook.errors.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    }
}

/// "Preview" on the new-webhook form: the form again, with the events it would have received.
pub async fn preview_new_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    body: Bytes,
) -> Response {
    let mut webhook = WebhookForm::from_form(&form_of(&body));
    let preview = match filter_preview(&console, &signed, &mut webhook).await {
        Ok(preview) => preview,
        Err(response) => return response,
    };
    let status = preview_status(&webhook);
    new_page(&console, &signed, webhook, preview, status).await
}

/// "Preview" on a webhook's settings: nothing is saved.
pub async fn preview_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let subscription = match console
        .services
        .get_subscription(&signed.session.tenant_id, &id)
        .await
    {
        Ok(s) => s,
        Err(err) => return service_failure(&signed, err),
    };
    let mut webhook = WebhookForm::from_form(&form_of(&body));
    let preview = match filter_preview(&console, &signed, &mut webhook).await {
        Ok(preview) => preview,
        Err(response) => return response,
    };
    let status = preview_status(&webhook);
    webhook_page(
        &console,
        &signed,
        &subscription,
        &LogQuery::default(),
        Extras {
            form: Some(webhook),
            preview,
            status: Some(status),
            ..Extras::default()
        },
    )
    .await
}

pub async fn create_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    body: Bytes,
) -> Response {
    let mut webhook = WebhookForm::from_form(&form_of(&body));
    let created = match webhook.to_new() {
        Ok(new) => {
            console
                .services
                .create_subscription(&signed.session.tenant_id, new)
                .await
        }
        Err(invalid) => Err(invalid.into()),
    };
    match created {
        Ok(subscription) => {
            console
                .sessions
                .notify(
                    &signed.id,
                    Notice::ok(format!(
                        "Webhook \u{201c}{}\u{201d} created.",
                        subscription.name
                    )),
                )
                .await;
            see_other(&format!("/webhooks/{}", subscription.id))
        }
        Err(Error::Invalid(invalid)) => {
            webhook.set_error(&invalid);
            new_page(
                &console,
                &signed,
                webhook,
                None,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
        Err(err) => service_failure(&signed, err),
    }
}

/// What the webhook page shows besides the subscription.
#[derive(Default)]
struct Extras {
    form: Option<WebhookForm>,
    preview: Option<FilterPreview>,
    secret: Option<(String, &'static str)>,
    notice: Option<Notice>,
    status: Option<StatusCode>,
}

async fn webhook_page(
    console: &Console,
    signed: &Signed,
    subscription: &Subscription,
    query: &LogQuery,
    extras: Extras,
) -> Response {
    let tenant = &signed.session.tenant_id;
    let Ok(state) = views::parse_state(&query.state) else {
        return failure(
            Some(signed),
            StatusCode::BAD_REQUEST,
            "Invalid filter",
            "state: must be one of pending, in_flight, succeeded, failed, dead",
        );
    };
    let log = match console
        .services
        .list_deliveries(
            tenant,
            &subscription.id,
            "",
            state,
            PageRequest::new(DEFAULT_PAGE_SIZE, &query.page, DEFAULT_PAGE_SIZE),
        )
        .await
    {
        Ok(page) => page,
        Err(err) => return service_failure(signed, err),
    };
    let now = Utc::now();
    let deliveries: Vec<DeliveryView> = log
        .items
        .iter()
        .map(|d| DeliveryView::new(d, now))
        .collect();
    let webhook = extras
        .form
        .unwrap_or_else(|| WebhookForm::from_subscription(subscription));
    let published = published_types(console, tenant).await;
    let choices = type_choices(&published, &webhook.event_types);
    let notice = match extras.notice {
        Some(notice) => Some(notice),
        None => {
            console
                .sessions
                .take_notice(&signed.id, &signed.session)
                .await
        }
    };
    let filter = if state.is_some() {
        query.state.as_str()
    } else {
        "all"
    };
    let filters: Vec<(&str, &str, bool)> = STATE_FILTERS
        .iter()
        .map(|(value, label)| (*value, *label, *value == filter))
        .collect();
    render(
        Some(signed),
        notice,
        "webhooks",
        extras.status.unwrap_or(StatusCode::OK),
        "webhook.html",
        serde_json::json!({ "webhook_view": SubscriptionView::new(subscription, now), "form": webhook, "choices": choices, "deliveries": deliveries, "filters": filters, "filter": filter, "next_page": log.next_page_token, "paged": !query.page.is_empty(), "secret": extras.secret.as_ref().map(|(s, _)| s.clone()), "secret_note": extras.secret.as_ref().map(|(_, note)| *note), "preview": extras.preview }),
    )
}

pub async fn webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Response {
    match console
        .services
        .get_subscription(&signed.session.tenant_id, &id)
        .await
    {
        Ok(subscription) => {
            webhook_page(&console, &signed, &subscription, &query, Extras::default()).await
        }
        Err(err) => service_failure(&signed, err),
    }
}

pub async fn update_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let tenant = &signed.session.tenant_id;
    let mut webhook = WebhookForm::from_form(&form_of(&body));
    let updated = match webhook.to_patch() {
        Ok(patch) => {
            console
                .services
                .update_subscription(tenant, &id, patch)
                .await
        }
        Err(invalid) => Err(invalid.into()),
    };
    match updated {
        Ok(subscription) => {
            console.sessions.notify(
                &signed.id,
                Notice::ok(if subscription.active {
                    "Saved."
                } else {
                    "Saved. The webhook is inactive: published events skip it until you turn it \
                     back on (test webhooks are still sent)."
                }),
            ).await;
            see_other(&format!("/webhooks/{id}"))
        }
        Err(Error::Invalid(invalid)) => {
            let subscription = match console.services.get_subscription(tenant, &id).await {
                Ok(s) => s,
                Err(err) => return service_failure(&signed, err),
            };
            webhook.set_error(&invalid);
            webhook_page(
                &console,
                &signed,
                &subscription,
                &LogQuery::default(),
                Extras {
                    form: Some(webhook),
                    notice: Some(Notice::error(
                        "Nothing was saved: correct the field marked below.",
                    )),
                    status: Some(StatusCode::UNPROCESSABLE_ENTITY),
                    ..Extras::default()
                },
            )
            .await
        }
        Err(err) => service_failure(&signed, err),
    }
}

pub async fn reveal_secret(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    match console
        .services
        .get_subscription(&signed.session.tenant_id, &id)
        .await
    {
        Ok(subscription) => {
            webhook_page(
                &console,
                &signed,
                &subscription,
                &LogQuery::default(),
                Extras {
                    secret: revealable_secret(&subscription).map(|secret| (secret, "")),
                    ..Extras::default()
                },
            )
            .await
        }
        Err(err) => service_failure(&signed, err),
    }
}

pub async fn rotate_secret(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let form = form_of(&body);
    let grace = match form.text("grace") {
        "now" => Some(0),
        _ => None,
    };
    // Empty: a new key of the current scheme.
    let scheme = match form.text("scheme") {
        "" => None,
        text => match parse_scheme(text) {
            Ok(scheme) => Some(scheme),
            Err(invalid) => {
                return failure(
                    Some(&signed),
                    StatusCode::BAD_REQUEST,
                    "Invalid signature scheme",
                    &invalid.to_string(),
                );
            }
        },
    };
    match console
        .services
        .rotate_secret(&signed.session.tenant_id, &id, grace, scheme)
        .await
    {
        Ok(subscription) => {
            let note = if grace == Some(0) {
                "The previous key stopped signing now."
            } else {
                "The previous key keeps signing beside this one for 24 hours."
            };
            let notice = match subscription.signature_scheme() {
                SignatureScheme::HmacSha256 => "New signing secret issued.",
                SignatureScheme::Ed25519 => {
                    "New Ed25519 key pair issued: give your receiver the new public key."
                }
            };
            webhook_page(
                &console,
                &signed,
                &subscription,
                &LogQuery::default(),
                Extras {
                    secret: revealable_secret(&subscription)
                        .map(|secret| (secret, note))
                        .or(Some((String::new(), note))),
                    notice: Some(Notice::ok(notice)),
                    ..Extras::default()
                },
            )
            .await
        }
        Err(err) => service_failure(&signed, err),
    }
}

/// The HMAC secret, which the tenant may see; an Ed25519 private key never leaves Herald.
fn revealable_secret(subscription: &Subscription) -> Option<String> {
    (subscription.signature_scheme() == SignatureScheme::HmacSha256)
        .then(|| subscription.signing_secret.clone())
}

pub async fn enable_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    match console
        .services
        .enable_subscription(&signed.session.tenant_id, &id)
        .await
    {
        Ok(_) => {
            console.sessions.notify(
                &signed.id,
                Notice::ok(
                    "Enabled. Deliveries that went dead meanwhile can be sent again with Replay.",
                ),
            ).await;
            see_other(&format!("/webhooks/{id}"))
        }
        Err(err) => service_failure(&signed, err),
    }
}

pub async fn replay(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let form = form_of(&body);
    let window = match form.text("since") {
        "1h" => chrono::Duration::hours(1),
        "7d" => chrono::Duration::days(7),
        "30d" => chrono::Duration::days(30),
        _ => chrono::Duration::hours(24),
    };
    match console
        .services
        .replay_deliveries(&signed.session.tenant_id, &id, Utc::now() - window)
        .await
    {
        Ok(count) => {
            let text = match count {
                0 => "No dead deliveries in that period: nothing to replay.".to_owned(),
                1 => "1 dead delivery goes out again.".to_owned(),
                n => format!("{n} dead deliveries go out again."),
            };
            console.sessions.notify(&signed.id, Notice::ok(text)).await;
            see_other(&format!("/webhooks/{id}"))
        }
        Err(err) => service_failure(&signed, err),
    }
}

pub async fn delete_webhook(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    match console
        .services
        .delete_subscription(&signed.session.tenant_id, &id)
        .await
    {
        Ok(()) => {
            console
                .sessions
                .notify(&signed.id, Notice::ok("Webhook deleted."))
                .await;
            see_other("/")
        }
        Err(err) => service_failure(&signed, err),
    }
}

/// "Send test webhook": sends a `test` event and waits up to [`TEST_WAIT`] for its first attempt,
/// then shows the result on the webhook's page.
pub async fn send_test(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let tenant = signed.session.tenant_id.clone();
    // Subscribe first, so the attempt cannot be recorded before we listen.
    let mut records = console.services.watch();
    let published = match console.services.send_test_event(&tenant, &id, None).await {
        Ok(published) => published,
        Err(err) => return service_failure(&signed, err),
    };
    let Some(delivery_id) = published.delivery_ids.first().cloned() else {
        return service_failure(
            &signed,
            Error::Unavailable("send test: no delivery was created".into()),
        );
    };
    let wait = async {
        loop {
            match records.recv().await {
                Ok(record) if record.delivery_id == delivery_id => return Some(record),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    };
    let record = tokio::time::timeout(TEST_WAIT, wait).await.ok().flatten();
    let link = format!("/deliveries/{delivery_id}");
    let notice = match record {
        Some(record) => {
            let attempt = LiveAttempt::new(&record);
            if attempt.ok {
                Notice::ok(format!(
                    "Test webhook delivered: {} in {} ms.",
                    attempt.outcome, attempt.duration_ms
                ))
            } else {
                let detail = if attempt.error_message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", attempt.error_message)
                };
                Notice::error(format!(
                    "Test webhook failed: {}{detail}. Delivery state: {}.",
                    attempt.outcome, attempt.state_label
                ))
            }
        }
        None => match console.services.get_delivery(&tenant, &delivery_id).await {
            Ok((delivery, _)) => Notice::info(format!(
                "Test webhook queued; no attempt yet (state: {}). Its page shows the attempts as \
                 they come.",
                views::state_label(delivery.state)
            )),
            Err(err) => return service_failure(&signed, err),
        },
    };
    console
        .sessions
        .notify(
            &signed.id,
            notice.with_link(link, "View delivery").beside_test(),
        )
        .await;
    see_other(&format!("/webhooks/{id}"))
}

// ---------------------------------------------------------------------------------------------
// Deliveries

pub async fn delivery(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let tenant = &signed.session.tenant_id;
    let (delivery, attempts) = match console.services.get_delivery(tenant, &id).await {
        Ok(found) => found,
        Err(err) => return service_failure(&signed, err),
    };
    // The event and webhook add context; the page still shows without them (a deleted webhook).
    let event = console
        .services
        .get_event(tenant, &delivery.event_id)
        .await
        .ok();
    let webhook = console
        .services
        .get_subscription(tenant, &delivery.subscription_id)
        .await
        .ok();
    let now = Utc::now();
    let attempts: Vec<AttemptView> = attempts
        .iter()
        .enumerate()
        .map(|(i, a)| AttemptView::new(i + 1, a))
        .collect();
    let notice = console
        .sessions
        .take_notice(&signed.id, &signed.session)
        .await;
    render(
        Some(&signed),
        notice,
        "webhooks",
        StatusCode::OK,
        "delivery.html",
        serde_json::json!({ "delivery": DeliveryView::new(&delivery, now), "in_flight": delivery.state == DeliveryState::InFlight, "attempts": attempts, "payload": event.as_ref().map(|e| pretty_json(&e.payload)), "event_action": event.as_ref().and_then(|e| e.action.clone()), "event_entity": event.as_ref().and_then(|e| match (&e.entity_type, &e.entity_id) {
                (Some(t), Some(i)) => Some(format!("{t}:{i}")),
                _ => None,
            }), "webhook_name": webhook.as_ref().map(|w| w.name.clone()) }),
    )
}

/// Shows a payload indented when it is JSON, as sent otherwise (the bytes sent are unchanged).
fn pretty_json(payload: &str) -> String {
    serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| payload.to_owned())
}

pub async fn retry(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    match console
        .services
        .retry_delivery(&signed.session.tenant_id, &id)
        .await
    {
        Ok(_) => {
            console
                .sessions
                .notify(
                    &signed.id,
                    Notice::ok(
                        "Retry scheduled: one more attempt goes out now, with the same webhook-id.",
                    ),
                )
                .await;
            see_other(&format!("/deliveries/{id}"))
        }
        Err(Error::FailedPrecondition(message)) => {
            console
                .sessions
                .notify(&signed.id, Notice::error(message))
                .await;
            see_other(&format!("/deliveries/{id}"))
        }
        Err(err) => service_failure(&signed, err),
    }
}

// ---------------------------------------------------------------------------------------------
// Live view

pub async fn live(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Query(query): Query<LiveQuery>,
) -> Response {
    let mut name = None;
    if !query.subscription.is_empty() {
        match console
            .services
            .get_subscription(&signed.session.tenant_id, &query.subscription)
            .await
        {
            Ok(s) => name = Some(s.name),
            Err(err) => return service_failure(&signed, err),
        }
    }
    render(
        Some(&signed),
        None,
        "live",
        StatusCode::OK,
        "live.html",
        serde_json::json!({ "subscription": query.subscription, "subscription_name": name }),
    )
}

/// Server-Sent Events: one `attempt` event per attempt recorded for the session's tenant (and
/// webhook, if named), from `WatchDeliveries`' source. Ends at shutdown or when the session ends.
pub async fn live_events(
    State(console): State<Console>,
    Extension(signed): Extension<Signed>,
    Query(query): Query<LiveQuery>,
) -> Response {
    let tenant = signed.session.tenant_id.clone();
    if !query.subscription.is_empty()
        && let Err(err) = console
            .services
            .get_subscription(&tenant, &query.subscription)
            .await
    {
        return service_failure(&signed, err);
    }
    let subscription = (!query.subscription.is_empty()).then_some(query.subscription);
    let mut records = console.services.watch();
    let stopping = console.services.stopping.clone();
    let sessions = console.sessions.clone();
    let mut ended = sessions.ended();
    let auth = console.services.auth.clone();
    let session_id = signed.id;
    let token_id = signed.session.token_id;
    let stream = async_stream::stream! {
        // The stream ends with its session: at once when a sign-out or a revocation is heard
        // of (here or on another replica), within a minute when it expires.
        let mut check = tokio::time::interval(Duration::from_secs(60));
        check.reset();
        loop {
            let received = tokio::select! {
                _ = stopping.cancelled() => break,
                _ = check.tick() => None,
                _ = ended.recv() => None,
                received = records.recv() => Some(received),
            };
            let Some(received) = received else {
                let live = matches!(sessions.get(&session_id).await, Ok(Some(_)))
                    && auth.token_still_valid(&token_id).await;
                if !live {
                    break;
                }
                continue;
            };
            match received {
                Ok(record) => {
                    if record.tenant_id != tenant
                        || subscription.as_ref().is_some_and(|s| *s != record.subscription_id)
                    {
                        continue;
                    }
                    if let Ok(event) = SseEvent::default()
                        .event("attempt")
                        .json_data(LiveAttempt::new(&record))
                    {
                        yield Ok::<_, Infallible>(event);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "a console live view fell behind");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    };
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
