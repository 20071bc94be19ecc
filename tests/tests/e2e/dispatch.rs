//! Dispatch under adversity: what a deleted or deactivated subscription leaves behind, what
//! retention keeps, leases that end while their agent stays connected, fairness between tenants
//! and between subscriptions.

use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::{Backend, Herald, Receiver, both_backends, eventually, harness};

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

/// Subscriptions with a 2 s timeout; leases last 2 s more (`HERALD_LEASE_GRACE=2s`).
fn short_leases(builder: herald_tests::HeraldBuilder) -> herald_tests::HeraldBuilder {
    builder.configure(|c| {
        c.lease_grace = Duration::from_secs(2);
        c.retry_schedule = vec![Duration::from_secs(1)];
    })
}

/// Connects as an agent that takes jobs and never reports them, while its stream stays open
/// and its heartbeats keep coming. Returns the delivery ids it was sent and whether the control
/// plane closed its stream.
fn silent_agent(
    herald: &Herald,
    capacity: u32,
) -> (
    tokio::sync::watch::Receiver<Vec<String>>,
    tokio::sync::watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt as _;
    let (jobs_tx, jobs) = tokio::sync::watch::channel(Vec::new());
    let (closed_tx, closed) = tokio::sync::watch::channel(false);
    let channel = herald.admin().channel();
    let token = herald.agent_token.clone();
    tokio::spawn(async move {
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let hello = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(pb::Hello {
                agent_id: "silent".into(),
                region: "local".into(),
                capacity,
                version: "test".into(),
            })),
        };
        let heartbeats = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
            Duration::from_millis(200),
        ))
        .map(|_| pb::AgentMessage {
            message: Some(pb::agent_message::Message::Heartbeat(
                pb::Heartbeat::default(),
            )),
        });
        let mut request = tonic::Request::new(tokio_stream::iter(vec![hello]).chain(heartbeats));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut stream = client.connect(request).await.unwrap().into_inner();
        while let Ok(Some(message)) = stream.message().await {
            if let Some(pb::control_message::Message::Jobs(batch)) = message.message {
                jobs_tx
                    .send_modify(|ids| ids.extend(batch.jobs.into_iter().map(|j| j.delivery_id)));
            }
        }
        let _ = closed_tx.send(true);
    });
    (jobs, closed)
}

/// Publishes five events in one call: their jobs go out in one round, under leases that expire
/// together. Returns the delivery ids.
async fn publish_five_at_once(client: &herald_client::HeraldClient) -> Vec<String> {
    client
        .publish_many(pb::PublishEventsRequest {
            events: (0..5).map(user_new).collect(),
        })
        .await
        .unwrap()
        .results
        .into_iter()
        .flat_map(|r| r.delivery_ids)
        .collect()
}

/// Every delivery SUCCEEDED, with a `TIMEOUT` attempt before its success.
async fn timed_out_then_delivered(client: &herald_client::HeraldClient, ids: &[String]) {
    for id in ids {
        let delivery = eventually(
            "the delivery SUCCEEDED",
            Duration::from_secs(30),
            || async {
                let d = crate::delivery::get_delivery(client, id).await;
                (d.state == pb::DeliveryState::Succeeded as i32).then_some(d)
            },
        )
        .await;
        let errors: Vec<i32> = delivery.attempts.iter().map(|a| a.error).collect();
        assert_eq!(
            errors.first(),
            Some(&(pb::AttemptError::Timeout as i32)),
            "{id}: {:?}",
            delivery.attempts
        );
        assert!(
            delivery.attempts[0]
                .error_message
                .contains("no result from agent"),
            "{:?}",
            delivery.attempts[0]
        );
    }
}

/// An agent that takes jobs and never reports them (its stream open, heartbeats coming) does
/// not hold them past timeout + grace: they end as `TIMEOUT` attempts and a healthy agent
/// delivers them; after three expired leases in a row the silent agent is disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_does_not_keep_its_jobs() {
    let herald = short_leases(Herald::builder(Backend::Sqlite).no_builtin_agent())
        .start()
        .await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |s| s.timeout_ms = 2_000).await;
    let (mut jobs, mut closed) = silent_agent(&herald, 5);
    crate::delivery::agents_connected(&herald, 1).await;
    let ids = publish_five_at_once(&client).await;
    let taken = tokio::time::timeout(
        Duration::from_secs(20),
        jobs.wait_for(|jobs| jobs.len() == 5),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(taken.len(), 5);
    // A healthy agent in the same region.
    let _healthy = harness::spawn_agent(&crate::delivery::agent_env(
        &herald,
        "healthy",
        "local",
        "127.0.0.0/8",
    ));
    receiver.wait_for(5, Duration::from_secs(30)).await;
    timed_out_then_delivered(&client, &ids).await;
    tokio::time::timeout(Duration::from_secs(10), closed.wait_for(|closed| *closed))
        .await
        .expect("the silent agent was disconnected")
        .unwrap();
    herald.stop().await;
}

