//! Herald's control plane: owns tenants, tokens, subscriptions, events, deliveries and attempts;
//! validates input; fans events out; leases delivery jobs to agents; records every result.
//!
//! [`start`] runs it on a bound listener; `main.rs` only parses flags and prints.

pub mod config;
pub mod console;
pub mod dispatch;
pub mod domain;
pub mod grpc;
pub mod metrics;
pub mod service;
pub mod storage;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dispatch::scheduler::{Scheduler, Settings};
use crate::domain::validate::Limits;
use crate::service::Services;
use crate::storage::{Store, StoreOptions};

/// A running control plane.
pub struct Running {
    /// The address the gRPC API listens on.
    pub addr: SocketAddr,
    /// The admin token generated at this start (first start without `HERALD_ADMIN_TOKEN`).
    pub generated_admin_token: Option<String>,
    /// The shared agent token, when it was generated at this start (first start without
    /// `HERALD_AGENT_TOKEN`; stored hashed, shown once).
    pub generated_agent_token: Option<String>,
    /// Where the web console is served, when `HERALD_CONSOLE_LISTEN` is set.
    pub console_addr: Option<SocketAddr>,
    /// Where `/metrics` is served, when `HERALD_METRICS_LISTEN` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub services: Services,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the control plane has stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("control plane task panicked")?
    }
}

/// Points where tests can step into a running control plane.
#[derive(Clone, Default)]
pub struct Hooks {
    /// See [`dispatch::HandoffHook`].
    pub handoff: Option<dispatch::HandoffHook>,
    /// `PRAGMA max_page_count` for every SQLite write, changeable while running: a disk that
    /// fills up and is freed again.
    pub sqlite_page_limit: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Runs in every publish transaction just before its `COMMIT` (a fault injected there).
    pub before_publish_commit: Option<service::publish::CommitHook>,
}

/// Runs a control plane until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let running = start(config, listener).await?;
    shutdown.cancelled().await;
    running.shutdown();
    running.wait().await
}

/// Opens the store, starts the scheduler, the gRPC server and the built-in agent.
pub async fn start(config: Config, listener: TcpListener) -> anyhow::Result<Running> {
    start_with(config, listener, Hooks::default()).await
}

