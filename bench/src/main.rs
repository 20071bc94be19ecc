//! `herald-bench`: Herald's delivery benchmark. Per run of a named workload it starts a fresh
//! database (SQLite file or PostgreSQL database), one `herald-control-plane` child process (or
//! `--replicas N` on PostgreSQL) with its built-in agent or N `herald-agent` processes, and a
//! recording receiver on 127.0.0.1; publishes through `herald-client`; measures publish calls,
//! deliveries, end-to-end latency, CPU, memory, commits, rows and WAL written; then drives the
//! same receiver with a plain HTTP client for the loopback ceiling.
//!
//! ```sh
//! cargo build --release --workspace --bins && target/release/herald-bench --workload all --repeat 3
//! ```
//!
//! `workload.rs` owns the common runs (one tenant, closed or open loop); `scenarios.rs` the
//! paired runs of `slow-mix` and `tenants`; `backlog.rs` and `chaos.rs` their own workloads;
//! `standin.rs` the agent stand-in that `chaos` uses.

mod backlog;
mod chaos;
mod deploy;
mod receiver;
mod report;
mod scenarios;
mod standin;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};

use crate::deploy::{Backend, Plan};
use crate::report::{Report, SpecReport, Summary, WorkloadReport};
use crate::workload::{Overrides, Settings, Spec, Workload};

/// Herald's delivery benchmark: runs named workloads against a control plane and agents it
/// starts, and reports throughput, latency, CPU, memory and the loopback ceiling.
#[derive(Debug, Parser)]
#[command(name = "herald-bench", version, about)]
struct Args {
    /// Workload to run; `all` is every one but `backlog` (run it on its own: minutes)
    #[arg(long, value_enum, default_value = "all")]
    workload: WorkloadArg,
    /// Database of the control plane (a fresh one per run)
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// 0: the control plane's built-in agent; N: N `herald-agent` processes (built-in agent off)
    #[arg(long, default_value_t = 0, value_name = "N")]
    agents: usize,
    /// Control planes on the one database (PostgreSQL only): agents know all of them and
    /// publishers spread over them
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=16))]
    replicas: u32,
    /// Runs per workload; the report shows medians
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
    /// Events per run of fanout-1, fanout-10, failures and payload-64k (default 20,000 /
    /// 5,000 / 10,000 / 5,000); tenants: events per light tenant (40, x 5 subscriptions);
    /// backlog: deliveries (1,000,000)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    events: Option<u64>,
    /// steady: publishes per second (default 1,000); slow-mix: 500; chaos: 1,000; tenants:
    /// light tenants' publishes per second (600; the heavy tenant publishes as many again)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: Option<u32>,
    /// steady: one run per rate, e.g. `200,1000,3000` (instead of --rate)
    #[arg(long, value_name = "N,N,..", value_delimiter = ',', conflicts_with = "rate",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rates: Vec<u32>,
    /// Give every subscription a payload filter that every event passes (a string, an event
    /// field and a numeric range), to measure what evaluating filters in the fan-out costs
    #[arg(long)]
    payload_filter: bool,
    /// tenants: how many tenants (default 1,000; one of them is the heavy one)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..=100_000))]
    tenants: Option<u64>,
    /// steady: how long to publish (default 20s); slow-mix: 30s; chaos: 20s
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Concurrent publishers of the closed-loop workloads, and clients of the loopback ceiling
    #[arg(long, default_value_t = 32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Longest wait for the last deliveries after the last publish returned
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// PostgreSQL server on which a database per run is created and dropped
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Directory of `herald-control-plane` and `herald-agent` (default: this executable's)
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WorkloadArg {
    #[value(name = "fanout-1")]
    Fanout1,
    #[value(name = "fanout-10")]
    Fanout10,
    Failures,
    Steady,
    #[value(name = "payload-64k")]
    Payload64k,
    #[value(name = "slow-mix")]
    SlowMix,
    Tenants,
    Backlog,
    Chaos,
    /// Every workload but backlog
    All,
}

impl WorkloadArg {
    fn workloads(self) -> Vec<Workload> {
        match self {
            Self::Fanout1 => vec![Workload::Fanout1],
            Self::Fanout10 => vec![Workload::Fanout10],
            Self::Failures => vec![Workload::Failures],
            Self::Steady => vec![Workload::Steady],
            Self::Payload64k => vec![Workload::Payload64k],
            Self::SlowMix => vec![Workload::SlowMix],
            Self::Tenants => vec![Workload::Tenants],
            Self::Backlog => vec![Workload::Backlog],
            Self::Chaos => vec![Workload::Chaos],
            Self::All => Workload::ALL.to_vec(),
        }
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args)) {
        Ok(report) => {
            let lost: usize = report.workloads.iter().map(|w| w.median.lost).sum();
            if lost > 0 {
                eprintln!("herald-bench: {lost} deliveries lost");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("herald-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(args: Args) -> anyhow::Result<Report> {
    let started = Instant::now();
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .context("this executable has no directory")?
            .to_path_buf(),
    };
    let settings = Settings {
        plan: Plan {
            bin_dir,
            agents: args.agents,
            replicas: args.replicas as usize,
            retry_schedule: None,
            control_plane_env: Vec::new(),
        },
        backend: args.backend,
        pg_admin_url: args.pg_admin_url,
        drain_timeout: args.drain_timeout,
    };
    let overrides = Overrides {
        events: args.events.map(|n| n as usize),
        rate: args.rate,
        duration: args.duration,
        concurrency: args.concurrency as usize,
        tenants: args.tenants.map(|n| n as usize),
        payload_filter: args.payload_filter,
    };
    let repeat = args.repeat as usize;
    let mut workloads = Vec::new();
    // A `--rates` sweep is one steady workload per rate.
    let mut planned = Vec::new();
    for workload in args.workload.workloads() {
        if workload == Workload::Steady && !args.rates.is_empty() {
            for rate in &args.rates {
                let overrides = Overrides {
                    rate: Some(*rate),
                    ..overrides
                };
                planned.push((format!("steady@{rate}"), Spec::new(workload, overrides)));
            }
        } else {
            planned.push((workload.name().to_owned(), Spec::new(workload, overrides)));
        }
    }
    for (label, spec) in planned {
        let workload = spec.workload;
        let mut runs = Vec::with_capacity(repeat);
        for n in 1..=repeat {
            let t = Instant::now();
            let run = tokio::select! {
                run = workload::run(&spec, &settings) => run
                    .with_context(|| format!("{label} run {n}"))?,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
            };
            eprintln!(
                "herald-bench: {label} run {n}/{repeat}: {:.0} deliveries/s, e2e p99 {:.1} ms, lost {} ({:.1} s)",
                run.deliveries_per_s,
                run.e2e_p99_ms,
                run.lost,
                t.elapsed().as_secs_f64()
            );
            runs.push(run);
        }
        workloads.push(WorkloadReport {
            workload,
            label,
            spec: SpecReport::from(&spec),
            median: Summary::of(&runs),
            runs,
        });
    }
    let report = Report {
        backend: args.backend,
        agents: args.agents,
        replicas: args.replicas as usize,
        repeat,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        runtime_s: started.elapsed().as_secs_f64(),
        workloads,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("cannot render JSON")?
        );
    } else {
        print!("{}", report.table());
    }
    Ok(report)
}
