//! Dispatch under adversity: what a deleted or deactivated subscription leaves behind, what
//! retention keeps, leases that end while their agent stays connected, fairness between tenants
//! and between subscriptions.

use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::{Backend, Herald, Receiver, both_backends, eventually};

use crate::delivery::{subscribe, user_new};

async fn states(client: &herald_client::HeraldClient, subscription_id: &str) -> Vec<i32> {
    client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            subscription_id: subscription_id.into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries
        .into_iter()
        .map(|d| d.state)
        .collect()
}

/// The states of the deliveries of these events to one subscription (also a deleted one).
async fn states_of_events(
    client: &herald_client::HeraldClient,
    event_ids: &[String],
    subscription_id: &str,
) -> Vec<i32> {
    let mut states = Vec::new();
    for event_id in event_ids {
        let deliveries = client
            .deliveries()
            .list_deliveries(pb::ListDeliveriesRequest {
                event_id: event_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        states.extend(
            deliveries
                .into_iter()
                .filter(|d| d.subscription_id == subscription_id)
                .map(|d| d.state),
        );
    }
    states
}

const PENDING: i32 = pb::DeliveryState::Pending as i32;
const DEAD: i32 = pb::DeliveryState::Dead as i32;

/// `DeleteSubscription` and `UpdateSubscription{active: false}` make the subscription's waiting
/// deliveries `DEAD` in the same call: nothing of it stays due. Re-activated, `ReplayDeliveries`
/// brings them back.
async fn deleted_or_deactivated_subscriptions_leave_nothing_due(backend: Backend) {
    // No agent: every delivery waits.
    let herald = Herald::builder(backend).no_builtin_agent().start().await;
    let (_, client) = herald.tenant("acme").await;
    let deleted = subscribe(&client, "http://127.0.0.1:9/a".into(), |_| {}).await;
    let deactivated = subscribe(&client, "http://127.0.0.1:9/b".into(), |_| {}).await;
    let mut events = Vec::new();
    for i in 0..3 {
        events.push(client.publish(user_new(i)).await.unwrap().event_id);
    }
    assert_eq!(states(&client, &deactivated.id).await, vec![PENDING; 3]);

    client
        .subscriptions()
        .delete_subscription(pb::DeleteSubscriptionRequest {
            id: deleted.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: deactivated.id.clone(),
            active: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    // The deleted subscription's deliveries stay in the log, DEAD.
    assert_eq!(
        states_of_events(&client, &events, &deleted.id).await,
        vec![DEAD; 3]
    );
    assert_eq!(states(&client, &deactivated.id).await, vec![DEAD; 3]);

    client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: deactivated.id.clone(),
            active: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let replayed = client
        .deliveries()
        .replay_deliveries(pb::ReplayDeliveriesRequest {
            subscription_id: deactivated.id.clone(),
            since: Some(prost_types::Timestamp::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.count, 3);
    assert_eq!(states(&client, &deactivated.id).await, vec![PENDING; 3]);
    herald.stop().await;
}
both_backends!(deleted_or_deactivated_subscriptions_leave_nothing_due);

/// Retention never removes an event whose delivery is still failing, however old it is.
async fn retention_keeps_an_event_whose_delivery_is_failing(backend: Backend) {
    let herald = Herald::builder(backend)
        .configure(|c| c.retry_schedule = vec![Duration::from_secs(3600)])
        .start()
        .await;
    let receiver = Receiver::start().await;
    receiver.default_reply(500);
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/"), |_| {}).await;
    let failing = client.publish(user_new(1)).await.unwrap();
    eventually("the delivery FAILED", Duration::from_secs(20), || async {
        (states(&client, &sub.id).await == vec![pb::DeliveryState::Failed as i32]).then_some(())
    })
    .await;
    let store = herald.running.as_ref().unwrap().services.store.clone();
    let cutoff = chrono::Utc::now() + chrono::Duration::hours(1);
    let removed = herald_control_plane::storage::retention::purge(&store, cutoff, 10)
        .await
        .unwrap();
    assert_eq!(removed, 0);
    client
        .events()
        .get_event(pb::GetEventRequest {
            id: failing.event_id,
            ..Default::default()
        })
        .await
        .unwrap();
    herald.stop().await;
}
both_backends!(retention_keeps_an_event_whose_delivery_is_failing);
