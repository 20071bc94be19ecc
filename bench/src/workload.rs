//! The named workloads and one run of each: set up a tenant and subscriptions, warm up, publish
//! (closed loop with N publishers, or open loop at a fixed rate), wait for the deliveries, read
//! the processes, stop them, and drive the same receiver directly for the loopback ceiling.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use herald_client::{HeraldClient, v1 as pb};
use tokio::task::JoinSet;

use crate::deploy::{Database, Deployment, Plan, Usage, proc_usage};
use crate::receiver::{OTHER_TARGET, Receiver, Record};
use crate::report::Run;

/// A named workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// 20,000 events, 1 subscription, 32 concurrent publishers
    #[value(name = "fanout-1")]
    #[serde(rename = "fanout-1")]
    Fanout1,
    /// 5,000 events, 10 subscriptions, 32 concurrent publishers
    #[value(name = "fanout-10")]
    #[serde(rename = "fanout-10")]
    Fanout10,
    /// 10,000 events, 1 subscription, 500 to 20% of first attempts, 100 ms retries
    Failures,
    /// 1,000 events/s for 20 s, open loop, 1 subscription
    Steady,
}

impl Workload {
    pub const ALL: [Self; 4] = [Self::Fanout1, Self::Fanout10, Self::Failures, Self::Steady];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fanout1 => "fanout-1",
            Self::Fanout10 => "fanout-10",
            Self::Failures => "failures",
            Self::Steady => "steady",
        }
    }
}

/// How events are published.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// `publishers` tasks, each publishing its next event as soon as the previous one returned.
    Closed { events: usize, publishers: usize },
    /// One publish started every `1/rate` s for `duration`, whether or not earlier ones returned.
    Open { rate: u32, duration: Duration },
}

impl Load {
    pub fn events(self) -> usize {
        match self {
            Self::Closed { events, .. } => events,
            Self::Open { rate, duration } => (f64::from(rate) * duration.as_secs_f64()) as usize,
        }
    }
}

/// A workload with its numbers settled.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub load: Load,
    pub subscriptions: usize,
    /// Whether the receiver answers 500 to a fifth of first attempts.
    pub failures: bool,
    /// Concurrent clients of the loopback ceiling.
    pub concurrency: usize,
}

/// Overrides from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Overrides {
    pub events: Option<usize>,
    pub rate: Option<u32>,
    pub duration: Option<Duration>,
    pub concurrency: usize,
}

impl Spec {
    pub fn new(workload: Workload, overrides: Overrides) -> Self {
        let closed = |events: usize| Load::Closed {
            events: overrides.events.unwrap_or(events),
            publishers: overrides.concurrency,
        };
        let (load, subscriptions) = match workload {
            Workload::Fanout1 => (closed(20_000), 1),
            Workload::Fanout10 => (closed(5_000), 10),
            Workload::Failures => (closed(10_000), 1),
            Workload::Steady => (
                Load::Open {
                    rate: overrides.rate.unwrap_or(1_000),
                    duration: overrides.duration.unwrap_or(Duration::from_secs(20)),
                },
                1,
            ),
        };
        Self {
            load,
            subscriptions,
            failures: workload == Workload::Failures,
            concurrency: overrides.concurrency,
        }
    }
}

/// Settings shared by every run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub plan: Plan,
    pub backend: crate::deploy::Backend,
    pub pg_admin_url: String,
    /// The longest wait for deliveries after the last publish returned.
    pub drain_timeout: Duration,
}

/// Events published before measuring, to open connections and warm caches.
const WARMUP_EVENTS: usize = 64;
/// The longest a publish phase may take before publishers stop.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(180);
/// The longest the loopback ceiling runs.
const CEILING_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest wait for agents to connect, and for the warm-up deliveries.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One published event.
struct Published {
    /// The event id (`webhook-id`), or why the publish failed.
    id: Result<String, String>,
    start: Instant,
    end: Instant,
}

