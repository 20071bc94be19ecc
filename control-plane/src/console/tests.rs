//! Unit tests of the console's edges: cookies, headers and every template rendered.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use chrono::Utc;

use super::form::{WebhookForm, type_choices};
use super::views::{DeliveryView, SubscriptionView};
use super::*;
use crate::domain::model::{
    Delivery, DeliveryState, LastDelivery, Subscription, SubscriptionStatus,
};

fn signed() -> Signed {
    Signed {
        id: session::random_token(),
        tenant_name: "Acme <Corp>".into(),
        session: Session {
            tenant_id: "ten_a".into(),
            token_id: "tok_a".into(),
            csrf: session::random_token(),
            expires_at: Utc::now() + session::SESSION_TTL,
            notice: None,
        },
    }
}

fn subscription() -> Subscription {
    let now = Utc::now();
    Subscription {
        id: "sub_1".into(),
        tenant_id: "ten_a".into(),
        name: "CRM <sync>".into(),
        url: "http://127.0.0.1:9/hooks".into(),
        event_types: vec!["user.*".into()],
        active: true,
        status: SubscriptionStatus::Disabled,
        disabled_reason: Some("answered 410 Gone".into()),
        api_key: Some("sk_live_1234".into()),
        api_key_header: "X-API-Key".into(),
        signing_secret: "whsec_x".into(),
        previous_secret: None,
        region: None,
        timeout: Duration::from_secs(15),
        max_attempts: 11,
        max_concurrency: 64,
        rate_limit_per_s: 0,
        ordered: false,
        payload_filter: None,
        headers: Vec::new(),
        last_delivery: Some(LastDelivery {
            state: DeliveryState::Dead,
            status_code: 500,
            at: now,
        }),
        created_at: now,
        updated_at: now,
    }
}

fn delivery() -> Delivery {
    let now = Utc::now();
    Delivery {
        id: "dlv_1".into(),
        tenant_id: "ten_a".into(),
        event_id: "evt_1".into(),
        subscription_id: "sub_1".into(),
        state: DeliveryState::Dead,
        attempt_count: 1,
        next_attempt_at: now,
        ordering_key: None,
        event_type: "user.new".into(),
        last_status_code: Some(500),
        last_error: None,
        created_at: now,
    }
}

async fn body_of(response: Response) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn every_template_renders_and_escapes() {
    let signed = signed();
    let s = subscription();
    let now = Utc::now();
    let mut form = WebhookForm::from_subscription(&s);
    form.set_error(&crate::domain::validate::Invalid::new(
        "url",
        "scheme must be http or https",
    ));
    let choices = type_choices(&[("user.new".into(), 2)], &form.event_types);
    let pages = [
        render(
            Some(&signed),
            Some(Notice::ok("saved").with_link("/x", "see")),
            "webhooks",
            StatusCode::OK,
            "webhooks.html",
            serde_json::json!({ "webhooks": vec![SubscriptionView::new(&s, now)] }),
        ),
        render(
            Some(&signed),
            None,
            "webhooks",
            StatusCode::OK,
            "new.html",
            serde_json::json!({ "form": &form, "choices": &choices }),
        ),
        render(
            Some(&signed),
            None,
            "webhooks",
            StatusCode::OK,
            "webhook.html",
            serde_json::json!({ "webhook_view": SubscriptionView::new(&s, now), "form": &form, "choices": &choices, "deliveries": vec![DeliveryView::new(&delivery(), now)], "filters": vec![("all", "All", true), ("dead", "Dead", false)], "filter": "all", "next_page": Some("dlv_0"), "paged": true, "secret": Some("whsec_x"), "secret_note": "" }),
        ),
        render(
            Some(&signed),
            None,
            "webhooks",
            StatusCode::OK,
            "delivery.html",
            serde_json::json!({ "delivery": DeliveryView::new(&delivery(), now), "attempts": Vec::<()>::new(), "payload": "{}", "webhook_name": "CRM" }),
        ),
        render(
            Some(&signed),
            None,
            "live",
            StatusCode::OK,
            "live.html",
            serde_json::json!({ "subscription": "sub_1" }),
        ),
        render(
            None,
            None,
            "",
            StatusCode::OK,
            "login.html",
            serde_json::json!({ "csrf": "t", "error": "token: nope" }),
        ),
        render(
            None,
            None,
            "",
            StatusCode::OK,
            "linked.html",
            serde_json::json!({}),
        ),
        failure(Some(&signed), StatusCode::NOT_FOUND, "Not found", "gone"),
    ];
    for page in pages {
        assert_eq!(page.status(), StatusCode::OK.max(page.status()));
        let html = body_of(page).await;
        assert!(html.contains("</html>"), "{html}");
        assert!(!html.contains("internal error"), "{html}");
        assert!(!html.contains("CRM <sync>"), "unescaped: {html}");
    }
    let html = body_of(render(
        Some(&signed),
        None,
        "webhooks",
        StatusCode::OK,
        "new.html",
        serde_json::json!({ "form": &form, "choices": &choices }),
    ))
    .await;
    assert!(html.contains(
        r#"<p class="error" id="url-error" data-field="url">scheme must be http or https</p>"#
    ));
    assert!(html.contains(&signed.session.csrf));
    // The header names the tenant by its name (escaped), its id only in the tooltip.
    assert!(
        html.contains(
            r#"title="The tenant this session belongs to (ten_a)">Acme &lt;Corp&gt;</span>"#
        ),
        "{html}"
    );
}

