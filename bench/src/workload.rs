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
use crate::receiver::{Answer, OTHER_TARGET, Receiver, Record};
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
    /// 5,000 events of 64 KiB, 1 subscription, 32 concurrent publishers
    #[value(name = "payload-64k")]
    #[serde(rename = "payload-64k")]
    Payload64k,
    /// 500 events/s for 30 s over 100 subscriptions (one event type each), 10 answering after
    /// 5 s; then the same with none slow
    #[value(name = "slow-mix")]
    #[serde(rename = "slow-mix")]
    SlowMix,
    /// 1,000 tenants x 5 subscriptions, 40 events each; then the same with one tenant
    /// publishing as much again as all the others together
    Tenants,
    /// 1,000,000 deliveries published while no agent of their region is connected, then one
    /// agent connects; not part of `all`
    Backlog,
    /// fanout-1 over 4 agents: one stopped, one that never reports, one killed and restarted,
    /// and one tenant whose receiver hangs; then the same without faults
    Chaos,
}

impl Workload {
    /// What `--workload all` runs: every workload but `backlog` (minutes of its own).
    pub const ALL: [Self; 8] = [
        Self::Fanout1,
        Self::Fanout10,
        Self::Failures,
        Self::Steady,
        Self::Payload64k,
        Self::SlowMix,
        Self::Tenants,
        Self::Chaos,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fanout1 => "fanout-1",
            Self::Fanout10 => "fanout-10",
            Self::Failures => "failures",
            Self::Steady => "steady",
            Self::Payload64k => "payload-64k",
            Self::SlowMix => "slow-mix",
            Self::Tenants => "tenants",
            Self::Backlog => "backlog",
            Self::Chaos => "chaos",
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
    pub workload: Workload,
    pub load: Load,
    pub subscriptions: usize,
    /// Whether the receiver answers 500 to a fifth of first attempts.
    pub failures: bool,
    /// Concurrent clients of the loopback ceiling.
    pub concurrency: usize,
    /// Size of each event's payload.
    pub payload: Payload,
    /// Which subscriptions receive an event.
    pub routing: Routing,
    /// Subscriptions `0..n` whose receiver answers late.
    pub slow: Option<Slow>,
    /// Each subscription's `max_concurrency`; `None`: the control plane's default.
    pub max_concurrency: Option<u32>,
    /// Tenants (the `tenants` workload; 1 elsewhere).
    pub tenants: usize,
    /// Every subscription has [`PASSING_FILTER`].
    pub payload_filter: bool,
}

/// A payload filter every event of the bench passes: what a filter costs, not what it saves.
pub const PASSING_FILTER: &str =
    r#"{"result.plan": "pro", "$action": "new", "result.id": {"$gte": 0}}"#;

/// Size of each event's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// About 100 bytes of JSON.
    Small,
    /// JSON padded to exactly this many bytes.
    Padded(usize),
}

/// Which subscriptions receive an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Every subscription receives every event.
    FanOut,
    /// Subscription `n` receives only event type `bench.s<n>`; event `i` is of type
    /// `bench.s<i mod subscriptions>`, so each event is one delivery.
    OneEach,
}

/// Receivers that answer late.
#[derive(Debug, Clone, Copy)]
pub struct Slow {
    pub subscriptions: usize,
    pub delay: Duration,
}

/// Overrides from the command line.
#[derive(Debug, Clone, Copy)]
pub struct Overrides {
    pub events: Option<usize>,
    pub rate: Option<u32>,
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub tenants: Option<usize>,
    pub payload_filter: bool,
}

/// The `payload-64k` payload size.
pub const PAYLOAD_64K: usize = 64 * 1024;
/// Default light tenants' events of `tenants` (x 5 subscriptions = 200 deliveries each).
pub const TENANT_EVENTS: usize = 40;
/// Subscriptions per tenant of `tenants`.
pub const TENANT_SUBSCRIPTIONS: usize = 5;

