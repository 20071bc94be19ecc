//! The `herald-agent` binary: flags, configuration, tracing, the crypto provider and signals
//! around `herald_agent::run`; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use herald_agent::config::{self, LogFormat, Overrides};
use herald_agent::{health, telemetry};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The exit code of a bad configuration (`EX_USAGE` in sysexits.h).
const EXIT_CONFIG: u8 = 64;

/// Herald's delivery agent: receives signed jobs from a control plane and POSTs them to receivers.
/// Every flag has a `HERALD_*` environment variable; flags win.
#[derive(Debug, Parser)]
#[command(name = "herald-agent", version, about)]
struct Args {
    /// TOML configuration file [env: HERALD_CONFIG]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Control plane URL(s), comma-separated [env: HERALD_CONTROL_PLANE; default: http://127.0.0.1:50051]
    #[arg(long, value_name = "URL")]
    control_plane: Option<String>,
    /// Region this agent serves [env: HERALD_REGION; default: default]
    #[arg(long)]
    region: Option<String>,
    /// Jobs run at once, 1-65536 [env: HERALD_CAPACITY; default: 256]
    #[arg(long, value_name = "N")]
    capacity: Option<String>,
    /// Agent id shown by `herald agents list` [env: HERALD_AGENT_ID; default: host name + suffix]
    #[arg(long, value_name = "ID")]
    agent_id: Option<String>,
    /// CIDRs the SSRF guard allows, comma-separated, e.g. 127.0.0.0/8 [env: HERALD_ALLOW_DESTINATIONS]
    #[arg(long, value_name = "CIDRS")]
    allow_destinations: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask the running agent's health service (HERALD_HEALTH_LISTEN) whether a control plane
    /// holds its stream: exit 0 when SERVING, 1 otherwise (for container health checks)
    Health,
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args = Args::parse();
    let command = args.command.take();
    let settings = match config::load_from_process(args.into_overrides()) {
        Ok(settings) => settings,
        Err(invalid) => {
            eprintln!("{invalid}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // One crypto provider for the process (ring); the library passes ring explicitly anyway, so
    // an earlier installation by someone else is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Command::Health) = command {
        return health(&settings);
    }
    match serve(settings) {
        Ok(code) => code,
        Err(err) => {
            error!(error = %format!("{err:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}

/// `herald-agent health`: one check of the running agent's health service.
fn health(settings: &config::Settings) -> ExitCode {
    let Some(addr) = settings.health_listen else {
        eprintln!(
            "herald-agent health: HERALD_HEALTH_LISTEN is not set, so the agent serves no health check"
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald-agent health: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let target = format!("http://{}", health::loopback_of(addr));
    match runtime.block_on(health::check(&target, health::plaintext_channel(addr))) {
        Ok(()) => {
            println!("{target}: SERVING");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("herald-agent health: {err}");
            ExitCode::FAILURE
        }
    }
}

impl Args {
    fn into_overrides(self) -> Overrides {
        Overrides {
            config: self.config,
            control_plane: self.control_plane,
            region: self.region,
            capacity: self.capacity,
            agent_id: self.agent_id,
            allow_destinations: self.allow_destinations,
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C, then drains; a second signal exits at once.
fn serve(settings: config::Settings) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The OTLP exporter's channel needs the runtime.
    let telemetry = {
        let _entered = runtime.enter();
        telemetry::init(
            "herald-agent",
            settings.log_format == LogFormat::Json,
            settings.otlp,
        )?
    };
    let mut config = settings.config;
    let metrics_listen = settings.metrics_listen;
    let health_listen = settings.health_listen;
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        if let Some(addr) = metrics_listen {
            let metrics = telemetry::Metrics::default();
            config.metrics = Some(telemetry::AgentMetrics::register(&metrics));
            let listener = telemetry::bind_metrics(addr)
                .await
                .with_context(|| format!("HERALD_METRICS_LISTEN: cannot listen on {addr}"))?;
            tokio::spawn(metrics.serve(listener, shutdown.clone()));
        }
        if let Some(addr) = health_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("HERALD_HEALTH_LISTEN: cannot listen on {addr}"))?;
            let (connected, watched) = tokio::sync::watch::channel(false);
            config.connected = Some(connected);
            tokio::spawn(health::serve(listener, watched, shutdown.clone()));
        }
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        info!(
            agent_id = %config.agent_id,
            region = %config.region,
            capacity = config.capacity,
            control_planes = ?config.control_planes,
            "starting"
        );
        let mut agent = tokio::spawn(herald_agent::run(config, shutdown.clone()));
        tokio::select! {
            finished = &mut agent => return finished_with(finished),
            _ = terminate.recv() => info!("SIGTERM; finishing in-flight jobs"),
            _ = tokio::signal::ctrl_c() => info!("interrupted; finishing in-flight jobs"),
        }
        shutdown.cancel();
        tokio::select! {
            finished = &mut agent => finished_with(finished),
            _ = terminate.recv() => {
                warn!("second signal; exiting without waiting for in-flight jobs");
                Ok(ExitCode::FAILURE)
            }
            _ = tokio::signal::ctrl_c() => {
                warn!("second signal; exiting without waiting for in-flight jobs");
                Ok(ExitCode::FAILURE)
            }
        }
    });
    telemetry.shutdown();
    code
}

fn finished_with(
    finished: Result<Result<(), herald_agent::Error>, tokio::task::JoinError>,
) -> anyhow::Result<ExitCode> {
    match finished.context("agent task failed")? {
        Ok(()) => {
            info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            error!(error = %err, "invalid configuration");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
    }
}
