//! The first hour of a new user: the shared agent token that outlives restarts and its reset on
//! every replica, what a refused destination says, the one-line start errors with their exit
//! codes, plain logs in files, and the README's settings table against the settings the code
//! reads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herald_client::{HeraldClient, v1 as pb};
use herald_tests::{Backend, Herald, Receiver, TestDatabase, eventually, harness};

use crate::delivery::{subscribe, user_new};

/// How long any single wait of these tests may take (an agent's reconnect backs off up to 10 s).
const DEADLINE: Duration = Duration::from_secs(30);

/// Returns a loopback address whose port was free a moment ago.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The line the control plane prints with a generated value, such as the agent token.
fn printed(output: &str, prefix: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.strip_prefix(prefix).map(|rest| rest.trim().to_owned()))
}

const AGENT_TOKEN_LINE: &str =
    "agent token for remote agents (HERALD_AGENT_TOKEN; shown once, stored hashed): ";

/// A remote agent started with the token the first start printed keeps delivering after the
/// control plane restarts: the token is stored (hashed), not made anew per start, and printed
/// only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_agent_keeps_its_generated_token_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let env = vec![
        ("HERALD_LISTEN", addr.to_string()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_BUILTIN_AGENT", "false".to_owned()),
    ];
    let mut cp = harness::spawn_control_plane_in(dir.path(), &env).await;
    let token = eventually("the agent token line", DEADLINE, || {
        let output = cp.output();
        async move { printed(&output, AGENT_TOKEN_LINE) }
    })
    .await;
    assert!(token.starts_with("hrla_"), "{token}");
    let url = format!("http://{addr}");
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", url.clone()),
        ("HERALD_AGENT_TOKEN", token.clone()),
        ("HERALD_AGENT_ID", "remote-1".to_owned()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
    ]);
    let admin = HeraldClient::connect(&url, harness::ADMIN_TOKEN).unwrap();
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let receiver = Receiver::start().await;
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
    let publish = |id: u32| {
        let mut event = user_new(id);
        event.tenant_id = tenant.id.clone();
        let admin = admin.clone();
        async move { admin.publish(event).await.unwrap().event_id }
    };
    let first = publish(1).await;
    let got = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(got[0].header("webhook-id"), Some(first.as_str()));

    // Restart on the same file: no new token is printed, and the agent comes back with its own.
    let status = cp.terminate().await;
    assert!(status.success(), "{status:?}\n{}", cp.logs());
    let cp = harness::spawn_control_plane_in(dir.path(), &env).await;
    assert_eq!(
        printed(&cp.output(), AGENT_TOKEN_LINE),
        None,
        "the stored agent token is shown once: {}",
        cp.output()
    );
    eventually("the agent connected again", DEADLINE, || {
        let admin = admin.clone();
        async move {
            let agents = admin
                .admin()
                .list_agents(pb::ListAgentsRequest::default())
                .await
                .ok()?
                .into_inner()
                .agents;
            agents
                .iter()
                .any(|a| a.agent_id == "remote-1" && a.identity.starts_with("shared agent token"))
                .then_some(())
        }
    })
    .await;
    let second = publish(2).await;
    let got = receiver.wait_for(2, DEADLINE).await;
    assert!(
        got.iter()
            .any(|r| r.header("webhook-id") == Some(second.as_str())),
        "delivered after the restart"
    );
    assert!(
        !agent.logs().contains("refused the agent credential"),
        "{}",
        agent.logs()
    );
    agent.kill().await;
}