/// Runs `spec` once on a fresh database, control plane and receiver.
pub async fn run(spec: &Spec, settings: &Settings) -> anyhow::Result<Run> {
    let expected_max = spec.load.events() * spec.subscriptions;
    let receiver = Receiver::start(expected_max + expected_max / 2 + 1024).await?;
    let database = Database::create(settings.backend, &settings.pg_admin_url).await?;
    let result = run_on(spec, settings, &receiver, &database).await;
    database.drop_database().await;
    result
}

async fn run_on(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
) -> anyhow::Result<Run> {
    let mut plan = settings.plan.clone();
    if spec.failures {
        plan.retry_schedule = Some("100ms".into());
    }
    let mut deployment = Deployment::start(&plan, database).await?;
    let measured = measure(spec, settings, receiver, database, &mut deployment).await;
    let measured = match measured {
        Ok(measured) => measured,
        Err(err) => {
            let logs = deployment
                .control_planes
                .iter()
                .chain(&deployment.agents)
                .map(|p| format!("--- {} (last lines) ---\n{}", p.name, p.tail()))
                .collect::<Vec<_>>()
                .join("\n");
            deployment.stop().await;
            return Err(err.context(logs));
        }
    };
    deployment.stop().await;
    // Every backend of the stopped control planes has published its counts by now.
    let after = After {
        commits: database.commits().await?,
        rows: database.rows_written().await?,
        wal: database.wal_position().await?,
        size: database.size().await?,
    };
    let records = receiver.take();

    let ceiling = ceiling(
        receiver,
        measured.expected.max(1_000),
        spec.concurrency,
        CEILING_TIMEOUT,
    )
    .await?;
    Ok(Run::compute(spec, &measured, &records, &after, ceiling))
}

/// What the measured phase produced, before the numbers are worked out.
pub struct Measured {
    /// Publish start per event id.
    pub starts: HashMap<String, Instant>,
    /// Publish call durations of successful publishes.
    pub calls: Vec<Duration>,
    pub published: usize,
    pub publish_errors: usize,
    pub first_error: Option<String>,
    pub first_start: Instant,
    pub last_end: Instant,
    /// Deliveries expected: successful publishes × subscriptions.
    pub expected: usize,
    /// CPU and peak RSS over the measured phase: control planes, agents, this process.
    pub control_planes: Vec<Usage>,
    pub agents: Vec<Usage>,
    pub bench: Usage,
    /// CPU of the PostgreSQL backends serving the control plane; `None` on SQLite.
    pub database_cpu: Option<Duration>,
    pub commits_before: Option<u64>,
    /// Rows written per table, and the WAL position, at the start of the measured phase
    /// (PostgreSQL).
    pub rows_before: Option<std::collections::BTreeMap<String, u64>>,
    pub wal_before: Option<u64>,
    /// The database's size at the start of the measured phase (PostgreSQL).
    pub size_before: Option<u64>,
}

/// What the database shows once the control planes have stopped (PostgreSQL).
pub struct After {
    pub commits: Option<u64>,
    pub rows: Option<std::collections::BTreeMap<String, u64>>,
    pub wal: Option<u64>,
    pub size: Option<u64>,
}

