//! Process lifecycles: the single-machine default as a newcomer starts it, crashes and restarts,
//! graceful shutdown of agents and control planes, and secret rotation.

use std::collections::HashSet;
use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::harness::{self, TestDatabase};
use herald_tests::receiver::Reply;
use herald_tests::{Backend, Herald, Receiver, eventually};

use crate::delivery::{subscribe, user_new};

/// The README's first command with no configuration at all (only a free port instead of 50051,
/// so tests can run side by side): it prints an admin token, and its built-in agent delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_start_delivers_with_no_other_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut cp =
        harness::spawn_control_plane_in(dir.path(), &[("HERALD_LISTEN", "127.0.0.1:0".into())])
            .await;
    let url = format!("http://{}", cp.addr.unwrap());
    let token = eventually("the admin token line", Duration::from_secs(10), || {
        let printed = cp.output();
        async move {
            printed.lines().find_map(|line| {
                line.strip_prefix("admin token (shown once, stored hashed): ")
                    .map(str::to_owned)
            })
        }
    })
    .await;
    assert!(
        dir.path().join("herald.db").exists(),
        "the SQLite file is created in the working directory"
    );
    let admin = herald_client::HeraldClient::connect(&url, &token).unwrap();
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let receiver = Receiver::start().await;
    let sub = admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant.id.clone(),
            name: "local".into(),
            url: receiver.url("/hook"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut event = user_new(1);
    event.tenant_id = tenant.id.clone();
    let published = admin.publish(event).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(
        got[0].header("webhook-id"),
        Some(published.event_id.as_str())
    );
    standardwebhooks::Webhook::new(&sub.signing_secret)
        .unwrap()
        .verify(&got[0].body, &got[0].headers)
        .unwrap();
    let status = cp.terminate().await;
    assert!(
        status.success(),
        "SIGTERM ends the control plane cleanly: {status:?}\n{}",
        cp.logs()
    );
}

/// SIGKILL of the control plane while deliveries are in flight: after a restart on the same file,
/// every acknowledged event is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_are_delivered_after_a_control_plane_crash() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let receiver = Receiver::start().await;
    receiver.default_reply(Reply {
        status: 200,
        headers: vec![],
        delay: Duration::from_millis(300),
    });
    let env = vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_RETRY_SCHEDULE", "100ms".to_owned()),
    ];
    let mut cp = harness::spawn_control_plane(&env).await;
    let admin = herald_client::HeraldClient::connect(
        &format!("http://{}", cp.addr.unwrap()),
        harness::ADMIN_TOKEN,
    )
    .unwrap();
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant.id.clone(),
            name: "slow".into(),
            url: receiver.url("/"),
            max_concurrency: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut acknowledged = HashSet::new();
    for i in 0..40 {
        let mut event = user_new(i);
        event.tenant_id = tenant.id.clone();
        acknowledged.insert(admin.publish(event).await.unwrap().event_id);
    }
    // Kill it mid-run: some requests are open at the receiver, most are still waiting.
    eventually("requests in flight", Duration::from_secs(10), || async {
        (receiver.open_now() > 0).then_some(())
    })
    .await;
    cp.kill().await;
    let before_restart = receiver.received().len();
    assert!(
        before_restart < 40,
        "the crash happened mid-run ({before_restart} of 40 had arrived)"
    );

    let mut cp = harness::spawn_control_plane(&env).await;
    let delivered = eventually(
        "every acknowledged event delivered",
        Duration::from_secs(60),
        || {
            let got: HashSet<String> = receiver
                .received()
                .iter()
                .filter_map(|r| r.header("webhook-id").map(str::to_owned))
                .collect();
            let acknowledged = acknowledged.clone();
            async move { acknowledged.is_subset(&got).then_some(got) }
        },
    )
    .await;
    assert_eq!(delivered.len(), 40);
    cp.terminate().await;
}

/// SIGTERM on an agent holding a job: it finishes, reports, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_agent_finishes_and_reports_its_jobs() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    let receiver = Receiver::start().await;
    receiver.default_reply(Reply {
        status: 200,
        headers: vec![],
        delay: Duration::from_millis(800),
    });
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", herald.url()),
        ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
        ("HERALD_AGENT_ID", "term-1".into()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".into()),
    ]);
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/"), |_| {}).await;
    let published = client.publish(user_new(1)).await.unwrap();
    receiver.wait_for(1, Duration::from_secs(20)).await;
    let status = agent.terminate().await;
    assert!(status.success(), "{status:?}\n{}", agent.logs());
    let delivery = client
        .deliveries()
        .get_delivery(pb::GetDeliveryRequest {
            id: published.delivery_ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        delivery.state,
        pb::DeliveryState::Succeeded as i32,
        "the result was reported before exit"
    );
    assert_eq!(delivery.attempts.len(), 1);
    assert_eq!(delivery.attempts[0].agent_id, "term-1");
    herald.stop().await;
}

/// After `RotateSecret` both secrets verify during the grace period; once it ends (grace 0),
/// only the newest does.
async fn rotation_signs_with_both_secrets_during_the_grace_period(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/"), |_| {}).await;
    let rotate = |grace: Option<u32>| {
        let client = client.clone();
        let id = sub.id.clone();
        async move {
            client
                .subscriptions()
                .rotate_secret(pb::RotateSecretRequest {
                    id,
                    grace_period_s: grace,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .signing_secret
        }
    };
    let verifies = |secret: &str, request: &herald_tests::Received| {
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&request.body, &request.headers)
            .is_ok()
    };
    let second = rotate(None).await;
    client.publish(user_new(1)).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    assert!(
        verifies(&sub.signing_secret, &got[0]),
        "the previous secret verifies during the grace period"
    );
    assert!(verifies(&second, &got[0]), "the new secret verifies");
    let third = rotate(Some(0)).await;
    client.publish(user_new(2)).await.unwrap();
    let got = receiver.wait_for(2, Duration::from_secs(20)).await;
    assert!(verifies(&third, &got[1]));
    assert!(
        !verifies(&second, &got[1]),
        "a grace period of 0 ends the previous secret at once"
    );
    assert!(!verifies(&sub.signing_secret, &got[1]));
    herald.stop().await;
}
herald_tests::both_backends!(rotation_signs_with_both_secrets_during_the_grace_period);

/// An open WatchDeliveries stream ends at shutdown instead of holding it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_watch_streams() {
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let (_, client) = herald.tenant("acme").await;
    let mut stream = client
        .deliveries()
        .watch_deliveries(pb::WatchDeliveriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let stopping = tokio::spawn(herald.stop());
    let ended = tokio::time::timeout(Duration::from_secs(4), stream.message()).await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "the stream ended: {ended:?}"
    );
    tokio::time::timeout(Duration::from_secs(4), stopping)
        .await
        .unwrap()
        .unwrap();
}