impl Spec {
    pub fn new(workload: Workload, overrides: Overrides) -> Self {
        let closed = |events: usize| Load::Closed {
            events: overrides.events.unwrap_or(events),
            publishers: overrides.concurrency,
        };
        let open = |rate: u32, duration: Duration| Load::Open {
            rate: overrides.rate.unwrap_or(rate),
            duration: overrides.duration.unwrap_or(duration),
        };
        let mut spec = Self {
            workload,
            load: closed(20_000),
            subscriptions: 1,
            failures: workload == Workload::Failures,
            concurrency: overrides.concurrency,
            payload: Payload::Small,
            routing: Routing::FanOut,
            slow: None,
            // The most allowed, so that the subscription's limit is not what is measured.
            max_concurrency: Some(1024),
            tenants: 1,
            payload_filter: overrides.payload_filter,
        };
        match workload {
            Workload::Fanout1 => {}
            Workload::Chaos => {
                // The unaffected tenants' events, one subscription each; the hanging tenant's
                // are published before the measured phase.
                spec.load = open(1_000, Duration::from_secs(20));
                spec.subscriptions = 3;
                spec.tenants = 4;
            }
            Workload::Fanout10 => {
                spec.load = closed(5_000);
                spec.subscriptions = 10;
            }
            Workload::Failures => spec.load = closed(10_000),
            Workload::Steady => spec.load = open(1_000, Duration::from_secs(20)),
            Workload::Payload64k => {
                spec.load = closed(5_000);
                spec.payload = Payload::Padded(PAYLOAD_64K);
            }
            Workload::SlowMix => {
                spec.load = open(500, Duration::from_secs(30));
                spec.subscriptions = 100;
                spec.routing = Routing::OneEach;
                spec.slow = Some(Slow {
                    subscriptions: 10,
                    delay: Duration::from_secs(5),
                });
                spec.max_concurrency = None;
            }
            Workload::Tenants => {
                // The light tenants' events at `rate`/s; `--events`: events per light tenant.
                let tenants = overrides.tenants.unwrap_or(1_000).max(2);
                let light = (tenants - 1) * overrides.events.unwrap_or(TENANT_EVENTS);
                let rate = overrides.rate.unwrap_or(600).max(1);
                spec.load = Load::Open {
                    rate,
                    duration: Duration::from_secs_f64(light as f64 / f64::from(rate)),
                };
                spec.tenants = tenants;
                spec.subscriptions = tenants * TENANT_SUBSCRIPTIONS;
                spec.max_concurrency = None;
            }
            Workload::Backlog => {
                // `--events`: deliveries, over 10 subscriptions.
                spec.subscriptions = 10;
                spec.load = Load::Closed {
                    events: overrides.events.unwrap_or(1_000_000).div_ceil(10),
                    publishers: overrides.concurrency.min(8),
                };
            }
        }
        spec
    }

    /// Returns event `n`'s publish request.
    pub fn event(&self, n: usize) -> pb::PublishEventRequest {
        let mut request = event(n);
        if let Payload::Padded(size) = self.payload {
            request.payload = padded(&request.payload, size);
        }
        if self.routing == Routing::OneEach {
            request.event_type = event_type_of(n % self.subscriptions.max(1));
        }
        request
    }

    /// Returns the deliveries one published event makes.
    pub fn deliveries_per_event(&self) -> usize {
        match self.routing {
            Routing::FanOut => self.subscriptions,
            Routing::OneEach => 1,
        }
    }

    /// Returns subscription `n`'s event types (empty: every type).
    pub fn event_types(&self, n: usize) -> Vec<String> {
        match self.routing {
            Routing::FanOut => Vec::new(),
            Routing::OneEach => vec![event_type_of(n)],
        }
    }

    /// Returns each event's payload size in bytes.
    pub fn payload_bytes(&self) -> usize {
        match self.payload {
            Payload::Small => event(0).payload.len(),
            Payload::Padded(size) => size,
        }
    }
}

/// The event type only subscription `n` receives under [`Routing::OneEach`].
fn event_type_of(n: usize) -> String {
    format!("bench.s{n}")
}