async fn measure(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
    deployment: &mut Deployment,
) -> anyhow::Result<Measured> {
    let admin = HeraldClient::connect(&deployment.url(0), &deployment.admin_token)
        .context("control plane address")?;
    // Built-in agents: one per control plane. ListAgents shows every replica's agents.
    let agents = match settings.plan.agents {
        0 => deployment.addrs.len(),
        n => n,
    };
    wait_for_agents(&admin, deployment, agents).await?;
    spread_agents(&admin, deployment, agents).await?;
    let token = tenant_token(&admin).await?;
    // One client per control plane: publishers spread over them.
    let clients = (0..deployment.addrs.len())
        .map(|n| HeraldClient::connect(&deployment.url(n), &token).context("tenant client"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = &clients[0];
    for n in 0..spec.subscriptions {
        client
            .subscriptions()
            .create_subscription(pb::CreateSubscriptionRequest {
                name: format!("bench {n}"),
                url: receiver.url(n),
                // The most allowed, so that the subscription's limit is not what is measured.
                max_concurrency: 1024,
                ..Default::default()
            })
            .await
            .context("create subscription")?;
    }

    // Warm up (connections, caches), then forget it.
    let warmup = publish_closed(&clients, WARMUP_EVENTS, spec.concurrency.min(WARMUP_EVENTS)).await;
    let warm_expected = warmup.iter().filter(|p| p.id.is_ok()).count() * spec.subscriptions;
    let deadline = Instant::now() + READY_TIMEOUT;
    while receiver.ok_count() < warm_expected as u64 {
        deployment.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "warm-up: {} of {warm_expected} deliveries arrived within {READY_TIMEOUT:?}",
                receiver.ok_count()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Late duplicates of the warm-up would count as unknown ids; give retries a moment to end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    receiver.take();
    receiver.fail_first(spec.failures);

    let usage = |deployment: &Deployment| -> anyhow::Result<_> {
        let cps = deployment
            .control_planes
            .iter()
            .map(|p| p.usage())
            .collect::<Result<Vec<_>, _>>()?;
        let agents = deployment
            .agents
            .iter()
            .map(|p| p.usage())
            .collect::<Result<Vec<_>, _>>()?;
        Ok((cps, agents, proc_usage("self")?))
    };
    if settings.backend == crate::deploy::Backend::Postgres {
        // Every backend publishes its row counts at most a second after its last transaction.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let commits_before = database.commits().await?;
    let rows_before = database.rows_written().await?;
    let wal_before = database.wal_position().await?;
    let size_before = database.size().await?;
    let database_before = database.backend_cpu().await?;
    let before = usage(deployment)?;

    let published = match spec.load {
        Load::Closed { events, publishers } => publish_closed(&clients, events, publishers).await,
        Load::Open { rate, duration } => publish_open(&clients, rate, duration).await,
    };
    let first_start = published
        .iter()
        .map(|p| p.start)
        .min()
        .context("nothing was published")?;
    let last_end = published
        .iter()
        .map(|p| p.end)
        .max()
        .context("nothing was published")?;
    let mut starts = HashMap::with_capacity(published.len());
    let mut calls = Vec::with_capacity(published.len());
    let mut publish_errors = 0;
    let mut first_error = None;
    for p in &published {
        match &p.id {
            Ok(id) => {
                starts.insert(id.clone(), p.start);
                calls.push(p.end - p.start);
            }
            Err(message) => {
                publish_errors += 1;
                first_error.get_or_insert_with(|| message.clone());
            }
        }
    }
    let expected = starts.len() * spec.subscriptions;

    // Wait for every delivery, at most `drain_timeout` after the last publish returned.
    let deadline = last_end + settings.drain_timeout;
    loop {
        if receiver.ok_count() >= expected as u64 && receiver.unique_ok() >= expected {
            break;
        }
        if Instant::now() > deadline {
            break;
        }
        deployment.check_alive()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = usage(deployment)?;
    let database_after = database.backend_cpu().await?;
    // Backends that connected during the phase count whole.
    let database_cpu = database_after.map(|after| {
        after
            .iter()
            .map(|(pid, cpu)| {
                let before = database_before.as_ref().and_then(|b| b.get(pid));
                cpu.saturating_sub(before.copied().unwrap_or_default())
            })
            .sum()
    });
    let diff = |a: &[Usage], b: &[Usage]| -> Vec<Usage> {
        a.iter()
            .zip(b)
            .map(|(before, after)| Usage {
                cpu: after.cpu.saturating_sub(before.cpu),
                peak_rss_bytes: after.peak_rss_bytes,
            })
            .collect()
    };
    Ok(Measured {
        published: published.len(),
        calls,
        starts,
        publish_errors,
        first_error,
        first_start,
        last_end,
        expected,
        control_planes: diff(&before.0, &after.0),
        agents: diff(&before.1, &after.1),
        bench: diff(&[before.2], &[after.2])[0],
        database_cpu,
        commits_before,
        rows_before,
        wal_before,
        size_before,
    })
}

/// Waits until `n` agents are connected to the control plane.
async fn wait_for_agents(
    admin: &HeraldClient,
    deployment: &mut Deployment,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let connected = admin
            .admin()
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .map(|r| r.into_inner().agents.len())
            .unwrap_or(0);
        if connected >= n {
            return Ok(());
        }
        deployment.check_alive()?;
        if Instant::now() > deadline {
            bail!("{connected} of {n} agents connected within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With several control planes, makes every run alike: an agent picks its first control plane
/// at random, so agents that crowd on one replica (while another has fewer than its share) are
/// restarted until each replica has `agents / replicas` of them or more.
async fn spread_agents(
    admin: &HeraldClient,
    deployment: &mut Deployment,
    agents: usize,
) -> anyhow::Result<()> {
    let replicas = deployment.addrs.len();
    if replicas < 2 || deployment.agents.is_empty() {
        return Ok(());
    }
    let share = agents / replicas;
    for _ in 0..50 {
        let listed = admin
            .admin()
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .context("list agents")?
            .into_inner()
            .agents;
        let mut by_replica: HashMap<String, Vec<String>> = HashMap::new();
        for agent in &listed {
            by_replica
                .entry(agent.replica_id.clone())
                .or_default()
                .push(agent.agent_id.clone());
        }
        let short = by_replica.len() < replicas.min(agents)
            || by_replica.values().any(|ids| ids.len() < share);
        if listed.len() == agents && !short {
            return Ok(());
        }
        if listed.len() == agents {
            let crowded = by_replica
                .values()
                .max_by_key(|ids| ids.len())
                .and_then(|ids| ids.first())
                .and_then(|id| id.strip_prefix("bench-"))
                .and_then(|n| n.parse::<usize>().ok())
                .context("an agent of this run")?;
            deployment.restart_agent(crowded - 1).await?;
            // Long enough for its replica to see the old stream gone.
            tokio::time::sleep(Duration::from_millis(300)).await;
            wait_for_agents(admin, deployment, agents).await?;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    bail!("agents did not spread over the {replicas} control planes")
}

/// Creates the tenant `bench` and returns a token for it.
async fn tenant_token(admin: &HeraldClient) -> anyhow::Result<String> {
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "bench".into(),
        })
        .await
        .context("create tenant")?
        .into_inner();
    let token = admin
        .admin()
        .create_token(pb::CreateTokenRequest {
            tenant_id: tenant.id,
            name: "bench".into(),
        })
        .await
        .context("create token")?
        .into_inner()
        .token;
    Ok(token)
}

/// Returns event `n`'s publish request: a payload of about 100 bytes.
fn event(n: usize) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "user.new".into(),
        payload: format!(
            r#"{{"entity_type":"user","entity_id":{n:>10},"action_type":"new","result":{{"id":{n:>10},"plan":"pro"}}}}"#
        ),
        entity_type: "user".into(),
        entity_id: n.to_string(),
        action: "new".into(),
        ..Default::default()
    }
}

async fn publish_one(client: &HeraldClient, n: usize, start: Instant) -> Published {
    let id = client
        .publish(event(n))
        .await
        .map(|r| r.event_id)
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()));
    Published {
        id,
        start,
        end: Instant::now(),
    }
}

/// Publishes `events` events with `publishers` concurrent tasks (all spawned before any is
/// awaited; publisher `i` calls control plane `i mod clients`), stopping early after
/// [`PUBLISH_TIMEOUT`].
async fn publish_closed(
    clients: &[HeraldClient],
    events: usize,
    publishers: usize,
) -> Vec<Published> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + PUBLISH_TIMEOUT;
    let mut tasks = JoinSet::new();
    for i in 0..publishers.max(1) {
        let client = clients[i % clients.len()].clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut done = Vec::with_capacity(events / publishers.max(1) + 1);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events || Instant::now() > deadline {
                    return done;
                }
                done.push(publish_one(&client, n, Instant::now()).await);
            }
        });
    }
    let mut published = Vec::with_capacity(events);
    while let Some(done) = tasks.join_next().await {
        published.extend(done.unwrap_or_default());
    }
    published
}

