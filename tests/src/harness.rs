//! Control planes and agents for tests: in-process through the library's `start`, or as child
//! processes of the workspace's binaries (for SIGKILL), on a fresh SQLite file or a fresh
//! PostgreSQL database that is dropped afterwards.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use herald_client::HeraldClient;
use herald_control_plane::config::Config;
use sea_orm::{ConnectionTrait, Database};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The PostgreSQL server of this machine.
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const PG_PREFIX: &str = "herald_test_";

/// Where a control plane keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database made for one test.
pub struct TestDatabase {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                Self {
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let admin = Database::connect(PG_ADMIN_URL).await.unwrap_or_else(|err| {
                    panic!(
                        "PostgreSQL at 127.0.0.1:5432 is unreachable ({err}); scripts/test (the \
                         README's test command) starts it, or `pg_ctlcluster \
                         --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
                    )
                });
                drop_stale_databases(&admin).await;
                let now = chrono::Utc::now().timestamp();
                let name = format!(
                    "{PG_PREFIX}{now}_{}",
                    ulid::Ulid::new().to_string().to_ascii_lowercase()
                );
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                let _ = admin.close().await;
                Self {
                    url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// Another handle on the same PostgreSQL database, for a second replica; dropping it (or the
    /// replica on it) leaves the database to the handle that created it.
    pub fn shared(&self) -> Self {
        assert!(
            self.pg_name.is_some(),
            "only PostgreSQL is shared by replicas"
        );
        Self {
            url: self.url.clone(),
            pg_name: None,
            _dir: None,
        }
    }

    /// The SQLite file, when on SQLite.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        herald_control_plane::storage::parse_sqlite_path(&self.url)
            .filter(|_| self.pg_name.is_none())
    }

    /// Drops the PostgreSQL database (SQLite files go with their temp dir).
    pub async fn drop_database(&mut self) {
        if let Some(name) = self.pg_name.take()
            && let Ok(admin) = Database::connect(PG_ADMIN_URL).await
        {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
            let _ = admin.close().await;
        }
    }
}

/// Drops test databases left by runs that died more than three hours ago.
async fn drop_stale_databases(admin: &sea_orm::DatabaseConnection) {
    let rows = admin
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT datname FROM pg_database WHERE datname LIKE '{PG_PREFIX}%'"),
        ))
        .await
        .unwrap_or_default();
    let cutoff = chrono::Utc::now().timestamp() - 3 * 3600;
    for row in rows {
        let Ok(name) = row.try_get_by_index::<String>(0) else {
            continue;
        };
        let created = name
            .strip_prefix(PG_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<i64>().ok());
        if created.is_some_and(|secs| secs < cutoff) {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// Builds a control plane for a test.
#[derive(Clone)]
pub struct HeraldBuilder {
    backend: Backend,
    builtin_agent: bool,
    hooks: herald_control_plane::Hooks,
    pub config: Config,
}

/// A control plane under test.
pub struct Herald {
    pub addr: SocketAddr,
    pub admin_token: String,
    pub agent_token: String,
    pub database: TestDatabase,
    pub running: Option<herald_control_plane::Running>,
    pub config: Config,
}

pub const ADMIN_TOKEN: &str = "hrld_test_admin_token_0123456789";
pub const AGENT_TOKEN: &str = "hrla_test_agent_token_0123456789";

impl HeraldBuilder {
    pub fn new(backend: Backend) -> Self {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: Some(ADMIN_TOKEN.into()),
            agent_token: Some(AGENT_TOKEN.into()),
            builtin_agent: true,
            // Tests that want the console turn it on with a port of their own.
            console_listen: None,
            retry_schedule: vec![Duration::from_millis(100), Duration::from_millis(200)],
            lease_grace: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            ..Config::default()
        };
        Self {
            backend,
            builtin_agent: true,
            hooks: Default::default(),
            config,
        }
    }

    /// Without the built-in agent (the test runs its own).
    pub fn no_builtin_agent(mut self) -> Self {
        self.builtin_agent = false;
        self
    }

    /// Steps into the running control plane (see `herald_control_plane::Hooks`).
    pub fn hooks(mut self, hooks: herald_control_plane::Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(&mut self.config);
        self
    }

    /// Starts the control plane in this process.
    pub async fn start(self) -> Herald {
        let database = TestDatabase::new(self.backend).await;
        self.start_on(database).await
    }

    /// Starts the control plane on a runtime of its own, on an existing database:
    /// [`Herald::crash`] then drops that runtime with every task of the control plane at once
    /// (no drain, no last write, no close), which leaves the database as a SIGKILL would.
    pub async fn start_crashable_on(
        self,
        database: TestDatabase,
    ) -> (Herald, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let url = database.url.clone();
        let started = runtime.spawn(async move {
            let builder = self;
            let mut config = builder.config;
            config.database_url = url;
            config.builtin_agent = builder.builtin_agent;
            let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
            let running = herald_control_plane::start_with(config.clone(), listener, builder.hooks)
                .await
                .unwrap();
            (running, config)
        });
        let (running, config) = started.await.unwrap();
        let herald = Herald {
            addr: running.addr,
            admin_token: ADMIN_TOKEN.into(),
            agent_token: AGENT_TOKEN.into(),
            database,
            running: Some(running),
            config,
        };
        (herald, runtime)
    }

    /// Starts the control plane in this process on an existing database.
    pub async fn start_on(self, database: TestDatabase) -> Herald {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = self.config;
        config.database_url = database.url.clone();
        config.builtin_agent = self.builtin_agent;
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let running = herald_control_plane::start_with(config.clone(), listener, self.hooks)
            .await
            .unwrap();
        Herald {
            addr: running.addr,
            admin_token: ADMIN_TOKEN.into(),
            agent_token: AGENT_TOKEN.into(),
            database,
            running: Some(running),
            config,
        }
    }
}

impl Herald {
    pub fn builder(backend: Backend) -> HeraldBuilder {
        HeraldBuilder::new(backend)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with the admin token.
    pub fn admin(&self) -> HeraldClient {
        HeraldClient::connect(&self.url(), &self.admin_token).unwrap()
    }

    /// A client with any token.
    pub fn client(&self, token: &str) -> HeraldClient {
        HeraldClient::connect(&self.url(), token).unwrap()
    }

    /// Creates a tenant and a token for it; returns (tenant id, tenant client).
    pub async fn tenant(&self, name: &str) -> (String, HeraldClient) {
        let (tenant, token) = create_tenant(&self.admin(), name, "test").await;
        (tenant.id, self.client(&token))
    }

    /// Stops a control plane started by [`HeraldBuilder::start_crashable_on`] the way SIGKILL
    /// would, and returns its database.
    pub async fn crash(mut self, runtime: tokio::runtime::Runtime) -> TestDatabase {
        runtime.shutdown_background();
        drop(self.running.take());
        // The runtime's threads drop its tasks (and the SQLite file's lock with them) on their
        // way out; the file is free once its lock can be taken.
        if let Some(path) = self.database.sqlite_path() {
            let mut lock_path = path.into_os_string();
            lock_path.push(".lock");
            crate::eventually(
                "the crashed control plane's file lock",
                Duration::from_secs(10),
                || {
                    let lock_path = lock_path.clone();
                    async move {
                        let file = std::fs::OpenOptions::new()
                            .write(true)
                            .open(&lock_path)
                            .ok()?;
                        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
                            .ok()
                            .map(drop)
                    }
                },
            )
            .await;
        }
        self.database
    }

    /// Stops the control plane gracefully and returns its database, to start another on it.
    pub async fn stop_keeping_database(mut self) -> TestDatabase {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.wait().await.unwrap();
        }
        self.database
    }

    /// Stops the control plane gracefully and drops its database.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            running.wait().await.unwrap();
        }
        self.database.drop_database().await;
    }
}