/// Returns the JSON object `payload` with a `padding` member making it `size` bytes (or
/// `payload` unchanged when it is as large already).
fn padded(payload: &str, size: usize) -> String {
    let Some(body) = payload.strip_suffix('}') else {
        return payload.to_owned();
    };
    // `,"padding":""}` is 14 bytes.
    let room = size.saturating_sub(body.len() + 14);
    if room == 0 {
        return payload.to_owned();
    }
    let mut out = String::with_capacity(size);
    out.push_str(body);
    out.push_str(r#","padding":""#);
    out.extend(std::iter::repeat_n('x', room));
    out.push_str(r#""}"#);
    out
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

impl Settings {
    /// Runs `run` on a fresh database (SQLite file or PostgreSQL database), dropped afterwards
    /// whatever the outcome.
    pub async fn on_fresh_database<T>(
        &self,
        run: impl AsyncFnOnce(&Database) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let database = Database::create(self.backend, &self.pg_admin_url).await?;
        let result = run(&database).await;
        database.drop_database().await;
        result
    }
}

/// Events published before measuring, to open connections and warm caches.
pub const WARMUP_EVENTS: usize = 64;
/// The longest a publish phase may take before publishers stop.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(180);
/// The longest the loopback ceiling runs.
pub const CEILING_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest wait for agents to connect, and for the warm-up deliveries.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One published event.
pub struct Published {
    /// The event id (`webhook-id`), or why the publish failed.
    pub id: Result<String, String>,
    pub start: Instant,
    pub end: Instant,
}

/// Runs `spec`'s workload once: the common run, or the workload's own.
pub async fn run(spec: &Spec, settings: &Settings) -> anyhow::Result<Run> {
    match spec.workload {
        Workload::SlowMix => crate::scenarios::slow_mix(spec, settings).await,
        Workload::Tenants => crate::scenarios::tenants(spec, settings).await,
        Workload::Backlog => crate::backlog::run(spec, settings).await,
        Workload::Chaos => crate::chaos::run(spec, settings).await,
        Workload::Fanout1
        | Workload::Fanout10
        | Workload::Failures
        | Workload::Steady
        | Workload::Payload64k => Ok(run_once(spec, settings).await?.run),
    }
}

/// A common run's numbers, with the receiver's records and the publish starts they came from.
pub struct Finished {
    pub run: Run,
    pub records: Vec<Record>,
    pub starts: HashMap<String, Instant>,
}

/// Runs `spec` once on a fresh database, control plane and receiver: one tenant, its
/// subscriptions, a warm-up, then the measured load.
pub async fn run_once(spec: &Spec, settings: &Settings) -> anyhow::Result<Finished> {
    let expected_max = spec.load.events() * spec.deliveries_per_event();
    let receiver = Receiver::start(expected_max + expected_max / 2 + 1024).await?;
    settings
        .on_fresh_database(async |database| run_on(spec, settings, &receiver, database).await)
        .await
}

async fn run_on(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
) -> anyhow::Result<Finished> {
    let mut plan = settings.plan.clone();
    if spec.failures {
        plan.retry_schedule = Some("100ms".into());
    }
    let mut deployment = Deployment::start(&plan, database).await?;
    let measured = measure(spec, settings, receiver, database, &mut deployment).await;
    let measured = match measured {
        Ok(measured) => measured,
        Err(err) => return Err(fail(deployment, err).await),
    };
    deployment.stop().await;
    // Every backend of the stopped control planes has published its counts by now.
    let after = After::read(database).await?;
    let records = receiver.take();

    let ceiling = ceiling(
        receiver,
        measured.expected.max(1_000),
        spec.concurrency,
        CEILING_TIMEOUT,
    )
    .await?;
    let run = Run::compute(spec, &measured, &records, &after, ceiling);
    Ok(Finished {
        run,
        records,
        starts: measured.starts,
    })
}

/// Stops `deployment` after `err`, adding its processes' last log lines to the error.
pub async fn fail(deployment: Deployment, err: anyhow::Error) -> anyhow::Error {
    let logs = deployment
        .control_planes
        .iter()
        .chain(&deployment.agents)
        .map(|p| format!("--- {} (last lines) ---\n{}", p.name, p.tail()))
        .collect::<Vec<_>>()
        .join("\n");
    deployment.stop().await;
    err.context(logs)
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

impl After {
    pub async fn read(database: &Database) -> anyhow::Result<Self> {
        Ok(Self {
            commits: database.commits().await?,
            rows: database.rows_written().await?,
            wal: database.wal_position().await?,
            size: database.size().await?,
        })
    }
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
                event_types: spec.event_types(n),
                max_concurrency: spec.max_concurrency.unwrap_or(0),
                payload_filter: spec.payload_filter.then(|| PASSING_FILTER.to_owned()),
                ..Default::default()
            })
            .await
            .context("create subscription")?;
    }

    // Warm up (connections, caches), then forget it.
    let warmup = publish_closed(
        spec,
        &clients,
        WARMUP_EVENTS,
        spec.concurrency.min(WARMUP_EVENTS),
    )
    .await;
    let warm_expected =
        warmup.iter().filter(|p| p.id.is_ok()).count() * spec.deliveries_per_event();
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
    if let Some(slow) = spec.slow {
        for n in 0..slow.subscriptions {
            receiver.answer(n, Answer::After(slow.delay));
        }
    }
    let publish = async {
        match spec.load {
            Load::Closed { events, publishers } => {
                publish_closed(spec, &clients, events, publishers).await
            }
            Load::Open { rate, duration } => publish_open(spec, &clients, rate, duration).await,
        }
    };
    measure_phase(
        settings,
        receiver,
        database,
        deployment,
        spec.deliveries_per_event(),
        publish,
    )
    .await
}

/// Measures one phase: reads the processes and the database, runs `publish`, waits for the
/// deliveries its successful publishes make (`deliveries_per_event` each, at most
/// `drain_timeout` after the last publish returned), and reads them again.
pub async fn measure_phase(
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
    deployment: &mut Deployment,
    deliveries_per_event: usize,
    publish: impl std::future::Future<Output = Vec<Published>>,
) -> anyhow::Result<Measured> {
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

    let published = publish.await;
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
    let expected = starts.len() * deliveries_per_event;

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
pub async fn wait_for_agents(
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
pub async fn tenant_token(admin: &HeraldClient) -> anyhow::Result<String> {
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
pub fn event(n: usize) -> pb::PublishEventRequest {
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

pub async fn publish_one(
    client: &HeraldClient,
    request: pb::PublishEventRequest,
    start: Instant,
) -> Published {
    let id = client
        .publish(request)
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
pub async fn publish_closed(
    spec: &Spec,
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
        let spec = *spec;
        tasks.spawn(async move {
            let mut done = Vec::with_capacity(events / publishers.max(1) + 1);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= events || Instant::now() > deadline {
                    return done;
                }
                done.push(publish_one(&client, spec.event(n), Instant::now()).await);
            }
        });
    }
    let mut published = Vec::with_capacity(events);
    while let Some(done) = tasks.join_next().await {
        published.extend(done.unwrap_or_default());
    }
    published
}

/// Starts one publish of `spec`'s events every `1/rate` s for `duration` (see
/// [`publish_open_with`]).
pub async fn publish_open(
    spec: &Spec,
    clients: &[HeraldClient],
    rate: u32,
    duration: Duration,
) -> Vec<Published> {
    let events = Load::Open { rate, duration }.events();
    publish_open_with(clients, rate, events, |n| spec.event(n)).await
}

/// Starts one publish every `1/rate` s, `events` in all, without waiting for earlier ones
/// (event `n`, made by `request(n)`, on control plane `n mod clients`); a publish's start is its
/// scheduled instant, so a stall on the way counts against latency.
pub async fn publish_open_with(
    clients: &[HeraldClient],
    rate: u32,
    events: usize,
    request: impl Fn(usize) -> pb::PublishEventRequest,
) -> Vec<Published> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let begin = Instant::now() + Duration::from_millis(5);
    let mut tasks = JoinSet::new();
    for n in 0..events {
        let at = begin + period.mul_f64(n as f64);
        tokio::time::sleep_until(at.into()).await;
        let client = clients[n % clients.len()].clone();
        let request = request(n);
        tasks.spawn(async move { publish_one(&client, request, at).await });
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
pub async fn ceiling(
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
