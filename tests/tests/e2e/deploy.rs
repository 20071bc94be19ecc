//! The deployment files in `deploy/`, kept honest: the environment files are the one source of
//! the production layout's settings, so a test starts that layout from them (two control planes
//! on PostgreSQL with TLS and mTLS, agents in two regions) with only a listed set of keys
//! overridden and delivers through both regions; the container build and the compose file are
//! checked against the workspace (binaries, ports, variables); the systemd units pass
//! `systemd-analyze verify`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_client::v1 as pb;
use herald_tests::harness::{self, Child, TestDatabase};
use herald_tests::pki::Ca;
use herald_tests::{Backend, Receiver, eventually};

use crate::delivery::{subscribe, user_new};
use crate::observability::free_port;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
}

/// The keys a test may set on a control plane of the layout instead of the environment files'
/// values: where it listens, its database, its certificates.
const CONTROL_PLANE_OVERRIDES: &[&str] = &[
    "HERALD_LISTEN",
    "HERALD_CONSOLE_LISTEN",
    "HERALD_METRICS_LISTEN",
    "HERALD_DATABASE_URL",
    "HERALD_TLS_CERT",
    "HERALD_TLS_KEY",
    "HERALD_TLS_CLIENT_CA",
];

/// The same for an agent: where the control planes are, where it listens, its certificates.
const AGENT_OVERRIDES: &[&str] = &[
    "HERALD_CONTROL_PLANE",
    "HERALD_METRICS_LISTEN",
    "HERALD_HEALTH_LISTEN",
    "HERALD_TLS_CA",
    "HERALD_TLS_CLIENT_CERT",
    "HERALD_TLS_CLIENT_KEY",
];

/// Keys the layout leaves to the installation, which a test may add: the receivers on
/// 127.0.0.1 (refused by the SSRF guard otherwise).
const ADDED: &[&str] = &["HERALD_ALLOW_DESTINATIONS"];

/// Reads an environment file: `KEY=VALUE` lines, `#` comments and blank lines. Values have no
/// quotes, spaces or `$`, so compose, systemd and a shell read them alike.
pub fn read_env_file(path: &Path) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: not KEY=VALUE: {line}", path.display(), n + 1));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "{}:{}: {key} is not a variable name",
            path.display(),
            n + 1
        );
        assert!(
            !value.contains(['"', '\'', ' ', '\t', '$', '\\']),
            "{}:{}: {key}'s value needs quoting, which compose and systemd read differently",
            path.display(),
            n + 1
        );
        pairs.push((key.to_owned(), value.to_owned()));
    }
    pairs
}

/// The environment of one process of the layout: the files in order (later ones win), then
/// `overrides`, each of which must be in `allowed` and (unless in [`ADDED`] or a secret named
/// by `secrets`) set by the files.
fn layout_env(
    files: &[&str],
    secrets: Option<&str>,
    allowed: &[&str],
    overrides: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        env.extend(read_env_file(&deploy_dir().join("env").join(file)));
    }
    let secret_keys: Vec<String> = secrets
        .map(|file| {
            read_env_file(&deploy_dir().join("secrets").join(file))
                .into_iter()
                .map(|(key, _)| key)
                .collect()
        })
        .unwrap_or_default();
    for (key, value) in overrides {
        let secret = secret_keys.iter().any(|k| k == key);
        assert!(
            secret || allowed.contains(key) || ADDED.contains(key),
            "{key} is not on the list of keys a test may override"
        );
        assert!(
            secret || ADDED.contains(key) || env.contains_key(*key),
            "{key} is overridden but the environment files do not set it"
        );
        env.insert((*key).to_owned(), value.clone());
    }
    env.into_iter().collect()
}

/// A process's environment: (variable, value) pairs.
type Env = Vec<(String, String)>;

fn as_refs(env: &[(String, String)]) -> Vec<(&str, String)> {
    env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect()
}

fn value<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} is not set"))
}