/// `reset-agent-token` on a PostgreSQL deployment: the streams of agents using the old token end
/// on every replica at once and they are refused from then on; the new token connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_agent_token_ends_the_old_tokens_streams_on_every_replica() {
    // Both replicas without HERALD_AGENT_TOKEN: the first start generates the shared token.
    let first = Herald::builder(Backend::Postgres)
        .no_builtin_agent()
        .configure(|c| c.agent_token = None)
        .start()
        .await;
    let token = first
        .running
        .as_ref()
        .and_then(|r| r.generated_agent_token.clone())
        .expect("the first start generates the shared agent token");
    let second = Herald::builder(Backend::Postgres)
        .no_builtin_agent()
        .configure(|c| c.agent_token = None)
        .start_on(first.database.shared())
        .await;
    assert_eq!(
        second
            .running
            .as_ref()
            .and_then(|r| r.generated_agent_token.clone()),
        None,
        "a replica finds the stored token"
    );
    let replicas = [&first, &second];
    let mut agents: Vec<harness::Child> = replicas
        .iter()
        .enumerate()
        .map(|(i, herald)| {
            harness::spawn_agent(&[
                ("HERALD_CONTROL_PLANE", herald.url()),
                ("HERALD_AGENT_TOKEN", token.clone()),
                ("HERALD_AGENT_ID", format!("old-{i}")),
            ])
        })
        .collect();
    let connected = |herald: &Herald| {
        herald
            .running
            .as_ref()
            .map(|r| r.services.agents.list())
            .unwrap_or_default()
    };
    for herald in replicas {
        eventually("an agent on each replica", DEADLINE, || {
            let n = connected(herald).len();
            async move { (n == 1).then_some(()) }
        })
        .await;
    }

    let output = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .arg("reset-agent-token")
        .env("HERALD_DATABASE_URL", &first.database.url)
        .env_remove("HERALD_AGENT_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let new_token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        new_token.starts_with("hrla_") && new_token != token,
        "{new_token}"
    );

    // Both replicas drop their old-token agents, which are refused when they come back.
    for herald in replicas {
        eventually("the old token's streams ended", DEADLINE, || {
            let n = connected(herald).len();
            async move { (n == 0).then_some(()) }
        })
        .await;
    }
    for agent in &agents {
        eventually("the old token refused", DEADLINE, || {
            let logs = agent.logs();
            async move { logs.contains("refused the agent credential").then_some(()) }
        })
        .await;
    }
    for agent in &mut agents {
        agent.kill().await;
    }

    // The new token connects and delivers.
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", second.url()),
        ("HERALD_AGENT_TOKEN", new_token),
        ("HERALD_AGENT_ID", "new".to_owned()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
    ]);
    let receiver = Receiver::start().await;
    let (_, client) = second.tenant("acme").await;
    subscribe(&client, receiver.url("/hook"), |_| {}).await;
    let published = client.publish(user_new(1)).await.unwrap();
    let got = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(
        got[0].header("webhook-id"),
        Some(published.event_id.as_str())
    );
    agent.kill().await;
    second.stop_keeping_database().await;
    first.stop().await;
}

/// A remote agent refuses 127.0.0.1 unless allowed: the dead delivery's error says which
/// setting allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_destination_names_the_setting_that_allows_it() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", herald.url()),
        ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
    ]);
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("acme").await;
    let sub = subscribe(&client, receiver.url("/hook"), |_| {}).await;
    client.publish(user_new(1)).await.unwrap();
    let dead = eventually("a dead delivery", DEADLINE, || {
        let client = client.clone();
        let sub = sub.id.clone();
        async move {
            let deliveries = client
                .deliveries()
                .list_deliveries(pb::ListDeliveriesRequest {
                    subscription_id: sub,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .deliveries;
            deliveries
                .into_iter()
                .find(|d| d.state() == pb::DeliveryState::Dead)
        }
    })
    .await;
    let attempt = client
        .deliveries()
        .get_delivery(pb::GetDeliveryRequest {
            id: dead.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .attempts
        .pop()
        .expect("an attempt");
    assert_eq!(attempt.error(), pb::AttemptError::DestinationRefused);
    assert!(
        attempt.error_message.contains("127.0.0.1 is loopback")
            && attempt
                .error_message
                .contains("HERALD_ALLOW_DESTINATIONS on the agent allows it (e.g. 127.0.0.1/32)"),
        "{}",
        attempt.error_message
    );
    assert!(receiver.received().is_empty());
    agent.kill().await;
    herald.stop().await;
}

/// A PostgreSQL database that does not exist: one line naming the setting, the database's own
/// words and how to create it, and exit code 64 like any bad setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_postgres_database_is_one_line_with_a_hint_and_exit_64() {
    let output = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .env(
            "HERALD_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/herald_missing_database",
        )
        .env("HERALD_LISTEN", "127.0.0.1:0")
        .env("HERALD_CONSOLE_LISTEN", "")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("herald-control-plane: HERALD_DATABASE_URL: cannot open "),
        "{stderr}"
    );
    assert_eq!(
        stderr
            .matches("database \"herald_missing_database\" does not exist")
            .count(),
        1,
        "said once: {stderr}"
    );
    assert!(
        stderr.contains("createdb -h 127.0.0.1 -U postgres -O postgres herald_missing_database"),
        "{stderr}"
    );
}

/// `reset-admin-token` (and the other maintenance commands) on an SQLite file a running control
/// plane holds: "stop the control plane first", not a hint at PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_admin_token_on_a_running_sqlite_control_plane_says_stop_it_first() {
    let herald = Herald::builder(Backend::Sqlite).start().await;
    for command in ["reset-admin-token", "reset-agent-token"] {
        let output = tokio::process::Command::new(harness::binary("herald-control-plane"))
            .arg(command)
            .env("HERALD_DATABASE_URL", &herald.database.url)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("in use by a running control plane: stop the control plane first"),
            "{stderr}"
        );
        assert!(!stderr.contains("PostgreSQL"), "{stderr}");
        assert!(output.stdout.is_empty(), "no token was made");
    }
    // Stopped, the same command works.
    let database: TestDatabase = herald.stop_keeping_database().await;
    let output = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .arg("reset-admin-token")
        .env("HERALD_DATABASE_URL", &database.url)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("hrld_"));
}