/// [`start`] with test hooks.
pub async fn start_with(
    config: Config,
    listener: TcpListener,
    hooks: Hooks,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("listener has no address")?;
    let sqlite = config.database_url.starts_with("sqlite:");
    let store = Store::open(StoreOptions {
        url: config.database_url.clone(),
        max_connections: if sqlite { 4 } else { 16 },
        master_key: config.master_key,
        previous_master_key: config.master_key_previous,
        sqlite_page_limit: hooks.sqlite_page_limit.clone(),
    })
    .await?;
    // With a key, nothing stays in clear: values written before it was set are sealed now.
    let sealed = storage::secrets::reseal(&store, storage::secrets::Reseal::Clear, 500).await?;
    if sealed > 0 {
        tracing::info!(
            sealed,
            "sealed secrets stored in clear under HERALD_MASTER_KEY"
        );
    }
    if !store.sealer.has_key() {
        tracing::warn!(
            "HERALD_MASTER_KEY is not set: receiver API keys and signing secrets are stored in clear"
        );
    }
    let replica_id = format!("cp-{}", ulid::Ulid::new().to_string().to_ascii_lowercase());
    // Several replicas share a PostgreSQL database: watchers hear of every replica's attempts.
    // Listening before serving, so nothing committed after the start is missed.
    let attempt_listener = if store.shared() {
        Some(
            dispatch::watch::listen(&config.database_url)
                .await
                .context("HERALD_DATABASE_URL: cannot listen for recorded attempts")?,
        )
    } else {
        None
    };
    if sqlite {
        // One replica per SQLite file: leases of a previous process died with it.
        let released = storage::deliveries::release_all(&store.writer, chrono::Utc::now()).await?;
        if released > 0 {
            tracing::info!(
                released,
                "re-queued deliveries in flight at the previous stop"
            );
        }
    }
    let shutdown = CancellationToken::new();
    // Ends watch streams after the drain, so watchers see the last results first.
    let watchers_stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (commands, command_rx) = tokio::sync::mpsc::channel(dispatch::COMMAND_QUEUE);
    let dispatcher = dispatch::Handle::new(commands, hooks.handoff);
    let (records, _) = tokio::sync::broadcast::channel(4096);
    let registry = dispatch::registry::Registry::new(&replica_id);
    let prometheus = metrics::Registry::default();
    let metrics = metrics::Metrics::register(&prometheus);
    let storage_errors = store.error_counts();
    prometheus.register(|r| {
        r.register(
            "storage_errors",
            "Failed database statements and commits, by kind (full, unavailable, conflict, internal)",
            storage_errors,
        )
    });
    let changes = dispatch::changes::Announcer::new(store.clone(), replica_id.clone());
    let scheduler = Scheduler::new(
        store.clone(),
        Settings {
            replica_id: replica_id.clone(),
            retry_schedule: config.retry_schedule.clone(),
            lease_grace: config.lease_grace,
            disable_after: config.disable_after,
            region_fallback: config.region_fallback,
            silence_limit: 3 * grpc::agent::HEARTBEAT_INTERVAL,
        },
        command_rx,
        registry.clone(),
        records.clone(),
        metrics.clone(),
        changes.clone(),
    );
    let scheduler_stop = CancellationToken::new();
    // Awaited on its own at shutdown: it records the last results before the store closes.
    let scheduler_task = tokio::spawn(scheduler.run(scheduler_stop.clone()));
    if attempt_listener.is_some() {
        tasks.spawn(dispatch::presence::run(
            store.clone(),
            registry.clone(),
            scheduler_stop.clone(),
        ));
    }
    let publisher = service::publish::Publisher::start(
        store.clone(),
        dispatcher.clone(),
        metrics.clone(),
        hooks.before_publish_commit.clone(),
        &mut tasks,
    );
    let auth = service::auth::Auth::new(store.clone(), config.admin_token.as_deref());
    let auth_failures = auth.failures();
    prometheus.register(|r| {
        r.register(
            "auth_failures",
            "Failed authentications, by reason (unknown, known_bad, throttled)",
            auth_failures,
        )
    });
    let generated_admin_token = auth.bootstrap_admin().await?;
    // Remote agents keep one token across restarts: HERALD_AGENT_TOKEN, or one generated at the
    // first start and stored hashed. The built-in agent never needs either.
    let generated_agent_token = match &config.agent_token {
        Some(_) => None,
        None => service::agents::bootstrap_shared_token(&store).await?,
    };
    let services = Services {
        store: store.clone(),
        limits: Arc::new(Limits {
            max_payload_bytes: config.max_payload_bytes,
            https_only: config.https_only,
        }),
        auth,
        publisher,
        agents: registry,
        dispatcher: dispatcher.clone(),
        records,
        stopping: watchers_stop.clone(),
        console: console::Sessions::new(store.clone(), changes.clone(), config.tls_cert.is_some()),
        known_tenants: Default::default(),
        changes,
    };
    if let Some(listener) = attempt_listener {
        // Other replicas' changes, applied here as if made here.
        let apply: dispatch::watch::ChangeSink = {
            let (dispatcher, auth, console) = (
                dispatcher.clone(),
                services.auth.clone(),
                services.console.clone(),
            );
            Arc::new(move |change| {
                let (dispatcher, auth, console) =
                    (dispatcher.clone(), auth.clone(), console.clone());
                Box::pin(async move {
                    use dispatch::changes::Change;
                    match change {
                        Change::Subscription(id) => dispatcher.subscription_changed(&id).await,
                        Change::AgentCredentialRevoked(id) => {
                            dispatcher
                                .send(dispatch::Command::RevokeCredential(id))
                                .await;
                        }
                        Change::TokenRevoked(_) => {
                            auth.forget_all();
                            console.session_ended();
                        }
                        Change::ConsoleSessionEnded => console.session_ended(),
                    }
                })
            })
        };
        tasks.spawn(dispatch::watch::relay(
            listener,
            store.clone(),
            replica_id.clone(),
            services.records.clone(),
            apply,
            scheduler_stop.clone(),
        ));
    }

    let api = grpc::Api::new(
        services.clone(),
        (config.max_payload_bytes * 500 + (1 << 20)).min(256 << 20),
    );
    let agent_api = grpc::AgentApi::new(
        config.agent_token.as_deref(),
        services.clone(),
        config.tls_client_ca.is_some(),
        replica_id.clone(),
    );
    let builtin_link = agent_api.in_process();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<herald_proto::v1::event_service_server::EventServiceServer<grpc::EventApi>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection v1alpha")?;

    let server_stop = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        // Outermost: a call refused while stopping counts as the `UNAVAILABLE` its caller saw.
        .layer(grpc::CountErrors::new(
            &metrics,
            &[
                herald_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ],
        ))
        .layer(grpc::RefuseWhenStopping(shutdown.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api.admin)
        .add_service(api.subscriptions)
        .add_service(api.events)
        .add_service(api.deliveries)
        .add_service(herald_proto::v1::agent_service_server::AgentServiceServer::new(agent_api));
    let server_stopped = server_stop.clone();
    let server = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let resolver = tls::Reloading::new(cert.clone(), key.clone())?;
            let acceptor = tls::acceptor(resolver.clone(), config.tls_client_ca.as_deref())?;
            tasks.spawn(resolver.watch(scheduler_stop.clone()));
            let incoming = tls::incoming(listener, acceptor, server_stop.clone());
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, server_stopped.cancelled_owned())
                    .await
            })
        }
        _ => {
            // Small request/response frames: Nagle's algorithm would hold them back.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(async move {
                router
                    .serve_with_incoming_shutdown(incoming, server_stopped.cancelled_owned())
                    .await
            })
        }
    };

    tasks.spawn(follow_write_health(
        store.clone(),
        health_reporter,
        shutdown.clone(),
        scheduler_stop.clone(),
    ));
    tasks.spawn(metrics::refresh_from_storage(
        store.clone(),
        metrics.clone(),
        scheduler_stop.clone(),
    ));
    tasks.spawn(retention_loop(
        store.clone(),
        config.retention,
        scheduler_stop.clone(),
    ));

    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let listener = herald_agent::telemetry::bind_metrics(addr)
                .await
                .with_context(|| format!("HERALD_METRICS_LISTEN: cannot listen on {addr}"))?;
            let addr = listener.local_addr().ok();
            tasks.spawn(prometheus.clone().serve(listener, scheduler_stop.clone()));
            addr
        }
        None => None,
    };

    let console_addr = match config.console_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("HERALD_CONSOLE_LISTEN: cannot listen on {addr}"))?;
            let addr = listener.local_addr().ok();
            let tls = config
                .tls_cert
                .clone()
                .zip(config.tls_key.clone())
                .map(|(cert, key)| console::TlsFiles { cert, key });
            tasks.spawn(console::serve(
                services.clone(),
                listener,
                tls,
                scheduler_stop.clone(),
            ));
            addr
        }
        None => None,
    };

    let agent_stop = CancellationToken::new();
    let tls_on = config.tls_cert.is_some();
    if config.builtin_agent && tls_on {
        tracing::warn!(
            "the built-in agent is off while the API serves TLS; run herald-agent processes with HERALD_TLS_CA"
        );
    }
    let builtin_agent = if config.builtin_agent && !tls_on {
        let agent_config = herald_agent::Config {
            // Jobs and results as values on channels: no loopback gRPC, no credential.
            in_process: Some(builtin_link),
            control_planes: Vec::new(),
            agent_id: "builtin".into(),
            region: "local".into(),
            capacity: 256,
            allow_destinations: vec![
                "127.0.0.0/8".parse().context("loopback range")?,
                "::1/128".parse().context("loopback range")?,
            ],
            // The built-in agent reports through the control plane's registry.
            metrics: Some(herald_agent::telemetry::AgentMetrics::register(&prometheus)),
            ..herald_agent::Config::default()
        };
        let stop = agent_stop.clone();
        Some(tokio::spawn(async move {
            herald_agent::run(agent_config, stop).await
        }))
    } else {
        None
    };

    let stop = shutdown.clone();
    let grace = config.shutdown_grace;
    let done = tokio::spawn(async move {
        stop.cancelled().await;
        tracing::info!("shutting down: draining agents");
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let deadline = tokio::time::Instant::now() + grace;
        if dispatcher
            .send(dispatch::Command::Drain {
                deadline,
                done: done_tx,
            })
            .await
        {
            let _ = tokio::time::timeout(grace + std::time::Duration::from_secs(1), done_rx).await;
        }
        agent_stop.cancel();
        if let Some(agent) = builtin_agent {
            let _ = tokio::time::timeout(grace, agent).await;
        }
        watchers_stop.cancel();
        server_stop.cancel();
        let served = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
        scheduler_stop.cancel();
        // The scheduler records what it received (and waits for its last write) before
        // anything else stops.
        if tokio::time::timeout(grace, scheduler_task).await.is_err() {
            tracing::warn!("the scheduler did not stop within HERALD_SHUTDOWN_GRACE");
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        if store.shared() {
            // Its agents have moved on: other replicas stop listing them at once.
            let _ = storage::agents::delete_replica(&store.writer, &replica_id).await;
        }
        store.close().await;
        match served {
            Ok(Ok(Ok(()))) | Err(_) => Ok(()),
            Ok(Ok(Err(err))) => Err(err).context("gRPC server"),
            Ok(Err(err)) => Err(err).context("gRPC server task"),
        }
    });

    Ok(Running {
        addr,
        generated_admin_token,
        generated_agent_token,
        metrics_addr,
        console_addr,
        services,
        shutdown,
        done,
    })
}