/// Runs a `health` subcommand with `env` (and no other HERALD_* variable).
async fn run_health(binary: &str, env: &[(String, String)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(harness::binary(binary));
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command
        .arg("health")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .output()
        .await
        .unwrap()
}

/// Waits until `binary health` exits 0 with `env`.
async fn wait_healthy(what: &str, binary: &'static str, env: &[(String, String)]) {
    let env = env.to_vec();
    eventually(what, Duration::from_secs(30), || {
        let env = env.clone();
        async move {
            run_health(binary, &env)
                .await
                .status
                .success()
                .then_some(())
        }
    })
    .await;
}

fn tls_client(port: u16, ca: &Path, token: &str) -> herald_client::HeraldClient {
    let options = herald_client::Options {
        tls: herald_client::Tls {
            ca: Some(ca.to_owned()),
            client_cert: None,
        },
        ..Default::default()
    };
    herald_client::HeraldClient::with_options(&format!("https://localhost:{port}"), token, options)
        .unwrap()
}

/// The production layout from `deploy/env/*.env`: two control planes on one PostgreSQL
/// database serving TLS (agents must show client certificates), an agent in `eu` and one in
/// `us` talking to both; a subscription per region gets its events through its region's agent;
/// the health subcommands answer for every process, over TLS for the control planes; when one
/// control plane stops, its health check fails and the agents deliver through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_files_run_the_production_layout() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("Herald layout CA");
    let ca_path = server_ca.write(dir.path(), "ca.pem");
    let server = server_ca.issue(&["localhost", "127.0.0.1"], 1, dir.path(), "server");
    let agents_ca = Ca::new("Herald layout agents CA");
    let agents_ca_path = agents_ca.write(dir.path(), "agents-ca.pem");
    let mut database = TestDatabase::new(Backend::Postgres).await;
    let master_key = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        *b"herald-layout-test-master-key-32",
    );
    let secrets = [
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_MASTER_KEY", master_key),
        // Trust authentication on the test server: any password will do.
        ("PGPASSWORD", "unused".to_owned()),
    ];
    let control_plane_env = |listen: &str| {
        let mut overrides = vec![
            ("HERALD_LISTEN", listen.to_owned()),
            ("HERALD_CONSOLE_LISTEN", "127.0.0.1:0".to_owned()),
            ("HERALD_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            ("HERALD_DATABASE_URL", database.url.clone()),
            ("HERALD_TLS_CERT", server.cert_path.display().to_string()),
            ("HERALD_TLS_KEY", server.key_path.display().to_string()),
            ("HERALD_TLS_CLIENT_CA", agents_ca_path.display().to_string()),
        ];
        overrides.extend(secrets.iter().cloned());
        layout_env(
            &["control-plane.env"],
            Some("control-plane.env.example"),
            CONTROL_PLANE_OVERRIDES,
            &overrides,
        )
    };
    let cp_env = control_plane_env("127.0.0.1:0");
    assert_eq!(value(&cp_env, "HERALD_BUILTIN_AGENT"), "false");
    let mut cp1 = harness::spawn_control_plane(&as_refs(&cp_env)).await;
    let mut cp2 = harness::spawn_control_plane(&as_refs(&cp_env)).await;
    let ports = [cp1.addr.unwrap().port(), cp2.addr.unwrap().port()];

    // `herald-control-plane health`, over TLS, trusting exactly the served certificate.
    let health_env: Vec<Vec<(String, String)>> = ports
        .iter()
        .map(|port| control_plane_env(&format!("127.0.0.1:{port}")))
        .collect();
    for env in &health_env {
        let output = run_health("herald-control-plane", env).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.starts_with("https://127.0.0.1:") && stdout.contains("SERVING"),
            "{stdout}"
        );
    }

    let control_planes = ports
        .iter()
        .map(|port| format!("https://localhost:{port}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut agents: Vec<(String, Child, Env)> = Vec::new();
    for region in ["eu", "us"] {
        let cert = agents_ca.issue(
            &[&format!("agent-{region}.herald.test")],
            if region == "eu" { 2 } else { 3 },
            dir.path(),
            &format!("agent-{region}"),
        );
        let env = layout_env(
            &["agent.env", &format!("agent-{region}.env")],
            Some("agent.env.example"),
            AGENT_OVERRIDES,
            &[
                ("HERALD_CONTROL_PLANE", control_planes.clone()),
                ("HERALD_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
                (
                    "HERALD_HEALTH_LISTEN",
                    format!("127.0.0.1:{}", free_port().await),
                ),
                ("HERALD_TLS_CA", ca_path.display().to_string()),
                (
                    "HERALD_TLS_CLIENT_CERT",
                    cert.cert_path.display().to_string(),
                ),
                ("HERALD_TLS_CLIENT_KEY", cert.key_path.display().to_string()),
                ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
                ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
            ],
        );
        assert_eq!(value(&env, "HERALD_REGION"), region);
        let agent = harness::spawn_agent(&as_refs(&env));
        agents.push((region.to_owned(), agent, env));
    }
    for (region, agent, env) in &agents {
        let what = format!("agent {region} healthy: {}", agent.logs());
        wait_healthy(&what, "herald-agent", env).await;
    }

    let admin = tls_client(ports[0], &ca_path, harness::ADMIN_TOKEN);
    let listed = admin
        .admin()
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let regions: BTreeSet<(String, String)> = listed
        .iter()
        .map(|a| (a.region.clone(), a.identity.clone()))
        .collect();
    assert_eq!(
        regions,
        BTreeSet::from([
            ("eu".to_owned(), "agent-eu.herald.test".to_owned()),
            ("us".to_owned(), "agent-us.herald.test".to_owned()),
        ]),
        "{listed:?}"
    );

    let (_, token) = harness::create_tenant(&admin, "acme", "layout").await;
    let publishers = [
        tls_client(ports[0], &ca_path, &token),
        tls_client(ports[1], &ca_path, &token),
    ];
    let mut receivers = Vec::new();
    for region in ["eu", "us"] {
        let receiver = Receiver::start().await;
        let subscription = subscribe(&publishers[0], receiver.url("/hook"), |s| {
            s.region = region.into();
        })
        .await;
        receivers.push((region, receiver, subscription));
    }
    // Through both replicas.
    for i in 0..4u32 {
        publishers[(i % 2) as usize]
            .publish(user_new(i))
            .await
            .unwrap();
    }
    for (region, receiver, subscription) in &receivers {
        receiver.wait_for(4, Duration::from_secs(30)).await;
        // A receiver answers before its agent's result is recorded: wait for the log.
        let deliveries = eventually(
            "4 succeeded deliveries",
            Duration::from_secs(30),
            || async {
                let deliveries = publishers[0]
                    .deliveries()
                    .list_deliveries(pb::ListDeliveriesRequest {
                        subscription_id: subscription.id.clone(),
                        state: pb::DeliveryState::Succeeded as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .deliveries;
                (deliveries.len() == 4).then_some(deliveries)
            },
        )
        .await;
        for delivery in deliveries {
            let delivery = publishers[1]
                .deliveries()
                .get_delivery(pb::GetDeliveryRequest {
                    id: delivery.id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let attempt_regions: Vec<&str> = delivery
                .attempts
                .iter()
                .map(|a| a.region.as_str())
                .collect();
            assert_eq!(attempt_regions, vec![*region], "{delivery:?}");
        }
    }

    // One replica goes: its health check fails, the agents deliver through the other.
    assert!(cp1.terminate().await.success(), "{}", cp1.logs());
    let output = run_health("herald-control-plane", &health_env[0]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("herald-control-plane health: https://127.0.0.1:")
            && stderr.contains("cannot connect"),
        "{stderr}"
    );
    publishers[1].publish(user_new(99)).await.unwrap();
    for (_, receiver, _) in &receivers {
        receiver.wait_for(5, Duration::from_secs(30)).await;
    }
    for (region, mut agent, _) in agents {
        assert!(
            agent.terminate().await.success(),
            "{region}: {}",
            agent.logs()
        );
    }
    assert!(cp2.terminate().await.success(), "{}", cp2.logs());
    database.drop_database().await;
}

/// The settings each process reads, as environment variables: the control plane's from its
/// raw configuration's keys, the agent's from its list.
fn settings() -> (HashSet<String>, HashSet<String>) {
    let raw = serde_json::to_value(herald_control_plane::config::RawConfig::default()).unwrap();
    let mut control_plane: HashSet<String> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(|key| format!("HERALD_{}", key.to_ascii_uppercase()))
        .collect();
    control_plane.insert("HERALD_CONFIG".into());
    let mut agent: HashSet<String> = herald_agent::config::KEYS
        .iter()
        .map(|key| format!("HERALD_{}", key.to_ascii_uppercase()))
        .collect();
    agent.insert("HERALD_CONFIG".into());
    (control_plane, agent)
}

/// Every `HERALD_*` name in `text`.
fn herald_variables(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("HERALD_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        found.insert(name.trim_end_matches('_').to_owned());
    }
    found
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The `[[bin]]` names of a crate's manifest.
fn binaries_of(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            names.push(name.trim_matches('"').to_owned());
        }
    }
    names
}

fn yaml(path: &Path) -> serde_yaml::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    // Compose's `<<: *anchor` merges, as compose applies them.
    value.apply_merge().unwrap();
    value
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The container build, the compose file, Prometheus's scrape configuration and the systemd
/// units agree with the workspace and with the environment files: the binaries built are the
/// workspace's, the image runs as a user other than root with a health check through the
/// health subcommand, every port published or scraped is the one the environment files set
/// (and the gRPC and console ports are the settings' defaults), settings come only from the
/// environment files, and every `HERALD_*` variable anywhere in `deploy/` is one the code reads.
#[test]
fn the_deployment_files_match_the_workspace() {
    let deploy = deploy_dir();
    let root = deploy.parent().unwrap();
    let (cp_settings, agent_settings) = settings();

    // Environment files: only settings of their process.
    let cp_env = read_env_file(&deploy.join("env/control-plane.env"));
    let mut agent_env = read_env_file(&deploy.join("env/agent.env"));
    for (key, _) in &cp_env {
        assert!(
            cp_settings.contains(key),
            "control-plane.env: {key} is no control plane setting"
        );
    }
    for file in ["agent.env", "agent-eu.env", "agent-us.env"] {
        let pairs = read_env_file(&deploy.join("env").join(file));
        for (key, _) in &pairs {
            assert!(
                agent_settings.contains(key),
                "{file}: {key} is no agent setting"
            );
        }
        if file != "agent.env" {
            agent_env.extend(pairs);
        }
    }
    for (file, known) in [
        ("control-plane.env.example", &cp_settings),
        ("agent.env.example", &agent_settings),
    ] {
        for (key, _) in read_env_file(&deploy.join("secrets").join(file)) {
            assert!(
                !key.starts_with("HERALD_") || known.contains(&key),
                "{file}: {key} is no setting"
            );
        }
    }
    let get = |pairs: &[(String, String)], key: &str| value(pairs, key).to_owned();
    let grpc_port = port_of(&get(&cp_env, "HERALD_LISTEN"));
    let console_port = port_of(&get(&cp_env, "HERALD_CONSOLE_LISTEN"));
    let metrics_port = port_of(&get(&cp_env, "HERALD_METRICS_LISTEN"));
    let agent_metrics_port = port_of(&get(&agent_env, "HERALD_METRICS_LISTEN"));
    let defaults = herald_control_plane::config::RawConfig::default();
    assert_eq!(grpc_port, port_of(&defaults.listen));
    assert_eq!(
        console_port,
        port_of(herald_control_plane::config::DEFAULT_CONSOLE_LISTEN)
    );
    assert!(
        get(&agent_env, "HERALD_HEALTH_LISTEN").starts_with("127.0.0.1:"),
        "the agent's health service is for its own machine"
    );

    // Every HERALD_* variable in deploy/ is read by the code.
    let every_setting: HashSet<&String> = cp_settings.iter().chain(&agent_settings).collect();
    let mut files = vec![
        deploy.join("Dockerfile"),
        deploy.join("compose.yaml"),
        deploy.join("prometheus/alerts.yml"),
        deploy.join("prometheus/prometheus.yml"),
    ];
    for sub in ["env", "secrets", "systemd"] {
        for entry in std::fs::read_dir(deploy.join(sub)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for name in herald_variables(&text) {
            assert!(
                every_setting.contains(&name),
                "{}: {name} is no setting the code reads",
                file.display()
            );
        }
    }

    // The container build: the workspace's three binaries, not root, a health check.
    let dockerfile = std::fs::read_to_string(deploy.join("Dockerfile")).unwrap();
    let built: BTreeSet<String> = dockerfile
        .split("--bin ")
        .skip(1)
        .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
        .collect();
    let mut workspace_binaries = BTreeSet::new();
    for krate in ["control-plane", "agent", "client"] {
        workspace_binaries.extend(binaries_of(&root.join(krate).join("Cargo.toml")));
    }
    assert_eq!(built, workspace_binaries);
    for binary in &built {
        harness::binary(binary);
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "{binary} is not copied"
        );
    }
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    assert!(
        stages[1].contains("-slim") || stages[1].contains("distroless"),
        "{}",
        stages[1]
    );
    let user = dockerfile
        .lines()
        .rfind(|line| line.starts_with("USER "))
        .expect("the image names its user");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    assert!(dockerfile.contains(r#"CMD ["herald-control-plane", "health"]"#));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["herald-control-plane"]"#));
    assert!(
        !dockerfile.lines().any(|l| l.starts_with("ENV HERALD_")),
        "settings belong in the environment files"
    );
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace().map(|p| p.parse::<u16>().unwrap()))
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([grpc_port, console_port, metrics_port])
    );

    // The compose file.
    let compose = yaml(&deploy.join("compose.yaml"));
    let services = compose["services"].as_mapping().unwrap();
    let service = |name: &str| &compose["services"][name];
    let build = &compose["x-herald"]["build"];
    assert_eq!(build["dockerfile"].as_str(), Some("deploy/Dockerfile"));
    assert!(
        deploy
            .join(build["context"].as_str().unwrap())
            .join("deploy/Dockerfile")
            .is_file()
    );
    for (name, body) in services {
        let name = name.as_str().unwrap();
        for file in strings(&body["env_file"]) {
            let path = deploy.join(&file);
            assert!(
                path.is_file()
                    || deploy.join(format!("{file}.example")).is_file()
                    || (file.starts_with("secrets/agent-")
                        && deploy.join("secrets/agent.env.example").is_file()),
                "{name}: env_file {file} has neither a file nor an example"
            );
        }
        if let Some(environment) = body["environment"].as_mapping() {
            for key in environment.keys() {
                let key = key.as_str().unwrap();
                assert!(
                    !key.starts_with("HERALD_"),
                    "{name}: {key} belongs in the env files"
                );
            }
        }
        for volume in strings(&body["volumes"]) {
            if let Some(local) = volume.strip_prefix("./") {
                let local = local.split(':').next().unwrap();
                assert!(deploy.join(local).exists(), "{name}: {local} is missing");
            }
        }
    }
    for replica in ["control-plane-1", "control-plane-2"] {
        assert_eq!(
            strings(&service(replica)["env_file"]),
            ["env/control-plane.env", "secrets/control-plane.env"]
        );
        let container_ports: BTreeSet<u16> = strings(&service(replica)["ports"])
            .iter()
            .map(|mapping| port_of(mapping))
            .collect();
        assert_eq!(container_ports, BTreeSet::from([grpc_port, console_port]));
    }
    let mut regions = Vec::new();
    for (name, body) in services {
        let name = name.as_str().unwrap();
        let Some(region) = name.strip_prefix("agent-") else {
            continue;
        };
        regions.push(region.to_owned());
        let env_files = strings(&body["env_file"]);
        assert_eq!(
            env_files,
            [
                "env/agent.env".to_owned(),
                format!("env/agent-{region}.env"),
                format!("secrets/agent-{region}.env"),
            ]
        );
        let own = read_env_file(&deploy.join(format!("env/agent-{region}.env")));
        assert_eq!(value(&own, "HERALD_REGION"), region);
        assert_eq!(strings(&body["entrypoint"]), ["herald-agent"]);
    }
    assert_eq!(regions, ["eu", "us"], "agents in two regions");
    assert_eq!(
        strings(&compose["x-agent"]["healthcheck"]["test"]),
        ["CMD", "herald-agent", "health"]
    );
    // Agents reach the control planes by their service names, on the gRPC port, over TLS.
    let urls = get(&agent_env, "HERALD_CONTROL_PLANE");
    let named: BTreeSet<String> = urls.split(',').map(str::to_owned).collect();
    assert_eq!(
        named,
        BTreeSet::from([
            format!("https://control-plane-1:{grpc_port}"),
            format!("https://control-plane-2:{grpc_port}"),
        ])
    );
    // Prometheus scrapes the ports the processes serve /metrics on.
    let prometheus = yaml(&deploy.join("prometheus/prometheus.yml"));
    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"].as_sequence().unwrap() {
        for config in job["static_configs"].as_sequence().into_iter().flatten() {
            scraped.extend(strings(&config["targets"]).iter().map(|t| port_of(t)));
        }
        for config in job["dns_sd_configs"].as_sequence().into_iter().flatten() {
            scraped.insert(config["port"].as_u64().unwrap() as u16);
        }
    }
    assert_eq!(scraped, BTreeSet::from([metrics_port, agent_metrics_port]));

    // The systemd units read the same files and run the workspace's binaries.
    let unit = |name: &str| std::fs::read_to_string(deploy.join("systemd").join(name)).unwrap();
    let cp_unit = unit("herald-control-plane.service");
    assert!(cp_unit.contains("EnvironmentFile=/etc/herald/control-plane.env\n"));
    assert!(cp_unit.contains("ExecStart=/usr/local/bin/herald-control-plane\n"));
    let agent_unit = unit("herald-agent@.service");
    assert!(agent_unit.contains("EnvironmentFile=/etc/herald/agent.env\n"));
    assert!(agent_unit.contains("EnvironmentFile=/etc/herald/agent-%i.env\n"));
    assert!(agent_unit.contains("ExecStart=/usr/local/bin/herald-agent\n"));
    // The credentials they load are the files the environment names, where it names them.
    for (text, pairs) in [(&cp_unit, &cp_env), (&agent_unit, &agent_env)] {
        for (key, path) in pairs.iter().filter(|(k, _)| k.starts_with("HERALD_TLS_")) {
            let (dir, file) = path.rsplit_once('/').unwrap();
            let file = file.replace("-eu.", "-%i.").replace("-us.", "-%i.");
            assert!(
                text.contains(&format!("LoadCredential={file}:{dir}/{file}\n")),
                "{key}: {path} is not loaded"
            );
            assert!(text.contains(&format!("BindReadOnlyPaths=%d:{dir}\n")));
        }
    }
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=",
        "SystemCallFilter=@system-service",
    ] {
        assert!(cp_unit.contains(hardening), "control plane: {hardening}");
        assert!(agent_unit.contains(hardening), "agent: {hardening}");
    }
    assert!(cp_unit.contains("StateDirectory=herald\n"));
}

/// `systemd-analyze verify` accepts the units (with `ExecStart` pointing at the built binaries,
/// since it checks that they are executable), without a single warning, and `systemd-analyze
/// security` rates each at most 2.0 (lower is better; 10 is unprotected).
#[test]
fn the_systemd_units_verify() {
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed here; the units were not verified");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replace(
                "/usr/local/bin/herald-control-plane",
                &harness::binary("herald-control-plane")
                    .display()
                    .to_string(),
            )
            .replace(
                "/usr/local/bin/herald-agent",
                &harness::binary("herald-agent").display().to_string(),
            );
        // A template is verified as one of its instances.
        let name = name.replace("@.service", "@eu.service");
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(name);
    }
    units.sort();
    assert_eq!(
        units,
        [
            "herald-agent@eu.service",
            "herald-backup.service",
            "herald-backup.timer",
            "herald-control-plane.service"
        ]
    );
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(units.iter().map(|u| format!("./{u}")))
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );
    for unit in units.iter().filter(|u| u.ends_with(".service")) {
        let output = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(format!("./{unit}"))
            .current_dir(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let exposure: f64 = text
            .lines()
            .find_map(|line| line.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|score| score.split_whitespace().next())
            .and_then(|score| score.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in {text}"));
        assert!(exposure <= 2.0, "{unit}: exposure {exposure}\n{text}");
    }
}
