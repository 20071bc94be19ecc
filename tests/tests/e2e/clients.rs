//! Clients beyond Rust, end to end: the Python client's own tests (pytest, in the virtual
//! environment `scripts/python-client-env` makes), the README's TypeScript and Go publishers
//! compiled and run (`scripts/typescript-client`, `scripts/go-client`), and buf's lint and
//! breaking-change check of `proto/` (`scripts/buf`). Each against a control plane started here
//! on 127.0.0.1, with a receiver on 127.0.0.1. The scripts install what they need (PyPI, npm,
//! Debian's packages) once and cache it in the target directory; each test prints how long its
//! script took.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herald_client::v1 as pb;
use herald_tests::{Backend, Herald, Receiver, harness};

/// How long any single wait on the control plane may take.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long a script may take: a first run downloads packages and compiles.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(280);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// The target directory (target/debug/… → target), where the scripts cache what they install.
fn target_dir() -> PathBuf {
    harness::bin_dir().parent().unwrap().to_path_buf()
}

/// What a process printed.
struct Output {
    stdout: String,
    stderr: String,
}

/// Runs `command` to completion and asserts that it succeeded.
async fn run(what: &str, mut command: tokio::process::Command, deadline: Duration) -> Output {
    let started = Instant::now();
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(deadline, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish in {deadline:?}"))
        .unwrap_or_else(|err| panic!("{what} could not start: {err}"));
    let out = Output {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        out.stdout,
        out.stderr
    );
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    out
}

/// Runs one of the project's scripts with the target directory, and asserts that it succeeded.
async fn run_script(name: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(repo().join("scripts").join(name));
    command.args(args).env("CARGO_TARGET_DIR", target_dir());
    let what = format!("scripts/{name} {}", args.join(" "));
    run(what.trim_end(), command, SCRIPT_DEADLINE).await
}

/// Runs one of the project's build scripts and returns the last line it printed: what it built.
async fn script(name: &str) -> String {
    let out = run_script(name, &[]).await;
    out.stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/{name} printed nothing: {}", out.stderr))
        .to_owned()
}

/// A control plane on SQLite with one tenant whose `user.*` events go to a receiver; returns
/// (herald, tenant id, tenant token, receiver).
async fn with_subscriber() -> (Herald, String, String, Receiver) {
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let admin = herald.admin();
    let (tenant, token) = harness::create_tenant(&admin, "acme", "backend").await;
    let receiver = Receiver::start().await;
    herald
        .client(&token)
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            name: "CRM sync".into(),
            url: receiver.url("/hooks"),
            event_types: vec!["user.*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    (herald, tenant.id, token, receiver)
}

/// Asserts that the event a publisher printed was stored for the tenant and delivered.
async fn assert_published(herald: &Herald, token: &str, receiver: &Receiver, printed: &str) {
    let event_id = printed.trim();
    let event = herald
        .client(token)
        .events()
        .get_event(pb::GetEventRequest {
            id: event_id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("event {event_id:?} printed by the publisher: {status}"))
        .into_inner();
    assert_eq!(event.event_type, "user.new");
    assert_eq!(
        (event.entity_type.as_str(), event.entity_id.as_str()),
        ("user", "42")
    );
    assert!(
        event.idempotency_key.starts_with("idem_"),
        "the publisher sends an idempotency key: {event:?}"
    );
    let received = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(received[0].header("webhook-id"), Some(event_id));
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(body["result"]["id"], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_passes_its_end_to_end_tests() {
    let venv = PathBuf::from(script("python-client-env").await);
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let results = tempfile::tempdir().unwrap();
    let result_file = results.path().join("result.json");
    let mut pytest = tokio::process::Command::new(venv.join("bin/python"));
    pytest
        .args(["-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"])
        .current_dir(repo().join("clients/python"))
        .env("HERALD_ADDR", herald.addr.to_string())
        .env("HERALD_ADMIN_TOKEN", &herald.admin_token)
        .env("HERALD_RESULT_FILE", &result_file)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = run("pytest clients/python", pytest, SCRIPT_DEADLINE).await;
    let summary = out.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.contains("4 passed") && !summary.contains("skipped"),
        "every Python test ran: {}",
        out.stdout
    );

    // What the Python test did, seen through the Rust client: one event under its key, and its
    // delivery SUCCEEDED.
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result_file).unwrap()).unwrap();
    let field = |name: &str| result[name].as_str().unwrap().to_owned();
    let admin = herald.admin();
    let events = admin
        .events()
        .list_events(pb::ListEventsRequest {
            tenant_id: field("tenant_id"),
            event_type: "user.new".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        events
            .iter()
            .map(|e| (e.id.clone(), e.idempotency_key.clone()))
            .collect::<Vec<_>>(),
        vec![(field("event_id"), field("idempotency_key"))]
    );
    let deliveries = admin
        .deliveries()
        .list_deliveries(pb::ListDeliveriesRequest {
            tenant_id: field("tenant_id"),
            event_id: field("event_id"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deliveries;
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    assert_eq!(deliveries[0].subscription_id, field("subscription_id"));
    assert_eq!(deliveries[0].state(), pb::DeliveryState::Succeeded);
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_publisher_publishes_and_the_event_is_delivered() {
    let build = PathBuf::from(script("typescript-client").await);
    let (herald, _tenant, token, receiver) = with_subscriber().await;
    let mut node = tokio::process::Command::new("node");
    node.arg(build.join("dist/publish.js"))
        .env("HERALD_ADDR", herald.addr.to_string())
        .env("HERALD_TOKEN", &token);
    let out = run("node dist/publish.js", node, DEADLINE).await;
    assert_published(&herald, &token, &receiver, &out.stdout).await;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_publisher_publishes_and_the_event_is_delivered() {
    let binary = script("go-client").await;
    let (herald, _tenant, token, receiver) = with_subscriber().await;
    let mut publisher = tokio::process::Command::new(binary);
    publisher
        .env("HERALD_ADDR", herald.addr.to_string())
        .env("HERALD_TOKEN", &token);
    let out = run("herald-publish (Go)", publisher, DEADLINE).await;
    assert_published(&herald, &token, &receiver, &out.stdout).await;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protos_pass_buf_lint_and_have_no_breaking_change() {
    // Each exits non-zero and names the file, line and rule of every finding.
    run_script("buf", &["lint"]).await;
    run_script("buf", &["breaking", "--against", "breaking-baseline.binpb"]).await;
}

#[test]
fn readme_shows_the_publishers_the_suite_runs() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    for file in [
        "clients/typescript/src/publish.ts",
        "clients/go/publisher/main.go",
    ] {
        let source = std::fs::read_to_string(repo().join(file)).unwrap();
        assert!(
            readme.contains(&source),
            "README.md's \"From your backend\" shows {file} as it is: copy it there again"
        );
    }
}
