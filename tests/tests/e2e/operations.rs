//! What docs/OPERATIONS.md promises an operator: a backup of SQLite taken while the control
//! plane runs restores every acknowledged write; the alert rules of
//! `deploy/prometheus/alerts.yml` pass `promtool`, and each condition they page on shows in a
//! running control plane's `/metrics` once it is driven into it; an agent's health check
//! follows its stream.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::harness::{self, TestDatabase};
use herald_tests::receiver::Reply;
use herald_tests::{Backend, Herald, Receiver, eventually};
use sea_orm::ConnectionTrait as _;

use crate::delivery::{subscribe, user_new};
use crate::deploy::deploy_dir;
use crate::observability::{free_port, reqwest_get, scrape};

const MASTER_KEY: &str = "aGVyYWxkLWJhY2t1cC10ZXN0LW1hc3Rlci1rZXktMzI=";

/// Runs `herald-control-plane` with `args` and `env` (and no other HERALD_* variable).
async fn control_plane_command(args: &[&str], env: &[(&str, String)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(harness::binary("herald-control-plane"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

fn sqlite_env(path: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        (
            "HERALD_DATABASE_URL",
            format!("sqlite://{}", path.display()),
        ),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_MASTER_KEY", MASTER_KEY.to_owned()),
        ("HERALD_RETRY_SCHEDULE", "100ms".to_owned()),
    ]
}

/// `herald-control-plane backup --to FILE` while the control plane runs and publishes go on:
/// after a stop and the loss of the database, a control plane started on the backup file has
/// the tenant, its token, the subscription (its sealed secrets open with the same master key)
/// and every event acknowledged before the backup began; with another master key it refuses to
/// start. An existing file is never overwritten, and PostgreSQL is pointed to pg_dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_running_restores_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("herald.db");
    let env = sqlite_env(&live);
    let mut cp = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", cp.addr.unwrap());
    let admin = herald_client::HeraldClient::connect(&url, harness::ADMIN_TOKEN).unwrap();
    let (_, token) = harness::create_tenant(&admin, "acme", "backend").await;
    let client = herald_client::HeraldClient::connect(&url, &token).unwrap();
    let receiver = Receiver::start().await;
    let subscription = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let mut before = Vec::new();
    for i in 0..20 {
        before.push(client.publish(user_new(i)).await.unwrap().event_id);
    }
    receiver.wait_for(20, Duration::from_secs(20)).await;

    // Publishing goes on while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU32::new(0));
    let publishing = {
        let (client, stop, published) = (client.clone(), stop.clone(), published.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = published.load(Ordering::Relaxed);
                client.publish(user_new(1000 + n)).await.unwrap();
                published.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    eventually("publishing under way", Duration::from_secs(10), || {
        let published = published.load(Ordering::Relaxed);
        async move { (published > 0).then_some(()) }
    })
    .await;
    let backup = dir.path().join("backup.db");
    let backup_arg = backup.display().to_string();
    let output = control_plane_command(&["backup", "--to", &backup_arg], &env).await;
    stop.store(true, Ordering::Relaxed);
    // Every publish during the backup was acknowledged (the task unwraps them).
    publishing.await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("backed up sqlite://"), "{stdout}");
    assert!(backup.is_file());
    assert!(!dir.path().join("backup.db.partial").exists());

    // A backup never overwrites a file; PostgreSQL is backed up with its own tools.
    let again = control_plane_command(&["backup", "--to", &backup_arg], &env).await;
    assert_eq!(again.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let postgres = control_plane_command(
        &[
            "backup",
            "--to",
            &dir.path().join("pg.db").display().to_string(),
        ],
        &[(
            "HERALD_DATABASE_URL",
            "postgres://herald@127.0.0.1:5432/herald".to_owned(),
        )],
    )
    .await;
    assert_eq!(postgres.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&postgres.stderr).contains("pg_dump"));

    // The machine loses its database; the backup is put in its place.
    assert!(cp.terminate().await.success(), "{}", cp.logs());
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", live.display()));
    }
    std::fs::rename(&backup, &live).unwrap();

    // Without the master key the data was sealed with, the restore does not start.
    let mut wrong_key = env.clone();
    wrong_key.retain(|(k, _)| *k != "HERALD_MASTER_KEY");
    wrong_key.push((
        "HERALD_MASTER_KEY",
        "b3RoZXItbWFzdGVyLWtleS1vZi0zMi1ieXRlcy0uLi4=".to_owned(),
    ));
    let refused = control_plane_command(&[], &wrong_key).await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("HERALD_MASTER_KEY"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let mut restored = harness::spawn_control_plane(&env).await;
    let url = format!("http://{}", restored.addr.unwrap());
    let client = herald_client::HeraldClient::connect(&url, &token).unwrap();
    let got = client
        .subscriptions()
        .get_subscription(pb::GetSubscriptionRequest {
            id: subscription.id.clone(),
            ..Default::default()
        })
        .await
        .expect("the tenant's token and subscription are restored")
        .into_inner();
    assert_eq!(got.url, subscription.url);
    for event_id in &before {
        client
            .events()
            .get_event(pb::GetEventRequest {
                id: event_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("{event_id} is not restored: {status}"));
    }
    // The restored control plane works: a new event is delivered, signed with the restored
    // (sealed) secret, so the receiver sees the next request.
    client.publish(user_new(5000)).await.unwrap();
    eventually(
        "a delivery after the restore",
        Duration::from_secs(20),
        || {
            let receiver = &receiver;
            async move {
                receiver
                    .received()
                    .iter()
                    .any(|r| r.body.as_ref() == user_new(5000).payload.as_bytes())
                    .then_some(())
            }
        },
    )
    .await;
    assert!(restored.terminate().await.success(), "{}", restored.logs());
}

/// `deploy/prometheus/alerts.yml` passes `promtool check rules` and its tests
/// (`alerts_test.yml`, a firing and a quiet case per rule), and Prometheus's configuration
/// `promtool check config`. promtool comes from Debian's `prometheus` package, installed by
/// `scripts/ensure-promtool` when missing.
#[test]
fn the_alert_rules_pass_promtool() {
    let root = deploy_dir().parent().unwrap().to_path_buf();
    let ensured = std::process::Command::new(root.join("scripts/ensure-promtool"))
        .output()
        .unwrap();
    if ensured.status.code() == Some(2) {
        eprintln!(
            "SKIPPED: promtool is missing and apt-get cannot install it: {}",
            String::from_utf8_lossy(&ensured.stderr)
        );
        return;
    }
    assert!(
        ensured.status.success(),
        "{}",
        String::from_utf8_lossy(&ensured.stderr)
    );
    let promtool = String::from_utf8_lossy(&ensured.stdout).trim().to_owned();
    let dir = deploy_dir().join("prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Each rule has a test case.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no promtool test"
        );
    }
}

/// The `herald_*` metric names an alert rule or the Grafana dashboard queries.
fn queried_metrics() -> BTreeSet<String> {
    let mut text = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(deploy_dir().join("grafana/dashboards/herald.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    for panel in parsed["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            text.push('\n');
            text.push_str(target["expr"].as_str().unwrap());
        }
    }
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("herald_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Drives a running control plane into each condition an alert rule pages on and reads it from
/// `/metrics`: a delivery going `DEAD` (`herald_deliveries_total{outcome="dead"}`), a due
/// delivery nobody takes (`herald_oldest_due_delivery_age_seconds`), an endpoint disabled by a
/// 410 (`herald_subscriptions_disabled_total{reason="gone"}`), a region without an agent
/// (`herald_agents_connected{region} 0`) and publishes failing on the server's side
/// (`herald_rpc_errors_total{method,code}`, a trigger in the database refusing the insert).
/// Every metric an alert rule or the dashboard queries is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_alert_condition_shows_in_the_metrics() {
    let herald = Herald::builder(Backend::Sqlite)
        .configure(|c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    let port = herald
        .running
        .as_ref()
        .unwrap()
        .metrics_addr
        .unwrap()
        .port();
    let (_, client) = herald.tenant("acme").await;
    let value =
        |samples: &std::collections::HashMap<String, f64>, key: &str| samples.get(key).copied();

    // Exported from the start, at 0: the series the alerts watch exist before anything happens.
    let samples = scrape(port).await;
    for key in [
        "herald_deliveries_total{outcome=\"dead\"}",
        "herald_subscriptions_disabled_total{reason=\"gone\"}",
        "herald_subscriptions_disabled_total{reason=\"failing\"}",
        "herald_rpc_errors_total{code=\"INTERNAL\",method=\"PublishEvent\"}",
        "herald_rpc_errors_total{code=\"UNAVAILABLE\",method=\"PublishEvents\"}",
        "herald_oldest_due_delivery_age_seconds",
    ] {
        assert_eq!(value(&samples, key), Some(0.0), "{key}");
    }
    // Deliveries dying: one attempt allowed, the receiver answers 500.
    let failing = Receiver::start().await;
    failing.default_reply(Reply::from(500));
    subscribe(&client, failing.url("/dies"), |s| {
        s.max_attempts = 1;
        s.event_types = vec!["dies".into()];
    })
    .await;
    client
        .publish(pb::PublishEventRequest {
            event_type: "dies".into(),
            ..user_new(1)
        })
        .await
        .unwrap();

    // An endpoint disabled: it answers 410 Gone.
    let gone = Receiver::start().await;
    gone.default_reply(Reply::from(410));
    subscribe(&client, gone.url("/gone"), |s| {
        s.event_types = vec!["gone".into()];
    })
    .await;
    client
        .publish(pb::PublishEventRequest {
            event_type: "gone".into(),
            ..user_new(2)
        })
        .await
        .unwrap();

    // A region without an agent (the built-in agent serves `local`): the delivery waits.
    let nowhere = Receiver::start().await;
    subscribe(&client, nowhere.url("/eu"), |s| {
        s.region = "eu".into();
        s.event_types = vec!["waits".into()];
    })
    .await;
    client
        .publish(pb::PublishEventRequest {
            event_type: "waits".into(),
            ..user_new(3)
        })
        .await
        .unwrap();

    let samples = eventually(
        "dead, disabled, waiting and agentless in /metrics",
        Duration::from_secs(30),
        || async move {
            let samples = scrape(port).await;
            let ok = value(&samples, "herald_deliveries_total{outcome=\"dead\"}") >= Some(1.0)
                && value(
                    &samples,
                    "herald_subscriptions_disabled_total{reason=\"gone\"}",
                ) == Some(1.0)
                && value(&samples, "herald_oldest_due_delivery_age_seconds") > Some(1.0)
                && value(&samples, "herald_agents_connected{region=\"eu\"}") == Some(0.0);
            ok.then_some(samples)
        },
    )
    .await;
    assert_eq!(
        value(&samples, "herald_agents_connected{region=\"local\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "herald_subscriptions_disabled_total{reason=\"failing\"}"
        ),
        Some(0.0)
    );
    assert!(nowhere.received().is_empty());

    // Publish errors on the server's side: the database refuses every new event.
    let db = sea_orm::Database::connect(&herald.database.url)
        .await
        .unwrap();
    db.execute_unprepared(
        "CREATE TRIGGER refuse_events BEFORE INSERT ON events \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .await
    .unwrap();
    let refused = client.publish(user_new(4)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused}");
    let invalid = client
        .publish(pb::PublishEventRequest {
            event_type: String::new(),
            ..user_new(5)
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let samples = scrape(port).await;
    assert_eq!(
        value(
            &samples,
            "herald_rpc_errors_total{code=\"INTERNAL\",method=\"PublishEvent\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "herald_rpc_errors_total{code=\"INVALID_ARGUMENT\",method=\"PublishEvent\"}"
        ),
        Some(1.0)
    );
    db.execute_unprepared("DROP TRIGGER refuse_events")
        .await
        .unwrap();
    let _ = db.close().await;
    client.publish(user_new(6)).await.unwrap();
    // A path no service serves is counted as `unknown`, never under a name the caller chose.
    let mut grpc = tonic::client::Grpc::new(herald.admin().channel());
    grpc.ready().await.unwrap();
    let unknown = grpc
        .unary::<(), (), _>(
            tonic::Request::new(()),
            "/herald.v1.EventService/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::Unimplemented);
    let samples = scrape(port).await;
    assert_eq!(
        value(
            &samples,
            "herald_rpc_errors_total{code=\"UNIMPLEMENTED\",method=\"unknown\"}"
        ),
        Some(1.0)
    );
    let body = reqwest_get(port).await;
    for name in queried_metrics() {
        assert!(body.contains(&name), "{name} is queried but not exported");
    }
    herald.stop().await;
}

/// `herald-agent health` asks the agent's health service (`HERALD_HEALTH_LISTEN`): NOT_SERVING
/// (exit 1) while no control plane holds its stream, SERVING (exit 0) once one does, and
/// NOT_SERVING again when that control plane goes; without the setting it says so (exit 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_health_follows_its_stream() {
    let health_addr = format!("127.0.0.1:{}", free_port().await);
    let cp_addr = format!("127.0.0.1:{}", free_port().await);
    let agent_env = vec![
        ("HERALD_CONTROL_PLANE", format!("http://{cp_addr}")),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_HEALTH_LISTEN", health_addr.clone()),
        ("HERALD_REGION", "eu".to_owned()),
    ];
    let health = |env: Vec<(&'static str, String)>| async move {
        let mut command = tokio::process::Command::new(harness::binary("herald-agent"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HERALD_") {
                command.env_remove(key);
            }
        }
        command
            .arg("health")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .await
            .unwrap()
    };
    let unset: Vec<_> = agent_env
        .iter()
        .filter(|(k, _)| *k != "HERALD_HEALTH_LISTEN")
        .cloned()
        .collect();
    let output = health(unset).await;
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("HERALD_HEALTH_LISTEN"));

    let mut agent = harness::spawn_agent(&agent_env);
    // The exit code and what the check said (the listener answers once the agent is up).
    let answer = |expected: i32, said: &'static str| {
        let env = agent_env.clone();
        move || {
            let env = env.clone();
            async move {
                let output = health(env).await;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                (output.status.code() == Some(expected) && text.contains(said)).then_some(text)
            }
        }
    };
    eventually(
        "NOT_SERVING while no control plane runs",
        Duration::from_secs(20),
        answer(1, "NOT_SERVING"),
    )
    .await;

    let database = TestDatabase::new(Backend::Sqlite).await;
    let mut cp = harness::spawn_control_plane(&[
        ("HERALD_LISTEN", cp_addr.clone()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_BUILTIN_AGENT", "false".to_owned()),
    ])
    .await;
    eventually(
        "SERVING once the control plane holds the stream",
        Duration::from_secs(30),
        answer(0, ": SERVING"),
    )
    .await;
    assert!(cp.terminate().await.success(), "{}", cp.logs());
    eventually(
        "NOT_SERVING once the control plane is gone",
        Duration::from_secs(30),
        answer(1, "NOT_SERVING"),
    )
    .await;
    assert!(agent.terminate().await.success(), "{}", agent.logs());
}
