//! The batched paths of the pipeline: group commit isolation, the in-memory hand-off, retention.

use std::sync::Arc;
use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::{Backend, Herald, Receiver, both_backends, eventually};
use tonic::Code;

use crate::delivery::{subscribe, user_new};

/// Calls committed together each get their own answer: a reused key is refused for its caller
/// only.
async fn group_commit_keeps_each_callers_reply(backend: Backend) {
    let herald = Herald::builder(backend).no_builtin_agent().start().await;
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, "https://example.com/a".into(), |_| {}).await;
    let mut used = user_new(0);
    used.idempotency_key = "used".into();
    client.events().publish_event(used).await.unwrap();
    let calls = (1..=40).map(|i| {
        let client = client.clone();
        async move {
            let mut request = user_new(i);
            // Every fifth call reuses a key with a different payload.
            request.idempotency_key = if i % 5 == 0 {
                "used".into()
            } else {
                format!("key-{i}")
            };
            (i, client.events().publish_event(request).await)
        }
    });
    let replies = futures::future::join_all(calls).await;
    let mut event_ids = std::collections::HashSet::new();
    for (i, reply) in replies {
        if i % 5 == 0 {
            assert_eq!(reply.unwrap_err().code(), Code::AlreadyExists, "call {i}");
        } else {
            let reply = reply.unwrap().into_inner();
            assert_eq!(reply.delivery_ids.len(), 1, "call {i}");
            assert!(
                event_ids.insert(reply.event_id),
                "call {i} got its own event"
            );
        }
    }
    assert_eq!(event_ids.len(), 32);
    let (events, deliveries) = herald
        .running
        .as_ref()
        .unwrap()
        .services
        .store
        .row_counts()
        .await
        .unwrap();
    assert_eq!((events, deliveries), (33, 33));
    herald.stop().await;
}
both_backends!(group_commit_keeps_each_callers_reply);

/// Committed deliveries whose in-memory hand-off is lost (as in a crash right after the commit)
/// are still delivered once a control plane runs on the same database.
async fn a_lost_hand_off_still_delivers_after_restart(backend: Backend) {
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = dropped.clone();
    let hooks = herald_control_plane::Hooks {
        handoff: Some(Arc::new(move |deliveries| {
            counter.fetch_add(deliveries.len(), std::sync::atomic::Ordering::SeqCst);
            false
        })),
        ..Default::default()
    };
    let herald = Herald::builder(backend)
        .no_builtin_agent()
        .hooks(hooks)
        .start()
        .await;
    let receiver = Receiver::start().await;
    let (tenant_id, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/"), |_| {}).await;
    let mut published = Vec::new();
    for i in 0..5 {
        published.push(client.publish(user_new(i)).await.unwrap().event_id);
    }
    assert_eq!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "every hand-off went through the hook"
    );
    let database = herald.stop_keeping_database().await;

    let herald = Herald::builder(backend).start_on(database).await;
    let got = receiver.wait_for(5, Duration::from_secs(20)).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.header("webhook-id").unwrap().to_owned())
        .collect();
    ids.sort();
    published.sort();
    assert_eq!(ids, published);
    let _ = tenant_id;
    herald.stop().await;
}
both_backends!(a_lost_hand_off_still_delivers_after_restart);

/// Retention removes events older than the cut-off with their deliveries and attempts, and
/// nothing newer.
async fn retention_removes_only_what_is_older(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/"), |_| {}).await;
    let old = client.publish(user_new(1)).await.unwrap();
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let store = herald.running.as_ref().unwrap().services.store.clone();
    // Attempts are recorded just after the request arrives.
    eventually(
        "the first attempt recorded",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move { (store.all_counts().await.unwrap().2 == 1).then_some(()) }
        },
    )
    .await;
    let cutoff = chrono::Utc::now() + chrono::Duration::milliseconds(2);
    eventually(
        "the clock to pass the cut-off",
        Duration::from_secs(1),
        || async { (chrono::Utc::now() > cutoff).then_some(()) },
    )
    .await;
    let new = client.publish(user_new(2)).await.unwrap();
    receiver.wait_for(2, Duration::from_secs(20)).await;
    eventually(
        "the second attempt recorded",
        Duration::from_secs(10),
        || {
            let store = store.clone();
            async move { (store.all_counts().await.unwrap().2 == 2).then_some(()) }
        },
    )
    .await;
    let removed = herald_control_plane::storage::retention::purge(&store, cutoff, 1)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(store.all_counts().await.unwrap(), (1, 1, 1));
    let gone = client
        .events()
        .get_event(pb::GetEventRequest {
            id: old.event_id,
            ..Default::default()
        })
        .await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    client
        .events()
        .get_event(pb::GetEventRequest {
            id: new.event_id,
            ..Default::default()
        })
        .await
        .unwrap();
    herald.stop().await;
}
both_backends!(retention_removes_only_what_is_older);
