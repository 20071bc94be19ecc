//! Delivery: agents, signed POSTs, retries, the delivery log.

use std::collections::HashSet;
use std::time::Duration;

use herald_client::HeraldClient;
use herald_client::v1 as pb;
use herald_tests::receiver::Reply;
use herald_tests::{Backend, Herald, Received, Receiver, both_backends, eventually, harness};

/// Creates a subscription to `url` for the tenant client.
pub async fn subscribe(
    client: &herald_client::HeraldClient,
    url: String,
    f: impl FnOnce(&mut pb::CreateSubscriptionRequest),
) -> pb::Subscription {
    let mut request = pb::CreateSubscriptionRequest {
        name: "hook".into(),
        url,
        api_key: "key-1234".into(),
        ..Default::default()
    };
    f(&mut request);
    client
        .subscriptions()
        .create_subscription(request)
        .await
        .unwrap()
        .into_inner()
}

pub fn user_new(id: u32) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "user.new".into(),
        payload: format!(r#"{{"entity_type":"user","entity_id":{id},"action_type":"new"}}"#),
        entity_type: "user".into(),
        entity_id: id.to_string(),
        action: "new".into(),
        ..Default::default()
    }
}

async fn builtin_agent_delivers_a_signed_webhook(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let published = client.publish(user_new(7)).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    let request = &got[0];
    assert_eq!(
        request.header("webhook-id"),
        Some(published.event_id.as_str())
    );
    assert_eq!(request.header("x-api-key"), Some("key-1234"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(&request.body[..], user_new(7).payload.as_bytes());
    let wh = standardwebhooks::Webhook::new(&sub.signing_secret).unwrap();
    wh.verify(&request.body, &request.headers).unwrap();
    herald.stop().await;
}
both_backends!(builtin_agent_delivers_a_signed_webhook);

/// How long any single wait of these tests may take.
const DEADLINE: Duration = Duration::from_secs(15);

pub fn company_new(id: u32) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "company.new".into(),
        payload: format!(r#"{{"entity_type":"company","entity_id":{id},"action_type":"new"}}"#),
        entity_type: "company".into(),
        entity_id: id.to_string(),
        action: "new".into(),
        ..Default::default()
    }
}

/// An event of entity `user:<user>` whose payload carries its sequence number.
fn user_update(user: u32, seq: u32) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "user.update".into(),
        payload: format!(r#"{{"entity":"user:{user}","seq":{seq}}}"#),
        entity_type: "user".into(),
        entity_id: user.to_string(),
        action: "update".into(),
        ..Default::default()
    }
}

/// A reply held open for `delay`.
pub(crate) fn held(status: u16, delay: Duration) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        delay,
    }
}