/// How often a control plane whose writes fail tries one, so that it notices the storage is back
/// even when nothing else writes (a load balancer sends no traffic to a `NOT_SERVING` replica).
const WRITE_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `NOT_SERVING` while writes fail (a full disk, an unreachable database) and `SERVING`
/// again once they succeed, probing the storage meanwhile; `NOT_SERVING` for good once the
/// control plane is `stopping`.
async fn follow_write_health(
    store: Store,
    reporter: tonic_health::server::HealthReporter,
    stopping: CancellationToken,
    stop: CancellationToken,
) {
    use tonic_health::ServingStatus;
    let mut health = store.write_health();
    loop {
        let status = if health.ok() && !stopping.is_cancelled() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        reporter.set_service_status("", status).await;
        reporter
            .set_service_status(
                <herald_proto::v1::event_service_server::EventServiceServer<grpc::EventApi> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = stopping.cancelled(), if !stopping.is_cancelled() => {}
            changed = health.changed() => if changed.is_none() { return },
            _ = tokio::time::sleep(WRITE_PROBE_INTERVAL), if !health.ok() => {
                if let Err(err) = store.probe_writes().await {
                    tracing::debug!(error = %err, "storage write probe failed");
                }
            }
        }
    }
}

/// Events (and their deliveries and attempts) per purge transaction.
const RETENTION_BATCH: u64 = 500;

/// Purges what is older than `retention` at start and then every minute.
async fn retention_loop(store: Store, retention: std::time::Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        match storage::retention::purge(&store, cutoff, RETENTION_BATCH).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "purged events past retention"),
            Err(err) => {
                tracing::warn!(error = %err, "retention purge failed; retrying in a minute")
            }
        }
    }
}
