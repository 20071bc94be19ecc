//! What a run starts: a fresh database, the control plane and agents as child processes of the
//! workspace's binaries, and the readings taken from them (CPU time, peak RSS, commits).
//!
//! A [`Deployment`] holds a list of control planes: `--replicas N` starts N of them on one
//! PostgreSQL database, agents know every one of them, and publishers spread over them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use sea_orm::{ConnectOptions, ConnectionTrait as _, DatabaseConnection, DbBackend, Statement};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// Where the control plane keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

const PG_PREFIX: &str = "herald_bench_";
/// How long a control plane may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of a child's standard error kept for error messages.
const LOG_LINES: usize = 40;

/// A database made for one run.
pub enum Database {
    Sqlite {
        url: String,
        _dir: tempfile::TempDir,
    },
    Postgres {
        url: String,
        name: String,
        admin_url: String,
    },
}

impl Database {
    /// Creates a fresh SQLite file in a temp dir, or a fresh PostgreSQL database through
    /// `pg_admin_url` (dropping bench databases left by runs that died over three hours ago).
    pub async fn create(backend: Backend, pg_admin_url: &str) -> anyhow::Result<Self> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().context("cannot make a temp dir")?;
                let url = format!("sqlite://{}", dir.path().join("herald.db").display());
                Ok(Self::Sqlite { url, _dir: dir })
            }
            Backend::Postgres => {
                let admin = connect(pg_admin_url).await?;
                drop_stale_databases(&admin).await;
                let now = unix_now();
                let name = format!(
                    "{PG_PREFIX}{now}_{}_{:08x}",
                    std::process::id(),
                    rand_suffix()
                );
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .with_context(|| format!("cannot create database {name}"))?;
                let _ = admin.close().await;
                let url = match pg_admin_url.rsplit_once('/') {
                    Some((server, _)) => format!("{server}/{name}"),
                    None => bail!("--pg-admin-url: expected postgres://…/DATABASE"),
                };
                Ok(Self::Postgres {
                    url,
                    name,
                    admin_url: pg_admin_url.to_owned(),
                })
            }
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Self::Sqlite { url, .. } | Self::Postgres { url, .. } => url,
        }
    }

    /// Returns the transactions committed in this database so far, where the backend counts them.
    ///
    /// PostgreSQL publishes a backend's counts when it goes idle (at most once a second) and when
    /// it exits, so the count is exact once the control plane has stopped.
    pub async fn commits(&self) -> anyhow::Result<Option<u64>> {
        match self {
            Self::Sqlite { .. } => Ok(commits_sqlite()),
            Self::Postgres {
                name, admin_url, ..
            } => {
                let admin = connect(admin_url).await?;
                let rows = admin
                    .query_all_raw(Statement::from_string(
                        DbBackend::Postgres,
                        format!(
                            "SELECT xact_commit FROM pg_stat_database WHERE datname = '{name}'"
                        ),
                    ))
                    .await
                    .context("cannot read pg_stat_database")?;
                let _ = admin.close().await;
                let commits = rows
                    .first()
                    .map(|row| row.try_get_by_index::<i64>(0))
                    .transpose()
                    .context("pg_stat_database.xact_commit")?;
                Ok(commits.map(|n| u64::try_from(n).unwrap_or(0)))
            }
        }
    }

    /// Returns the CPU time used so far by each PostgreSQL backend connected to this database
    /// (the server's work for the control plane); `None` on SQLite, whose work is in-process.
    pub async fn backend_cpu(&self) -> anyhow::Result<Option<HashMap<u32, Duration>>> {
        let Self::Postgres {
            name, admin_url, ..
        } = self
        else {
            return Ok(None);
        };
        let admin = connect(admin_url).await?;
        let rows = admin
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pid FROM pg_stat_activity WHERE datname = '{name}'"),
            ))
            .await
            .context("cannot read pg_stat_activity")?;
        let _ = admin.close().await;
        let mut cpu = HashMap::new();
        for row in rows {
            let Ok(pid) = row.try_get_by_index::<i32>(0) else {
                continue;
            };
            // A backend that exited meanwhile is skipped.
            if let Ok(usage) = proc_usage(&pid.to_string()) {
                cpu.insert(pid as u32, usage.cpu);
            }
        }
        Ok(Some(cpu))
    }

    /// Returns the server's WAL position in bytes (PostgreSQL; server-wide, so other databases'
    /// writes count too: run the bench on a quiet server).
    pub async fn wal_position(&self) -> anyhow::Result<Option<u64>> {
        let Self::Postgres { admin_url, .. } = self else {
            return Ok(None);
        };
        let admin = connect(admin_url).await?;
        let row = admin
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint".to_owned(),
            ))
            .await
            .context("cannot read the WAL position")?;
        let _ = admin.close().await;
        let position = row
            .map(|row| row.try_get_by_index::<i64>(0))
            .transpose()
            .context("pg_current_wal_lsn")?;
        Ok(position.map(|p| u64::try_from(p).unwrap_or(0)))
    }

    /// Returns the size of this database's files: tables, indexes, dead rows not yet vacuumed
    /// (PostgreSQL).
    pub async fn size(&self) -> anyhow::Result<Option<u64>> {
        let Self::Postgres {
            name, admin_url, ..
        } = self
        else {
            return Ok(None);
        };
        let admin = connect(admin_url).await?;
        let row = admin
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_database_size('{name}')"),
            ))
            .await
            .context("cannot read the database size")?;
        let _ = admin.close().await;
        let size = row
            .map(|row| row.try_get_by_index::<i64>(0))
            .transpose()
            .context("pg_database_size")?;
        Ok(size.map(|s| u64::try_from(s).unwrap_or(0)))
    }

    /// Returns the rows inserted, updated and deleted so far per table of this database
    /// (PostgreSQL's statistics: a backend publishes its counts when idle, at most once a
    /// second, and when it exits).
    pub async fn rows_written(&self) -> anyhow::Result<Option<BTreeMap<String, u64>>> {
        let Self::Postgres { url, .. } = self else {
            return Ok(None);
        };
        let db = connect(url).await?;
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT relname::text, (n_tup_ins + n_tup_upd + n_tup_del)::bigint \
                 FROM pg_stat_user_tables"
                    .to_owned(),
            ))
            .await
            .context("cannot read pg_stat_user_tables")?;
        let _ = db.close().await;
        let mut written = BTreeMap::new();
        for row in rows {
            let table: String = row.try_get_by_index(0).context("relname")?;
            let count: i64 = row.try_get_by_index(1).context("rows written")?;
            written.insert(table, u64::try_from(count).unwrap_or(0));
        }
        Ok(Some(written))
    }

    /// Drops the PostgreSQL database (a SQLite file goes with its temp dir).
    pub async fn drop_database(self) {
        if let Self::Postgres {
            name, admin_url, ..
        } = self
            && let Ok(admin) = connect(&admin_url).await
        {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
            let _ = admin.close().await;
        }
    }
}

