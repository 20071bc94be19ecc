//! Delivery: agents, signed POSTs, retries, the delivery log.

use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::{Backend, Herald, Receiver, both_backends};

/// Creates a subscription to `url` for the tenant client.
pub async fn subscribe(client: &herald_client::HeraldClient, url: String, f: impl FnOnce(&mut pb::CreateSubscriptionRequest)) -> pb::Subscription {
    let mut request = pb::CreateSubscriptionRequest {
        name: "hook".into(),
        url,
        api_key: "key-1234".into(),
        ..Default::default()
    };
    f(&mut request);
    client.subscriptions().create_subscription(request).await.unwrap().into_inner()
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
    assert_eq!(request.header("webhook-id"), Some(published.event_id.as_str()));
    assert_eq!(request.header("x-api-key"), Some("key-1234"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(&request.body[..], user_new(7).payload.as_bytes());
    let wh = standardwebhooks::Webhook::new(&sub.signing_secret).unwrap();
    wh.verify(&request.body, &request.headers).unwrap();
    herald.stop().await;
}
both_backends!(builtin_agent_delivers_a_signed_webhook);