/// A stopped agent (`SIGSTOP`: no results, no heartbeats, its connection left open) does not
/// keep its jobs either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_does_not_keep_its_jobs() {
    let herald = short_leases(Herald::builder(Backend::Sqlite).no_builtin_agent())
        .start()
        .await;
    let receiver = Receiver::start().await;
    // The requests arrive; the answers come after the agent is stopped.
    receiver.default_reply(crate::delivery::held(200, Duration::from_millis(500)));
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |s| s.timeout_ms = 2_000).await;
    let mut stopped = harness::spawn_agent(&crate::delivery::agent_env(
        &herald,
        "stopped",
        "local",
        "127.0.0.0/8",
    ));
    crate::delivery::agents_connected(&herald, 1).await;
    let ids = publish_five_at_once(&client).await;
    receiver.wait_for(5, Duration::from_secs(20)).await;
    let pid = nix::unistd::Pid::from_raw(stopped.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    receiver.default_reply(200);
    let _healthy = harness::spawn_agent(&crate::delivery::agent_env(
        &herald,
        "healthy",
        "local",
        "127.0.0.0/8",
    ));
    timed_out_then_delivered(&client, &ids).await;
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    stopped.kill().await;
    herald.stop().await;
}

/// One tenant's backlog of 3,000 due deliveries (a receiver at `max_concurrency` 1) does not
/// starve another tenant's retry: it goes out before the first tenant's receiver got 50 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_retry_is_not_starved_by_another_tenants_backlog() {
    let herald = Herald::builder(Backend::Sqlite)
        .configure(|c| c.retry_schedule = vec![Duration::from_secs(1)])
        .start()
        .await;
    let slow = Receiver::start().await;
    slow.default_reply(crate::delivery::held(200, Duration::from_millis(100)));
    let (_, a) = herald.tenant("a").await;
    subscribe(&a, slow.url("/a"), |s| s.max_concurrency = 1).await;
    for chunk in 0..30 {
        let events = (0..100).map(|i| user_new(chunk * 100 + i)).collect();
        a.publish_many(pb::PublishEventsRequest { events })
            .await
            .unwrap();
    }
    slow.wait_for(1, Duration::from_secs(20)).await;

    let other = Receiver::start().await;
    other.script([500]);
    let (_, b) = herald.tenant("b").await;
    subscribe(&b, other.url("/b"), |_| {}).await;
    b.publish(user_new(1)).await.unwrap();
    other.wait_for(1, Duration::from_secs(20)).await;
    let before = slow.received().len();
    other.wait_for(2, Duration::from_secs(60)).await;
    let during = slow.received().len() - before;
    assert!(
        during < 50,
        "the retry went out after {during} more deliveries of the other tenant"
    );
    herald.stop().await;
}

