//! The control-plane API: every RPC end to end, validation, auth, idempotency, durability,
//! secrets at rest, reflection and health.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt as _;

use herald_client::v1 as pb;
use herald_tests::harness::{self, TestDatabase};
use herald_tests::{Backend, Herald, Receiver, both_backends};
use tonic::Code;

use crate::delivery::{subscribe, user_new};

/// Row counts of the tables a refused call must not touch.
async fn counts(herald: &Herald) -> (u64, u64) {
    herald
        .running
        .as_ref()
        .unwrap()
        .services
        .store
        .row_counts()
        .await
        .unwrap()
}

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String) {
    let status = result.unwrap_err();
    (status.code(), status.message().to_owned())
}

async fn every_rpc_works_end_to_end(backend: Backend) {
    let herald = Herald::builder(backend).start().await;
    let admin = herald.admin();
    let (tenant_id, client) = herald.tenant("acme").await;
    let tenants = admin
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        tenants
            .tenants
            .iter()
            .any(|t| t.id == tenant_id && t.name == "acme")
    );

    let tokens = admin
        .admin()
        .list_tokens(pb::ListTokensRequest {
            tenant_id: tenant_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].tenant_id, tenant_id);

    // Subscriptions: create (secret shown), get/list (never the secret), update, rotate, reveal.
    let sub = subscribe(&client, "https://example.com/hook".into(), |r| {
        r.event_types = vec!["user.*".into()]
    })
    .await;
    assert!(sub.signing_secret.starts_with("whsec_"));
    assert_eq!(sub.api_key_hint, "1234");
    assert_eq!(sub.timeout_ms, 15_000);
    assert_eq!(sub.max_attempts, 11);
    assert_eq!(sub.max_concurrency, 64);
    assert_eq!(sub.api_key_header, "X-API-Key");
    assert_eq!(sub.status, pb::SubscriptionStatus::Enabled as i32);
    let got = client
        .subscriptions()
        .get_subscription(pb::GetSubscriptionRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.signing_secret, "");
    assert_eq!(got.url, sub.url);
    let listed = client
        .subscriptions()
        .list_subscriptions(pb::ListSubscriptionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.subscriptions.len(), 1);
    assert_eq!(listed.subscriptions[0].signing_secret, "");
    let updated = client
        .subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: sub.id.clone(),
            name: Some("renamed".into()),
            event_types: Some(pb::EventTypes { values: vec![] }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.name, "renamed");
    assert!(updated.event_types.is_empty());
    assert_eq!(updated.url, sub.url, "unset fields are unchanged");
    let rotated = client
        .subscriptions()
        .rotate_secret(pb::RotateSecretRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.signing_secret, sub.signing_secret);
    let revealed = client
        .subscriptions()
        .get_subscription_secret(pb::GetSubscriptionSecretRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revealed.signing_secret, rotated.signing_secret);
    let enabled = client
        .subscriptions()
        .enable_subscription(pb::EnableSubscriptionRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enabled.status, pb::SubscriptionStatus::Enabled as i32);

    // Events: publish, batch, get, list, event types.
    let one = client.publish(user_new(1)).await.unwrap();
    assert_eq!(one.delivery_ids.len(), 1);
    let batch = client
        .publish_many(pb::PublishEventsRequest {
            events: vec![user_new(2), user_new(3)],
        })
        .await
        .unwrap();
    assert_eq!(batch.results.len(), 2);
    let event = client
        .events()
        .get_event(pb::GetEventRequest {
            id: one.event_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(event.payload, user_new(1).payload);
    assert_eq!(event.entity_id, "1");
    let events = client
        .events()
        .list_events(pb::ListEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 3);
    assert!(events.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let types = client
        .subscriptions()
        .list_event_types(pb::ListEventTypesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .event_types;
    assert_eq!(
        types,
        vec![pb::EventTypeCount {
            event_type: "user.new".into(),
            count: 3
        }]
    );

    // Deliveries: list by event and by subscription, get.
    let by_event = client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            event_id: one.event_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(by_event.len(), 1);
    assert_eq!(by_event[0].event_type, "user.new");
    let whole_log = client
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(
        whole_log.len(),
        3,
        "without a filter: the tenant's whole log"
    );
    assert!(
        whole_log.windows(2).all(|w| w[0].id > w[1].id),
        "newest first"
    );
    assert_eq!(by_event[0].webhook_id, one.event_id);
    let delivery = client
        .deliveries()
        .get_delivery(pb::GetDeliveryRequest {
            id: one.delivery_ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delivery.subscription_id, sub.id);

    // Delete, revoke.
    client
        .subscriptions()
        .delete_subscription(pb::DeleteSubscriptionRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (c, _) = code(
        client
            .subscriptions()
            .get_subscription(pb::GetSubscriptionRequest {
                id: sub.id.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::NotFound);
    admin
        .admin()
        .revoke_token(pb::RevokeTokenRequest {
            token_id: tokens[0].id.clone(),
        })
        .await
        .unwrap();
    let (c, _) = code(
        client
            .subscriptions()
            .list_subscriptions(pb::ListSubscriptionsRequest::default())
            .await,
    );
    assert_eq!(
        c,
        Code::Unauthenticated,
        "a revoked token is refused at once"
    );
    herald.stop().await;
}
both_backends!(every_rpc_works_end_to_end);

async fn bad_input_is_refused_naming_the_field(backend: Backend) {
    let herald = Herald::builder(backend)
        .configure(|c| c.max_payload_bytes = 1024)
        .start()
        .await;
    let (tenant_id, client) = herald.tenant("acme").await;
    let (other_id, other) = herald.tenant("other").await;
    let sub = subscribe(&client, "https://example.com/hook".into(), |_| {}).await;
    let before = counts(&herald).await;

    let bad_subscriptions: Vec<(&str, pb::CreateSubscriptionRequest)> = vec![
        (
            "url",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "ftp://example.com".into(),
                ..Default::default()
            },
        ),
        (
            "url",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "not a url".into(),
                ..Default::default()
            },
        ),
        (
            "url",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: format!("https://e.com/{}", "a".repeat(2050)),
                ..Default::default()
            },
        ),
        (
            "name",
            pb::CreateSubscriptionRequest {
                name: "".into(),
                url: "https://e.com".into(),
                ..Default::default()
            },
        ),
        (
            "name",
            pb::CreateSubscriptionRequest {
                name: "n".repeat(201),
                url: "https://e.com".into(),
                ..Default::default()
            },
        ),
        (
            "event_types",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                event_types: vec!["User.New".into()],
                ..Default::default()
            },
        ),
        (
            "event_types",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                event_types: vec!["a".into(); 51],
                ..Default::default()
            },
        ),
        (
            "api_key",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                api_key: "a\r\nb".into(),
                ..Default::default()
            },
        ),
        (
            "api_key_header",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                api_key_header: "bad header".into(),
                ..Default::default()
            },
        ),
        (
            "api_key_header",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                api_key_header: "webhook-signature".into(),
                ..Default::default()
            },
        ),
        (
            "region",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                region: "EU West".into(),
                ..Default::default()
            },
        ),
        (
            "timeout_ms",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                timeout_ms: 999,
                ..Default::default()
            },
        ),
        (
            "max_attempts",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                max_attempts: 51,
                ..Default::default()
            },
        ),
        (
            "max_concurrency",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                max_concurrency: 2000,
                ..Default::default()
            },
        ),
        (
            "rate_limit_per_s",
            pb::CreateSubscriptionRequest {
                name: "x".into(),
                url: "https://e.com".into(),
                rate_limit_per_s: 1_000_000,
                ..Default::default()
            },
        ),
    ];
    for (field, request) in bad_subscriptions {
        let (c, message) = code(client.subscriptions().create_subscription(request).await);
        assert_eq!(c, Code::InvalidArgument, "{field}: {message}");
        assert!(
            message.starts_with(&format!("{field}:")),
            "{field}: {message}"
        );
    }
    let (c, message) = code(
        client
            .subscriptions()
            .update_subscription(pb::UpdateSubscriptionRequest {
                id: sub.id.clone(),
                url: Some("gopher://x".into()),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(
        (c, message.starts_with("url:")),
        (Code::InvalidArgument, true),
        "{message}"
    );

    let bad_events: Vec<(&str, pb::PublishEventRequest)> = vec![
        (
            "event_type",
            pb::PublishEventRequest {
                event_type: "".into(),
                payload: "{}".into(),
                ..Default::default()
            },
        ),
        (
            "event_type",
            pb::PublishEventRequest {
                event_type: "user.*".into(),
                payload: "{}".into(),
                ..Default::default()
            },
        ),
        (
            "event_type",
            pb::PublishEventRequest {
                event_type: "a.b.c.d.e.f".into(),
                payload: "{}".into(),
                ..Default::default()
            },
        ),
        (
            "payload",
            pb::PublishEventRequest {
                event_type: "user.new".into(),
                payload: "[1]".into(),
                ..Default::default()
            },
        ),
        (
            "payload",
            pb::PublishEventRequest {
                event_type: "user.new".into(),
                payload: "{".into(),
                ..Default::default()
            },
        ),
        (
            "action",
            pb::PublishEventRequest {
                event_type: "user.new".into(),
                payload: "{}".into(),
                action: "test".into(),
                ..Default::default()
            },
        ),
        (
            "entity_id",
            pb::PublishEventRequest {
                event_type: "user.new".into(),
                payload: "{}".into(),
                entity_type: "user".into(),
                ..Default::default()
            },
        ),
        (
            "idempotency_key",
            pb::PublishEventRequest {
                event_type: "user.new".into(),
                payload: "{}".into(),
                idempotency_key: "k".repeat(300),
                ..Default::default()
            },
        ),
    ];
    for (field, request) in bad_events {
        let (c, message) = code(client.events().publish_event(request).await);
        assert_eq!(c, Code::InvalidArgument, "{field}: {message}");
        assert!(
            message.starts_with(&format!("{field}:")),
            "{field}: {message}"
        );
    }
    let big = pb::PublishEventRequest {
        event_type: "user.new".into(),
        payload: format!(r#"{{"a":"{}"}}"#, "x".repeat(2000)),
        ..Default::default()
    };
    let (c, message) = code(client.events().publish_event(big).await);
    assert_eq!(c, Code::ResourceExhausted, "{message}");
    assert!(message.starts_with("payload:"), "{message}");
    // A batch with one invalid event is refused whole.
    let mut bad = user_new(2);
    bad.payload = "nope".into();
    let (c, message) = code(
        client
            .events()
            .publish_events(pb::PublishEventsRequest {
                events: vec![user_new(1), bad],
            })
            .await,
    );
    assert_eq!(c, Code::InvalidArgument, "{message}");
    assert!(message.starts_with("events[1].payload:"), "{message}");

    // Authentication and tenant scoping.
    let stranger = herald.client("hrld_not_a_token");
    let (c, _) = code(
        stranger
            .subscriptions()
            .list_subscriptions(pb::ListSubscriptionsRequest::default())
            .await,
    );
    assert_eq!(c, Code::Unauthenticated);
    let anonymous = herald.client("");
    let (c, _) = code(anonymous.events().publish_event(user_new(1)).await);
    assert_eq!(c, Code::Unauthenticated);
    let (c, _) = code(
        client
            .subscriptions()
            .list_subscriptions(pb::ListSubscriptionsRequest {
                tenant_id: other_id.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::PermissionDenied);
    let (c, _) = code(
        other
            .subscriptions()
            .get_subscription(pb::GetSubscriptionRequest {
                id: sub.id.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(
        c,
        Code::NotFound,
        "another tenant's id is not found, never forbidden"
    );
    // The delivery log by subscription is scoped by the subscription's tenant alone.
    let (c, _) = code(
        other
            .deliveries()
            .list_deliveries(pb::ListDeliveriesRequest {
                subscription_id: sub.id.clone(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(c, Code::NotFound, "another tenant's delivery log");
    let (c, _) = code(
        client
            .admin()
            .list_tenants(pb::ListTenantsRequest::default())
            .await,
    );
    assert_eq!(
        c,
        Code::PermissionDenied,
        "a tenant token is not an admin token"
    );
    let (c, message) = code(
        herald
            .admin()
            .subscriptions()
            .list_subscriptions(pb::ListSubscriptionsRequest::default())
            .await,
    );
    assert_eq!(
        (c, message.starts_with("tenant_id:")),
        (Code::InvalidArgument, true),
        "{message}"
    );
    let (c, _) = code(
        herald
            .admin()
            .subscriptions()
            .list_subscriptions(pb::ListSubscriptionsRequest {
                tenant_id: "ten_00000000000000000000000000".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .and_then(|_| {
                Err::<(), _>(tonic::Status::not_found(
                    "empty list for an unknown tenant is fine",
                ))
            }),
    );
    assert_eq!(c, Code::NotFound);
    let _ = tenant_id;
    assert_eq!(
        counts(&herald).await,
        before,
        "refused calls changed no rows"
    );
    herald.stop().await;
}
both_backends!(bad_input_is_refused_naming_the_field);

async fn idempotent_publishes_create_one_event(backend: Backend) {
    let herald = Herald::builder(backend).no_builtin_agent().start().await;
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, "https://example.com/a".into(), |_| {}).await;
    subscribe(&client, "https://example.com/b".into(), |_| {}).await;
    let mut request = user_new(1);
    request.idempotency_key = "key-1".into();
    let first = client
        .events()
        .publish_event(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = client
        .events()
        .publish_event(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(first.delivery_ids.len(), 2);
    // Racing calls with one key: every caller gets the first reply.
    let mut racing = user_new(2);
    racing.idempotency_key = "key-2".into();
    let calls = (0..16).map(|_| {
        let client = client.clone();
        let racing = racing.clone();
        async move {
            client
                .events()
                .publish_event(racing)
                .await
                .unwrap()
                .into_inner()
        }
    });
    let replies = futures::future::join_all(calls).await;
    assert!(replies.iter().all(|r| *r == replies[0]), "{replies:?}");
    // Same key, different request.
    let mut other = user_new(3);
    other.idempotency_key = "key-1".into();
    let (c, message) = code(client.events().publish_event(other).await);
    assert_eq!(c, Code::AlreadyExists, "{message}");
    assert!(message.starts_with("idempotency_key:"));
    assert_eq!(counts(&herald).await, (2, 4));
    herald.stop().await;
}
both_backends!(idempotent_publishes_create_one_event);

async fn fan_out_respects_filters_active_and_status(backend: Backend) {
    let herald = Herald::builder(backend).no_builtin_agent().start().await;
    let (_, client) = herald.tenant("acme").await;
    let all = subscribe(&client, "https://example.com/all".into(), |_| {}).await;
    let users = subscribe(&client, "https://example.com/users".into(), |r| {
        r.event_types = vec!["user.*".into()]
    })
    .await;
    subscribe(&client, "https://example.com/companies".into(), |r| {
        r.event_types = vec!["company.*".into()]
    })
    .await;
    subscribe(&client, "https://example.com/off".into(), |r| {
        r.active = Some(false)
    })
    .await;
    let reply = client.publish(user_new(1)).await.unwrap();
    let mut targets = Vec::new();
    for id in &reply.delivery_ids {
        let d = client
            .deliveries()
            .get_delivery(pb::GetDeliveryRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        targets.push(d.subscription_id);
    }
    targets.sort();
    let mut expected = vec![all.id.clone(), users.id.clone()];
    expected.sort();
    assert_eq!(targets, expected);
    let mut deep = user_new(2);
    deep.event_type = "user.profile.updated".into();
    assert_eq!(
        client.publish(deep).await.unwrap().delivery_ids.len(),
        1,
        "user.* matches one segment only"
    );
    herald.stop().await;
}
both_backends!(fan_out_respects_filters_active_and_status);

async fn concurrent_publishes_share_commits(backend: Backend) {
    let herald = Herald::builder(backend).no_builtin_agent().start().await;
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, "https://example.com/a".into(), |_| {}).await;
    let store = herald.running.as_ref().unwrap().services.store.clone();
    let before = store.commits();
    let n = 200;
    let calls = (0..n).map(|i| {
        let client = client.clone();
        async move { client.publish(user_new(i)).await.unwrap() }
    });
    let replies = futures::future::join_all(calls).await;
    assert_eq!(replies.len(), n as usize);
    let commits = store.commits() - before;
    assert!(
        commits < u64::from(n),
        "{n} publishes took {commits} commits"
    );
    herald.stop().await;
}
both_backends!(concurrent_publishes_share_commits);

async fn storage_is_durable_by_configuration(backend: Backend) {
    let herald = Herald::builder(backend).no_builtin_agent().start().await;
    let store = &herald.running.as_ref().unwrap().services.store;
    match backend {
        Backend::Sqlite => {
            assert_eq!(store.read_setting("journal_mode").await.unwrap(), "wal");
            // 2 = FULL
            assert_eq!(store.read_setting("synchronous").await.unwrap(), "2");
        }
        Backend::Postgres => {
            assert_eq!(
                store.read_setting("synchronous_commit").await.unwrap(),
                "on"
            );
        }
    }
    herald.stop().await;
}
both_backends!(storage_is_durable_by_configuration);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_survive_sigkill() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let env = vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_BUILTIN_AGENT", "false".to_owned()),
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
    let mut sub = pb::CreateSubscriptionRequest {
        tenant_id: tenant.id.clone(),
        name: "a".into(),
        url: "https://example.com".into(),
        ..Default::default()
    };
    admin
        .subscriptions()
        .create_subscription(sub.clone())
        .await
        .unwrap();
    sub.url = "https://example.com/b".into();
    admin
        .subscriptions()
        .create_subscription(sub)
        .await
        .unwrap();
    let calls = (0..100).map(|i| {
        let admin = admin.clone();
        let mut request = user_new(i);
        request.tenant_id = tenant.id.clone();
        async move { admin.publish(request).await.unwrap() }
    });
    let acknowledged = futures::future::join_all(calls).await;
    cp.kill().await;

    let mut cp = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", cp.addr.unwrap());
    let admin = herald_client::HeraldClient::connect(&url, harness::ADMIN_TOKEN).unwrap();
    for reply in &acknowledged {
        let deliveries = admin
            .deliveries()
            .list_deliveries(pb::ListDeliveriesRequest {
                tenant_id: tenant.id.clone(),
                event_id: reply.event_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .deliveries;
        let mut ids: Vec<String> = deliveries.into_iter().map(|d| d.id).collect();
        ids.sort();
        let mut expected = reply.delivery_ids.clone();
        expected.sort();
        assert_eq!(ids, expected);
    }
    cp.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_and_never_logged() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let env = vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_MASTER_KEY", key.to_owned()),
        ("RUST_LOG", "trace".to_owned()),
    ];
    let mut cp = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", cp.addr.unwrap());
    let admin = herald_client::HeraldClient::connect(&url, harness::ADMIN_TOKEN).unwrap();
    let receiver = Receiver::start().await;
    let (_, token) = harness::create_tenant(&admin, "acme", "t").await;
    let client = herald_client::HeraldClient::connect(&url, &token).unwrap();
    let api_key = "receiver-api-key-5f3a9c";
    let secret_header = "secret-header-value-8e41d7";
    let sub = subscribe(&client, receiver.url("/"), |r| {
        r.api_key = api_key.into();
        r.headers = vec![pb::CustomHeader {
            name: "X-Shared-Key".into(),
            value: secret_header.into(),
            secret: true,
            ..Default::default()
        }];
    })
    .await;
    let rotated = client
        .subscriptions()
        .rotate_secret(pb::RotateSecretRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    client.publish(user_new(1)).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    // The secret header went out, through every traced path, on a delivery.
    assert_eq!(got[0].header("x-shared-key"), Some(secret_header));
    cp.terminate().await;

    use base64::Engine as _;
    let secrets = [
        api_key.to_owned(),
        secret_header.to_owned(),
        sub.signing_secret.clone(),
        rotated.signing_secret.clone(),
    ];
    let mut forms: Vec<String> = Vec::new();
    for secret in &secrets {
        forms.push(secret.clone());
        forms.push(base64::engine::general_purpose::STANDARD.encode(secret));
        if let Some(body) = secret.strip_prefix("whsec_") {
            forms.push(body.to_owned());
        }
    }
    let path = database.sqlite_path().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
    let stored = String::from_utf8_lossy(&bytes);
    let logs = cp.logs();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "trace logging was on"
    );
    for form in &forms {
        assert!(
            !stored.contains(form.as_str()),
            "a secret is stored in clear"
        );
        assert!(!logs.contains(form.as_str()), "a secret was logged");
    }
    assert!(!logs.contains(&token), "a token was logged");
    assert!(
        !logs.contains(harness::AGENT_TOKEN),
        "the agent token was logged"
    );
    assert!(
        !logs.contains(harness::ADMIN_TOKEN),
        "the admin token was logged"
    );

    // Another key is refused at start, with a message naming the setting.
    let mut wrong = env.clone();
    wrong.retain(|(k, _)| *k != "HERALD_MASTER_KEY");
    wrong.push((
        "HERALD_MASTER_KEY",
        "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=".to_owned(),
    ));
    let output = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .envs(wrong.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("HERALD_MASTER_KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_naming_the_setting() {
    let output = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .env("HERALD_LISTEN", "not-an-address")
        .env("HERALD_CLI_ONLY_SETTING", "ignored")
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HERALD_LISTEN"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

mod reflection {
    use bytes::{Buf, BufMut, Bytes};
    use prost::Message as _;
    use prost_reflect::{DescriptorPool, DynamicMessage};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic_reflection::pb::{v1, v1alpha};

    use super::*;

    /// Passes message bytes through, so calls need no generated types.
    #[derive(Default, Clone)]
    struct RawCodec;
    struct RawEncoder;
    struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Bytes;
        type Error = tonic::Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put(item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Bytes;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }

    impl Codec for RawCodec {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }

    /// Builds a descriptor pool from file descriptors fetched over reflection.
    fn pool(files: Vec<Vec<u8>>) -> DescriptorPool {
        let mut set = prost_types::FileDescriptorSet::default();
        for file in files {
            set.file
                .push(prost_types::FileDescriptorProto::decode(file.as_slice()).unwrap());
        }
        let mut pool = DescriptorPool::new();
        pool.add_file_descriptor_set(set).unwrap();
        pool
    }

    async fn list_tenants_dynamically(herald: &Herald, pool: &DescriptorPool) {
        let method = pool
            .get_service_by_name("herald.v1.AdminService")
            .unwrap()
            .methods()
            .find(|m| m.name() == "ListTenants")
            .unwrap();
        let request = DynamicMessage::new(method.input());
        let channel = herald.admin().channel();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let mut call = tonic::Request::new(Bytes::from(request.encode_to_vec()));
        call.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", herald.admin_token).parse().unwrap(),
        );
        let path = http::uri::PathAndQuery::from_static("/herald.v1.AdminService/ListTenants");
        let reply = grpc.unary(call, path, RawCodec).await.unwrap().into_inner();
        let reply = DynamicMessage::decode(method.output(), reply).unwrap();
        let tenants = reply.get_field_by_name("tenants").unwrap();
        assert_eq!(tenants.as_list().unwrap().len(), 1);
    }

    /// Lists the services and fetches the files describing `AdminService` over one reflection
    /// version (`v1` or `v1alpha`: the same messages in two packages); returns (services, files).
    macro_rules! ask_reflection {
        ($version:ident, $herald:expr) => {{
            use $version::server_reflection_request::MessageRequest;
            use $version::server_reflection_response::MessageResponse;
            let mut client = $version::server_reflection_client::ServerReflectionClient::new(
                $herald.admin().channel(),
            );
            let ask = |request| $version::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request),
            };
            let mut replies = client
                .server_reflection_info(tokio_stream::iter(vec![
                    ask(MessageRequest::ListServices(String::new())),
                    ask(MessageRequest::FileContainingSymbol(
                        "herald.v1.AdminService".into(),
                    )),
                    // A client resolves imports it lacks by file name, as grpcurl does.
                    ask(MessageRequest::FileByFilename(
                        "google/protobuf/timestamp.proto".into(),
                    )),
                ]))
                .await
                .unwrap()
                .into_inner();
            let mut services: Vec<String> = Vec::new();
            let mut files: Vec<Vec<u8>> = Vec::new();
            while let Some(reply) = replies.message().await.unwrap() {
                match reply.message_response.unwrap() {
                    MessageResponse::ListServicesResponse(list) => {
                        services.extend(list.service.into_iter().map(|s| s.name));
                    }
                    MessageResponse::FileDescriptorResponse(fds) => {
                        files.extend(fds.file_descriptor_proto);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            (services, files)
        }};
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reflection_v1_and_v1alpha_describe_every_service() {
        let herald = Herald::builder(Backend::Sqlite)
            .no_builtin_agent()
            .start()
            .await;
        herald.tenant("acme").await;
        let expected = [
            "grpc.health.v1.Health",
            "herald.v1.AdminService",
            "herald.v1.AgentService",
            "herald.v1.DeliveryService",
            "herald.v1.EventService",
            "herald.v1.SubscriptionService",
        ];

        let (services, files) = ask_reflection!(v1, herald);
        for name in expected {
            assert!(
                services.iter().any(|s| s == name),
                "v1: {name} missing from {services:?}"
            );
        }
        list_tenants_dynamically(&herald, &pool(files)).await;

        let (services, files) = ask_reflection!(v1alpha, herald);
        for name in expected {
            assert!(
                services.iter().any(|s| s == name),
                "v1alpha: {name} missing from {services:?}"
            );
        }
        list_tenants_dynamically(&herald, &pool(files)).await;

        // Health, without a token.
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(herald.admin().channel());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        herald.stop().await;
    }
}

/// A flood of 10,000 failed authentications from 127.0.0.2 costs little: once its failures are
/// spent, that address's bad tokens are refused without database reads, while valid callers on
/// 127.0.0.1 and on 127.0.0.2 itself are served. Latencies are reported, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failed_authentications_leaves_valid_callers_served() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .configure(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    let metrics_port = herald
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .unwrap()
        .port();
    let flooder_ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let channel_from = |ip: std::net::IpAddr| {
        tonic::transport::Endpoint::from_shared(herald.url())
            .unwrap()
            .local_address(Some(ip))
            .connect_lazy()
    };
    let request = |token: &str| {
        let mut request = tonic::Request::new(pb::ListTenantsRequest::default());
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let flood_channel = channel_from(flooder_ip);
    let flood = async {
        let mut codes: HashMap<tonic::Code, usize> = HashMap::new();
        let calls = futures::stream::iter(0..10_000)
            .map(|i| {
                let mut client =
                    pb::admin_service_client::AdminServiceClient::new(flood_channel.clone());
                let request = request(&format!("hrld_forged_{i:08}"));
                async move { client.list_tenants(request).await }
            })
            .buffer_unordered(32);
        futures::pin_mut!(calls);
        while let Some(result) = calls.next().await {
            let code = result.err().map_or(tonic::Code::Ok, |s| s.code());
            *codes.entry(code).or_default() += 1;
        }
        codes
    };
    let valid = async {
        let mut latencies: HashMap<&str, Vec<Duration>> = HashMap::new();
        for round in 0..20 {
            for (name, ip) in [("127.0.0.1", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")] {
                let mut client = pb::admin_service_client::AdminServiceClient::new(channel_from(
                    ip.parse().unwrap(),
                ));
                let started = std::time::Instant::now();
                client
                    .list_tenants(request(&herald.admin_token))
                    .await
                    .unwrap_or_else(|s| panic!("valid caller on {name}, round {round}: {s:?}"));
                latencies.entry(name).or_default().push(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies
    };
    let (codes, latencies) = tokio::join!(flood, valid);
    assert_eq!(codes.get(&tonic::Code::Ok), None, "{codes:?}");
    for (name, mut samples) in latencies {
        samples.sort();
        eprintln!(
            "auth flood: valid caller on {name}: p50 {:?}, max {:?} ({} calls); flood: {codes:?}",
            samples[samples.len() / 2],
            samples[samples.len() - 1],
            samples.len()
        );
    }
    let samples = crate::observability::scrape(metrics_port).await;
    let throttled = samples
        .get(r#"herald_auth_failures_total{reason="throttled"}"#)
        .copied()
        .unwrap_or(0.0);
    let looked_up = samples
        .get(r#"herald_auth_failures_total{reason="unknown"}"#)
        .copied()
        .unwrap_or(0.0);
    eprintln!("auth flood: {looked_up} looked up, {throttled} refused without a look-up");
    assert!(looked_up < 1_000.0, "{samples:?}");
    assert!(throttled > 9_000.0, "{samples:?}");
    herald.stop().await;
}
