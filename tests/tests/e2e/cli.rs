//! The `herald` command-line tool end to end: the README's CLI quickstart run as written, the
//! `--json` output of every command, `--quiet`, `deliveries watch`, `herald listen`, and the
//! one-line errors with SPEC 9's exit codes. Each test runs the built binary against its own
//! in-process control plane on SQLite.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_tests::{Backend, Herald, Receiver, eventually, harness};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// How long any single wait of these tests may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// What one `herald` run printed.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "herald failed: {self:#?}");
        &self.stdout
    }

    /// Asserts success and parses stdout as JSON.
    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.stdout))
    }

    /// Asserts the exit code and one line on stderr (and nothing on stdout); returns the line.
    fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        assert!(self.stdout.is_empty(), "stdout: {self:#?}");
        let line = self.stderr.trim_end();
        assert_eq!(line.lines().count(), 1, "one line: {self:#?}");
        assert!(line.starts_with("herald: "), "{line}");
        assert!(!line.contains("panicked"), "{line}");
        line
    }
}

/// A `herald` command with `addr` and `token` and no other HERALD_* setting of this process.
fn command(addr: &str, token: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(harness::binary("herald"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command
        .env("HERALD_ADDR", addr)
        .env("HERALD_TOKEN", token)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `herald ARGS…` to completion.
async fn run_herald(addr: &str, token: &str, args: &[&str]) -> Run {
    let output = tokio::time::timeout(DEADLINE, command(addr, token).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("herald {args:?} did not finish in {DEADLINE:?}"))
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `herald` with an address and a token.
struct Cli {
    addr: String,
    token: String,
}

impl Cli {
    fn new(addr: &str, token: &str) -> Self {
        Self {
            addr: addr.to_owned(),
            token: token.to_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Run {
        run_herald(&self.addr, &self.token, args).await
    }
}

/// A control plane with a tenant; returns (herald, tenant id, tenant token).
async fn with_tenant() -> (Herald, String, String) {
    with_tenant_on(Herald::builder(Backend::Sqlite).start().await).await
}

/// Makes a tenant and its token on `herald`; returns (herald, tenant id, tenant token).
async fn with_tenant_on(herald: Herald) -> (Herald, String, String) {
    let tenant_id = as_admin(&herald, &["tenants", "create", "--name", "acme", "--quiet"])
        .await
        .ok()
        .trim()
        .to_owned();
    let token = as_admin(
        &herald,
        &[
            "tokens", "create", "--tenant", &tenant_id, "--name", "backend", "--quiet",
        ],
    )
    .await
    .ok()
    .trim()
    .to_owned();
    (herald, tenant_id, token)
}

/// Runs `herald` with the admin token.
async fn as_admin(herald: &Herald, args: &[&str]) -> Run {
    run_herald(&herald.url(), &herald.admin_token, args).await
}

/// Returns a port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Collects a child's output lines into a shared buffer.
fn collect(stream: impl AsyncRead + Unpin + Send + 'static, into: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut text = into.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
}

/// Kills a process group (a script and what it left in the background) when dropped.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Returns the fenced `sh` block that follows the README's marker comment.
fn readme_cli_block(readme: &str) -> String {
    let marker = "<!-- tests/tests/e2e/cli.rs runs the next block";
    let start = readme
        .find(marker)
        .expect("README.md has the CLI quickstart marker");
    let rest = &readme[start..];
    let open = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + "```sh\n".len();
    let close = rest[open..].find("\n```").expect("the block is closed") + open;
    rest[open..=close].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quickstart_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let block = readme_cli_block(&readme);
    assert!(
        block.contains("herald listen --port 8787") && block.contains("127.0.0.1:8787/hooks"),
        "the quickstart listens on 8787: {block}"
    );
    assert!(
        !block.contains("jq") && !block.contains("curl"),
        "the quickstart needs nothing but herald: {block}"
    );
    // The README's first command (`scripts/start`) is this
    // control plane; its `export HERALD_ADDR=… HERALD_TOKEN=…` line is the environment below.
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let script = block.replace("8787", &free_port().to_string());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quickstart.sh"), &script).unwrap();
    let path = format!(
        "{}:{}",
        harness::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bash = tokio::process::Command::new("bash");
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            bash.env_remove(key);
        }
    }
    bash.args(["-e", "quickstart.sh"])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("HERALD_ADDR", herald.url())
        .env("HERALD_TOKEN", &herald.admin_token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = bash.spawn().unwrap();
    let _group = Group(child.id().unwrap() as i32);
    let output = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().unwrap(), output.clone());
    collect(child.stderr.take().unwrap(), output.clone());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the quickstart hung: {}", output.lock().unwrap()))
        .unwrap();
    let text = || output.lock().unwrap().clone();
    assert!(status.success(), "the quickstart failed: {}", text());

    // The published event and the test webhook both arrive at `herald listen`, verified.
    let event_id = eventually("the publish output", DEADLINE, || async {
        text()
            .lines()
            .find_map(|line| line.strip_prefix("published "))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    })
    .await;
    eventually("both webhooks at the listener", DEADLINE, || async {
        let out = text();
        let arrived = out.contains(&format!("POST /hooks  {event_id}"));
        let verified = out.matches("✓ signature valid   ✓ api key valid").count() >= 2;
        (arrived && verified).then_some(())
    })
    .await;
    let out = text();
    assert!(!out.contains("invalid"), "{out}");
    assert!(
        out.contains("\"external_id\": \"1815\""),
        "pretty body: {out}"
    );
    assert!(
        out.contains("\"type\": \"test\""),
        "the test webhook: {out}"
    );
    assert!(out.contains("delivered: ✓ succeeded"), "test --wait: {out}");
    assert!(
        out.contains("STATE") && out.contains("sub_"),
        "the delivery log: {out}"
    );
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_print_json_with_ids() {
    let herald = Herald::builder(Backend::Sqlite).start().await;
    let tenant = as_admin(&herald, &["--json", "tenants", "create", "--name", "acme"])
        .await
        .json();
    let tenant_id = tenant["id"].as_str().unwrap().to_owned();
    assert!(tenant_id.starts_with("ten_"), "{tenant}");
    assert_eq!(tenant["name"], "acme");
    assert!(tenant["created_at"].as_str().unwrap().ends_with('Z'));

    let tenants = as_admin(&herald, &["--json", "tenants", "list"])
        .await
        .json();
    assert_eq!(tenants["tenants"][0]["id"], tenant_id.as_str(), "{tenants}");

    let created = as_admin(
        &herald,
        &[
            "--json", "--tenant", &tenant_id, "tokens", "create", "--name", "ci",
        ],
    )
    .await
    .json();
    let token_id = created["token_id"].as_str().unwrap().to_owned();
    assert!(token_id.starts_with("tok_"), "{created}");
    assert!(created["token"].as_str().unwrap().starts_with("hrld_"));
    let admin = as_admin(
        &herald,
        &["--json", "tokens", "create", "--admin", "--name", "ops"],
    )
    .await
    .json();
    assert!(admin["token_id"].as_str().unwrap().starts_with("tok_"));

    let tokens = as_admin(
        &herald,
        &["--json", "--tenant", &tenant_id, "tokens", "list"],
    )
    .await
    .json();
    let listed = tokens["tokens"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{tokens}");
    assert_eq!(listed[0]["id"], token_id.as_str());
    assert_eq!(listed[0]["tenant_id"], tenant_id.as_str());
    assert!(listed[0].get("token").is_none(), "no plaintext in a list");

    let revoked = as_admin(&herald, &["--json", "tokens", "revoke", &token_id])
        .await
        .json();
    assert_eq!(revoked, serde_json::json!({}));
    let token = created["token"].as_str().unwrap();
    run_herald(&herald.url(), token, &["subscriptions", "list"])
        .await
        .fails(4);

    let agents = as_admin(&herald, &["--json", "agents", "list"])
        .await
        .json();
    let agent = &agents["agents"][0];
    assert_eq!(agent["region"], "local", "the built-in agent: {agents}");
    assert!(agent["agent_id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(agent["capacity"].as_u64().unwrap() > 0);
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_commands_print_json_with_ids() {
    let (herald, tenant_id, token) = with_tenant().await;
    let addr = herald.url();
    let cli = Cli::new(&addr, &token);
    let created = run_herald(
        &addr,
        &token,
        &[
            "--json",
            "subscriptions",
            "create",
            "--name",
            "CRM sync",
            "--url",
            "https://example.com/hooks",
            "--event-type",
            "user.*",
            "--event-type",
            "company.new",
            "--api-key",
            "sk_live_1234",
            "--api-key-header",
            "X-Key",
            "--region",
            "local",
            "--ordered",
            "--inactive",
        ],
    )
    .await
    .json();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sub_"), "{created}");
    assert_eq!(created["tenant_id"], tenant_id.as_str());
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{created}");
    assert_eq!(
        created["event_types"],
        serde_json::json!(["user.*", "company.new"])
    );
    assert_eq!(created["active"], false);
    assert_eq!(created["ordered"], true);
    assert_eq!(created["api_key_header"], "X-Key");
    assert_eq!(created["api_key_hint"], "1234");
    assert_eq!(created["region"], "local");
    assert_eq!(created["status"], "SUBSCRIPTION_STATUS_ENABLED");
    assert_eq!(created["timeout_ms"], 15000);

    let list = cli.run(&["--json", "subscriptions", "list"]).await.json();
    assert_eq!(list["subscriptions"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["subscriptions"][0]["signing_secret"], "");

    let got = cli
        .run(&["--json", "subscriptions", "get", &id])
        .await
        .json();
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["name"], "CRM sync");

    let updated = cli
        .run(&[
            "--json",
            "subscriptions",
            "update",
            &id,
            "--name",
            "renamed",
            "--all-event-types",
            "--active",
            "--ordered",
            "false",
        ])
        .await
        .json();
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["name"], "renamed");
    assert_eq!(updated["event_types"], serde_json::json!([]));
    assert_eq!(updated["active"], true);
    assert_eq!(updated["ordered"], false);
    assert_eq!(updated["url"], "https://example.com/hooks", "unchanged");

    let rotated = cli
        .run(&[
            "--json",
            "subscriptions",
            "rotate-secret",
            &id,
            "--grace-period",
            "0",
        ])
        .await
        .json();
    assert_eq!(rotated["id"], id.as_str());
    let new_secret = rotated["signing_secret"].as_str().unwrap().to_owned();
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);

    let revealed = cli
        .run(&["--json", "subscriptions", "reveal-secret", &id])
        .await
        .json();
    assert_eq!(revealed["signing_secret"], new_secret.as_str());
    let quiet = cli
        .run(&["subscriptions", "reveal-secret", &id, "--quiet"])
        .await;
    assert_eq!(quiet.ok(), format!("{new_secret}\n"));

    let enabled = cli
        .run(&["--json", "subscriptions", "enable", &id])
        .await
        .json();
    assert_eq!(enabled["status"], "SUBSCRIPTION_STATUS_ENABLED");

    // People get a table and a detail view.
    let table = cli.run(&["subscriptions", "list"]).await;
    assert!(table.ok().starts_with("ID "), "{}", table.stdout);
    assert!(table.stdout.contains(&id) && table.stdout.contains("● active"));
    let view = cli.run(&["subscriptions", "get", &id]).await;
    assert!(view.ok().contains("https://example.com/hooks"));
    assert!(view.stdout.contains("X-Key: …1234"), "{}", view.stdout);

    let deleted = cli
        .run(&["--json", "subscriptions", "delete", &id])
        .await
        .json();
    assert_eq!(deleted, serde_json::json!({}));
    cli.run(&["subscriptions", "get", &id]).await.fails(3);
    herald.stop().await;
}

/// Creates a subscription to `url` through the CLI and returns its id.
async fn subscribe(addr: &str, token: &str, url: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "subscriptions",
        "create",
        "--name",
        "hook",
        "--url",
        url,
        "--api-key",
        "sk_live_1234",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let id = run_herald(addr, token, &args).await.ok().trim().to_owned();
    assert!(id.starts_with("sub_"), "{id}");
    id
}

const USER_NEW: &str = r#"{"entity_id": 1, "entity_type": "user", "action_type": "new", "result": {"id": 1, "external_id": "1815", "code": "CODE", "name_infix": null, "companies": [5]}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_commands_print_json_with_ids() {
    let (herald, tenant_id, token) = with_tenant().await;
    let addr = herald.url();
    let receiver = Receiver::start().await;
    let sub = subscribe(&addr, &token, &receiver.url("/hooks"), &[]).await;

    // --data as a JSON string, with a key the CLI makes.
    let published = run_herald(
        &addr,
        &token,
        &[
            "--json", "events", "publish", "--type", "user.new", "--data", USER_NEW, "--entity",
            "user:1", "--action", "new",
        ],
    )
    .await
    .json();
    let event_id = published["event_id"].as_str().unwrap().to_owned();
    assert!(event_id.starts_with("evt_"), "{published}");
    let delivery_ids = published["delivery_ids"].as_array().unwrap();
    assert_eq!(delivery_ids.len(), 1);
    assert!(delivery_ids[0].as_str().unwrap().starts_with("dlv_"));
    let got = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(&got[0].body[..], USER_NEW.as_bytes(), "bytes as given");

    let event = run_herald(&addr, &token, &["--json", "events", "get", &event_id])
        .await
        .json();
    assert_eq!(event["id"], event_id.as_str());
    assert_eq!(event["tenant_id"], tenant_id.as_str());
    assert_eq!(event["event_type"], "user.new");
    assert_eq!(event["entity_type"], "user");
    assert_eq!(event["entity_id"], "1");
    assert_eq!(event["action"], "new");
    assert_eq!(event["payload"], USER_NEW);
    let key = event["idempotency_key"].as_str().unwrap().to_owned();
    assert!(!key.is_empty(), "the CLI made an idempotency key");

    // --data @FILE and --data - (stdin), with an explicit key: the same key twice is one event.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("company.json");
    std::fs::write(
        &file,
        r#"{"entity_id": 5, "entity_type": "company", "action_type": "delete"}"#,
    )
    .unwrap();
    let data = format!("@{}", file.display());
    let args = [
        "events",
        "publish",
        "--type",
        "company.delete",
        "--data",
        &data,
        "--idempotency-key",
        "k-1",
        "--quiet",
    ];
    let first = run_herald(&addr, &token, &args)
        .await
        .ok()
        .trim()
        .to_owned();
    let again = run_herald(&addr, &token, &args)
        .await
        .ok()
        .trim()
        .to_owned();
    assert!(first.starts_with("evt_"));
    assert_eq!(first, again, "one event per idempotency key");
    let mut stdin = command(&addr, &token)
        .args([
            "--json",
            "events",
            "publish",
            "--type",
            "user.update",
            "--data",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt as _;
        let mut input = stdin.stdin.take().unwrap();
        input
            .write_all(br#"{"entity_id": 1, "action_type": "update"}"#)
            .await
            .unwrap();
    }
    let output = stdin.wait_with_output().await.unwrap();
    assert!(output.status.success());
    let from_stdin: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(from_stdin["event_id"].as_str().unwrap().starts_with("evt_"));

    let list = run_herald(&addr, &token, &["--json", "events", "list"])
        .await
        .json();
    let events = list["events"].as_array().unwrap();
    assert_eq!(events.len(), 3, "{list}");
    assert!(events.iter().any(|e| e["id"] == event_id.as_str()));
    let only = run_herald(
        &addr,
        &token,
        &["--json", "events", "list", "--type", "user.new"],
    )
    .await
    .json();
    assert_eq!(only["events"].as_array().unwrap().len(), 1);
    let types = run_herald(&addr, &token, &["--json", "events", "types"])
        .await
        .json();
    assert!(
        types["event_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["event_type"] == "user.new" && t["count"] == "1"),
        "{types}"
    );
    let table = run_herald(&addr, &token, &["events", "list"]).await;
    assert!(table.ok().contains("user:1"), "{}", table.stdout);
    let _ = sub;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_commands_print_json_with_ids() {
    let (herald, _, token) = with_tenant().await;
    let addr = herald.url();
    let receiver = Receiver::start().await;
    // The first request fails and, with one attempt allowed, its delivery is DEAD.
    receiver.script([500]);
    let sub = subscribe(
        &addr,
        &token,
        &receiver.url("/hooks"),
        &["--max-attempts", "1"],
    )
    .await;
    let cli = Cli::new(&addr, &token);
    let published = cli
        .run(&[
            "--json", "events", "publish", "--type", "user.new", "--data", USER_NEW,
        ])
        .await
        .json();
    let event_id = published["event_id"].as_str().unwrap().to_owned();
    let delivery_id = published["delivery_ids"][0].as_str().unwrap().to_owned();

    let dead = eventually("a dead delivery", DEADLINE, || {
        let cli = &cli;
        let sub = sub.clone();
        async move {
            let list = cli
                .run(&[
                    "--json",
                    "deliveries",
                    "list",
                    "--subscription",
                    &sub,
                    "--state",
                    "dead",
                ])
                .await
                .json();
            let first = list["deliveries"].get(0)?.clone();
            Some(first)
        }
    })
    .await;
    assert_eq!(dead["id"], delivery_id.as_str(), "{dead}");
    assert_eq!(dead["event_id"], event_id.as_str());
    assert_eq!(dead["subscription_id"], sub.as_str());
    assert_eq!(dead["state"], "DELIVERY_STATE_DEAD");
    assert_eq!(dead["last_status_code"], 500);

    let got = cli
        .run(&["--json", "deliveries", "get", &delivery_id])
        .await
        .json();
    assert_eq!(got["id"], delivery_id.as_str());
    assert_eq!(got["webhook_id"], event_id.as_str());
    let attempts = got["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{got}");
    assert!(attempts[0]["id"].as_str().unwrap().starts_with("att_"));
    assert_eq!(attempts[0]["status_code"], 500);
    assert_eq!(attempts[0]["error"], "ATTEMPT_ERROR_NONE");

    // People see the state and the attempt at a glance.
    let table = cli.run(&["deliveries", "list", "--event", &event_id]).await;
    assert!(table.ok().contains("✗ dead"), "{}", table.stdout);
    assert!(table.stdout.contains("500"));
    let view = cli.run(&["deliveries", "get", &delivery_id]).await;
    assert!(view.ok().contains("att_"), "{}", view.stdout);

    // Replay brings it back; the receiver now answers 200.
    let replayed = cli
        .run(&[
            "--json",
            "deliveries",
            "replay",
            "--subscription",
            &sub,
            "--since",
            "1h",
        ])
        .await
        .json();
    assert_eq!(replayed["count"], 1, "{replayed}");
    eventually("the replayed delivery succeeds", DEADLINE, || {
        let cli = &cli;
        let id = delivery_id.clone();
        async move {
            let got = cli.run(&["--json", "deliveries", "get", &id]).await.json();
            (got["state"] == "DELIVERY_STATE_SUCCEEDED").then_some(())
        }
    })
    .await;

    // Retry sends a succeeded delivery once more.
    let retried = cli
        .run(&["--json", "deliveries", "retry", &delivery_id])
        .await
        .json();
    assert_eq!(retried["id"], delivery_id.as_str());
    receiver.wait_for(3, DEADLINE).await;

    // The list across every subscription, and the test webhook.
    let all = cli
        .run(&["--json", "deliveries", "list", "--limit", "5"])
        .await
        .json();
    assert_eq!(all["deliveries"][0]["id"], delivery_id.as_str(), "{all}");
    let test = cli.run(&["--json", "test", &sub]).await.json();
    assert!(
        test["event_id"].as_str().unwrap().starts_with("evt_"),
        "{test}"
    );
    assert!(test["delivery_id"].as_str().unwrap().starts_with("dlv_"));
    let waited = cli.run(&["test", &sub, "--wait"]).await;
    assert!(
        waited.ok().contains("delivered: ✓ succeeded"),
        "{}",
        waited.stdout
    );
    let test_body: Value =
        serde_json::from_slice(&receiver.wait_for(5, DEADLINE).await[3].body).unwrap();
    assert_eq!(test_body["type"], "test");
    herald.stop().await;
}

/// Spawns a long-running `herald` and returns it with its stdout lines and stderr text.
fn spawn(
    addr: &str,
    token: &str,
    args: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    Arc<Mutex<String>>,
) {
    let mut child = command(addr, token)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    collect(child.stderr.take().unwrap(), stderr.clone());
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines, stderr)
}

/// Waits until `text` contains `what`.
async fn wait_for_text(text: &Arc<Mutex<String>>, what: &str) {
    eventually(what, DEADLINE, || async {
        text.lock().unwrap().contains(what).then_some(())
    })
    .await;
}

/// Reads the next stdout line under the deadline.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("a line in time")
        .unwrap()
        .expect("the process is still running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_attempts_live() {
    let (herald, _, token) = with_tenant().await;
    let addr = herald.url();
    let receiver = Receiver::start().await;
    let sub = subscribe(&addr, &token, &receiver.url("/hooks"), &[]).await;
    let (_json_child, mut json_lines, json_err) = spawn(
        &addr,
        &token,
        &["--json", "deliveries", "watch", "--subscription", &sub],
    );
    let (_human_child, mut human_lines, human_err) = spawn(&addr, &token, &["deliveries", "watch"]);
    wait_for_text(&json_err, "watching").await;
    wait_for_text(&human_err, "watching").await;

    let published = run_herald(
        &addr,
        &token,
        &[
            "--json", "events", "publish", "--type", "user.new", "--data", USER_NEW,
        ],
    )
    .await
    .json();
    let delivery_id = published["delivery_ids"][0].as_str().unwrap();
    let record: Value = serde_json::from_str(&next_line(&mut json_lines).await).unwrap();
    assert_eq!(record["delivery_id"], delivery_id, "{record}");
    assert_eq!(record["subscription_id"], sub.as_str());
    assert_eq!(record["event_id"], published["event_id"]);
    assert_eq!(record["state"], "DELIVERY_STATE_SUCCEEDED");
    assert_eq!(record["attempt"]["status_code"], 200);
    let line = next_line(&mut human_lines).await;
    assert!(
        line.contains(delivery_id) && line.contains("✓ succeeded") && line.contains("200"),
        "{line}"
    );
    herald.stop().await;
}

/// `deliveries watch` outlives a control-plane restart: it says it reconnects, watches again
/// once the control plane is back, and prints the attempts made after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_when_the_control_plane_restarts() {
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (herald, _, token) = with_tenant_on(
        Herald::builder(Backend::Sqlite)
            .configure(|c| c.listen = listen)
            .start()
            .await,
    )
    .await;
    let addr = herald.url();
    let receiver = Receiver::start().await;
    let sub = subscribe(&addr, &token, &receiver.url("/hooks"), &[]).await;
    let (mut child, mut lines, stderr) = spawn(
        &addr,
        &token,
        &["--json", "deliveries", "watch", "--subscription", &sub],
    );
    wait_for_text(&stderr, "watching attempts").await;

    let database = herald.stop_keeping_database().await;
    wait_for_text(&stderr, "reconnecting").await;
    let herald = Herald::builder(Backend::Sqlite)
        .configure(|c| c.listen = listen)
        .start_on(database)
        .await;
    wait_for_text(&stderr, "reconnected: watching attempts").await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "watch exited: {}",
        stderr.lock().unwrap()
    );

    let published = run_herald(
        &addr,
        &token,
        &[
            "--json", "events", "publish", "--type", "user.new", "--data", USER_NEW,
        ],
    )
    .await
    .json();
    let record: Value = serde_json::from_str(&next_line(&mut lines).await).unwrap();
    assert_eq!(
        record["delivery_id"], published["delivery_ids"][0],
        "{record}"
    );
    assert_eq!(record["state"], "DELIVERY_STATE_SUCCEEDED");
    herald.stop().await;
}

/// A usage error's usage line shows the flags the command needs, not `--addr` and `--token`
/// whose values came from HERALD_ADDR and HERALD_TOKEN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_lines_do_not_show_settings_from_the_environment_as_required() {
    let run = run_herald("http://127.0.0.1:9", "hrld_any", &["tenants", "create"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let usage = run
        .stderr
        .lines()
        .find(|line| line.starts_with("Usage: "))
        .unwrap_or_else(|| panic!("a usage line: {run:?}"));
    assert_eq!(usage, "Usage: herald tenants create --name <NAME>");
    // The environment still counts: a typo names the flag, and the help lists the variables.
    let help = run_herald(
        "http://127.0.0.1:9",
        "hrld_any",
        &["tenants", "create", "--help"],
    )
    .await;
    assert!(help.ok().contains("[env: HERALD_ADDR="), "{help:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_one_json_object_per_webhook() {
    let (herald, _, token) = with_tenant().await;
    let addr = herald.url();
    let (good_port, bare_port, bad_port) = (free_port(), free_port(), free_port());
    let url = |port: u16| format!("http://127.0.0.1:{port}/hooks");
    let good = subscribe(&addr, &token, &url(good_port), &[]).await;
    let _bare = subscribe(&addr, &token, &url(bare_port), &[]).await;
    let bad = subscribe(&addr, &token, &url(bad_port), &["--max-attempts", "1"]).await;
    let secret = run_herald(
        &addr,
        &token,
        &["subscriptions", "reveal-secret", &good, "-q"],
    )
    .await
    .ok()
    .trim()
    .to_owned();

    let (good_port, bare_port, bad_port) = (
        good_port.to_string(),
        bare_port.to_string(),
        bad_port.to_string(),
    );
    let (_a, mut verified, a_err) = spawn(
        &addr,
        "",
        &[
            "listen",
            "--json",
            "--port",
            &good_port,
            "--secret",
            &secret,
            "--api-key",
            "sk_live_1234",
        ],
    );
    let (_b, mut unchecked, b_err) = spawn(&addr, "", &["listen", "--json", "--port", &bare_port]);
    let (_c, mut refused, c_err) = spawn(
        &addr,
        "",
        &[
            "listen",
            "--json",
            "--port",
            &bad_port,
            "--secret",
            "whsec_c2Vjb25kLXNlY3JldC1ieXRlcy0xMjM0NTY=",
            "--api-key",
            "another-key",
            "--api-key-header",
            "X-API-Key",
            "--status",
            "503",
        ],
    );
    for err in [&a_err, &b_err, &c_err] {
        wait_for_text(err, "listening on http://127.0.0.1:").await;
    }

    let published = run_herald(
        &addr,
        &token,
        &[
            "--json", "events", "publish", "--type", "user.new", "--data", USER_NEW,
        ],
    )
    .await
    .json();
    let event_id = published["event_id"].as_str().unwrap();
    let parse = |line: String| -> Value {
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
    };
    let a = parse(next_line(&mut verified).await);
    assert_eq!(a["webhook_id"], event_id, "{a}");
    assert_eq!(a["signature_valid"], true, "{a}");
    assert_eq!(a["api_key_valid"], true, "{a}");
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/hooks");
    assert_eq!(a["body"]["result"]["external_id"], "1815");
    assert_eq!(a["headers"]["content-type"], "application/json");

    let b = parse(next_line(&mut unchecked).await);
    assert_eq!(b["webhook_id"], event_id);
    assert!(b["signature_valid"].is_null(), "{b}");
    assert!(b["api_key_valid"].is_null(), "{b}");

    let c = parse(next_line(&mut refused).await);
    assert_eq!(c["signature_valid"], false, "{c}");
    assert_eq!(c["api_key_valid"], false, "{c}");
    assert_eq!(c["status"], 503);
    // Herald recorded the status `--status` answered with.
    let failed = eventually("the 503 recorded", DEADLINE, || {
        let (addr, token, bad) = (addr.clone(), token.clone(), bad.clone());
        async move {
            let list = run_herald(
                &addr,
                &token,
                &[
                    "--json",
                    "deliveries",
                    "list",
                    "--subscription",
                    &bad,
                    "--state",
                    "dead",
                ],
            )
            .await
            .json();
            list["deliveries"].get(0).cloned()
        }
    })
    .await;
    assert_eq!(failed["last_status_code"], 503, "{failed}");
    herald.stop().await;
}

/// `--signature ed25519`: `reveal-secret` prints the public key, `herald listen --public-key`
/// verifies the `v1a` signature (and refuses it with another key pair's public key);
/// `--filter @FILE` reads the payload filter from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_verifies_ed25519_signatures_with_the_public_key() {
    let (herald, _, token) = with_tenant().await;
    let addr = herald.url();
    let dir = tempfile::tempdir().unwrap();
    let filter_file = dir.path().join("filter.json");
    std::fs::write(&filter_file, r#"{"result.external_id": "1815"}"#).unwrap();
    let filter_arg = format!("@{}", filter_file.display());
    let (port, other_port) = (free_port(), free_port());
    let url = |port: u16| format!("http://127.0.0.1:{port}/hooks");
    let sub = subscribe(
        &addr,
        &token,
        &url(port),
        &["--signature", "ed25519", "--filter", &filter_arg],
    )
    .await;
    let other = subscribe(&addr, &token, &url(other_port), &["--signature", "ed25519"]).await;
    let shown = run_herald(&addr, &token, &["--json", "subscriptions", "get", &sub])
        .await
        .json();
    assert_eq!(shown["payload_filter"], r#"{"result.external_id": "1815"}"#);
    assert_eq!(
        shown["signature_scheme"], "SIGNATURE_SCHEME_ED25519",
        "{shown}"
    );
    let public_key = |id: String| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            run_herald(
                &addr,
                &token,
                &["subscriptions", "reveal-secret", &id, "-q"],
            )
            .await
            .ok()
            .trim()
            .to_owned()
        }
    };
    let key = public_key(sub.clone()).await;
    let other_key = public_key(other.clone()).await;
    assert!(key.starts_with("whpk_") && other_key.starts_with("whpk_") && key != other_key);
    assert_eq!(shown["signing_public_key"], key.as_str());

    let (port, other_port) = (port.to_string(), other_port.to_string());
    let (_a, mut verified, a_err) = spawn(
        &addr,
        "",
        &["listen", "--json", "--port", &port, "--public-key", &key],
    );
    // The other subscription's listener is given the first one's key: refused.
    let (_b, mut refused, b_err) = spawn(
        &addr,
        "",
        &[
            "listen",
            "--json",
            "--port",
            &other_port,
            "--public-key",
            &key,
        ],
    );
    for err in [&a_err, &b_err] {
        wait_for_text(err, "listening on http://127.0.0.1:").await;
    }
    let published = run_herald(
        &addr,
        &token,
        &[
            "--json", "events", "publish", "--type", "user.new", "--data", USER_NEW,
        ],
    )
    .await
    .json();
    let parse = |line: String| -> Value {
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"))
    };
    let a = parse(next_line(&mut verified).await);
    assert_eq!(a["webhook_id"], published["event_id"], "{a}");
    assert_eq!(a["signature_valid"], true, "{a}");
    let b = parse(next_line(&mut refused).await);
    assert_eq!(b["signature_valid"], false, "{b}");
    assert_eq!(
        b["signature_error"],
        "webhook-signature: no signature matches"
    );

    // A malformed key is refused before listening, naming the flag.
    let bad = run_herald(&addr, "", &["listen", "--public-key", "whpk_AAAA"]).await;
    assert_eq!(bad.code, 2, "a usage error: {bad:?}");
    assert!(
        bad.stderr
            .contains("--public-key: public key: must be whpk_"),
        "{bad:?}"
    );
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_prints_only_what_was_made() {
    let (herald, tenant_id, token) = with_tenant().await;
    let addr = herald.url();
    assert!(tenant_id.starts_with("ten_") && !tenant_id.contains('\n'));
    assert!(token.starts_with("hrld_"));
    let receiver = Receiver::start().await;
    let sub = subscribe(&addr, &token, &receiver.url("/h"), &[]).await;
    let event = run_herald(
        &addr,
        &token,
        &[
            "events", "publish", "--type", "user.new", "--data", "{}", "-q",
        ],
    )
    .await;
    assert!(event.ok().trim().starts_with("evt_") && event.stdout.lines().count() == 1);
    let ids = run_herald(&addr, &token, &["subscriptions", "list", "--quiet"]).await;
    assert_eq!(ids.ok(), format!("{sub}\n"));
    let delivery = run_herald(&addr, &token, &["test", &sub, "--quiet"]).await;
    assert!(delivery.ok().trim().starts_with("dlv_"), "{delivery:?}");
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_one_line_and_the_spec_exit_code() {
    let (herald, _, token) = with_tenant().await;
    let addr = herald.url();

    // Unknown subscription: 3.
    let line = run_herald(&addr, &token, &["subscriptions", "get", "sub_01unknown"])
        .await
        .fails(3)
        .to_owned();
    assert!(
        line.contains("sub_01unknown") && line.contains("not found"),
        "{line}"
    );
    run_herald(&addr, &token, &["test", "sub_01unknown"])
        .await
        .fails(3);

    // Malformed JSON in --data: 2, refused by the CLI itself (nothing published).
    let line = run_herald(
        &addr,
        &token,
        &[
            "events",
            "publish",
            "--type",
            "user.new",
            "--data",
            "{\"id\": 1,",
        ],
    )
    .await
    .fails(2)
    .to_owned();
    assert!(
        line.contains("--data") && line.contains("not valid JSON"),
        "{line}"
    );
    run_herald(
        &addr,
        &token,
        &["events", "publish", "--type", "user.new", "--data", "[1]"],
    )
    .await
    .fails(2);
    let events = run_herald(&addr, &token, &["--json", "events", "list"])
        .await
        .json();
    assert_eq!(events["events"], serde_json::json!([]));

    // Bad URL: 5, naming the field.
    let line = run_herald(
        &addr,
        &token,
        &[
            "subscriptions",
            "create",
            "--name",
            "x",
            "--url",
            "ftp://example.com",
        ],
    )
    .await
    .fails(5)
    .to_owned();
    assert!(line.starts_with("herald: url:"), "{line}");

    // Wrong token: 4.
    let line = run_herald(&addr, "hrld_wrong", &["subscriptions", "list"])
        .await
        .fails(4)
        .to_owned();
    assert!(line.contains("token"), "{line}");
    // A tenant token on an admin command: 4.
    run_herald(&addr, &token, &["tenants", "list"])
        .await
        .fails(4);

    // An admin token without --tenant: 5, saying which flag to pass.
    let line = as_admin(&herald, &["subscriptions", "list"])
        .await
        .fails(5)
        .to_owned();
    assert!(line.contains("--tenant"), "{line}");

    // `tokens create` with neither --tenant nor --admin: 2.
    let line = as_admin(&herald, &["tokens", "create", "--name", "x"])
        .await
        .fails(2)
        .to_owned();
    assert!(
        line.contains("--tenant") && line.contains("--admin"),
        "{line}"
    );

    // Usage errors from the flag parser are 2 as well.
    let run = run_herald(&addr, &token, &["deliveries", "list", "--state", "gone"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_not_running_exits_6_naming_the_address() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["subscriptions", "list"][..],
        &["events", "publish", "--type", "user.new", "--data", "{}"][..],
        &["tenants", "create", "--name", "acme"][..],
    ] {
        let run = run_herald(&addr, "hrld_any", args).await;
        let line = run.fails(6);
        assert!(line.contains(&addr), "{line}");
        assert!(
            line.contains("start one with `scripts/start` in Herald's repository"),
            "{line}"
        );
    }
}

/// `herald console-link --tenant …` prints a one-time sign-in link to the tenant's console
/// (`--quiet`: the link only), and the link signs a browser in once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_link_prints_a_one_time_sign_in_link() {
    let herald = Herald::builder(Backend::Sqlite)
        .configure(|c| c.console_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    let tenant = as_admin(&herald, &["--quiet", "tenants", "create", "--name", "acme"]).await;
    let tenant_id = tenant.stdout.trim().to_owned();
    let link = as_admin(
        &herald,
        &[
            "--quiet",
            "console-link",
            "--tenant",
            &tenant_id,
            "--ttl",
            "60",
        ],
    )
    .await;
    assert_eq!(link.code, 0, "{}", link.stderr);
    let url = link.stdout.trim();
    let console = herald.running.as_ref().unwrap().console_addr.unwrap();
    let path = url
        .strip_prefix(&format!("http://{console}"))
        .unwrap_or_else(|| panic!("a link to the console at {console}: {url}"));
    assert!(path.starts_with("/login/link?token="), "{url}");
    let get = |path: String| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(console).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {console}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let first = get(path.to_owned()).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("herald_session="), "{first}");
    let second = get(path.to_owned()).await;
    assert!(second.starts_with("HTTP/1.1 403"), "used once: {second}");
    let refused = as_admin(&herald, &["console-link", "--tenant", "ten_nobody"]).await;
    assert_ne!(refused.code, 0);
    herald.stop().await;
}