pub(crate) async fn get_delivery(client: &HeraldClient, id: &str) -> pb::Delivery {
    client
        .deliveries()
        .get_delivery(pb::GetDeliveryRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn get_subscription(client: &HeraldClient, id: &str) -> pb::Subscription {
    client
        .subscriptions()
        .get_subscription(pb::GetSubscriptionRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Lists a subscription's deliveries (`Unspecified`: every state).
async fn list_deliveries(
    client: &HeraldClient,
    subscription_id: &str,
    state: pb::DeliveryState,
    page_size: u32,
) -> pb::ListDeliveriesResponse {
    client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            subscription_id: subscription_id.into(),
            state: state as i32,
            page_size,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until a delivery is in `state`, and returns it with its attempts.
async fn delivery_in_state(
    client: &HeraldClient,
    id: &str,
    state: pb::DeliveryState,
) -> pb::Delivery {
    let what = format!("delivery {id} to be {}", state.as_str_name());
    eventually(&what, DEADLINE, move || async move {
        let delivery = get_delivery(client, id).await;
        (delivery.state() == state).then_some(delivery)
    })
    .await
}

async fn list_agents(herald: &Herald) -> Vec<pb::AgentInfo> {
    herald
        .admin()
        .admin()
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
}

/// Waits until `n` agents are connected.
pub(crate) async fn agents_connected(herald: &Herald, n: usize) -> Vec<pb::AgentInfo> {
    eventually(&format!("{n} connected agents"), DEADLINE, || async {
        let agents = list_agents(herald).await;
        (agents.len() == n).then_some(agents)
    })
    .await
}

/// The environment of a `herald-agent` process connected to `herald`.
pub(crate) fn agent_env(
    herald: &Herald,
    agent_id: &str,
    region: &str,
    allow: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_CONTROL_PLANE", herald.url()),
        ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
        ("HERALD_REGION", region.into()),
        ("HERALD_AGENT_ID", agent_id.into()),
        ("HERALD_ALLOW_DESTINATIONS", allow.into()),
    ]
}

pub(crate) fn webhook_ids(received: &[Received]) -> HashSet<String> {
    received
        .iter()
        .filter_map(|r| r.header("webhook-id"))
        .map(str::to_owned)
        .collect()
}

async fn retry_after_500_keeps_webhook_id_and_signs_afresh(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    receiver.script([500, 200]);
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let published = client.publish(user_new(1)).await.unwrap();
    assert_eq!(published.delivery_ids.len(), 1);

    let got = receiver.wait_for(2, DEADLINE).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 200]);
    let wh = standardwebhooks::Webhook::new(&sub.signing_secret).unwrap();
    for request in &got {
        assert_eq!(
            request.header("webhook-id"),
            Some(published.event_id.as_str())
        );
        wh.verify(&request.body, &request.headers).unwrap();
    }
    let timestamp = |r: &Received| {
        r.header("webhook-timestamp")
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    assert!(
        timestamp(&got[1]) >= timestamp(&got[0]),
        "the retry is signed at its own send time"
    );

    let delivery = delivery_in_state(
        &client,
        &published.delivery_ids[0],
        pb::DeliveryState::Succeeded,
    )
    .await;
    assert_eq!(delivery.attempt_count, 2);
    assert_eq!(delivery.webhook_id, published.event_id);
    let statuses: Vec<u32> = delivery.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(statuses, [500, 200], "attempts oldest first");
    for attempt in &delivery.attempts {
        assert_eq!(attempt.agent_id, "builtin");
        assert_eq!(attempt.region, "local");
        assert_eq!(attempt.error(), pb::AttemptError::None);
    }
    herald.stop().await;
}
both_backends!(retry_after_500_keeps_webhook_id_and_signs_afresh);

async fn retry_after_on_429_is_honoured(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    receiver.script([
        Reply {
            status: 429,
            headers: vec![("retry-after".into(), "2".into())],
            delay: Duration::ZERO,
        },
        Reply::from(200),
    ]);
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let published = client.publish(user_new(1)).await.unwrap();

    let got = receiver.wait_for(2, DEADLINE).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [429, 200]);
    let waited = got[1].at.duration_since(got[0].at);
    // The schedule says 100 ms; Retry-After says at least 2 s.
    assert!(
        waited >= Duration::from_secs(2),
        "the retry came {waited:?} after the 429"
    );
    let delivery = delivery_in_state(
        &client,
        &published.delivery_ids[0],
        pb::DeliveryState::Succeeded,
    )
    .await;
    assert_eq!(
        delivery
            .attempts
            .iter()
            .map(|a| a.status_code)
            .collect::<Vec<_>>(),
        [429, 200]
    );
    herald.stop().await;
}
both_backends!(retry_after_on_429_is_honoured);

async fn gone_disables_the_subscription(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    receiver.default_reply(410);
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    assert_eq!(sub.status(), pb::SubscriptionStatus::Enabled);
    let published = client.publish(user_new(1)).await.unwrap();

    let client_ref = &client;
    let sub_id = sub.id.as_str();
    let disabled = eventually(
        "the subscription to be disabled",
        DEADLINE,
        move || async move {
            let sub = get_subscription(client_ref, sub_id).await;
            (sub.status() == pb::SubscriptionStatus::Disabled).then_some(sub)
        },
    )
    .await;
    assert!(
        !disabled.disabled_reason.is_empty(),
        "a disabled subscription says why"
    );
    assert!(
        disabled.active,
        "Herald's status leaves the tenant's switch alone"
    );

    let delivery =
        delivery_in_state(&client, &published.delivery_ids[0], pb::DeliveryState::Dead).await;
    assert_eq!(
        delivery
            .attempts
            .iter()
            .map(|a| a.status_code)
            .collect::<Vec<_>>(),
        [410]
    );
    assert_eq!(receiver.received().len(), 1, "410 is not retried");

    let later = client.publish(user_new(2)).await.unwrap();
    assert!(
        later.delivery_ids.is_empty(),
        "a disabled subscription receives nothing: {:?}",
        later.delivery_ids
    );
    let listed = list_deliveries(&client, &sub.id, pb::DeliveryState::Unspecified, 0).await;
    assert_eq!(listed.deliveries.len(), 1);
    herald.stop().await;
}
both_backends!(gone_disables_the_subscription);

async fn failing_endpoint_is_disabled_then_enabled_and_replayed(backend: Backend) {
    let herald = Herald::builder(backend)
        .configure(|c| c.disable_after = Duration::from_millis(500))
        .start()
        .await;
    let receiver = Receiver::start().await;
    receiver.default_reply(500);
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |r| r.max_attempts = 50).await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut delivery_ids = Vec::new();
    for id in 1..=3 {
        let published = client.publish(user_new(id)).await.unwrap();
        assert_eq!(published.delivery_ids.len(), 1);
        delivery_ids.extend(published.delivery_ids);
    }

    let (client_ref, sub_id) = (&client, sub.id.as_str());
    eventually(
        "the subscription to be disabled with its 3 deliveries dead",
        DEADLINE,
        move || async move {
            let sub = get_subscription(client_ref, sub_id).await;
            let dead = list_deliveries(client_ref, sub_id, pb::DeliveryState::Dead, 0)
                .await
                .deliveries;
            (sub.status() == pb::SubscriptionStatus::Disabled && dead.len() == 3).then_some(())
        },
    )
    .await;
    let disabled = get_subscription(&client, &sub.id).await;
    assert!(!disabled.disabled_reason.is_empty());
    let dead: HashSet<String> = list_deliveries(&client, &sub.id, pb::DeliveryState::Dead, 0)
        .await
        .deliveries
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(dead, delivery_ids.iter().cloned().collect::<HashSet<_>>());
    assert!(receiver.received().iter().all(|r| r.status == 500));

    receiver.default_reply(200);
    let enabled = client
        .subscriptions()
        .enable_subscription(pb::EnableSubscriptionRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enabled.status(), pb::SubscriptionStatus::Enabled);
    assert!(enabled.disabled_reason.is_empty());
    let replayed = client
        .deliveries()
        .replay_deliveries(pb::ReplayDeliveriesRequest {
            subscription_id: sub.id.clone(),
            since: Some(herald_proto::timestamp(before)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.count, 3);

    let ok = eventually(
        "3 successful requests after the replay",
        DEADLINE,
        || async {
            let ok: Vec<Received> = receiver
                .received()
                .into_iter()
                .filter(|r| r.status == 200)
                .collect();
            (ok.len() >= 3).then_some(ok)
        },
    )
    .await;
    assert_eq!(ok.len(), 3);
    assert_eq!(
        webhook_ids(&ok).len(),
        3,
        "one request per event, each with its own webhook-id"
    );
    for id in &delivery_ids {
        let delivery = delivery_in_state(&client, id, pb::DeliveryState::Succeeded).await;
        assert_eq!(delivery.attempts.last().map(|a| a.status_code), Some(200));
    }
    herald.stop().await;
}
both_backends!(failing_endpoint_is_disabled_then_enabled_and_replayed);

async fn max_concurrency_is_never_exceeded(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let (_, client) = herald.tenant("acme").await;

    // A subscription limited to 2 requests at once, to a receiver that holds each 300 ms.
    let limited = Receiver::start().await;
    limited.default_reply(held(200, Duration::from_millis(300)));
    subscribe(&client, limited.url("/limited"), |r| {
        r.event_types = vec!["invoice.new".into()];
        r.max_concurrency = 2;
    })
    .await;
    let events = (1..=10)
        .map(|n| pb::PublishEventRequest {
            event_type: "invoice.new".into(),
            payload: format!(r#"{{"invoice":{n}}}"#),
            ..Default::default()
        })
        .collect();
    client
        .publish_many(pb::PublishEventsRequest { events })
        .await
        .unwrap();
    let got = limited.wait_for(10, DEADLINE).await;
    assert_eq!(webhook_ids(&got).len(), 10);
    assert!(
        limited.max_concurrent() <= 2,
        "{} requests were open at once",
        limited.max_concurrent()
    );
    assert_eq!(limited.max_concurrent(), 2, "the limit is used");

    // Isolation: a slow receiver does not delay another subscription of the same tenant.
    let slow = Receiver::start().await;
    slow.default_reply(held(200, Duration::from_secs(5)));
    let fast = Receiver::start().await;
    subscribe(&client, slow.url("/slow"), |r| {
        r.event_types = vec!["user.new".into()];
        r.timeout_ms = 1000;
    })
    .await;
    subscribe(&client, fast.url("/fast"), |r| {
        r.event_types = vec!["company.new".into()]
    })
    .await;
    client.publish(user_new(1)).await.unwrap();
    let slow_got = slow.wait_for(1, DEADLINE).await;
    client.publish(company_new(1)).await.unwrap();
    let fast_got = fast.wait_for(1, DEADLINE).await;
    assert!(
        slow.open_now() > 0,
        "the slow receiver still holds a request"
    );
    let after_slow = fast_got[0].at.duration_since(slow_got[0].at);
    assert!(
        after_slow < Duration::from_secs(1),
        "the fast receiver waited {after_slow:?}, past the slow one's 1 s timeout"
    );
    herald.stop().await;
}
both_backends!(max_concurrency_is_never_exceeded);

async fn ordered_subscription_keeps_entity_order_while_retrying(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    receiver.script([500]);
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |r| r.ordered = true).await;
    let events = vec![
        user_update(1, 1),
        user_update(1, 2),
        user_update(1, 3),
        user_update(2, 1),
        user_update(2, 2),
    ];
    let published = client
        .publish_many(pb::PublishEventsRequest { events })
        .await
        .unwrap();

    // Five successes and the one scripted failure.
    let got = receiver.wait_for(6, DEADLINE).await;
    let arrivals: Vec<(String, u64, u16)> = got
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            (
                body["entity"].as_str().unwrap().to_owned(),
                body["seq"].as_u64().unwrap(),
                r.status,
            )
        })
        .collect();
    assert_eq!(
        arrivals.iter().filter(|a| a.2 == 500).count(),
        1,
        "{arrivals:?}"
    );
    for (entity, count) in [("user:1", 3), ("user:2", 2)] {
        let of_entity: Vec<(u64, u16)> = arrivals
            .iter()
            .filter(|a| a.0 == entity)
            .map(|a| (a.1, a.2))
            .collect();
        let succeeded: Vec<u64> = of_entity
            .iter()
            .filter(|a| a.1 == 200)
            .map(|a| a.0)
            .collect();
        assert_eq!(
            succeeded,
            (1..=count).collect::<Vec<u64>>(),
            "{entity} in publish order: {arrivals:?}"
        );
        assert!(
            of_entity.windows(2).all(|pair| pair[0].0 <= pair[1].0),
            "{entity}: an event went out before an earlier one succeeded: {arrivals:?}"
        );
    }
    // The other entity did not wait for the failed one's retry.
    let failed = arrivals.iter().position(|a| a.2 == 500).unwrap();
    let (failed_entity, failed_seq) = (&arrivals[failed].0, arrivals[failed].1);
    let retry = arrivals
        .iter()
        .position(|a| a.0 == *failed_entity && a.1 == failed_seq && a.2 == 200)
        .unwrap();
    assert!(
        arrivals[..retry].iter().any(|a| a.0 != *failed_entity),
        "the other entity waited for {failed_entity}'s retry: {arrivals:?}"
    );
    for result in &published.results {
        delivery_in_state(
            &client,
            &result.delivery_ids[0],
            pb::DeliveryState::Succeeded,
        )
        .await;
    }
    herald.stop().await;
}
both_backends!(ordered_subscription_keeps_entity_order_while_retrying);

async fn send_test_event_reaches_an_inactive_subscription(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (tenant_id, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |r| {
        r.active = Some(false);
        r.event_types = vec!["company.*".into()];
    })
    .await;
    assert!(!sub.active);
    let test = client
        .deliveries()
        .send_test_event(pb::SendTestEventRequest {
            subscription_id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let got = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(got[0].header("webhook-id"), Some(test.event_id.as_str()));
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["type"], "test");
    assert_eq!(body["subscription_id"], sub.id.as_str());
    assert_eq!(body["tenant_id"], tenant_id.as_str());
    standardwebhooks::Webhook::new(&sub.signing_secret)
        .unwrap()
        .verify(&got[0].body, &got[0].headers)
        .unwrap();

    let listed = list_deliveries(&client, &sub.id, pb::DeliveryState::Unspecified, 0).await;
    assert_eq!(
        listed
            .deliveries
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>(),
        [test.delivery_id.as_str()]
    );
    delivery_in_state(&client, &test.delivery_id, pb::DeliveryState::Succeeded).await;

    let published = client.publish(company_new(1)).await.unwrap();
    assert!(
        published.delivery_ids.is_empty(),
        "an inactive subscription gets no events: {:?}",
        published.delivery_ids
    );
    herald.stop().await;
}
both_backends!(send_test_event_reaches_an_inactive_subscription);

async fn list_deliveries_is_newest_first_with_state_filter(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let mut published = Vec::new();
    for id in 1..=12 {
        published.push(client.publish(user_new(id)).await.unwrap().delivery_ids[0].clone());
    }
    receiver.wait_for(12, DEADLINE).await;
    let (client_ref, sub_id) = (&client, sub.id.as_str());
    eventually("12 succeeded deliveries", DEADLINE, move || async move {
        let first = list_deliveries(client_ref, sub_id, pb::DeliveryState::Succeeded, 100).await;
        (first.deliveries.len() == 12).then_some(())
    })
    .await;

    let page = list_deliveries(&client, &sub.id, pb::DeliveryState::Unspecified, 0).await;
    let ids: Vec<String> = page.deliveries.iter().map(|d| d.id.clone()).collect();
    let newest: Vec<String> = published.iter().rev().take(10).cloned().collect();
    assert_eq!(ids, newest, "the 10 newest, newest first");
    assert!(
        ids.windows(2).all(|pair| pair[0] > pair[1]),
        "ids descending: {ids:?}"
    );
    assert!(
        !page.next_page_token.is_empty(),
        "two more deliveries are on the next page"
    );

    let rest = client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            subscription_id: sub.id.clone(),
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rest_ids: Vec<String> = rest.deliveries.iter().map(|d| d.id.clone()).collect();
    assert_eq!(
        rest_ids,
        published.iter().take(2).rev().cloned().collect::<Vec<_>>()
    );
    assert!(rest.next_page_token.is_empty());

    let succeeded = list_deliveries(&client, &sub.id, pb::DeliveryState::Succeeded, 0).await;
    assert_eq!(
        succeeded
            .deliveries
            .iter()
            .map(|d| d.id.clone())
            .collect::<Vec<_>>(),
        newest
    );
    assert!(
        succeeded
            .deliveries
            .iter()
            .all(|d| d.state() == pb::DeliveryState::Succeeded)
    );
    let failed = list_deliveries(&client, &sub.id, pb::DeliveryState::Failed, 0).await;
    assert!(failed.deliveries.is_empty());
    assert!(failed.next_page_token.is_empty());
    herald.stop().await;
}
both_backends!(list_deliveries_is_newest_first_with_state_filter);

async fn watch_deliveries_streams_attempts(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    // Another tenant's attempts never show in this tenant's stream.
    let other_receiver = Receiver::start().await;
    let (_, other) = herald.tenant("globex").await;
    subscribe(&other, other_receiver.url("/other"), |_| {}).await;

    let mut stream = client
        .deliveries()
        .watch_deliveries(pb::WatchDeliveriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    other.publish(user_new(9)).await.unwrap();
    other_receiver.wait_for(1, DEADLINE).await;
    let published = client.publish(user_new(1)).await.unwrap();
    let delivery_id = published.delivery_ids[0].clone();

    let recorded = tokio::time::timeout(DEADLINE, async {
        loop {
            let message = stream.message().await.unwrap().expect("the stream ended");
            assert_eq!(
                message.subscription_id, sub.id,
                "only this tenant's attempts: {message:?}"
            );
            if message.delivery_id == delivery_id {
                return message;
            }
        }
    })
    .await
    .expect("no AttemptRecorded for the delivery within the deadline");
    assert_eq!(recorded.state(), pb::DeliveryState::Succeeded);
    assert_eq!(recorded.event_id, published.event_id);
    let attempt = recorded.attempt.expect("the attempt");
    assert_eq!(attempt.status_code, 200);
    assert_eq!(attempt.agent_id, "builtin");
    // Closed first: the control plane's shutdown waits (up to 5 s) for open watch streams.
    drop(stream);
    herald.stop().await;
}
both_backends!(watch_deliveries_streams_attempts);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_agents_shows_the_builtin_agent() {
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let agents = agents_connected(&herald, 1).await;
    let agent = &agents[0];
    assert_eq!(agent.agent_id, "builtin");
    assert_eq!(agent.region, "local");
    assert_eq!(agent.capacity, 256);
    assert!(!agent.version.is_empty());
    assert!(agent.connected_at.is_some());
    herald.stop().await;
}

async fn retry_delivery_resends_a_succeeded_delivery(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let published = client.publish(user_new(1)).await.unwrap();
    let delivery_id = published.delivery_ids[0].clone();
    receiver.wait_for(1, DEADLINE).await;
    delivery_in_state(&client, &delivery_id, pb::DeliveryState::Succeeded).await;

    client
        .deliveries()
        .retry_delivery(pb::RetryDeliveryRequest {
            id: delivery_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got = receiver.wait_for(2, DEADLINE).await;
    assert_eq!(got.len(), 2);
    let wh = standardwebhooks::Webhook::new(&sub.signing_secret).unwrap();
    for request in &got {
        assert_eq!(
            request.header("webhook-id"),
            Some(published.event_id.as_str())
        );
        wh.verify(&request.body, &request.headers).unwrap();
    }
    let (client_ref, id) = (&client, delivery_id.as_str());
    let delivery = eventually("the resend to be recorded", DEADLINE, move || async move {
        let delivery = get_delivery(client_ref, id).await;
        (delivery.state() == pb::DeliveryState::Succeeded && delivery.attempts.len() == 2)
            .then_some(delivery)
    })
    .await;
    assert_eq!(delivery.attempt_count, 2);
    assert_eq!(delivery.id, delivery_id, "the same delivery");
    herald.stop().await;
}
both_backends!(retry_delivery_resends_a_succeeded_delivery);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_s_jobs_stay_in_their_region() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    let mut eu = [
        harness::spawn_agent(&agent_env(&herald, "eu-1", "eu", "127.0.0.0/8")),
        harness::spawn_agent(&agent_env(&herald, "eu-2", "eu", "127.0.0.0/8")),
    ];
    let _us = harness::spawn_agent(&agent_env(&herald, "us-1", "us", "127.0.0.0/8"));
    agents_connected(&herald, 3).await;

    let receiver = Receiver::start().await;
    receiver.default_reply(held(200, Duration::from_secs(1)));
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |r| r.region = "eu".into()).await;
    let events = (1..=20).map(user_new).collect();
    let published = client
        .publish_many(pb::PublishEventsRequest { events })
        .await
        .unwrap();

    let busy = eventually("an eu agent with jobs in flight", DEADLINE, || async {
        list_agents(&herald)
            .await
            .into_iter()
            .find(|a| a.region == "eu" && a.in_flight > 0)
    })
    .await;
    let killed = if busy.agent_id == "eu-1" { 0 } else { 1 };
    eu[killed].kill().await;

    let got = eventually("20 distinct webhook-ids", DEADLINE, || async {
        let got = receiver.received();
        (webhook_ids(&got).len() >= 20).then_some(got)
    })
    .await;
    let expected: HashSet<String> = published
        .results
        .iter()
        .map(|r| r.event_id.clone())
        .collect();
    assert_eq!(webhook_ids(&got), expected);
    // The killed agent died holding its jobs (the receiver answers after 1 s) and reported none:
    // they succeed on the survivor well before their leases (15 s + 5 s) could expire.
    let survivor = if killed == 0 { "eu-2" } else { "eu-1" };
    for result in &published.results {
        let delivery = delivery_in_state(
            &client,
            &result.delivery_ids[0],
            pb::DeliveryState::Succeeded,
        )
        .await;
        assert!(!delivery.attempts.is_empty());
        for attempt in &delivery.attempts {
            assert_eq!(attempt.region, "eu", "{attempt:?}");
            assert!(attempt.agent_id.starts_with("eu-"), "{attempt:?}");
            assert_eq!(attempt.agent_id, survivor, "{attempt:?}");
        }
    }
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_refuse_loopback_in_every_spelling_and_ignore_proxies() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    // Region `default`, loopback IPv4 refused (only ::1 allowed).
    let _guarded = harness::spawn_agent(&agent_env(&herald, "guarded-1", "default", "::1/128"));
    // Region `proxied`, loopback allowed, every proxy variable pointing at a fake proxy.
    let proxy = Receiver::start().await;
    let proxy_url = proxy.url("");
    let mut env = agent_env(&herald, "proxied-1", "proxied", "127.0.0.0/8");
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        env.push((name, proxy_url.clone()));
    }
    env.push(("NO_PROXY", String::new()));
    env.push(("no_proxy", String::new()));
    let _proxied = harness::spawn_agent(&env);
    agents_connected(&herald, 2).await;

    let refused = Receiver::start().await;
    let port = refused.addr.port();
    let (_, client) = herald.tenant("acme").await;
    let mut refused_subs = Vec::new();
    for host in [
        "127.0.0.1",
        "localhost",
        "127.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
    ] {
        let url = format!("http://{host}:{port}/");
        let sub = subscribe(&client, url.clone(), |r| r.region = "default".into()).await;
        refused_subs.push((url, sub.id));
    }
    let real = Receiver::start().await;
    let proxied_sub = subscribe(&client, real.url("/hook"), |r| r.region = "proxied".into()).await;

    let published = client.publish(user_new(1)).await.unwrap();
    assert_eq!(published.delivery_ids.len(), refused_subs.len() + 1);
    let listed = client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            event_id: published.event_id.clone(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    for (url, sub_id) in &refused_subs {
        let id = &listed
            .iter()
            .find(|d| d.subscription_id == *sub_id)
            .unwrap()
            .id;
        let delivery = delivery_in_state(&client, id, pb::DeliveryState::Dead).await;
        assert_eq!(
            delivery.attempts.len(),
            1,
            "{url}: a refused destination is not retried"
        );
        let attempt = &delivery.attempts[0];
        assert_eq!(
            attempt.error(),
            pb::AttemptError::DestinationRefused,
            "{url}: {attempt:?}"
        );
        assert_eq!(attempt.status_code, 0, "{url}");
        assert_eq!(attempt.agent_id, "guarded-1");
        assert!(!attempt.error_message.is_empty(), "{url}");
    }
    assert!(
        refused.received().is_empty(),
        "a refused destination was contacted"
    );

    let got = real.wait_for(1, DEADLINE).await;
    assert_eq!(
        got[0].header("webhook-id"),
        Some(published.event_id.as_str())
    );
    let proxied = listed
        .iter()
        .find(|d| d.subscription_id == proxied_sub.id)
        .unwrap();
    let delivery = delivery_in_state(&client, &proxied.id, pb::DeliveryState::Succeeded).await;
    assert_eq!(delivery.attempts[0].agent_id, "proxied-1");
    assert!(
        proxy.received().is_empty(),
        "the agent went through the environment's proxy"
    );
    herald.stop().await;
}

fn invoice(amount: &str, action: &str) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "invoice.updated".into(),
        payload: format!(r#"{{"amount": {amount}, "customer": {{"country": "FR"}}}}"#),
        entity_type: "invoice".into(),
        entity_id: amount.into(),
        action: action.into(),
        ..Default::default()
    }
}

/// A payload filter decides which events get a delivery for its subscription (none is created
/// for the others), numbers compare exactly, a bad filter is refused naming the problem, and
/// removing the filter delivers everything again.
async fn payload_filters_choose_which_events_are_delivered(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let (_, client) = herald.tenant("acme").await;
    let receiver = Receiver::start().await;
    let filter = r#"{"amount": {"$gt": 9007199254740992}, "$action": "paid", "customer.country": {"$in": ["FR", "DE"]}}"#;
    let filtered = subscribe(&client, receiver.url("/filtered"), |r| {
        r.payload_filter = Some(filter.into());
    })
    .await;
    assert_eq!(filtered.payload_filter, filter);
    let all = subscribe(&client, receiver.url("/all"), |_| {}).await;
    // Only the first matches: one above 2^53 (by one), paid, in FR.
    let mut published = Vec::new();
    for event in [
        invoice("9007199254740993", "paid"),
        invoice("9007199254740992", "paid"),
        invoice("9007199254740993", "refunded"),
        invoice("150", "paid"),
    ] {
        published.push(client.publish(event).await.unwrap().event_id);
    }
    // GetEvent says which subscriptions each event matched.
    let mut both = vec![filtered.id.clone(), all.id.clone()];
    both.sort();
    for (event_id, expected) in published.iter().zip([both, vec![all.id.clone()]]) {
        let event = client
            .events()
            .get_event(pb::GetEventRequest {
                id: event_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(event.subscription_ids, expected);
    }
    let received = receiver.wait_for(5, DEADLINE).await;
    let paths: Vec<&str> = received.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths.iter().filter(|p| **p == "/all").count(),
        4,
        "{paths:?}"
    );
    let mine: Vec<&Received> = received.iter().filter(|r| r.path == "/filtered").collect();
    assert_eq!(mine.len(), 1, "{paths:?}");
    assert!(String::from_utf8_lossy(&mine[0].body).contains("9007199254740993"));
    let log = client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            subscription_id: filtered.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        log.deliveries.len(),
        1,
        "no delivery for the events it filtered out"
    );

    let refused = client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: filtered.id.clone(),
            payload_filter: Some(r#"{"amount": {"$gt": true}}"#.into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "payload_filter: $gt needs a number or string at amount"
    );
    let cleared = client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: filtered.id.clone(),
            payload_filter: Some(String::new()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleared.payload_filter, "");
    client.publish(invoice("1", "refunded")).await.unwrap();
    let received = receiver.wait_for(7, DEADLINE).await;
    assert_eq!(
        received.iter().filter(|r| r.path == "/filtered").count(),
        2,
        "without a filter every event is delivered"
    );
    herald.stop().await;
}
both_backends!(payload_filters_choose_which_events_are_delivered);

/// Custom headers go out with every request; a secret one is sealed at rest, read back by
/// hint only, and kept by an update that sends it without its value; Herald's own headers,
/// hop-by-hop ones and the API-key header cannot be overridden.
async fn custom_headers_are_sent_and_secret_ones_stay_sealed(backend: Backend) {
    let herald = Herald::builder(backend)
        .configure(|c| c.master_key = Some([7u8; 32]))
        .start()
        .await;
    let (_, client) = herald.tenant("acme").await;
    let receiver = Receiver::start().await;
    let header = |name: &str, value: &str, secret: bool| pb::CustomHeader {
        name: name.into(),
        value: value.into(),
        secret,
        ..Default::default()
    };
    let sub = subscribe(&client, receiver.url("/hook"), |r| {
        r.headers = vec![
            header("X-Tenant", "acme", false),
            header("X-Shared-Key", "s3cr3t-value", true),
        ];
    })
    .await;
    assert_eq!(sub.headers[0].value, "acme");
    assert_eq!(
        sub.headers[1].value, "",
        "a secret value is never read back"
    );
    assert_eq!(sub.headers[1].value_hint, "alue");
    client.publish(user_new(1)).await.unwrap();
    let got = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(got[0].header("x-tenant"), Some("acme"));
    assert_eq!(got[0].header("x-shared-key"), Some("s3cr3t-value"));
    assert!(got[0].header("webhook-signature").is_some());

    // At rest: sealed, not in clear.
    use sea_orm::ConnectionTrait as _;
    let db = sea_orm::Database::connect(&herald.database.url)
        .await
        .unwrap();
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT headers FROM subscriptions WHERE id = '{}'", sub.id),
        ))
        .await
        .unwrap()
        .unwrap();
    let stored: String = row.try_get_by_index(0).unwrap();
    assert!(
        !stored.contains("s3cr3t-value") && stored.contains("sealed1:"),
        "{stored}"
    );
    let _ = db.close().await;

    for (name, expected) in [
        ("Webhook-Id", "headers: Webhook-Id is set by Herald"),
        ("Host", "headers: Host is set by Herald"),
        ("Upgrade", "headers: Upgrade is set by Herald"),
        ("x-api-key", "headers: x-api-key carries the API key"),
        (
            "Bad Name",
            "headers: \"Bad Name\" is not a valid header name",
        ),
    ] {
        let refused = client
            .subscriptions()
            .update_subscription(pb::UpdateSubscriptionRequest {
                id: sub.id.clone(),
                headers: Some(pb::CustomHeaders {
                    values: vec![header(name, "x", false)],
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(
            refused.message().starts_with(expected),
            "{name}: {}",
            refused.message()
        );
    }

    // The secret sent back without its value keeps it; the plain one is dropped.
    let updated = client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: sub.id.clone(),
            headers: Some(pb::CustomHeaders {
                values: vec![header("X-Shared-Key", "", true)],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.headers.len(), 1);
    client.publish(user_new(2)).await.unwrap();
    let got = receiver.wait_for(2, DEADLINE).await;
    assert_eq!(got[1].header("x-shared-key"), Some("s3cr3t-value"));
    assert_eq!(got[1].header("x-tenant"), None);
    herald.stop().await;
}
both_backends!(custom_headers_are_sent_and_secret_ones_stay_sealed);

/// Verifies the `v1a` signatures of a request with `ring`, an Ed25519 implementation
/// independent of the one Herald signs with; returns how many of them verify.
fn ring_verified_v1a(request: &Received, public_key: &str) -> usize {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(public_key.strip_prefix("whpk_").expect("a whpk_ key"))
        .unwrap();
    let message = [
        request.header("webhook-id").unwrap().as_bytes(),
        b".",
        request.header("webhook-timestamp").unwrap().as_bytes(),
        b".",
        &request.body,
    ]
    .concat();
    request
        .header("webhook-signature")
        .unwrap()
        .split(' ')
        .filter_map(|sig| sig.strip_prefix("v1a,"))
        .filter(|sig| {
            let sig = engine.decode(sig).unwrap();
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
                .verify(&message, &sig)
                .is_ok()
        })
        .count()
}

/// Ed25519 (Standard Webhooks `v1a`): every read carries the public key, the private key is
/// sealed at rest and never leaves; an independent Ed25519 implementation verifies the
/// delivery and refuses a tampered body; a change of scheme and a rotation keep both keys
/// signing through the grace period.
async fn ed25519_signatures_verify_with_the_public_key_only(backend: Backend) {
    let herald = Herald::builder(backend)
        .configure(|c| c.master_key = Some([7u8; 32]))
        .start()
        .await;
    let (_, client) = herald.tenant("acme").await;
    let receiver = Receiver::start().await;
    let sub = subscribe(&client, receiver.url("/hook"), |r| {
        r.signature_scheme = pb::SignatureScheme::Ed25519 as i32;
    })
    .await;
    assert_eq!(sub.signature_scheme, pb::SignatureScheme::Ed25519 as i32);
    assert!(sub.signing_public_key.starts_with("whpk_"), "{sub:?}");
    assert_eq!(sub.signing_secret, "", "the private key is never sent");
    let public_key = sub.signing_public_key.clone();
    let read = client
        .subscriptions()
        .get_subscription(pb::GetSubscriptionRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.signing_public_key, public_key);
    let revealed = client
        .subscriptions()
        .get_subscription_secret(pb::GetSubscriptionSecretRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed.signing_secret, "");
    assert_eq!(revealed.signing_public_key, public_key);

    // At rest: sealed like the HMAC secrets.
    use sea_orm::ConnectionTrait as _;
    let db = sea_orm::Database::connect(&herald.database.url)
        .await
        .unwrap();
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT signing_secret FROM subscriptions WHERE id = '{}'",
                sub.id
            ),
        ))
        .await
        .unwrap()
        .unwrap();
    let stored: String = row.try_get_by_index(0).unwrap();
    assert!(
        stored.starts_with("sealed1:") && !stored.contains("whsk_"),
        "{stored}"
    );
    let _ = db.close().await;

    client.publish(user_new(1)).await.unwrap();
    let got = receiver.wait_for(1, DEADLINE).await;
    let signature = got[0].header("webhook-signature").unwrap();
    assert!(
        signature.starts_with("v1a,") && !signature.contains(' '),
        "{signature}"
    );
    assert_eq!(ring_verified_v1a(&got[0], &public_key), 1);
    let key = herald_proto::webhook::PublicKey::parse(&public_key).unwrap();
    let now = chrono::Utc::now().timestamp();
    let check = |body: &[u8]| {
        herald_proto::webhook::verify(
            &key,
            got[0].header("webhook-id"),
            got[0].header("webhook-timestamp"),
            Some(signature),
            body,
            now,
            300,
        )
    };
    assert_eq!(check(&got[0].body), Ok(()));
    let mut tampered = got[0].body.to_vec();
    tampered[2] ^= 1;
    assert_eq!(
        check(&tampered),
        Err(herald_proto::webhook::Error::NoMatchingSignature)
    );
    let mut forged = got[0].clone();
    forged.body = tampered.into();
    assert_eq!(ring_verified_v1a(&forged, &public_key), 0);

    // A change of scheme to HMAC: the new secret and the old public key both verify.
    let switched = client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: sub.id.clone(),
            signature_scheme: Some(pb::SignatureScheme::HmacSha256 as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        switched.signature_scheme,
        pb::SignatureScheme::HmacSha256 as i32
    );
    assert_eq!(switched.signing_public_key, "");
    let secret = client
        .subscriptions()
        .get_subscription_secret(pb::GetSubscriptionSecretRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .signing_secret;
    assert!(secret.starts_with("whsec_"));
    client.publish(user_new(2)).await.unwrap();
    let got = receiver.wait_for(2, DEADLINE).await;
    standardwebhooks::Webhook::new(&secret)
        .unwrap()
        .verify(&got[1].body, &got[1].headers)
        .unwrap();
    assert_eq!(ring_verified_v1a(&got[1], &public_key), 1);

    // Rotation back to a new Ed25519 key: the new public key and the HMAC secret verify.
    let rotated = client
        .subscriptions()
        .rotate_secret(pb::RotateSecretRequest {
            id: sub.id.clone(),
            signature_scheme: Some(pb::SignatureScheme::Ed25519 as i32),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.signing_public_key, public_key);
    assert_eq!(rotated.signing_secret, "");
    client.publish(user_new(3)).await.unwrap();
    let got = receiver.wait_for(3, DEADLINE).await;
    assert_eq!(ring_verified_v1a(&got[2], &rotated.signing_public_key), 1);
    assert_eq!(
        ring_verified_v1a(&got[2], &public_key),
        0,
        "only the key just replaced keeps signing"
    );
    standardwebhooks::Webhook::new(&secret)
        .unwrap()
        .verify(&got[2].body, &got[2].headers)
        .unwrap();

    let refused = client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: sub.id.clone(),
            signature_scheme: Some(7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(refused.message(), "signature_scheme: unknown value 7");
    herald.stop().await;
}
both_backends!(ed25519_signatures_verify_with_the_public_key_only);