#[test]
fn cookies_are_found_by_name() {
    let mut headers = HeaderMap::new();
    headers.append(
        header::COOKIE,
        HeaderValue::from_static("a=1; herald_session=abc; b=2"),
    );
    headers.append(header::COOKIE, HeaderValue::from_static("herald_login=xyz"));
    assert_eq!(cookie(&headers, SESSION_COOKIE).as_deref(), Some("abc"));
    assert_eq!(cookie(&headers, LOGIN_COOKIE).as_deref(), Some("xyz"));
    assert_eq!(cookie(&headers, "herald"), None);
}

#[test]
fn cookies_are_http_only_strict_and_secure_with_tls() {
    let plain = set_cookie(SESSION_COOKIE, "v", "/", 60, false);
    assert_eq!(
        plain.to_str().expect("ascii"),
        "herald_session=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict"
    );
    let tls = set_cookie(SESSION_COOKIE, "v", "/", 60, true);
    assert!(tls.to_str().expect("ascii").ends_with("; Secure"));
}

#[tokio::test]
async fn links_need_a_running_console_and_a_ttl_in_range() {
    let (sessions, _dir) = session::tests::sessions().await;
    assert!(matches!(
        sessions.create_link("ten_a", 0, "tok_admin").await,
        Err(crate::service::Error::FailedPrecondition(_))
    ));
    sessions.set_base_url(Some("http://127.0.0.1:50052".into()));
    let (url, expires_at) = sessions
        .create_link("ten_a", 0, "tok_admin")
        .await
        .expect("link");
    assert!(url.starts_with("http://127.0.0.1:50052/login/link?token="));
    let ttl = expires_at - Utc::now();
    assert!(ttl > chrono::Duration::seconds(590) && ttl <= chrono::Duration::seconds(600));
    let token = url.rsplit('=').next().expect("token");
    assert_eq!(
        sessions.redeem_link(token).await.expect("redeem"),
        Some(("ten_a".to_owned(), "tok_admin".to_owned()))
    );
    assert!(matches!(
        sessions.create_link("ten_a", 3601, "tok_admin").await,
        Err(crate::service::Error::Invalid(_))
    ));
}

#[test]
fn unspecified_binds_become_loopback_in_links() {
    assert_eq!(
        reachable("0.0.0.0:50052".parse().expect("addr")).to_string(),
        "127.0.0.1:50052"
    );
    assert_eq!(
        reachable("10.1.2.3:50052".parse().expect("addr")).to_string(),
        "10.1.2.3:50052"
    );
}
