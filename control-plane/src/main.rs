//! `herald-control-plane`: flags -> configuration -> tracing -> [`herald_control_plane::start`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_control_plane::config::{Config, ConfigError, LogFormat};
use serde::Serialize;

/// Herald's control plane: the gRPC API, the delivery scheduler and (by default) a built-in agent.
#[derive(Debug, Parser)]
#[command(name = "herald-control-plane", version, about)]
struct Args {
    /// TOML configuration file (HERALD_CONFIG)
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Address of the gRPC API (HERALD_LISTEN, default 127.0.0.1:50051)
    #[arg(long)]
    listen: Option<String>,
    /// sqlite://FILE or postgres://… (HERALD_DATABASE_URL, default sqlite://herald.db)
    #[arg(long)]
    database_url: Option<String>,
    /// Run the in-process agent, region `local` (HERALD_BUILTIN_AGENT, default true)
    #[arg(long)]
    builtin_agent: Option<bool>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Revoke the generated admin token and print a new one
    ResetAdminToken,
    /// Revoke the generated shared agent token and print a new one; agents still using the old
    /// one are disconnected by every running replica (PostgreSQL) and refused from then on
    ResetAgentToken,
    /// Seal every stored secret under HERALD_MASTER_KEY, opening what
    /// HERALD_MASTER_KEY_PREVIOUS sealed; run once every replica runs with both keys, then
    /// restart them without the previous one. Safe to run again after an interruption.
    RotateMasterKey,
    /// Ask the running control plane's gRPC health service (at HERALD_LISTEN, over TLS when
    /// HERALD_TLS_CERT is set) whether it serves: exit 0 when SERVING, 1 otherwise
    Health,
    /// Copy the SQLite database to FILE, safely while the control plane runs (on PostgreSQL use
    /// pg_dump). Restore: stop the control plane, put FILE in place of the database, start
    Backup {
        /// The new file to write (an existing file is never overwritten)
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

/// The flags that were passed, layered over the environment.
#[derive(Debug, Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    builtin_agent: Option<bool>,
}

/// Exit code for a configuration error (EX_USAGE / EX_CONFIG family).
const EXIT_CONFIG: u8 = 64;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The runtime's worker threads: `TOKIO_WORKER_THREADS` when set, else one fewer than the cores
/// (at least one). The database's work runs outside the runtime — SQLite on sqlx's connection
/// threads, PostgreSQL in its own processes — and a worker per core only adds wake-ups between
/// idle workers: on 2 cores one worker costs 12% less CPU per delivery at 200–3,000/s and
/// delivers as fast at saturation (docs/SCALING.md).
fn worker_threads() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(
        args.config.clone(),
        Overrides {
            listen: args.listen.clone(),
            database_url: args.database_url.clone(),
            builtin_agent: args.builtin_agent,
        },
    ) {
        Ok(config) => config,
        Err(ConfigError { key, problem }) => {
            eprintln!("herald-control-plane: {key}: {problem}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    // One-shot commands that print their own outcome: no runtime sized for serving, no logs.
    match &args.command {
        Some(Command::Health) => return health(&config),
        Some(Command::Backup { to }) => return backup(&config, to),
        _ => {}
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald-control-plane: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's channel needs the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        match herald_agent::telemetry::init(
            "herald-control-plane",
            config.log_format == LogFormat::Json,
            config.otlp,
        ) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                eprintln!("herald-control-plane: {err}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    };
    let subcommand = args.command.is_some();
    let result = runtime.block_on(async {
        match args.command {
            Some(Command::ResetAdminToken) => reset_admin_token(config).await,
            Some(Command::ResetAgentToken) => reset_agent_token(config).await,
            Some(Command::RotateMasterKey) => rotate_master_key(config).await,
            Some(Command::Health | Command::Backup { .. }) | None => serve(config).await,
        }
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let (message, code) = describe(&err, subcommand);
            eprintln!("herald-control-plane: {message}");
            ExitCode::from(code)
        }
    }
}

/// Returns the line a failed run prints and its exit code: 64 when the configuration is at
/// fault (a PostgreSQL database or role that does not exist), 1 otherwise.
fn describe(err: &anyhow::Error, subcommand: bool) -> (String, u8) {
    use herald_control_plane::storage::OpenError;
    match err.downcast_ref::<OpenError>() {
        // A maintenance command on an SQLite file that a running control plane holds.
        Some(OpenError::InUse { path }) if subcommand => (
            format!(
                "HERALD_DATABASE_URL: {} is in use by a running control plane: stop the control \
                 plane first, then run this command again",
                path.display()
            ),
            1,
        ),
        Some(open) if open.is_configuration() => (open.to_string(), EXIT_CONFIG),
        _ => (format!("{err:#}"), 1),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("HERALD_LISTEN: cannot listen on {}", config.listen))?;
    if !config.listen.ip().is_loopback() && config.tls_cert.is_none() {
        tracing::warn!(listen = %config.listen, "serving plaintext gRPC on a non-loopback address; set HERALD_TLS_CERT and HERALD_TLS_KEY");
    }
    let running = herald_control_plane::start(config, listener).await?;
    let addr = running.addr;
    println!("herald control plane listening on http://{addr}");
    if let Some(console) = running.console_addr {
        println!("web console on http://{console}/");
    }
    if let Some(metrics) = running.metrics_addr {
        println!("metrics on http://{metrics}/metrics");
    }
    if let Some(token) = &running.generated_admin_token {
        println!("admin token (shown once, stored hashed): {token}");
        println!("  export HERALD_ADDR=http://{addr} HERALD_TOKEN={token}");
    }
    if let Some(token) = &running.generated_agent_token {
        println!(
            "agent token for remote agents (HERALD_AGENT_TOKEN; shown once, stored hashed): {token}"
        );
        println!(
            "  herald-control-plane reset-agent-token replaces it; per-agent credentials: herald agents credentials create"
        );
    }
    println!("next: herald tenants create --name acme   (see README.md)");
    wait_for_signal().await;
    running.shutdown();
    running.wait().await
}

/// A runtime for a one-shot command.
fn small_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            eprintln!("herald-control-plane: cannot start the runtime: {err}");
            ExitCode::FAILURE
        })
}

/// `herald-control-plane health`: one check of the running control plane's health service.
fn health(config: &Config) -> ExitCode {
    use herald_agent::health;
    let runtime = match small_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let addr = health::loopback_of(config.listen);
    let checked = match &config.tls_cert {
        None => {
            let target = format!("http://{addr}");
            let checked = runtime.block_on(health::check(&target, health::plaintext_channel(addr)));
            (target, checked)
        }
        Some(cert) => {
            let tls = match herald_control_plane::tls::pinned_client_config(cert) {
                Ok(tls) => tls,
                Err(err) => {
                    eprintln!("herald-control-plane health: {err}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let target = format!("https://{addr}");
            let checked = runtime.block_on(health::check(&target, tls_channel(addr, tls)));
            (target, checked)
        }
    };
    match checked {
        (target, Ok(())) => {
            println!("{target}: SERVING");
            ExitCode::SUCCESS
        }
        (_, Err(err)) => {
            eprintln!("herald-control-plane health: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A gRPC channel to `addr` over TLS with `tls` (which trusts the listener's own certificate).
async fn tls_channel(
    addr: std::net::SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<tonic::transport::Channel, String> {
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The URL only names the authority: TLS is the connector's.
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|err| err.to_string())?
        .connect_timeout(herald_agent::health::CHECK_TIMEOUT)
        .connect_with_connector(connect)
        .await
        .map_err(|err| herald_agent::health::with_sources(&err))
}

/// `herald-control-plane backup --to FILE`.
fn backup(config: &Config, to: &std::path::Path) -> ExitCode {
    use herald_control_plane::storage::backup::{self, BackupError};
    let runtime = match small_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(backup::sqlite(&config.database_url, to)) {
        Ok(bytes) => {
            println!(
                "backed up {} to {} ({bytes} bytes)",
                config.database_url,
                to.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("herald-control-plane backup: {err}");
            match err {
                BackupError::NotSqlite | BackupError::Url(_) | BackupError::Exists(_) => {
                    ExitCode::from(EXIT_CONFIG)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn rotate_master_key(config: Config) -> anyhow::Result<()> {
    use herald_control_plane::storage::{self, secrets};
    anyhow::ensure!(
        config.master_key.is_some(),
        "HERALD_MASTER_KEY: set it to the new key (and HERALD_MASTER_KEY_PREVIOUS to the old one)"
    );
    let store = storage::Store::open(storage::StoreOptions {
        url: config.database_url.clone(),
        max_connections: 2,
        master_key: config.master_key,
        previous_master_key: config.master_key_previous,
        sqlite_page_limit: None,
    })
    .await?;
    let sealed = secrets::reseal(&store, secrets::Reseal::All, 500).await?;
    // From now on a start with the new key alone is accepted, and one with the old key refused.
    store.record_master_key().await?;
    store.close().await;
    println!("re-sealed {sealed} secrets under the new master key");
    Ok(())
}

async fn reset_agent_token(config: Config) -> anyhow::Result<()> {
    use herald_control_plane::dispatch::changes::{Announcer, Change};
    use herald_control_plane::service::agents;
    use herald_control_plane::storage;
    let store = storage::Store::open(storage::StoreOptions {
        url: config.database_url.clone(),
        max_connections: 1,
        master_key: config.master_key,
        previous_master_key: config.master_key_previous,
        sqlite_page_limit: None,
    })
    .await?;
    let (revoked, token) = agents::reset_shared_token(&store).await?;
    // Running replicas (PostgreSQL) end the streams of agents using the old token at once.
    let announcer = Announcer::new(store.clone(), "reset-agent-token".into());
    for id in revoked {
        announcer.announce(Change::AgentCredentialRevoked(id)).await;
    }
    store.close().await;
    if config.agent_token.is_some() {
        eprintln!(
            "herald-control-plane: HERALD_AGENT_TOKEN is set too: agents using it stay connected \
             until it is removed from every replica's settings"
        );
    }
    println!("{token}");
    Ok(())
}

async fn reset_admin_token(config: Config) -> anyhow::Result<()> {
    let store =
        herald_control_plane::storage::Store::open(herald_control_plane::storage::StoreOptions {
            url: config.database_url.clone(),
            max_connections: 1,
            master_key: config.master_key,
            previous_master_key: config.master_key_previous,
            sqlite_page_limit: None,
        })
        .await?;
    let auth = herald_control_plane::service::auth::Auth::new(store.clone(), None);
    let token = auth.reset_admin().await?;
    store.close().await;
    println!("{token}");
    Ok(())
}