/// Returns the transactions committed in a SQLite database: the control plane exposes no counter
/// yet, so this is unknown (shown as n/a).
pub fn commits_sqlite() -> Option<u64> {
    None
}

async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    sea_orm::Database::connect(options).await.with_context(|| {
        format!(
            "PostgreSQL at {url} is unreachable; start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )
    })
}

async fn drop_stale_databases(admin: &DatabaseConnection) {
    let rows = admin
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT datname FROM pg_database WHERE datname LIKE '{PG_PREFIX}%'"),
        ))
        .await
        .unwrap_or_default();
    let cutoff = unix_now().saturating_sub(3 * 3600);
    for row in rows {
        let Ok(name) = row.try_get_by_index::<String>(0) else {
            continue;
        };
        let created = name
            .strip_prefix(PG_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|secs| secs < cutoff) {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Returns 32 bits that differ between runs (no rng crate needed for a name).
fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(unix_now());
    hasher.finish() as u32
}

/// A child process of a workspace binary; killed if dropped while running.
pub struct Process {
    pub name: String,
    child: Child,
    pid: u32,
    log: Arc<Mutex<VecDeque<String>>>,
}

/// CPU time and memory of a process, read from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    pub peak_rss_bytes: u64,
}

impl Process {
    /// Starts `binary` with `env` (and none of the caller's `HERALD_*` variables); returns the
    /// process and its standard output.
    fn spawn(
        name: &str,
        binary: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<(Self, Option<ChildStdout>)> {
        let mut command = Command::new(binary);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") {
                command.env_remove(key);
            }
        }
        command
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(keep_tail(stderr, log.clone()));
        }
        let stdout = child.stdout.take();
        let process = Self {
            name: name.to_owned(),
            child,
            pid,
            log,
        };
        Ok((process, stdout))
    }

    /// Returns the CPU time used so far and the peak resident set size.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        proc_usage(&self.pid.to_string()).with_context(|| format!("{}: /proc", self.name))
    }

    /// Returns the last lines the process wrote to standard error.
    pub fn tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Asks the process to stop (SIGTERM).
    fn terminate(&self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
    }

    /// Sends `signal` to the process (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops the process: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    pub async fn stop(mut self) {
        self.terminate();
        self.reap().await;
    }

    /// Waits for the exit after [`Self::terminate`], killing the process after [`STOP_TIMEOUT`].
    async fn reap(&mut self) {
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("herald-bench: {} ignored SIGTERM; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Returns the CPU time and peak RSS of `/proc/<pid>` (`self` for this process).
pub fn proc_usage(pid: &str) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    // Then field 3 (state) is index 0, so utime (14) and stime (15) are indexes 11 and 12.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("unexpected /proc/PID/stat")
    };
    let ticks = ticks(11)? + ticks(12)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(Usage {
        cpu: Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second()),
        peak_rss_bytes: peak_kib * 1024,
    })
}