/// Logs written to a pipe or a file carry no terminal colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_off_a_terminal_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    // Without a master key the control plane warns at start: a log line to look at.
    let mut cp =
        harness::spawn_control_plane_in(dir.path(), &[("HERALD_LISTEN", "127.0.0.1:0".into())])
            .await;
    let logs = eventually("a log line", DEADLINE, || {
        let logs = cp.logs();
        async move {
            logs.contains("HERALD_MASTER_KEY is not set")
                .then_some(logs)
        }
    })
    .await;
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes: {logs:?}");
    let mut agent = harness::spawn_agent(&[
        (
            "HERALD_CONTROL_PLANE",
            format!("http://{}", cp.addr.unwrap()),
        ),
        ("HERALD_AGENT_TOKEN", "hrla_wrong".to_owned()),
    ]);
    let logs = eventually("the agent's refusal", DEADLINE, || {
        let logs = agent.logs();
        async move {
            logs.contains("refused the agent credential")
                .then_some(logs)
        }
    })
    .await;
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes: {logs:?}");
    agent.kill().await;
    cp.kill().await;
}

/// The `HERALD_*` settings the README's configuration table lists, by process.
fn readme_settings() -> BTreeMap<&'static str, BTreeSet<String>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("| process | setting | default |")
        .expect("README.md has the settings table");
    let mut table: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for line in readme[start..].lines().skip(2) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (processes, setting) = (cells[1], cells[2]);
        for process in ["control plane", "agent", "cli"] {
            if !processes
                .split(',')
                .any(|p| p.trim().eq_ignore_ascii_case(process))
            {
                continue;
            }
            let names = table.entry(process).or_default();
            // Names in the setting cell only (the default cell may mention others).
            for word in setting.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("HERALD_") {
                    names.insert(word.to_owned());
                }
            }
        }
    }
    table
}

/// The `HERALD_*` settings each process reads, taken from the code: the control plane's raw
/// configuration, the agent's list of keys, and the CLI's `--help`.
async fn code_settings() -> BTreeMap<&'static str, BTreeSet<String>> {
    let upper = |key: &str| format!("HERALD_{}", key.to_ascii_uppercase());
    let mut control_plane: BTreeSet<String> =
        match serde_json::to_value(herald_control_plane::config::RawConfig::default()).unwrap() {
            serde_json::Value::Object(map) => map.keys().map(|k| upper(k)).collect(),
            other => panic!("not an object: {other}"),
        };
    control_plane.insert("HERALD_CONFIG".into());
    let mut agent: BTreeSet<String> = herald_agent::config::KEYS
        .iter()
        .map(|k| upper(k))
        .collect();
    agent.insert("HERALD_CONFIG".into());
    let help = tokio::process::Command::new(harness::binary("herald"))
        .args(["tenants", "list", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let cli: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect();
    assert!(cli.contains("HERALD_ADDR"), "{help}");
    BTreeMap::from([
        ("control plane", control_plane),
        ("agent", agent),
        ("cli", cli),
    ])
}

/// Every setting the code reads is in the README's table under the process that reads it, and
/// the table lists no setting a process does not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_settings_table_matches_the_code() {
    let readme = readme_settings();
    let code = code_settings().await;
    for (process, names) in &code {
        let listed = readme.get(process).cloned().unwrap_or_default();
        let missing: Vec<_> = names.difference(&listed).collect();
        let extra: Vec<_> = listed.difference(names).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{process}: read but not in README's table: {missing:?}; in the table but not read: {extra:?}"
        );
    }
}