/// Ten subscriptions whose receivers answer after 5 s do not delay a healthy one on the same
/// 256-credit agent: it is delivered while every slow request is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriptions_do_not_take_every_credit() {
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let (_, client) = herald.tenant("acme").await;
    let slow = Receiver::start().await;
    slow.default_reply(crate::delivery::held(200, Duration::from_secs(5)));
    let mut slow_subscriptions = Vec::new();
    for i in 0..10 {
        let sub = subscribe(&client, slow.url(&format!("/slow{i}")), |s| {
            s.event_types = vec!["slow.*".into()];
            s.timeout_ms = 10_000;
        })
        .await;
        slow_subscriptions.push(sub);
    }
    let healthy = Receiver::start().await;
    subscribe(&client, healthy.url("/healthy"), |s| {
        s.event_types = vec!["healthy.*".into()];
    })
    .await;
    for chunk in 0..2 {
        let events = (0..50)
            .map(|i| pb::PublishEventRequest {
                event_type: "slow.event".into(),
                payload: format!(r#"{{"n":{}}}"#, chunk * 50 + i),
                ..Default::default()
            })
            .collect();
        client
            .publish_many(pb::PublishEventsRequest { events })
            .await
            .unwrap();
    }
    // The slow receivers hold as many requests as they will get.
    let held = eventually("slow requests held", Duration::from_secs(20), || async {
        let open = slow.open_now();
        (open >= 200).then_some(open)
    })
    .await;
    client
        .publish(pb::PublishEventRequest {
            event_type: "healthy.event".into(),
            payload: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    healthy.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(
        slow.open_now() as usize,
        slow.received().len(),
        "delivered while every slow request ({held} and more) was still open"
    );
    herald.stop().await;
}

/// SIGTERM under load (`HERALD_SHUTDOWN_GRACE` well above the receiver's latency), then a
/// restart: every delivery has exactly one attempt and every `webhook-id` arrived once. The
/// stopping control plane refuses new publishes with `UNAVAILABLE`, records the results its
/// agent reports while draining, and closes the database only after its last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_and_repeats_nothing() {
    let database = harness::TestDatabase::new(Backend::Sqlite).await;
    let env = vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_SHUTDOWN_GRACE", "10s".to_owned()),
    ];
    let mut cp = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", cp.addr.unwrap());
    let admin = herald_client::HeraldClient::connect(&url, harness::ADMIN_TOKEN).unwrap();
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let receiver = Receiver::start().await;
    receiver.default_reply(crate::delivery::held(200, Duration::from_millis(200)));
    admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant.id.clone(),
            name: "hook".into(),
            url: receiver.url("/hook"),
            ..Default::default()
        })
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (admin, tenant_id, stop) = (admin.clone(), tenant.id.clone(), stop.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for i in 0..2_000 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let mut request = user_new(p * 10_000 + i);
                    request.tenant_id = tenant_id.clone();
                    match admin.publish(request).await {
                        Ok(reply) => acknowledged.push(reply.event_id),
                        Err(status) => {
                            assert!(
                                matches!(status.code(), tonic::Code::Unavailable),
                                "a stopping control plane refuses with UNAVAILABLE: {status:?}"
                            );
                            break;
                        }
                    }
                }
                acknowledged
            })
        })
        .collect();
    receiver.wait_for(50, Duration::from_secs(30)).await;
    let status = cp.terminate().await;
    assert!(status.success(), "{status:?}: {}", cp.logs());
    stop.cancel();
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }

    let mut cp = harness::spawn_control_plane(&env).await;
    let got = receiver
        .wait_for(acknowledged.len(), Duration::from_secs(60))
        .await;
    let mut arrivals: std::collections::HashMap<String, u32> = Default::default();
    for request in &got {
        *arrivals
            .entry(request.header("webhook-id").unwrap().to_owned())
            .or_default() += 1;
    }
    for id in &acknowledged {
        assert_eq!(
            arrivals.get(id),
            Some(&1),
            "webhook-id {id} arrived {:?} times",
            arrivals.get(id)
        );
    }
    let path = database.sqlite_path().unwrap();
    let db = sea_orm::Database::connect(format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    use sea_orm::ConnectionTrait as _;
    let rows = eventually(
        "every delivery recorded",
        Duration::from_secs(30),
        || async {
            let rows = db
                .query_all_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Sqlite,
                    "SELECT id, state, attempt_count FROM deliveries",
                ))
                .await
                .unwrap();
            let done = rows.len() == acknowledged.len()
                && rows.iter().all(|r| {
                    r.try_get_by_index::<i32>(1).unwrap() == pb::DeliveryState::Succeeded as i32
                });
            done.then_some(rows)
        },
    )
    .await;
    for row in rows {
        let attempts: i32 = row.try_get_by_index(2).unwrap();
        assert_eq!(
            attempts,
            1,
            "delivery {}",
            row.try_get_by_index::<String>(0).unwrap()
        );
    }
    cp.terminate().await;
}

/// An agent that reports results for a delivery it was never sent (another tenant's, its id
/// known or guessed) changes nothing in that delivery's log; after ten such results its stream
/// ends with `PERMISSION_DENIED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_write_into_deliveries_it_was_not_sent() {
    use tokio_stream::StreamExt as _;
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("victim").await;
    subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let published = client.publish(user_new(1)).await.unwrap();
    let delivery_id = published.delivery_ids[0].clone();
    let before = eventually(
        "the delivery SUCCEEDED",
        Duration::from_secs(20),
        || async {
            let d = crate::delivery::get_delivery(&client, &delivery_id).await;
            (d.state == pb::DeliveryState::Succeeded as i32).then_some(d)
        },
    )
    .await;

    let mut rogue = pb::agent_service_client::AgentServiceClient::new(herald.admin().channel());
    let hello = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            agent_id: "builtin".into(),
            region: "local".into(),
            capacity: 1,
            version: "test".into(),
        })),
    };
    let forged = (0..10).map(|i| pb::JobResult {
        delivery_id: delivery_id.clone(),
        lease_id: format!("lse_guessed_{i}"),
        status_code: 500,
        ..Default::default()
    });
    let results = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Results(pb::Results {
            results: forged.collect(),
            credits: 0,
        })),
    };
    let mut request = tonic::Request::new(
        tokio_stream::iter(vec![hello, results]).chain(tokio_stream::pending()),
    );
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", herald.agent_token).parse().unwrap(),
    );
    let mut stream = rogue.connect(request).await.unwrap().into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("ended"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream of an agent forging results is closed");
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    let after = crate::delivery::get_delivery(&client, &delivery_id).await;
    assert_eq!(
        after.attempts, before.attempts,
        "the delivery log is unchanged"
    );
    assert_eq!(after.state, before.state);
    herald.stop().await;
}