/// Returns `sysconf(_SC_CLK_TCK)`, the unit of `/proc/PID/stat` times (100 on Linux).
fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// Keeps the last [`LOG_LINES`] lines of a child's output, reading until it closes (so the pipe
/// never fills up).
async fn keep_tail(stream: impl AsyncRead + Unpin, log: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line);
    }
}

/// How to start a deployment.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where `herald-control-plane` and `herald-agent` are.
    pub bin_dir: PathBuf,
    /// 0: the control plane's built-in agent; N: N `herald-agent` processes.
    pub agents: usize,
    /// Control planes on the one database (more than one only on PostgreSQL).
    pub replicas: usize,
    /// `HERALD_RETRY_SCHEDULE`, when set.
    pub retry_schedule: Option<String>,
    /// More control plane settings, applied last (so they win).
    pub control_plane_env: Vec<(&'static str, String)>,
}

/// The control plane(s) and agents of one run.
pub struct Deployment {
    pub control_planes: Vec<Process>,
    pub agents: Vec<Process>,
    /// The gRPC address of each control plane.
    pub addrs: Vec<SocketAddr>,
    pub admin_token: String,
    /// How to start agent `n` again: its binary and environment.
    agent_binary: PathBuf,
    agent_envs: Vec<Vec<(&'static str, String)>>,
    /// How to start more agents.
    launcher: AgentLauncher,
}

/// Starts `herald-agent` processes for a deployment, owned by the caller (a workload that
/// starts, stops or kills agents itself).
#[derive(Debug, Clone)]
pub struct AgentLauncher {
    binary: PathBuf,
    token: String,
    /// Every control plane's URL, comma-separated.
    control_planes: String,
}

impl AgentLauncher {
    /// Starts agent `id` of `region` with `capacity`.
    pub fn spawn(&self, id: &str, region: &str, capacity: u32) -> anyhow::Result<Process> {
        let env = vec![
            ("HERALD_CONTROL_PLANE", self.control_planes.clone()),
            ("HERALD_AGENT_TOKEN", self.token.clone()),
            ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
            ("HERALD_AGENT_ID", id.to_owned()),
            ("HERALD_REGION", region.to_owned()),
            ("HERALD_CAPACITY", capacity.to_string()),
        ];
        let (agent, _) = Process::spawn(&format!("agent {id}"), &self.binary, &env)?;
        Ok(agent)
    }