/// Returns the directory holding the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/e2e-… -> target/debug
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Returns the path of a workspace binary, or panics saying how to build it.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// A child process of a workspace binary.
pub struct Child {
    pub child: tokio::process::Child,
    pub addr: Option<SocketAddr>,
    pub stderr_log: std::sync::Arc<std::sync::Mutex<String>>,
    pub stdout_log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Child {
    /// Kills the process with SIGKILL and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends SIGTERM and waits for the exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.child.wait().await.unwrap()
    }

    pub fn logs(&self) -> String {
        self.stderr_log.lock().unwrap().clone()
    }

    /// Returns what the process printed on standard output so far.
    pub fn output(&self) -> String {
        self.stdout_log.lock().unwrap().clone()
    }
}

/// Starts `herald-control-plane` with `env` (and no other HERALD_* variable), and waits for its
/// listening line.
pub async fn spawn_control_plane(env: &[(&str, String)]) -> Child {
    spawn_control_plane_in(&std::env::temp_dir(), env).await
}

/// Like [`spawn_control_plane`], with `dir` as the working directory (where the default
/// `sqlite://herald.db` lands).
pub async fn spawn_control_plane_in(dir: &Path, env: &[(&str, String)]) -> Child {
    let mut command = tokio::process::Command::new(binary("herald-control-plane"));
    command.current_dir(dir);
    // The console's default port would collide between tests running side by side.
    if !env.iter().any(|(k, _)| *k == "HERALD_CONSOLE_LISTEN") {
        command.env("HERALD_CONSOLE_LISTEN", "");
    }
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let stderr_log = capture(child.stderr.take().unwrap());
    let stdout_log = capture(child.stdout.take().unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let printed = stdout_log.lock().unwrap().clone();
        let addr = printed.lines().find_map(|line| {
            line.strip_prefix("herald control plane listening on http://")
                .and_then(|rest| rest.trim().parse::<SocketAddr>().ok())
        });
        if let Some(addr) = addr {
            break addr;
        }
        let exited = child.try_wait().ok().flatten().is_some();
        if exited || tokio::time::Instant::now() > deadline {
            let _ = child.start_kill();
            panic!(
                "control plane did not start: {}",
                stderr_log.lock().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Child {
        child,
        addr: Some(addr),
        stderr_log,
        stdout_log,
    }
}

/// Starts `herald-agent` with `env`.
pub fn spawn_agent(env: &[(&str, String)]) -> Child {
    let mut command = tokio::process::Command::new(binary("herald-agent"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    let stderr_log = capture(child.stderr.take().unwrap());
    Child {
        child,
        addr: None,
        stderr_log,
        stdout_log: Default::default(),
    }
}

/// Collects the lines of a child's output while it runs (so its pipe never fills up).
fn capture(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<String>> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

/// Runs an async test body once per backend.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::Backend::Postgres).await;
            }
        }
    };
}

/// Creates a tenant through an admin client and a token named `token_name` for it; returns the
/// tenant and the token's secret.
pub async fn create_tenant(
    admin: &HeraldClient,
    name: &str,
    token_name: &str,
) -> (herald_client::v1::Tenant, String) {
    use herald_client::v1 as pb;
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    let token = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            tenant_id: tenant.id.clone(),
            name: token_name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    (tenant, token)
}