/// Starts one publish every `1/rate` s for `duration` without waiting for earlier ones (event
/// `n` on control plane `n mod clients`); a publish's start is its scheduled instant, so a stall
/// on the way counts against latency.
async fn publish_open(clients: &[HeraldClient], rate: u32, duration: Duration) -> Vec<Published> {
    let events = Load::Open { rate, duration }.events();
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let begin = Instant::now() + Duration::from_millis(5);
    let mut tasks = JoinSet::new();
    for n in 0..events {
        let at = begin + period.mul_f64(n as f64);
        tokio::time::sleep_until(at.into()).await;
        let client = clients[n % clients.len()].clone();
        tasks.spawn(async move { publish_one(&client, n, at).await });
    }
    let mut published = Vec::with_capacity(events);
    let deadline = tokio::time::Instant::now() + PUBLISH_TIMEOUT;
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        if let Ok(done) = done {
            published.push(done);
        }
    }
    published
}

/// The loopback ceiling: requests/s the same receiver takes from a plain HTTP client.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub requests: usize,
    pub elapsed: Duration,
}

/// Sends `requests` POSTs (a 100-byte JSON body and a `webhook-id`, as Herald's) to `receiver`
/// from `concurrency` tasks sharing one reqwest client, for at most `limit`.
async fn ceiling(
    receiver: &Receiver,
    requests: usize,
    concurrency: usize,
    limit: Duration,
) -> anyhow::Result<Ceiling> {
    receiver.fail_first(false);
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .context("ceiling: reqwest client")?;
    let url = format!("http://{}/c", receiver.addr);
    let body = bytes::Bytes::from(format!(r#"{{"padding":"{}"}}"#, "x".repeat(86)));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + limit;
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, body, next) = (client.clone(), url.clone(), body.clone(), next.clone());
        tasks.spawn(async move {
            let mut ok = 0usize;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests || Instant::now() > deadline {
                    return ok;
                }
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", format!("msg_ceiling_{n}"))
                    .body(body.clone())
                    .send()
                    .await;
                if let Ok(response) = sent
                    && response.status().is_success()
                    && response.bytes().await.is_ok()
                {
                    ok += 1;
                }
            }
        });
    }
    let mut ok = 0;
    while let Some(done) = tasks.join_next().await {
        ok += done.unwrap_or(0);
    }
    let elapsed = started.elapsed();
    let records = receiver.take();
    let received = records.iter().filter(|r| r.target == OTHER_TARGET).count();
    if ok == 0 || received < ok {
        bail!("loopback ceiling: {ok} requests answered, {received} recorded");
    }
    Ok(Ceiling {
        requests: ok,
        elapsed,
    })
}

/// Returns, per (target, id) answered 200, the first such arrival.
pub fn first_successes(records: &[Record]) -> HashMap<(u32, &str), Instant> {
    let mut first: HashMap<(u32, &str), Instant> = HashMap::with_capacity(records.len());
    for record in records.iter().filter(|r| r.ok) {
        first
            .entry((record.target, &record.id))
            .and_modify(|at| *at = (*at).min(record.at))
            .or_insert(record.at);
    }
    first
}