    /// The agent credential (for an agent stand-in).
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl Deployment {
    /// Starts the planned control planes on `database` (one after the other, so that the first
    /// migrates the fresh database alone), then the planned agents, each knowing every control
    /// plane (an agent starts at a random one of its list).
    pub async fn start(plan: &Plan, database: &Database) -> anyhow::Result<Self> {
        if plan.replicas > 1 && matches!(database, Database::Sqlite { .. }) {
            bail!("--replicas: SQLite allows one control plane per file; use --backend postgres");
        }
        let admin_token = format!("hrld_bench_admin_{:016x}", rand_suffix());
        let agent_token = format!("hrla_bench_agent_{:016x}", rand_suffix());
        let mut env = vec![
            ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
            ("HERALD_DATABASE_URL", database.url().to_owned()),
            ("HERALD_ADMIN_TOKEN", admin_token.clone()),
            ("HERALD_AGENT_TOKEN", agent_token.clone()),
            ("HERALD_BUILTIN_AGENT", (plan.agents == 0).to_string()),
            ("HERALD_CONSOLE_LISTEN", String::new()),
            ("HERALD_SHUTDOWN_GRACE", "5s".to_owned()),
        ];
        if let Some(schedule) = &plan.retry_schedule {
            env.push(("HERALD_RETRY_SCHEDULE", schedule.clone()));
        }
        env.extend(plan.control_plane_env.iter().cloned());
        let control_plane_binary = binary(&plan.bin_dir, "herald-control-plane")?;
        let agent_binary = binary(&plan.bin_dir, "herald-agent")?;
        let mut deployment = Self {
            control_planes: Vec::new(),
            agents: Vec::new(),
            addrs: Vec::new(),
            admin_token,
            agent_binary: agent_binary.clone(),
            agent_envs: Vec::new(),
            launcher: AgentLauncher {
                binary: agent_binary.clone(),
                token: agent_token.clone(),
                control_planes: String::new(),
            },
        };
        for n in 1..=plan.replicas.max(1) {
            let name = if plan.replicas > 1 {
                format!("control plane {n}")
            } else {
                "control plane".to_owned()
            };
            let (mut control_plane, stdout) = Process::spawn(&name, &control_plane_binary, &env)?;
            let addr = match stdout {
                Some(stdout) => listening_addr(&mut control_plane, stdout).await?,
                None => bail!("{name}: no standard output"),
            };
            deployment.control_planes.push(control_plane);
            deployment.addrs.push(addr);
        }
        let control_planes = deployment
            .addrs
            .iter()
            .map(|addr| format!("http://{addr}"))
            .collect::<Vec<_>>()
            .join(",");
        deployment.launcher.control_planes = control_planes.clone();
        for n in 1..=plan.agents {
            let env = vec![
                ("HERALD_CONTROL_PLANE", control_planes.clone()),
                ("HERALD_AGENT_TOKEN", agent_token.clone()),
                ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
                ("HERALD_AGENT_ID", format!("bench-{n}")),
            ];
            let (agent, _) = Process::spawn(&format!("agent bench-{n}"), &agent_binary, &env)?;
            deployment.agents.push(agent);
            deployment.agent_envs.push(env);
        }
        Ok(deployment)
    }

    /// Kills agent `index` (0-based) and starts it again: it connects to a control plane picked
    /// at random again.
    pub async fn restart_agent(&mut self, index: usize) -> anyhow::Result<()> {
        let agent = &mut self.agents[index];
        let _ = agent.child.kill().await;
        let (agent, _) = Process::spawn(
            &agent.name.clone(),
            &self.agent_binary,
            &self.agent_envs[index],
        )?;
        self.agents[index] = agent;
        Ok(())
    }

    /// Returns a launcher of more agents, owned by the caller.
    pub fn launcher(&self) -> AgentLauncher {
        self.launcher.clone()
    }

    /// Returns the address of control plane `n` (publishers spread over them).
    pub fn url(&self, n: usize) -> String {
        format!("http://{}", self.addrs[n % self.addrs.len()])
    }

    /// Fails with the process's last log lines when a control plane or agent has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for process in self.control_planes.iter_mut().chain(self.agents.iter_mut()) {
            if process.exited() {
                bail!("{} exited:\n{}", process.name, process.tail());
            }
        }
        Ok(())
    }

    /// Stops every process: SIGTERM to all, then wait (agents first, as they drain to the
    /// control plane).
    pub async fn stop(mut self) {
        for process in self.agents.iter().chain(&self.control_planes) {
            process.terminate();
        }
        for process in self.agents.iter_mut().chain(self.control_planes.iter_mut()) {
            process.reap().await;
        }
    }
}

fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it alongside herald-bench, e.g. \
             `cargo build --release -p herald-bench -p herald-control-plane -p herald-agent`",
            path.display()
        );
    }
    Ok(path)
}

/// Reads the control plane's standard output until `herald control plane listening on
/// http://ADDR`, then keeps draining it.
async fn listening_addr(process: &mut Process, stdout: ChildStdout) -> anyhow::Result<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None) | Err(_)) => {
                // Give the stderr reader a moment to collect the reason.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!("control plane exited before listening:\n{}", process.tail());
            }
            Err(_) => bail!(
                "control plane did not print its address within {START_TIMEOUT:?}:\n{}",
                process.tail()
            ),
        };
        let addr = line
            .strip_prefix("herald control plane listening on http://")
            .and_then(|rest| rest.trim().parse::<SocketAddr>().ok());
        if let Some(addr) = addr {
            let log = process.log.clone();
            tokio::spawn(keep_tail(lines.into_inner(), log));
            return Ok(addr);
        }
    }
}
