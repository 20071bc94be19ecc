//! Storage faults on the write path: a disk that fills up and is freed again (SQLite's
//! `max_page_count`, changed while the control plane runs), a PostgreSQL connection terminated
//! while a publish batch commits. An acknowledged publish is in the database afterwards, and
//! nothing is stored twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::receiver::Reply;
use herald_tests::{Backend, Herald, Receiver, eventually, harness};
use sea_orm::ConnectionTrait as _;

use crate::delivery::subscribe;

/// SQLite's own default `max_page_count`: no limit in practice.
const NO_PAGE_LIMIT: u64 = 4_294_967_294;

fn event(i: u32, payload_bytes: usize) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "user.new".into(),
        payload: format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(payload_bytes)),
        ..Default::default()
    }
}

/// Reads a column of strings with a connection of its own (not the control plane's).
async fn read_strings(url: &str, sql: &str) -> Vec<String> {
    let db = sea_orm::Database::connect(url).await.unwrap();
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            sql.to_owned(),
        ))
        .await
        .unwrap();
    let _ = db.close().await;
    rows.iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect()
}

async fn health(herald: &Herald) -> i32 {
    let mut health = tonic_health::pb::health_client::HealthClient::new(herald.admin().channel());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Publishes `count` events from 8 concurrent publishers, half of them one event per call and
/// half three per `PublishEvents` call (SQLite rolls a failed single-row insert back with its
/// whole transaction, a failed multi-row one only to the statement: both must be survived);
/// returns the acknowledged event ids and the status codes of the refusals.
async fn publish_many(
    client: &herald_client::HeraldClient,
    from: u32,
    count: u32,
    payload_bytes: usize,
) -> (Vec<String>, Vec<tonic::Code>) {
    let next = Arc::new(AtomicU32::new(from));
    let publishers = (0..8).map(|publisher| {
        let (client, next) = (client.clone(), next.clone());
        let per_call = if publisher % 2 == 0 { 1 } else { 3 };
        async move {
            let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
            loop {
                let first = next.fetch_add(per_call, Ordering::Relaxed);
                if first >= from + count {
                    return (acknowledged, refused);
                }
                let last = (first + per_call).min(from + count);
                let reply = if per_call == 1 {
                    client
                        .publish(event(first, payload_bytes))
                        .await
                        .map(|reply| vec![reply.event_id])
                } else {
                    let events = (first..last).map(|i| event(i, payload_bytes)).collect();
                    client
                        .publish_many(pb::PublishEventsRequest { events })
                        .await
                        .map(|reply| reply.results.into_iter().map(|r| r.event_id).collect())
                };
                match reply {
                    Ok(ids) => acknowledged.extend(ids),
                    Err(status) => refused.push(status.code()),
                }
            }
        }
    });
    let mut all = (Vec::new(), Vec::new());
    for (acknowledged, refused) in futures::future::join_all(publishers).await {
        all.0.extend(acknowledged);
        all.1.extend(refused);
    }
    all
}

/// Publishing into a full disk, freeing space, then a crash and a restart: every acknowledged
/// event is in the file (read by an independent reader before the restart), listed and
/// delivered after it; refusals are `RESOURCE_EXHAUSTED`; health is `NOT_SERVING` while writes
/// fail and `SERVING` again once they succeed; results that could not be recorded are recorded
/// once space is back (no delivery stays `IN_FLIGHT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_no_acknowledged_publish() {
    let page_limit = Arc::new(AtomicU64::new(NO_PAGE_LIMIT));
    let database = harness::TestDatabase::new(Backend::Sqlite).await;
    let url = database.url.clone();
    let (herald, runtime) = Herald::builder(Backend::Sqlite)
        .hooks(herald_control_plane::Hooks {
            sqlite_page_limit: Some(page_limit.clone()),
            ..Default::default()
        })
        .configure(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start_crashable_on(database)
        .await;
    let metrics_port = herald
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .unwrap()
        .port();
    let receiver = Receiver::start().await;
    let (tenant_id, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let (mut acknowledged, refused) = publish_many(&client, 0, 20, 4096).await;
    assert!(refused.is_empty(), "{refused:?}");

    // Room for a few dozen more 4 KiB events, then the disk is full.
    let pages: i64 = read_strings(
        &url,
        "SELECT CAST(page_count AS TEXT) FROM pragma_page_count()",
    )
    .await[0]
        .parse()
        .unwrap();
    page_limit.store(pages as u64 + 60, Ordering::Release);
    let (during, refused) = publish_many(&client, 1_000, 400, 4096).await;
    assert!(
        !refused.is_empty(),
        "the disk never filled up ({} acknowledged)",
        during.len()
    );
    assert!(
        refused
            .iter()
            .all(|code| *code == tonic::Code::ResourceExhausted),
        "refusals of a full disk are RESOURCE_EXHAUSTED: {refused:?}"
    );
    eprintln!(
        "full disk: {} acknowledged, {} refused",
        during.len(),
        refused.len()
    );
    acknowledged.extend(during);
    assert_eq!(health(&herald).await, NOT_SERVING);
    let samples = crate::observability::scrape(metrics_port).await;
    eprintln!(
        "storage errors: {:?}",
        samples
            .iter()
            .filter(|(k, _)| k.starts_with("herald_storage_errors"))
            .collect::<Vec<_>>()
    );
    assert!(
        samples
            .get(r#"herald_storage_errors_total{kind="full"}"#)
            .is_some_and(|n| *n > 0.0),
        "{samples:?}"
    );

    // Space is back: publishing, recording and health recover by themselves.
    page_limit.store(NO_PAGE_LIMIT, Ordering::Release);
    eventually("health SERVING again", Duration::from_secs(20), || async {
        (health(&herald).await == SERVING).then_some(())
    })
    .await;
    let (after, refused) = publish_many(&client, 2_000, 100, 4096).await;
    assert!(refused.is_empty(), "{refused:?}");
    acknowledged.extend(after);

    let stored: HashSet<String> = read_strings(&url, "SELECT id FROM events")
        .await
        .into_iter()
        .collect();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events are not in the database file",
        missing.len(),
        acknowledged.len()
    );
    // Every delivery of an acknowledged event ends SUCCEEDED with its attempt recorded, also
    // the ones whose results arrived while the disk was full.
    eventually(
        "every delivery recorded as SUCCEEDED",
        Duration::from_secs(60),
        || async {
            // 3 = SUCCEEDED; one attempt each (the receiver answers 200).
            let states = read_strings(
                &url,
                "SELECT CAST(state AS TEXT) || ':' || CAST(attempt_count AS TEXT) FROM deliveries",
            )
            .await;
            let done =
                states.len() == acknowledged.len() && states.iter().all(|s| s.as_str() == "3:1");
            done.then_some(())
        },
    )
    .await;

    // A crash, and a restart on the same file.
    let database = herald.crash(runtime).await;
    let herald = Herald::builder(Backend::Sqlite).start_on(database).await;
    let listed: HashSet<String> = herald
        .admin()
        .events()
        .list_events(pb::ListEventsRequest {
            tenant_id: tenant_id.clone(),
            page_size: 1_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.id)
        .collect();
    for id in &acknowledged {
        assert!(listed.contains(id), "acknowledged event {id} is not listed");
    }
    let expected: HashSet<&String> = acknowledged.iter().collect();
    let got = receiver
        .wait_for(acknowledged.len(), Duration::from_secs(60))
        .await;
    let delivered: HashSet<&str> = got.iter().filter_map(|r| r.header("webhook-id")).collect();
    for id in expected {
        assert!(
            delivered.contains(id.as_str()),
            "event {id} was never delivered"
        );
    }
    herald.stop().await;
}

/// PostgreSQL: the writer's connection is terminated (`pg_terminate_backend`) just before a
/// publish batch commits, three times. No caller is told OK for an event that is not in the
/// database, and no event is stored twice under two ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_at_commit_acknowledges_only_what_is_stored() {
    let database = harness::TestDatabase::new(Backend::Postgres).await;
    let name = database.url.rsplit('/').next().unwrap().to_owned();
    let terminations = Arc::new(AtomicU32::new(0));
    let hook: herald_control_plane::service::publish::CommitHook = {
        let terminations = terminations.clone();
        Arc::new(move || {
            let (terminations, name) = (terminations.clone(), name.clone());
            Box::pin(async move {
                if terminations.fetch_add(1, Ordering::AcqRel) >= 3 {
                    return;
                }
                let admin = sea_orm::Database::connect(harness::PG_ADMIN_URL)
                    .await
                    .unwrap();
                // Waits (up to 5 s) until the backends are gone.
                admin
                    .execute_unprepared(&format!(
                        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
                         WHERE datname = '{name}' AND pid <> pg_backend_pid()"
                    ))
                    .await
                    .unwrap();
                let _ = admin.close().await;
            })
        })
    };
    let herald = Herald::builder(Backend::Postgres)
        .no_builtin_agent()
        .hooks(herald_control_plane::Hooks {
            before_publish_commit: Some(hook),
            ..Default::default()
        })
        .start_on(database)
        .await;
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, "http://127.0.0.1:9/hook".into(), |_| {}).await;
    let (acknowledged, refused) = publish_many(&client, 0, 300, 64).await;
    assert!(
        terminations.load(Ordering::Acquire) > 3,
        "the hook ran at every commit"
    );
    assert!(
        refused.iter().all(|code| *code == tonic::Code::Unavailable),
        "refusals of a lost connection are UNAVAILABLE: {refused:?}"
    );
    let url = herald.database.url.clone();
    let stored = read_strings(&url, "SELECT id FROM events").await;
    let stored_set: HashSet<&String> = stored.iter().collect();
    for id in &acknowledged {
        assert!(
            stored_set.contains(id),
            "acknowledged event {id} is not stored"
        );
    }
    // Each publish has its own payload: one stored event per payload at most.
    let mut per_payload: HashMap<String, u32> = HashMap::new();
    for payload in read_strings(&url, "SELECT payload FROM events").await {
        *per_payload.entry(payload).or_default() += 1;
    }
    let twice: Vec<_> = per_payload.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    // And a caller told it failed finds nothing stored for it.
    let acknowledged: HashSet<&String> = acknowledged.iter().collect();
    assert_eq!(stored_set, acknowledged);
    herald.stop().await;
}

/// Results that arrive while the disk is full are kept and written once space is back: the
/// deliveries stay `IN_FLIGHT` under leases that would expire meanwhile, then end `SUCCEEDED`
/// with one attempt each, and the receiver is not sent anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_could_not_be_recorded_are_recorded_once_space_is_back() {
    let page_limit = Arc::new(AtomicU64::new(NO_PAGE_LIMIT));
    let herald = Herald::builder(Backend::Sqlite)
        .hooks(herald_control_plane::Hooks {
            sqlite_page_limit: Some(page_limit.clone()),
            ..Default::default()
        })
        .start()
        .await;
    let url = herald.database.url.clone();
    let receiver = Receiver::start().await;
    // Held for a moment, and answered with a header large enough that its attempt row needs
    // pages of its own.
    receiver.default_reply(Reply {
        status: 200,
        headers: vec![("x-pad".into(), "y".repeat(4_000))],
        delay: Duration::from_secs(2),
    });
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let (acknowledged, refused) = publish_many(&client, 0, 10, 64).await;
    assert!(refused.is_empty(), "{refused:?}");
    receiver.wait_for(10, Duration::from_secs(20)).await;
    // Every job is at the receiver: the disk fills up before their results arrive.
    let pages: u64 = read_strings(
        &url,
        "SELECT CAST(page_count AS TEXT) FROM pragma_page_count()",
    )
    .await[0]
        .parse()
        .unwrap();
    page_limit.store(pages, Ordering::Release);
    eventually("health NOT_SERVING", Duration::from_secs(20), || async {
        (health(&herald).await == NOT_SERVING).then_some(())
    })
    .await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let leases = read_strings(
        &url,
        "SELECT CAST(state AS TEXT) || ':' || CAST(COALESCE(lease_expires_at, 0) AS TEXT) FROM deliveries",
    )
    .await;
    // Whatever is not recorded yet is IN_FLIGHT under a lease that will expire (a result
    // recorded before the disk filled may be SUCCEEDED already).
    let mut waiting = 0;
    for lease in &leases {
        let (state, expires) = lease.split_once(':').unwrap();
        if state == "3" {
            continue;
        }
        waiting += 1;
        assert_eq!(
            state, "2",
            "IN_FLIGHT while its result cannot be recorded: {leases:?}"
        );
        assert!(
            expires.parse::<i64>().unwrap() > now_ms,
            "under a lease that expires: {leases:?}"
        );
    }
    assert!(waiting > 0, "no result waited for space: {leases:?}");

    page_limit.store(NO_PAGE_LIMIT, Ordering::Release);
    eventually(
        "every delivery recorded as SUCCEEDED",
        Duration::from_secs(30),
        || async {
            let states = read_strings(
                &url,
                "SELECT CAST(state AS TEXT) || ':' || CAST(attempt_count AS TEXT) FROM deliveries",
            )
            .await;
            (states.len() == acknowledged.len() && states.iter().all(|s| s.as_str() == "3:1"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(receiver.received().len(), 10, "nothing was sent twice");
    assert_eq!(health(&herald).await, SERVING);
    herald.stop().await;
}
