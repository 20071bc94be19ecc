//! The web console: in headless Chromium (Debian's `chromium` and `chromium-driver`) driven over
//! WebDriver, and with raw HTTP for what a browser would never send (forged forms). Screenshots
//! of every page land in `target/console-screenshots/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use herald_client::{HeraldClient, v1 as pb};
use herald_tests::{Backend, Herald, Receiver, TestDatabase, eventually, harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page may take to show what a step waits for.
const WAIT: Duration = Duration::from_secs(20);

/// A control plane with its console on a port of its own.
async fn herald_with_console() -> (Herald, SocketAddr) {
    let herald = Herald::builder(Backend::Sqlite)
        .configure(|c| c.console_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    let addr = herald.running.as_ref().unwrap().console_addr.unwrap();
    (herald, addr)
}

/// A tenant with a token: (tenant id, plaintext token, client).
async fn tenant_with_token(herald: &Herald, name: &str) -> (String, String, HeraldClient) {
    let (tenant, token) = harness::create_tenant(&herald.admin(), name, "console").await;
    let client = herald.client(&token);
    (tenant.id, token, client)
}

async fn subscriptions(client: &HeraldClient) -> Vec<pb::Subscription> {
    client
        .subscriptions()
        .list_subscriptions(pb::ListSubscriptionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .subscriptions
}

fn user_new() -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "user.new".into(),
        payload: r#"{"entity_id":1,"entity_type":"user","action_type":"new","result":{"id":1,"name_first":"Guan"}}"#.into(),
        entity_type: "user".into(),
        entity_id: "1".into(),
        action: "new".into(),
        ..Default::default()
    }
}

/// Where the screenshots go: `target/console-screenshots`.
fn screenshot_dir() -> PathBuf {
    let dir = herald_tests::harness::bin_dir()
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium through a chromedriver child process (killed on drop).
struct Browser {
    client: Client,
    base: String,
    shots: PathBuf,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(console: SocketAddr) -> Self {
        Self::start_with(&format!("http://{console}")).await
    }

    /// Starts a browser for the console at `base` (`https://…` trusts any certificate).
    async fn start_with(base: &str) -> Self {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(path).exists(),
                "{path} is missing: the console's browser tests need Debian's Chromium and its \
                 WebDriver; install them with `apt-get install -y chromium chromium-driver` \
                 (scripts/test, the README's test command, does this when they are missing)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            // Its own process group, so a failed test takes Chromium down with it (see Drop).
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {CHROMEDRIVER}: {err}"));
        let profile = tempfile::tempdir().unwrap();
        let capabilities: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({
                "browserName": "chrome",
                "acceptInsecureCerts": base.starts_with("https://"),
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-dev-shm-usage",
                        format!("--user-data-dir={}", profile.path().display()),
                        "--window-size=1280,900",
                        "--hide-scrollbars",
                        "--no-first-run",
                        "--disable-sync",
                        "--disable-component-update",
                        "--disable-default-apps",
                        "--disable-extensions",
                        // Traffic only to loopback: any other host name fails to resolve.
                        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                    ],
                },
            }))
            .unwrap();
        let webdriver = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => break client,
                Err(err) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "chromedriver on port {port} did not start a Chromium session: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Self {
            client,
            base: base.to_owned(),
            shots: screenshot_dir(),
            driver,
            _profile: profile,
        }
    }

    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
    }

    /// The current path and query.
    async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
    }

    /// Waits until the path satisfies `pred`; returns it.
    async fn wait_path(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually(what, WAIT, || async {
            let path = self.path().await;
            pred(&path).then_some(path)
        })
        .await
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no element {css} on {}: {err}", self.base))
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    async fn fill(&self, css: &str, value: &str) {
        let input = self.find(css).await;
        input.clear().await.unwrap();
        input.send_keys(value).await.unwrap();
    }

    /// Waits until the element's text contains `needle`, reloading the page between looks
    /// when `reload` is set. Returns the text.
    async fn wait_text(&self, css: &str, needle: &str, reload: bool) -> String {
        eventually(&format!("{needle:?} in {css}"), WAIT, || async {
            if reload {
                self.client.refresh().await.unwrap();
            }
            let found = self.client.find(Locator::Css(css)).await.ok()?;
            let text = found.text().await.ok()?;
            text.contains(needle).then_some(text)
        })
        .await
    }

    /// Saves a screenshot of the whole page as `<name>.png`.
    async fn shot(&self, name: &str) {
        let height = self
            .client
            .execute("return document.documentElement.scrollHeight", vec![])
            .await
            .unwrap()
            .as_u64()
            .unwrap_or(900)
            .clamp(600, 4000);
        self.client
            .set_window_size(1280, u32::try_from(height).unwrap() + 140)
            .await
            .unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
        self.client.set_window_size(1280, 900).await.unwrap();
    }

    async fn sign_in(&self, token: &str) {
        self.goto("/").await;
        self.wait_path("the sign-in page", |p| p == "/login").await;
        self.fill("#token", token).await;
        self.click("form[action='/login'] button[type=submit]")
            .await;
        self.wait_path("the webhooks list", |p| p == "/").await;
        self.find("#new-webhook").await;
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_creates_tests_disables_and_retries_a_webhook() {
    let (herald, console) = herald_with_console().await;
    let receiver = Receiver::start().await;
    let (_tenant_id, token, client) = tenant_with_token(&herald, "acme").await;
    let browser = Browser::start(console).await;

    // Sign in with a tenant token.
    browser.goto("/").await;
    browser
        .wait_path("the sign-in page", |p| p == "/login")
        .await;
    browser.shot("01-sign-in").await;
    browser.sign_in(&token).await;
    assert!(browser.text("main").await.contains("No webhooks yet"));
    // The header names the tenant, not its id.
    assert_eq!(browser.text("header .tenant").await, "acme");
    browser.shot("02-webhooks-empty").await;

    // Bad input: the URL's error next to the URL field, and nothing created.
    browser.click("#new-webhook").await;
    browser
        .wait_path("the new webhook form", |p| p == "/webhooks/new")
        .await;
    browser.shot("03-new-webhook").await;
    browser.fill("#name", "CRM sync").await;
    browser.fill("#url", "ftp://x").await;
    browser.fill("#more_event_types", "user.*").await;
    browser.click("#save").await;
    let error = browser.text("#url-error").await;
    assert_eq!(error, "scheme must be http or https");
    let field = browser
        .find("#url-error")
        .await
        .attr("data-field")
        .await
        .unwrap();
    assert_eq!(field.as_deref(), Some("url"));
    // The form keeps what was typed.
    let kept = browser.find("#name").await.prop("value").await.unwrap();
    assert_eq!(kept.as_deref(), Some("CRM sync"));
    browser.shot("04-new-webhook-error").await;
    assert!(subscriptions(&client).await.is_empty());

    // A good one, with a single attempt per delivery.
    browser.fill("#url", &receiver.url("/hooks")).await;
    browser.fill("#api_key", "sk_live_1234").await;
    browser.click("details.advanced summary").await;
    browser.fill("#max_attempts", "1").await;
    browser.click("#save").await;
    let path = browser
        .wait_path("the new webhook's page", |p| {
            p.starts_with("/webhooks/sub_")
        })
        .await;
    let sub_id = path.trim_start_matches("/webhooks/").to_owned();
    assert!(browser.text("#notice").await.contains("created"));
    let created = subscriptions(&client).await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].id, sub_id);
    assert_eq!(created[0].url, receiver.url("/hooks"));
    assert_eq!(created[0].event_types, vec!["user.*"]);
    assert_eq!(created[0].max_attempts, 1);
    assert_eq!(created[0].api_key_hint, "1234");

    // "Send test webhook": the receiver gets it, the page says so and the log shows it.
    browser.click("#send-test").await;
    let notice = browser
        .wait_text("#test-result", "Test webhook delivered: HTTP 200", false)
        .await;
    assert!(notice.contains("View delivery"), "{notice}");
    browser.shot("05-test-webhook-sent").await;
    let got = receiver.wait_for(1, WAIT).await;
    assert_eq!(got[0].path, "/hooks");
    assert_eq!(got[0].header("x-api-key"), Some("sk_live_1234"));
    assert!(String::from_utf8_lossy(&got[0].body).contains(r#""type":"test""#));
    let row = browser
        .wait_text("#deliveries tbody tr", "HTTP 200", true)
        .await;
    assert!(row.contains("Succeeded") && row.contains("test"), "{row}");

    // Disable it: a publish creates no delivery for it.
    browser.click("#active").await;
    browser.click("#save").await;
    browser.wait_text("#active-badge", "Inactive", false).await;
    assert!(browser.text("#notice").await.contains("inactive"));
    let published = client.publish(user_new()).await.unwrap();
    assert!(published.delivery_ids.is_empty(), "{published:?}");
    let log = client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            subscription_id: sub_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(log.len(), 1, "only the test delivery: {log:?}");
    browser.goto("/").await;
    let listed = browser.text(&format!("tr[data-webhook='{sub_id}']")).await;
    assert!(
        listed.contains("CRM sync") && listed.contains("Inactive"),
        "{listed}"
    );
    assert!(
        listed.contains("Succeeded") && listed.contains("HTTP 200"),
        "{listed}"
    );
    browser.shot("06-webhooks-list").await;

    // Active again; the receiver fails; the dead delivery shows in the log and Retry sends it.
    browser.goto(&format!("/webhooks/{sub_id}")).await;
    browser.click("#active").await;
    browser.click("#save").await;
    browser.wait_text("#active-badge", "Active", false).await;
    receiver.default_reply(500);
    let published = client.publish(user_new()).await.unwrap();
    assert_eq!(published.delivery_ids.len(), 1);
    let delivery_id = published.delivery_ids[0].clone();
    eventually("the delivery to go dead", WAIT, || async {
        let d = client
            .deliveries()
            .get_delivery(pb::GetDeliveryRequest {
                id: delivery_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        (d.state == pb::DeliveryState::Dead as i32).then_some(())
    })
    .await;
    browser
        .goto(&format!("/webhooks/{sub_id}?state=dead"))
        .await;
    let row = browser
        .text(&format!("tr[data-delivery='{delivery_id}']"))
        .await;
    assert!(row.contains("Dead") && row.contains("HTTP 500"), "{row}");
    assert_eq!(
        browser.find_all_count("#deliveries tbody tr").await,
        1,
        "the dead filter shows only the dead delivery"
    );
    browser.shot("07-dead-delivery").await;
    receiver.default_reply(200);
    browser
        .click(&format!("button[data-retry='{delivery_id}']"))
        .await;
    browser
        .wait_path("the delivery's page", |p| {
            p == format!("/deliveries/{delivery_id}")
        })
        .await;
    assert!(browser.text("#notice").await.contains("Retry scheduled"));
    browser
        .wait_text("#delivery-state", "Succeeded", true)
        .await;
    let attempts = browser
        .client
        .find_all(Locator::Css("li.attempt"))
        .await
        .unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        attempts[0].attr("data-status").await.unwrap().as_deref(),
        Some("500")
    );
    assert_eq!(
        attempts[1].attr("data-status").await.unwrap().as_deref(),
        Some("200")
    );
    assert!(attempts[0].text().await.unwrap().contains("HTTP 500"));
    browser.shot("08-delivery-detail").await;
    let got = receiver.wait_for(3, WAIT).await;
    assert_eq!(got[1].header("webhook-id"), got[2].header("webhook-id"));
    assert_eq!((got[1].status, got[2].status), (500, 200));

    // The webhook's page with its log (the README's screenshot).
    browser.goto(&format!("/webhooks/{sub_id}")).await;
    browser.wait_text("#deliveries", "HTTP 200", false).await;
    browser.shot("09-webhook-detail").await;

    // Reveal: the secret on the page, not in the URL.
    browser.click("#reveal").await;
    let shown = browser.text("#signing-secret").await;
    let secret = client
        .subscriptions()
        .get_subscription_secret(pb::GetSubscriptionSecretRequest {
            id: sub_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .signing_secret;
    assert_eq!(shown, secret);
    assert!(!browser.path().await.contains("whsec_"));
    browser.shot("10-secret-revealed").await;

    // The live view shows attempts as they are recorded.
    browser.goto("/live").await;
    browser.find("#live-status[data-state='open']").await;
    client
        .deliveries()
        .send_test_event(pb::SendTestEventRequest {
            subscription_id: sub_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    browser.wait_text("#live-rows", "HTTP 200", false).await;
    browser.shot("11-live").await;

    browser.close().await;
    herald.stop().await;
}

impl Drop for Browser {
    /// Kills chromedriver and the Chromium it started (after a normal `close` Chromium is gone
    /// already; after a panic it would outlive the test).
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Browser {
    async fn find_all_count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.unwrap().len()
    }
}

/// The filter editor's preview runs the form's filters against the tenant's latest events
/// (and shows a bad filter's error beside it); header rows are saved with a secret value that
/// no page shows again; an Ed25519 webhook shows its public key, and a rotation to HMAC keeps
/// both keys signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_edits_filters_headers_and_the_signature_scheme() {
    let (herald, console) = herald_with_console().await;
    let receiver = Receiver::start().await;
    let (_tenant_id, token, client) = tenant_with_token(&herald, "acme").await;
    let order = |amount: u32| pb::PublishEventRequest {
        event_type: "order.paid".into(),
        payload: format!(r#"{{"amount": {amount}, "currency": "EUR"}}"#),
        ..Default::default()
    };
    for request in [order(50), order(150), user_new()] {
        client.publish(request).await.unwrap();
    }
    let browser = Browser::start(console).await;
    browser.sign_in(&token).await;
    browser.goto("/webhooks/new").await;
    browser.fill("#name", "Big orders").await;
    browser.fill("#url", &receiver.url("/orders")).await;

    // A bad filter: its error beside the field, no preview, nothing created.
    browser
        .fill("#payload_filter", r#"{"amount": {"$gt": true}}"#)
        .await;
    browser.click("#preview-filter").await;
    let error = browser.text("#payload_filter-error").await;
    assert_eq!(error, "$gt needs a number or string at amount");
    assert!(subscriptions(&client).await.is_empty());

    // The preview: 1 of the last 3 events matches; the form keeps what was typed.
    browser
        .fill("#payload_filter", r#"{"amount": {"$gte": 100}}"#)
        .await;
    browser.click("#preview-filter").await;
    let preview = browser
        .wait_text("#filter-preview", "of the last 3", false)
        .await;
    assert!(preview.contains("1 of the last 3"), "{preview}");
    let matched = browser
        .client
        .find_all(Locator::Css("#filter-preview li[data-matched=true]"))
        .await
        .unwrap();
    assert_eq!(
        matched.len(),
        1,
        "{}",
        browser
            .find("#filter-preview")
            .await
            .html(false)
            .await
            .unwrap()
    );
    assert!(matched[0].text().await.unwrap().contains("order.paid"));
    assert_eq!(
        browser
            .find("#name")
            .await
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("Big orders")
    );
    // With the event types narrowed to user.*, nothing matches.
    browser.fill("#more_event_types", "user.*").await;
    browser.click("#preview-filter").await;
    let preview = browser
        .wait_text("#filter-preview", "0 of the last 3", false)
        .await;
    assert!(preview.contains("0 of the last 3"), "{preview}");
    browser.fill("#more_event_types", "order.*").await;
    browser.click("#preview-filter").await;
    browser
        .wait_text("#filter-preview", "1 of the last 3", false)
        .await;
    browser.shot("14-filter-preview").await;

    // Headers (one secret) and Ed25519.
    browser.fill("input[name=header_name_0]", "X-Tenant").await;
    browser.fill("input[name=header_value_0]", "acme").await;
    browser
        .fill("input[name=header_name_1]", "X-Shared-Key")
        .await;
    browser
        .fill("input[name=header_value_1]", "s3cr3t-value")
        .await;
    browser.click("input[name=header_secret_1]").await;
    browser
        .click("#signature_scheme option[value=ed25519]")
        .await;
    browser.click("#save").await;
    let path = browser
        .wait_path("the new webhook's page", |p| {
            p.starts_with("/webhooks/sub_")
        })
        .await;
    let sub_id = path.trim_start_matches("/webhooks/").to_owned();
    let sub = &subscriptions(&client).await[0];
    assert_eq!(sub.id, sub_id);
    assert_eq!(sub.signature_scheme, pb::SignatureScheme::Ed25519 as i32);
    assert_eq!(sub.payload_filter, r#"{"amount": {"$gte": 100}}"#);
    assert_eq!(
        (sub.headers[0].name.as_str(), sub.headers[0].value.as_str()),
        ("X-Tenant", "acme")
    );
    assert!(sub.headers[1].secret && sub.headers[1].value_hint == "alue");
    assert_eq!(browser.text("#signature-scheme").await, "Ed25519");
    assert_eq!(
        browser.text("#signing-public-key").await,
        sub.signing_public_key
    );
    let page = browser.client.source().await.unwrap();
    assert!(!page.contains("s3cr3t-value"), "a secret value on a page");
    assert!(!page.contains("whsk_"), "a private key on a page");
    let placeholder = browser
        .find("input[name=header_value_1]")
        .await
        .attr("placeholder")
        .await
        .unwrap();
    assert_eq!(placeholder.as_deref(), Some("unchanged (ends in alue)"));
    browser.shot("15-ed25519-headers").await;

    // Saving the form unchanged keeps the secret header's value.
    browser.click("#save").await;
    browser.wait_text("main", "Saved.", false).await;
    client.publish(order(200)).await.unwrap();
    let got = receiver.wait_for(1, WAIT).await;
    assert_eq!(got[0].header("x-tenant"), Some("acme"));
    assert_eq!(got[0].header("x-shared-key"), Some("s3cr3t-value"));
    let public_key = herald_proto::webhook::PublicKey::parse(&sub.signing_public_key).unwrap();
    let verify = |request: &herald_tests::Received, key: &dyn herald_proto::webhook::Verify| {
        herald_proto::webhook::verify(
            key,
            request.header("webhook-id"),
            request.header("webhook-timestamp"),
            request.header("webhook-signature"),
            &request.body,
            chrono::Utc::now().timestamp(),
            300,
        )
    };
    assert_eq!(verify(&got[0], &public_key), Ok(()));

    // Rotate to HMAC: the page shows the new secret; both keys sign during the grace period.
    browser
        .client
        .execute("window.confirm = () => true", vec![])
        .await
        .unwrap();
    browser.click("#scheme option[value=hmac]").await;
    browser.click("#rotate").await;
    let secret = browser.text("#signing-secret").await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(browser.text("#signature-scheme").await, "HMAC-SHA256");
    client.publish(order(300)).await.unwrap();
    let got = receiver.wait_for(2, WAIT).await;
    let secret = herald_proto::webhook::Secret::parse(&secret).unwrap();
    assert_eq!(verify(&got[1], &public_key), Ok(()));
    assert_eq!(verify(&got[1], &secret), Ok(()));
    browser.shot("16-rotated-to-hmac").await;
    browser.close().await;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_keeps_tenants_apart_and_links_sign_in_once() {
    let (herald, console) = herald_with_console().await;
    let receiver = Receiver::start().await;
    let (a_id, _, a) = tenant_with_token(&herald, "acme").await;
    let (_, b_token, _) = tenant_with_token(&herald, "globex").await;
    let a_sub = a
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            name: "Acme CRM".into(),
            url: receiver.url("/a"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let a_test = a
        .deliveries()
        .send_test_event(pb::SendTestEventRequest {
            subscription_id: a_sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let browser = Browser::start(console).await;

    // Tenant B sees none of A's webhooks, and A's ids are not found.
    browser.sign_in(&b_token).await;
    let source = browser.client.source().await.unwrap();
    assert!(source.contains("No webhooks yet"));
    assert!(!source.contains(&a_sub.id) && !source.contains("Acme CRM"));
    for path in [
        format!("/webhooks/{}", a_sub.id),
        format!("/deliveries/{}", a_test.delivery_id),
        format!("/live?subscription={}", a_sub.id),
    ] {
        browser.goto(&path).await;
        assert_eq!(browser.text("h1").await, "Not found", "{path}");
        assert!(!browser.client.source().await.unwrap().contains("Acme CRM"));
    }
    browser.shot("12-other-tenant-not-found").await;
    let session = browser
        .client
        .get_named_cookie("herald_session")
        .await
        .unwrap();
    let session = format!("herald_session={}", session.value());
    for path in [
        format!("/webhooks/{}", a_sub.id),
        format!("/deliveries/{}", a_test.delivery_id),
    ] {
        assert_eq!(http(console, "GET", &path, &session, "").await.status, 404);
    }
    // Actions on A's ids are not found either, and change nothing.
    let page = http(console, "GET", "/", &session, "").await;
    let csrf = page.csrf();
    let forged = http(
        console,
        "POST",
        &format!("/webhooks/{}/delete", a_sub.id),
        &session,
        &form(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(forged.status, 404);
    assert_eq!(subscriptions(&a).await.len(), 1);

    // A console link from CreateConsoleSession signs in once.
    let admin = herald.admin();
    let link = admin
        .admin()
        .create_console_session(pb::CreateConsoleSessionRequest {
            tenant_id: a_id.clone(),
            ttl_s: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        link.url
            .starts_with(&format!("http://{console}/login/link?token=")),
        "{}",
        link.url
    );
    let ttl = link.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((590..=600).contains(&ttl), "{ttl}");
    browser.client.delete_all_cookies().await.unwrap();
    browser.client.goto(&link.url).await.unwrap();
    browser
        .wait_path("the webhooks list after the link", |p| p == "/")
        .await;
    let listed = browser.text("#webhooks").await;
    assert!(listed.contains("Acme CRM"), "{listed}");
    browser.shot("13-signed-in-by-link").await;
    browser.client.delete_all_cookies().await.unwrap();
    browser.client.goto(&link.url).await.unwrap();
    assert_eq!(browser.text("h1").await, "Link expired");
    browser.goto("/").await;
    browser
        .wait_path("the sign-in page after a used link", |p| p == "/login")
        .await;

    // Only admins mint links, for tenants that exist, for at most an hour.
    let refused = a
        .admin()
        .create_console_session(pb::CreateConsoleSessionRequest {
            tenant_id: a_id.clone(),
            ttl_s: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = admin
        .admin()
        .create_console_session(pb::CreateConsoleSessionRequest {
            tenant_id: "ten_nobody".into(),
            ttl_s: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let refused = admin
        .admin()
        .create_console_session(pb::CreateConsoleSessionRequest {
            tenant_id: a_id,
            ttl_s: 3601,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().starts_with("ttl_s:"),
        "{}",
        refused.message()
    );

    browser.close().await;
    herald.stop().await;
}

/// A response read off a raw HTTP/1.1 connection.
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn set_cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .find(|v| v.starts_with(&format!("{name}=")))
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let marker = r#"name="csrf" value=""#;
        let start = self.body.find(marker).expect("a csrf field") + marker.len();
        let end = self.body[start..].find('"').unwrap();
        self.body[start..start + end].to_owned()
    }
}

/// Sends one request on a fresh connection (`Connection: close`) and reads the whole response.
async fn http(addr: SocketAddr, method: &str, path: &str, cookie: &str, form: &str) -> Http {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !cookie.is_empty() {
        request.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    if method == "POST" {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(form);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Http {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_refuses_forged_forms_and_admin_tokens() {
    let (herald, console) = herald_with_console().await;
    let (_, token, client) = tenant_with_token(&herald, "acme").await;

    // Every response carries the security headers; the sign-in form sets its CSRF cookie.
    let login = http(console, "GET", "/login", "", "").await;
    assert_eq!(login.status, 200);
    assert_eq!(
        login
            .header("content-security-policy")
            .unwrap()
            .split("; ")
            .take(6)
            .collect::<Vec<_>>(),
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "frame-ancestors 'self'"
        ]
    );
    assert_eq!(login.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(login.header("referrer-policy"), Some("no-referrer"));
    let login_cookie = login.set_cookie("herald_login").unwrap();
    assert!(login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"));
    let login_cookie = login_cookie.split(';').next().unwrap().to_owned();
    let login_csrf = login.csrf();

    // Admin tokens are refused: the console is for tenants.
    let refused = http(
        console,
        "POST",
        "/login",
        &login_cookie,
        &form(&[("csrf", &login_csrf), ("token", &herald.admin_token)]),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("the console is for tenants"));
    assert!(refused.set_cookie("herald_session").is_none());
    // A sign-in form from elsewhere (no CSRF cookie) is refused.
    let refused = http(
        console,
        "POST",
        "/login",
        "",
        &form(&[("csrf", &login_csrf), ("token", &token)]),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(refused.set_cookie("herald_session").is_none());

    let signed = http(
        console,
        "POST",
        "/login",
        &login_cookie,
        &form(&[("csrf", &login_csrf), ("token", &token)]),
    )
    .await;
    assert_eq!(signed.status, 303);
    assert_eq!(signed.header("location"), Some("/"));
    let session = signed.set_cookie("herald_session").unwrap();
    assert!(session.contains("HttpOnly"), "{session}");
    assert!(session.contains("SameSite=Strict"), "{session}");
    assert!(session.contains("Path=/;"), "{session}");
    assert!(!session.contains("Secure"), "no TLS here: {session}");
    let session = session.split(';').next().unwrap().to_owned();
    let page = http(console, "GET", "/", &session, "").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let csrf = page.csrf();

    // Forms without the session's CSRF token are refused and change nothing.
    let fields = [
        ("name", "forged"),
        ("url", "http://127.0.0.1:9/forged"),
        ("active", "on"),
    ];
    let without = http(console, "POST", "/webhooks", &session, &form(&fields)).await;
    assert_eq!(without.status, 403, "{}", without.body);
    let mut wrong = fields.to_vec();
    wrong.push(("csrf", "not-the-token"));
    let wrong = http(console, "POST", "/webhooks", &session, &form(&wrong)).await;
    assert_eq!(wrong.status, 403);
    let mut login_token = fields.to_vec();
    login_token.push(("csrf", &login_csrf));
    let login_token = http(console, "POST", "/webhooks", &session, &form(&login_token)).await;
    assert_eq!(login_token.status, 403);
    assert!(subscriptions(&client).await.is_empty());

    // Bad input: 422, the problem next to the field, nothing created.
    let bad = http(
        console,
        "POST",
        "/webhooks",
        &session,
        &form(&[("csrf", &csrf), ("name", "x"), ("url", "ftp://x")]),
    )
    .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.body
            .contains(r#"id="url-error" data-field="url">scheme must be http or https</p>"#),
        "{}",
        bad.body
    );
    assert!(subscriptions(&client).await.is_empty());

    // With the token the same form works.
    let mut good = fields.to_vec();
    good.push(("csrf", &csrf));
    let created = http(console, "POST", "/webhooks", &session, &form(&good)).await;
    assert_eq!(created.status, 303, "{}", created.body);
    let listed = subscriptions(&client).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        created.header("location"),
        Some(format!("/webhooks/{}", listed[0].id).as_str())
    );

    // A bad edit changes nothing, not even its valid fields.
    let id = listed[0].id.clone();
    let bad = http(
        console,
        "POST",
        &format!("/webhooks/{id}"),
        &session,
        &form(&[
            ("csrf", &csrf),
            ("name", "renamed"),
            ("url", "http://127.0.0.1:9/forged"),
            ("max_attempts", "99"),
        ]),
    )
    .await;
    assert_eq!(bad.status, 422);
    assert!(
        bad.body.contains(
            r#"id="max_attempts-error" data-field="max_attempts">must be between 1 and 50"#
        ),
        "{}",
        bad.body
    );
    assert_eq!(subscriptions(&client).await[0].name, "forged");

    // A forged update and a forged delete change nothing either.
    let forged = http(
        console,
        "POST",
        &format!("/webhooks/{id}/delete"),
        &session,
        "",
    )
    .await;
    assert_eq!(forged.status, 403);
    assert_eq!(subscriptions(&client).await.len(), 1);

    // Without a session: to the sign-in page; after sign-out the old cookie is dead.
    let anonymous = http(console, "GET", &format!("/webhooks/{id}"), "", "").await;
    assert_eq!(anonymous.status, 303);
    assert_eq!(anonymous.header("location"), Some("/login"));
    let out = http(
        console,
        "POST",
        "/logout",
        &session,
        &form(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(out.status, 303);
    let after = http(console, "GET", "/", &session, "").await;
    assert_eq!(after.status, 303);
    assert_eq!(after.header("location"), Some("/login"));

    // The assets are Herald's own.
    let css = http(console, "GET", "/assets/console.css", "", "").await;
    assert_eq!(css.status, 200);
    assert_eq!(css.header("content-type"), Some("text/css"));
    let js = http(console, "GET", "/assets/console.js", "", "").await;
    assert_eq!(js.status, 200);
    assert!(js.body.contains("EventSource"));

    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_serves_https_with_secure_cookies_when_tls_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca = herald_tests::pki::Ca::new("console test CA");
    let server = ca.issue(&["127.0.0.1"], 1, dir.path(), "server");
    let herald = Herald::builder(Backend::Sqlite)
        .configure(|c| {
            c.console_listen = Some("127.0.0.1:0".parse().unwrap());
            c.tls_cert = Some(server.cert_path.clone());
            c.tls_key = Some(server.key_path.clone());
        })
        .start()
        .await;
    let running = herald.running.as_ref().unwrap();
    let console = running.console_addr.unwrap();
    let services = &running.services;
    let tenant = services.create_tenant("acme").await.unwrap();
    let (_, token) = services.create_token(&tenant.id, "console").await.unwrap();

    // Plain HTTP gets no page: the console speaks TLS only.
    let mut plain = tokio::net::TcpStream::connect(console).await.unwrap();
    plain
        .write_all(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(!String::from_utf8_lossy(&answer).contains("Sign in"));

    let browser = Browser::start_with(&format!("https://{console}")).await;
    browser.sign_in(&token).await;
    let cookie = browser
        .client
        .get_named_cookie("herald_session")
        .await
        .unwrap();
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    let (url, _) = services
        .console
        .create_link(&tenant.id, 60, "tok_configured_admin")
        .await
        .unwrap();
    assert!(
        url.starts_with(&format!("https://{console}/login/link?token=")),
        "{url}"
    );
    browser.client.delete_all_cookies().await.unwrap();
    browser.client.goto(&url).await.unwrap();
    browser
        .wait_path("the webhooks list after the link", |p| p == "/")
        .await;
    browser.find("#new-webhook").await;

    browser.close().await;
    herald.stop().await;
}

/// A console session lasts only as long as the token that opened it: revoking the tenant token
/// ends the browser session at its next request (no 12-hour grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_end_when_their_token_is_revoked() {
    let (herald, console) = herald_with_console().await;
    let (_, token, _) = tenant_with_token(&herald, "acme").await;
    let session = sign_in_over_http(console, &token).await;
    assert_eq!(http(console, "GET", "/", &session, "").await.status, 200);

    revoke_console_token(&herald).await;
    let after = http(console, "GET", "/", &session, "").await;
    assert_eq!(after.status, 303, "signed out: {}", after.body);
    assert_eq!(after.header("location"), Some("/login"));
    herald.stop().await;
}

/// Revokes the tenant token `tenant_with_token` made (named "console").
async fn revoke_console_token(herald: &Herald) {
    let admin = herald.admin();
    let token_id = admin
        .admin()
        .list_tokens(pb::ListTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .find(|t| t.name == "console")
        .unwrap()
        .id;
    admin
        .admin()
        .revoke_token(pb::RevokeTokenRequest { token_id })
        .await
        .unwrap();
}

/// Signs in with a tenant token over plain HTTP; returns the session cookie (`name=value`).
async fn sign_in_over_http(console: SocketAddr, token: &str) -> String {
    let login = http(console, "GET", "/login", "", "").await;
    let login_cookie = login
        .set_cookie("herald_login")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let signed = http(
        console,
        "POST",
        "/login",
        &login_cookie,
        &form(&[("csrf", &login.csrf()), ("token", token)]),
    )
    .await;
    assert_eq!(signed.status, 303, "{}", signed.body);
    signed
        .set_cookie("herald_session")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// Redeems a one-time link's token on `console`; returns the status and the session cookie.
async fn redeem(console: SocketAddr, link: &str) -> (u16, Option<String>) {
    let token = link.rsplit_once("token=").unwrap().1;
    let answer = http(
        console,
        "GET",
        &format!("/login/link?token={token}"),
        "",
        "",
    )
    .await;
    let cookie = answer
        .set_cookie("herald_session")
        .map(|c| c.split(';').next().unwrap().to_owned());
    (answer.status, cookie)
}

async fn console_link(herald: &Herald, tenant_id: &str) -> String {
    herald
        .admin()
        .admin()
        .create_console_session(pb::CreateConsoleSessionRequest {
            tenant_id: tenant_id.to_owned(),
            ttl_s: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .url
}

/// Starts a control plane with its console on `database`.
async fn console_on(backend: Backend, database: TestDatabase) -> (Herald, SocketAddr) {
    let herald = Herald::builder(backend)
        .configure(|c| c.console_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start_on(database)
        .await;
    let addr = herald.running.as_ref().unwrap().console_addr.unwrap();
    (herald, addr)
}

/// Sessions and one-time links live in the database: a restart keeps users signed in and a
/// link issued before it still works once; the notice left by an action survives too; sign-out
/// ends the session for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_and_links_survive_a_restart() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let (herald, console) = console_on(backend, TestDatabase::new(backend).await).await;
        let (tenant_id, token, _) = tenant_with_token(&herald, "acme").await;
        let session = sign_in_over_http(console, &token).await;
        let page = http(console, "GET", "/", &session, "").await;
        assert_eq!(page.status, 200, "{backend:?}");
        let link = console_link(&herald, &tenant_id).await;
        // An action leaves a notice for the next page; the restart comes in between.
        let created = http(
            console,
            "POST",
            "/webhooks",
            &session,
            &form(&[
                ("csrf", &page.csrf()),
                ("name", "CRM"),
                ("url", "http://127.0.0.1:9/hook"),
                ("event_type", "user.new"),
                ("active", "on"),
            ]),
        )
        .await;
        assert_eq!(created.status, 303, "{backend:?}: {}", created.body);

        let database = herald.stop_keeping_database().await;
        let (herald, console) = console_on(backend, database).await;
        let webhook = created.header("location").unwrap().to_owned();
        let after = http(console, "GET", &webhook, &session, "").await;
        assert_eq!(after.status, 200, "{backend:?}: still signed in");
        assert!(
            after.body.contains("\u{201c}CRM\u{201d} created."),
            "{backend:?}: the notice"
        );
        let again = http(console, "GET", &webhook, &session, "").await;
        assert!(
            !again.body.contains("\u{201c}CRM\u{201d} created."),
            "{backend:?}: shown once"
        );
        // Its CSRF token still matches: forms keep working across the restart.
        assert_eq!(again.csrf(), page.csrf(), "{backend:?}");

        let (status, linked) = redeem(console, &link).await;
        assert_eq!(status, 200, "{backend:?}: a link from before the restart");
        let linked = linked.unwrap();
        assert_eq!(http(console, "GET", "/", &linked, "").await.status, 200);
        assert_eq!(redeem(console, &link).await.0, 403, "{backend:?}: once");

        let out = http(
            console,
            "POST",
            "/logout",
            &session,
            &form(&[("csrf", &page.csrf())]),
        )
        .await;
        assert_eq!(out.status, 303, "{backend:?}");
        let database = herald.stop_keeping_database().await;
        let (herald, console) = console_on(backend, database).await;
        let ended = http(console, "GET", "/", &session, "").await;
        assert_eq!(ended.status, 303, "{backend:?}: signed out for good");
        assert_eq!(ended.header("location"), Some("/login"));
        assert_eq!(http(console, "GET", "/", &linked, "").await.status, 200);
        herald.stop().await;
    }
}

/// Two replicas on one PostgreSQL database serve the same sessions: a session opened on A works
/// on B; a link issued on A is redeemed on B, once across both; a sign-out on B ends the session
/// on A; revoking the token on A ends its sessions on B, and B's open live view ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_are_shared_by_replicas() {
    let (a, console_a) = console_on(
        Backend::Postgres,
        TestDatabase::new(Backend::Postgres).await,
    )
    .await;
    let (b, console_b) = console_on(Backend::Postgres, a.database.shared()).await;
    let (tenant_id, token, _) = tenant_with_token(&a, "acme").await;

    let session = sign_in_over_http(console_a, &token).await;
    let page = http(console_b, "GET", "/", &session, "").await;
    assert_eq!(page.status, 200, "a session from A on B");

    let link = console_link(&a, &tenant_id).await;
    let (status, linked) = redeem(console_b, &link).await;
    assert_eq!(status, 200);
    assert_eq!(
        redeem(console_a, &link).await.0,
        403,
        "once across replicas"
    );
    let linked = linked.unwrap();
    assert_eq!(http(console_a, "GET", "/", &linked, "").await.status, 200);

    let out = http(
        console_b,
        "POST",
        "/logout",
        &session,
        &form(&[("csrf", &page.csrf())]),
    )
    .await;
    assert_eq!(out.status, 303);
    assert_eq!(http(console_a, "GET", "/", &session, "").await.status, 303);

    // A live view open on B ends when the token behind its session is revoked on A.
    let second = sign_in_over_http(console_a, &token).await;
    let mut live = tokio::net::TcpStream::connect(console_b).await.unwrap();
    live.write_all(
        format!(
            "GET /live/events HTTP/1.1\r\nHost: {console_b}\r\nCookie: {second}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    live.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    revoke_console_token(&a).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), live.read_to_end(&mut rest))
        .await
        .expect("the live view ends within 10 s (the change channel)")
        .unwrap();
    assert_eq!(http(console_b, "GET", "/", &second, "").await.status, 303);
    b.stop_keeping_database().await;
    a.stop().await;
}
