//! The scheduler: one task that owns the in-memory view of due work and connected agents. It
//! takes deliveries committed just now (and finds the rest by polling: retries coming due,
//! expired leases, work left by a crash), leases them to agents of the right region within each
//! subscription's limits and fairly between tenants, sends signed jobs, and records results.
//!
//! Leases live in the database (`deliveries.lease_id`, `lease_expires_at`): a claim is a
//! conditional update, so no delivery is leased twice, and work held by a dead process is found
//! again once its lease expires.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_proto::v1 as pb;
use herald_proto::webhook;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::registry::{AgentInfo, Registry};
use super::{EventBodies, EventBody, watch};
use crate::config::RegionFallback;
use crate::domain::model::{
    Attempt, AttemptError, Delivery, DeliveryState, LastDelivery, Subscription, SubscriptionStatus,
};
use crate::domain::{health, ids, retry};
use crate::metrics::{Metrics, StatusClass};
use crate::storage::{self, Store, deliveries, events, subscriptions};
use herald_agent::telemetry;

/// How often the database is polled for due work when nothing is expected sooner.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most deliveries read per poll.
const POLL_LIMIT: u64 = 2_000;
/// Most commands handled between two assignment rounds.
const MAX_COMMANDS_PER_TURN: usize = 1024;
/// Most payload bytes kept in memory from hand-offs; beyond it, payloads are read back.
const MAX_CARRIED_BYTES: usize = 64 << 20;
/// Most jobs in one `Jobs` message.
const MAX_JOBS_PER_MESSAGE: usize = 64;
/// How long a subscription whose `max_concurrency` other replicas fill up waits before this
/// replica tries to lease its deliveries again.
const CLUSTER_FULL_BACKOFF: Duration = Duration::from_millis(100);
/// How long after a failed results write the next one starts.
const RESULTS_REWRITE_DELAY: Duration = Duration::from_secs(1);
/// The version sent in `User-Agent`.
const USER_AGENT: &str = concat!("Herald/", env!("CARGO_PKG_VERSION"));

/// An attempt as recorded, for `WatchDeliveries`.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub tenant_id: String,
    pub delivery_id: String,
    pub subscription_id: String,
    pub event_id: String,
    pub attempt: Attempt,
    pub state: DeliveryState,
}

/// What an agent's connection tells the scheduler.
pub struct AgentHello {
    pub agent_id: String,
    pub region: String,
    pub capacity: u32,
    pub version: String,
    pub identity: String,
    /// The per-agent credential it connected with (`None` for the shared token).
    pub credential_id: Option<String>,
    /// Cancelled to close the agent's stream (its credential was revoked).
    pub disconnect: CancellationToken,
    pub outbox: mpsc::Sender<pb::ControlMessage>,
}

/// What the scheduler is told.
pub enum Command {
    Submit {
        deliveries: Vec<Delivery>,
        bodies: EventBodies,
    },
    SubscriptionChanged(String),
    Wake,
    AgentConnected {
        key: u64,
        hello: AgentHello,
    },
    Credit {
        key: u64,
        credits: u32,
    },
    Results {
        key: u64,
        results: Vec<pb::JobResult>,
        credits: u32,
    },
    Heartbeat {
        key: u64,
    },
    AgentGone {
        key: u64,
    },
    /// Disconnects every agent that uses this credential.
    RevokeCredential(String),
    /// Asks every agent to drain; answers once none holds a lease, or at the deadline.
    Drain {
        deadline: Instant,
        done: oneshot::Sender<()>,
    },
}

/// Settings the scheduler follows.
#[derive(Debug, Clone)]
pub struct Settings {
    pub replica_id: String,
    pub retry_schedule: Vec<Duration>,
    pub lease_grace: Duration,
    pub disable_after: Duration,
    pub region_fallback: RegionFallback,
}

struct Agent {
    agent_id: String,
    region: String,
    credential_id: Option<String>,
    disconnect: CancellationToken,
    credits: u32,
    outbox: mpsc::Sender<pb::ControlMessage>,
    draining: bool,
}

struct Lease {
    agent_key: u64,
    lease_id: String,
    delivery: Delivery,
    attempt: u32,
}

#[derive(Default)]
struct SubscriptionLoad {
    in_flight: u32,
    /// Until when the subscription's `max_concurrency` is taken up by other replicas (a claim
    /// found no free slot): no new picks until then.
    full_until: Option<Instant>,
    /// Token bucket for `rate_limit_per_s`: tokens and when they were last refilled.
    tokens: f64,
    refilled_at: Option<Instant>,
}

pub struct Scheduler {
    store: Store,
    settings: Settings,
    commands: mpsc::UnboundedReceiver<Command>,
    registry: Registry,
    records: broadcast::Sender<AttemptRecord>,
    subscriptions: HashMap<String, Arc<Subscription>>,
    agents: HashMap<u64, Agent>,
    /// Deliveries known in memory: queued or leased.
    known: HashSet<String>,
    /// Bodies of handed-off events whose deliveries are queued, and their total payload bytes.
    bodies: EventBodies,
    carried_bytes: usize,
    /// Queued deliveries per subscription, in due order.
    queues: HashMap<String, VecDeque<Delivery>>,
    /// Tenants with queued work, in round-robin order, each with its subscriptions in turn.
    tenants: VecDeque<String>,
    tenant_subscriptions: HashMap<String, VecDeque<String>>,
    leases: HashMap<String, Lease>,
    load: HashMap<String, SubscriptionLoad>,
    /// Ordered subscriptions' entities with a delivery in flight: (subscription, ordering key).
    busy_entities: HashSet<(String, String)>,
    next_poll: Instant,
    /// When retries scheduled by this replica come due: each a wake-up for the poller, so a
    /// 100 ms retry is not held back to the next regular poll.
    retry_wakeups: std::collections::BinaryHeap<std::cmp::Reverse<Instant>>,
    drains: Vec<(Instant, oneshot::Sender<()>)>,
    /// Set by the first `Drain`: agents that connect from then on are asked to drain at once,
    /// so they move to another replica instead of taking work this one will not see through.
    draining: bool,
    /// Results received but not yet recorded: (agent, results, credits handed back).
    pending_results: Vec<(u64, Vec<pb::JobResult>, u32)>,
    /// Whether a results write is in flight; its outcome arrives on `written_rx`.
    writing: bool,
    /// Results whose write failed (a full disk, an unreachable database), written again with
    /// the next batch from `rewrite_at` on. Their slots stay taken and their deliveries known
    /// meanwhile; their leases stay in the database, so if the write never succeeds they expire
    /// and the poller hands the deliveries out again.
    unwritten: Vec<Step>,
    rewrite_at: Option<Instant>,
    written_tx: mpsc::UnboundedSender<Written>,
    written_rx: mpsc::UnboundedReceiver<Written>,
    metrics: Metrics,
    rng: rand::rngs::StdRng,
}

impl Scheduler {
    pub fn new(
        store: Store,
        settings: Settings,
        commands: mpsc::UnboundedReceiver<Command>,
        registry: Registry,
        records: broadcast::Sender<AttemptRecord>,
        metrics: Metrics,
    ) -> Self {
        use rand::SeedableRng;
        let (written_tx, written_rx) = mpsc::unbounded_channel();
        Self {
            store,
            settings,
            commands,
            registry,
            records,
            subscriptions: HashMap::new(),
            agents: HashMap::new(),
            known: HashSet::new(),
            bodies: HashMap::new(),
            carried_bytes: 0,
            queues: HashMap::new(),
            tenants: VecDeque::new(),
            tenant_subscriptions: HashMap::new(),
            leases: HashMap::new(),
            load: HashMap::new(),
            busy_entities: HashSet::new(),
            next_poll: Instant::now(),
            retry_wakeups: std::collections::BinaryHeap::new(),
            drains: Vec::new(),
            draining: false,
            pending_results: Vec::new(),
            unwritten: Vec::new(),
            rewrite_at: None,
            writing: false,
            written_tx,
            written_rx,
            metrics,
            rng: rand::rngs::StdRng::from_os_rng(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut rate_tick = tokio::time::interval(Duration::from_millis(100));
        rate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                command = self.commands.recv() => {
                    let Some(command) = command else { break };
                    self.handle(command).await;
                    // Take whatever else is queued before assigning, so work is batched.
                    // (bounded, so a busy stream of commands never starves assignment)
                    for _ in 0..MAX_COMMANDS_PER_TURN {
                        let Ok(command) = self.commands.try_recv() else { break };
                        self.handle(command).await;
                    }
                    self.flush_results().await;
                }
                Some(written) = self.written_rx.recv() => {
                    self.written(written);
                    self.flush_results().await;
                }
                _ = tokio::time::sleep_until(self.next_poll) => {
                    self.poll().await;
                    // Results whose write failed go again once their delay is over.
                    self.flush_results().await;
                }
                _ = rate_tick.tick(), if !self.queues.is_empty() => {}
            }
            self.assign().await;
            self.finish_drains();
            self.metrics.leases_in_flight.set(self.leases.len() as i64);
            self.metrics
                .deliveries_pending
                .set(self.known.len().saturating_sub(self.leases.len()) as i64);
        }
        // Results already received are recorded before the replica goes.
        self.settle_results().await;
        for (_, done) in self.drains.drain(..) {
            let _ = done.send(());
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Submit { deliveries, bodies } => {
                for (event_id, body) in bodies {
                    if self.carried_bytes + body.payload.len() > MAX_CARRIED_BYTES {
                        break;
                    }
                    self.carried_bytes += body.payload.len();
                    self.bodies.insert(event_id, body);
                }
                for delivery in deliveries {
                    self.enqueue(delivery);
                }
            }
            Command::SubscriptionChanged(id) => {
                self.subscriptions.remove(&id);
            }
            Command::Wake => self.next_poll = Instant::now(),
            Command::AgentConnected { key, hello } => self.agent_connected(key, hello),
            Command::Credit { key, credits } => self.grant(key, credits),
            Command::Results {
                key,
                results,
                credits,
            } => {
                // Recorded together with every other result taken in this turn.
                self.pending_results.push((key, results, credits));
            }
            Command::Heartbeat { key } => {
                self.registry.update(key, |a| a.last_seen_at = Utc::now())
            }
            Command::AgentGone { key } => {
                // Its last results first: they arrived before the stream closed.
                self.settle_results().await;
                self.agent_gone(key).await
            }
            Command::RevokeCredential(id) => {
                self.settle_results().await;
                let revoked: Vec<u64> = self
                    .agents
                    .iter()
                    .filter(|(_, agent)| agent.credential_id.as_deref() == Some(id.as_str()))
                    .map(|(key, _)| *key)
                    .collect();
                for key in revoked {
                    if let Some(agent) = self.agents.get(&key) {
                        tracing::warn!(agent_id = %agent.agent_id, credential_id = %id, "credential revoked; disconnecting the agent");
                        agent.disconnect.cancel();
                    }
                    self.agent_gone(key).await;
                }
            }
            Command::Drain { deadline, done } => {
                self.draining = true;
                for agent in self.agents.values_mut() {
                    drain(agent);
                }
                self.drains.push((deadline, done));
            }
        }
    }

    fn finish_drains(&mut self) {
        if self.drains.is_empty() {
            return;
        }
        let now = Instant::now();
        let idle = self.leases.is_empty()
            && !self.writing
            && self.pending_results.is_empty()
            && self.unwritten.is_empty();
        let (done, waiting): (Vec<_>, Vec<_>) = self
            .drains
            .drain(..)
            .partition(|(deadline, _)| idle || *deadline <= now);
        self.drains = waiting;
        for (_, sender) in done {
            let _ = sender.send(());
        }
        if !self.drains.is_empty() {
            self.next_poll = self.next_poll.min(now + Duration::from_millis(100));
        }
    }

    fn agent_connected(&mut self, key: u64, hello: AgentHello) {
        let now = Utc::now();
        tracing::info!(agent_id = %hello.agent_id, region = %hello.region, capacity = hello.capacity, "agent connected");
        self.registry.upsert(
            key,
            AgentInfo {
                agent_id: hello.agent_id.clone(),
                region: hello.region.clone(),
                capacity: hello.capacity,
                in_flight: 0,
                version: hello.version,
                identity: hello.identity,
                replica_id: self.settings.replica_id.clone(),
                connected_at: now,
                last_seen_at: now,
            },
        );
        self.metrics
            .agents_connected
            .get_or_create(&crate::metrics::Region {
                region: hello.region.clone(),
            })
            .inc();
        let mut agent = Agent {
            agent_id: hello.agent_id,
            region: hello.region,
            credential_id: hello.credential_id,
            disconnect: hello.disconnect,
            credits: hello.capacity,
            outbox: hello.outbox,
            draining: false,
        };
        if self.draining {
            // This replica is stopping: the agent goes on to the next control plane it knows.
            drain(&mut agent);
        }
        self.agents.insert(key, agent);
        // Work that waited for an agent of this region may go now.
        self.next_poll = Instant::now();
    }

    fn grant(&mut self, key: u64, credits: u32) {
        if let Some(agent) = self.agents.get_mut(&key) {
            agent.credits = agent.credits.saturating_add(credits);
        }
        self.registry.update(key, |a| a.last_seen_at = Utc::now());
    }

    async fn agent_gone(&mut self, key: u64) {
        let Some(agent) = self.agents.remove(&key) else {
            return;
        };
        self.metrics
            .agents_connected
            .get_or_create(&crate::metrics::Region {
                region: agent.region.clone(),
            })
            .dec();
        self.registry.remove(key);
        let held: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.agent_key == key)
            .map(|(id, _)| id.clone())
            .collect();
        tracing::info!(agent_id = %agent.agent_id, in_flight = held.len(), "agent disconnected");
        if held.is_empty() {
            return;
        }
        let mut released = Vec::new();
        for id in held {
            if let Some(lease) = self.leases.remove(&id) {
                self.unload(&lease.delivery);
                released.push(lease);
            }
        }
        let pairs: Vec<(String, String)> = released
            .iter()
            .map(|lease| (lease.delivery.id.clone(), lease.lease_id.clone()))
            .collect();
        // Re-queued at once: the agent's results can no longer arrive on its closed stream.
        match release(&self.store, &pairs).await {
            Ok(_) => {
                for lease in released {
                    self.known.remove(&lease.delivery.id);
                    let mut delivery = lease.delivery;
                    delivery.state = DeliveryState::Pending;
                    self.enqueue(delivery);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not re-queue a disconnected agent's leases; they expire instead");
                for lease in released {
                    self.known.remove(&lease.delivery.id);
                }
            }
        }
    }

    fn enqueue(&mut self, delivery: Delivery) {
        if !self.known.insert(delivery.id.clone()) {
            return;
        }
        let tenant = delivery.tenant_id.clone();
        let subscription = delivery.subscription_id.clone();
        let queue = self.queues.entry(subscription.clone()).or_default();
        let first_of_subscription = queue.is_empty();
        queue.push_back(delivery);
        if first_of_subscription {
            let subs = self.tenant_subscriptions.entry(tenant.clone()).or_default();
            if subs.is_empty() {
                self.tenants.push_back(tenant);
            }
            subs.push_back(subscription);
        }
    }

    async fn poll(&mut self) {
        let now = Utc::now();
        let tick = Instant::now();
        while self.retry_wakeups.peek().is_some_and(|at| at.0 <= tick) {
            self.retry_wakeups.pop();
        }
        self.next_poll = self
            .retry_wakeups
            .peek()
            .map_or(tick + POLL_INTERVAL, |at| at.0.min(tick + POLL_INTERVAL));
        self.drop_unneeded_bodies();
        match deliveries::due(&self.store.db, now, POLL_LIMIT).await {
            Ok(due) => {
                for delivery in due {
                    self.enqueue(delivery);
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not read due deliveries"),
        }
    }

    /// Forgets the bodies no queued delivery needs any more (all sent, or dropped from memory).
    fn drop_unneeded_bodies(&mut self) {
        if self.bodies.is_empty() {
            return;
        }
        let needed: HashSet<&str> = self
            .queues
            .values()
            .flatten()
            .map(|d| d.event_id.as_str())
            .collect();
        let mut carried = 0;
        self.bodies.retain(|event_id, body| {
            let keep = needed.contains(event_id.as_str());
            if keep {
                carried += body.payload.len();
            }
            keep
        });
        self.carried_bytes = carried;
    }

    /// Returns the subscription, from the cache or the database; `None` if it was deleted.
    async fn subscription(&mut self, id: &str) -> Option<Arc<Subscription>> {
        if let Some(s) = self.subscriptions.get(id) {
            return Some(s.clone());
        }
        match subscriptions::get_many(&self.store.db, &self.store.sealer, &[id.to_owned()]).await {
            Ok(mut found) => {
                let s = Arc::new(found.pop()?);
                self.subscriptions.insert(id.to_owned(), s.clone());
                Some(s)
            }
            Err(err) => {
                tracing::warn!(error = %err, subscription_id = id, "could not read subscription");
                None
            }
        }
    }

    /// Returns the agent that should take a job of `region` (None = any), if one has credit.
    fn agent_for(&self, region: Option<&str>) -> Option<u64> {
        let eligible = |agent: &Agent| !agent.draining && agent.credits > 0;
        let in_region = |agent: &Agent| region.is_none_or(|r| agent.region == r);
        let best = |filter: &dyn Fn(&Agent) -> bool| {
            self.agents
                .iter()
                .filter(|(_, a)| eligible(a) && filter(a))
                .max_by_key(|(_, a)| a.credits)
                .map(|(key, _)| *key)
        };
        if let Some(key) = best(&in_region) {
            return Some(key);
        }
        let region_has_agents = self.agents.values().any(|a| !a.draining && in_region(a));
        if region.is_some()
            && !region_has_agents
            && self.settings.region_fallback == RegionFallback::Any
        {
            return best(&|_| true);
        }
        None
    }

    fn take_rate_token(&mut self, subscription: &Subscription) -> bool {
        if subscription.rate_limit_per_s == 0 {
            return true;
        }
        let rate = f64::from(subscription.rate_limit_per_s);
        let load = self.load.entry(subscription.id.clone()).or_default();
        let now = Instant::now();
        let elapsed = load
            .refilled_at
            .map_or(1.0, |at| now.duration_since(at).as_secs_f64());
        load.tokens = (load.tokens + elapsed * rate).min(rate);
        load.refilled_at = Some(now);
        if load.tokens >= 1.0 {
            load.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn unload(&mut self, delivery: &Delivery) {
        if let Some(load) = self.load.get_mut(&delivery.subscription_id) {
            load.in_flight = load.in_flight.saturating_sub(1);
        }
        if let Some(key) = &delivery.ordering_key {
            self.busy_entities
                .remove(&(delivery.subscription_id.clone(), key.clone()));
        }
    }

    /// Picks queued deliveries for agents with credit: round-robin over tenants, then over each
    /// tenant's subscriptions, within each subscription's limits.
    async fn assign(&mut self) {
        let mut picks: HashMap<u64, Vec<(Delivery, Arc<Subscription>)>> = HashMap::new();
        let mut idle_rounds = 0;
        while idle_rounds < self.tenants.len().max(1) && !self.tenants.is_empty() {
            let Some(tenant) = self.tenants.pop_front() else {
                break;
            };
            let Some(subscription_id) = self
                .tenant_subscriptions
                .get_mut(&tenant)
                .and_then(VecDeque::pop_front)
            else {
                self.tenant_subscriptions.remove(&tenant);
                continue;
            };
            let picked = self.pick_from(&subscription_id, &mut picks).await;
            let queue_left = self
                .queues
                .get(&subscription_id)
                .is_some_and(|q| !q.is_empty());
            if !queue_left {
                self.queues.remove(&subscription_id);
            }
            let subs = self.tenant_subscriptions.entry(tenant.clone()).or_default();
            if queue_left {
                subs.push_back(subscription_id);
            }
            if subs.is_empty() {
                self.tenant_subscriptions.remove(&tenant);
            } else {
                self.tenants.push_back(tenant);
            }
            idle_rounds = if picked { 0 } else { idle_rounds + 1 };
        }
        if !picks.is_empty() {
            self.dispatch(picks).await;
        }
    }

    /// Takes the next eligible delivery of one subscription; returns whether it took one.
    async fn pick_from(
        &mut self,
        subscription_id: &str,
        picks: &mut HashMap<u64, Vec<(Delivery, Arc<Subscription>)>>,
    ) -> bool {
        let Some(subscription) = self.subscription(subscription_id).await else {
            // Deleted: forget its queue; its rows stay as they are.
            if let Some(queue) = self.queues.remove(subscription_id) {
                for delivery in queue {
                    self.known.remove(&delivery.id);
                }
            }
            return false;
        };
        if subscription.status == SubscriptionStatus::Disabled {
            if let Some(queue) = self.queues.remove(subscription_id) {
                for delivery in queue {
                    self.known.remove(&delivery.id);
                }
            }
            return false;
        }
        let (in_flight, full_until) = self
            .load
            .get(subscription_id)
            .map_or((0, None), |l| (l.in_flight, l.full_until));
        if in_flight >= subscription.max_concurrency
            || full_until.is_some_and(|until| until > Instant::now())
        {
            return false;
        }
        let Some(agent_key) = self.agent_for(subscription.region.as_deref()) else {
            return false;
        };
        let Some(queue) = self.queues.get_mut(subscription_id) else {
            return false;
        };
        // Ordered subscriptions: skip entities with a delivery in flight.
        let position = queue.iter().take(256).position(|d| {
            d.ordering_key.as_ref().is_none_or(|key| {
                !self
                    .busy_entities
                    .contains(&(subscription_id.to_owned(), key.clone()))
            })
        });
        let Some(position) = position else {
            return false;
        };
        if !self.take_rate_token(&subscription) {
            return false;
        }
        let Some(queue) = self.queues.get_mut(subscription_id) else {
            return false;
        };
        let Some(delivery) = queue.remove(position) else {
            return false;
        };
        if let Some(key) = &delivery.ordering_key {
            self.busy_entities
                .insert((subscription_id.to_owned(), key.clone()));
        }
        self.load
            .entry(subscription_id.to_owned())
            .or_default()
            .in_flight += 1;
        if let Some(agent) = self.agents.get_mut(&agent_key) {
            agent.credits -= 1;
        }
        picks
            .entry(agent_key)
            .or_default()
            .push((delivery, subscription));
        true
    }

    /// Leases every pick of this round in one transaction, then sends each agent its jobs.
    async fn dispatch(&mut self, picks: HashMap<u64, Vec<(Delivery, Arc<Subscription>)>>) {
        let now = Utc::now();
        let mut claims: Vec<deliveries::LeaseClaim> = Vec::with_capacity(picks.len());
        let mut batches = Vec::with_capacity(picks.len());
        for (key, batch) in picks {
            let Some(agent_id) = self.agents.get(&key).map(|a| a.agent_id.clone()) else {
                for (delivery, _) in batch {
                    self.give_back(delivery, false);
                }
                continue;
            };
            if batch.is_empty() {
                continue;
            }
            let longest = batch
                .iter()
                .map(|(_, s)| s.timeout)
                .max()
                .unwrap_or_default();
            let expires_at = now
                + chrono::Duration::from_std(longest + self.settings.lease_grace)
                    .unwrap_or_default();
            let mut groups: Vec<deliveries::ClaimGroup> = Vec::new();
            for (delivery, subscription) in &batch {
                match groups
                    .iter_mut()
                    .find(|g| g.subscription_id == delivery.subscription_id)
                {
                    Some(group) => group.ids.push(delivery.id.clone()),
                    None => groups.push(deliveries::ClaimGroup {
                        subscription_id: delivery.subscription_id.clone(),
                        max_concurrency: subscription.max_concurrency,
                        ids: vec![delivery.id.clone()],
                    }),
                }
            }
            claims.push(deliveries::LeaseClaim {
                lease_id: ids::new(ids::LEASE),
                agent_id,
                expires_at,
                groups,
            });
            batches.push((key, batch));
        }
        if claims.is_empty() {
            return;
        }
        let (claimed, deferred) = match self.claim(&claims, now).await {
            Ok(outcome) => (
                outcome.leased.into_iter().collect(),
                outcome.deferred.into_iter().collect(),
            ),
            Err(err) => {
                tracing::warn!(error = %err, "could not lease deliveries");
                (HashMap::new(), HashSet::new())
            }
        };
        let leased = batches
            .iter()
            .flat_map(|(_, batch)| batch)
            .map(|(delivery, _)| delivery)
            .filter(|delivery| claimed.contains_key(&delivery.id));
        let payloads = self.bodies_of(leased).await;
        let round = Round {
            claimed,
            deferred,
            payloads,
            now,
        };
        for ((key, batch), claim) in batches.into_iter().zip(&claims) {
            self.send_jobs(key, claim, batch, &round);
        }
    }

    /// Sends one agent the signed jobs of the deliveries leased to it; gives the rest back.
    fn send_jobs(
        &mut self,
        key: u64,
        claim: &deliveries::LeaseClaim,
        batch: Vec<(Delivery, Arc<Subscription>)>,
        round: &Round,
    ) {
        let Round {
            claimed,
            deferred,
            payloads,
            now,
        } = round;
        let now = *now;
        let (agent_id, lease_id) = (claim.agent_id.as_str(), claim.lease_id.as_str());
        // Other replicas hold the subscription's every slot: it waits a moment before trying again.
        let (ready, waiting): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(d, _)| !deferred.contains(&d.id));
        let retry_at = Instant::now() + CLUSTER_FULL_BACKOFF;
        for (delivery, _) in waiting {
            self.give_back_credit(key);
            self.load
                .entry(delivery.subscription_id.clone())
                .or_default()
                .full_until = Some(retry_at);
            self.give_back(delivery, false);
        }
        let mut jobs = Vec::with_capacity(ready.len());
        for (mut delivery, subscription) in ready {
            let Some(&attempt_count) = claimed.get(&delivery.id) else {
                // Someone else holds it, it is no longer due, or (ordered) an earlier event of
                // its entity is unfinished: not ours to send now; the poller finds it again.
                self.give_back_credit(key);
                self.unload(&delivery);
                self.known.remove(&delivery.id);
                continue;
            };
            // The row as leased: its attempt count is the truth, whoever attempted it before.
            delivery.attempt_count = attempt_count;
            delivery.state = DeliveryState::InFlight;
            let Some(body) = payloads.get(&delivery.event_id) else {
                self.give_back_credit(key);
                self.unload(&delivery);
                self.known.remove(&delivery.id);
                continue;
            };
            let attempt = delivery.attempt_count + 1;
            let lag = (now - delivery.next_attempt_at)
                .to_std()
                .unwrap_or_default();
            self.metrics.delivery_lag.observe(lag.as_secs_f64());
            // The dispatch joins the publisher's trace (stored with the event, so a retry hours
            // later joins it too); the agent's span becomes its child.
            let span = tracing::info_span!(
                "dispatch",
                tenant_id = %delivery.tenant_id,
                subscription_id = %delivery.subscription_id,
                event_id = %delivery.event_id,
                delivery_id = %delivery.id,
                attempt,
                agent_id = %agent_id,
            );
            if let Some(parent) = body.traceparent.as_deref() {
                telemetry::set_parent(&span, parent);
            }
            let job_traceparent =
                telemetry::traceparent(&span).or_else(|| body.traceparent.clone());
            jobs.push(build_job(
                &delivery,
                &subscription,
                &body.payload,
                job_traceparent.as_deref(),
                lease_id,
                attempt,
                now,
            ));
            self.leases.insert(
                delivery.id.clone(),
                Lease {
                    agent_key: key,
                    lease_id: lease_id.to_owned(),
                    delivery,
                    attempt,
                },
            );
        }
        let in_flight = self.leases.values().filter(|l| l.agent_key == key).count() as u32;
        self.registry.update(key, |a| a.in_flight = in_flight);
        let Some(agent) = self.agents.get(&key) else {
            return;
        };
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let chunk: Vec<pb::Job> = jobs.by_ref().take(MAX_JOBS_PER_MESSAGE).collect();
            let message = pb::ControlMessage {
                message: Some(pb::control_message::Message::Jobs(pb::Jobs { jobs: chunk })),
            };
            // The outbox holds at least `capacity` jobs; a full one means the stream is dying,
            // and its leases are re-queued when it closes.
            if agent.outbox.try_send(message).is_err() {
                tracing::warn!(agent_id = %agent.agent_id, "agent outbox full or closed");
                break;
            }
        }
    }

    /// Returns the bodies of the leased deliveries' events: carried from the hand-off, or read
    /// back (deliveries found by polling, retries).
    async fn bodies_of(&self, leased: impl Iterator<Item = &Delivery>) -> EventBodies {
        let mut bodies = EventBodies::new();
        let mut missing = Vec::new();
        for delivery in leased {
            if bodies.contains_key(&delivery.event_id) {
                continue;
            }
            match self.bodies.get(&delivery.event_id) {
                Some(body) => {
                    bodies.insert(delivery.event_id.clone(), body.clone());
                }
                None => missing.push(delivery.event_id.clone()),
            }
        }
        if missing.is_empty() {
            return bodies;
        }
        missing.sort_unstable();
        missing.dedup();
        match events::get_many(&self.store.db, &missing).await {
            Ok(events) => bodies.extend(events.into_iter().map(|e| {
                let body = EventBody {
                    payload: Bytes::from(e.payload),
                    traceparent: e.traceparent,
                };
                (e.id, Arc::new(body))
            })),
            Err(err) => {
                tracing::warn!(error = %err, "could not read event payloads; leases will expire");
            }
        }
        bodies
    }

    /// Takes the leases in one transaction (see [`deliveries::claim_leases`]).
    async fn claim(
        &self,
        claims: &[deliveries::LeaseClaim],
        now: DateTime<Utc>,
    ) -> Result<deliveries::Claimed, storage::Error> {
        let txn = self.store.begin_scheduler_write().await?;
        let claimed = deliveries::claim_leases(&txn, claims, now, self.store.shared()).await?;
        txn.commit().await?;
        Ok(claimed)
    }

    fn give_back_credit(&mut self, key: u64) {
        if let Some(agent) = self.agents.get_mut(&key) {
            agent.credits += 1;
        }
    }

    /// Returns a picked delivery to memory: re-queued, or forgotten for the poller to find.
    fn give_back(&mut self, delivery: Delivery, forget: bool) {
        self.unload(&delivery);
        self.known.remove(&delivery.id);
        if !forget {
            self.enqueue(delivery);
        }
    }

    /// Starts recording every result received since the last flush, in one transaction written
    /// in the background (the attempts always, each delivery's new state only under a
    /// still-valid lease), while this task goes on leasing and sending. One write at a time:
    /// results arriving meanwhile wait for the next, larger one.
    async fn flush_results(&mut self) {
        if (self.pending_results.is_empty() && self.unwritten.is_empty()) || self.writing {
            return;
        }
        if self.rewrite_at.is_some_and(|at| Instant::now() < at) {
            // The last write failed: the storage gets a moment before the next one.
            return;
        }
        self.rewrite_at = None;
        let now = Utc::now();
        let batch = std::mem::take(&mut self.pending_results);
        let mut planned = std::mem::take(&mut self.unwritten);
        for step in &mut planned {
            step.reset();
        }
        let mut grants = Vec::with_capacity(batch.len());
        for (key, results, credits) in batch {
            grants.push((key, credits));
            let (agent_id, region) = self
                .agents
                .get(&key)
                .map(|a| (a.agent_id.clone(), a.region.clone()))
                .unwrap_or_default();
            for result in results {
                let lease = match self.leases.get(&result.delivery_id) {
                    Some(lease) if lease.lease_id == result.lease_id && lease.agent_key == key => {
                        self.leases.remove(&result.delivery_id)
                    }
                    _ => None,
                };
                planned.push(self.plan(result, lease, &agent_id, &region, now).await);
            }
        }
        // The agent has finished these jobs: its credits are back now. The subscriptions' slots
        // (and ordered entities) are freed once the results are recorded.
        for (key, credits) in grants {
            let in_flight = self.leases.values().filter(|l| l.agent_key == key).count() as u32;
            self.registry.update(key, |a| {
                a.in_flight = in_flight;
                a.last_seen_at = now;
            });
            self.grant(key, credits);
        }
        self.writing = true;
        let store = self.store.clone();
        let replica_id = self.settings.replica_id.clone();
        let disable_after = self.settings.disable_after;
        let done = self.written_tx.clone();
        tokio::spawn(async move {
            let mut steps = planned;
            let outcome = write(&store, &replica_id, disable_after, &mut steps, now).await;
            // The scheduler is gone only at shutdown; its leases expire then.
            let _ = done.send(Written {
                steps,
                outcome,
                now,
            });
        });
    }

    /// Applies a finished results write to memory: frees slots, schedules retry wake-ups,
    /// publishes the attempts to watchers.
    fn written(&mut self, written: Written) {
        self.writing = false;
        let Written {
            steps,
            outcome,
            now,
        } = written;
        let recorded = match outcome {
            Ok(disabled) => {
                for id in disabled {
                    self.subscriptions.remove(&id);
                }
                true
            }
            Err(err) => {
                // Kept and written again in a moment (see `unwritten`).
                tracing::warn!(error = %err, results = steps.len(), "could not record results; retrying in {RESULTS_REWRITE_DELAY:?}");
                let at = Instant::now() + RESULTS_REWRITE_DELAY;
                self.rewrite_at = Some(at);
                self.next_poll = self.next_poll.min(at);
                self.unwritten.extend(steps);
                return;
            }
        };
        for step in &steps {
            if let Some(lease) = &step.lease {
                self.unload(&lease.delivery);
                self.known.remove(&lease.delivery.id);
                if lease.delivery.ordering_key.is_some() {
                    // The entity's next event may go now.
                    self.next_poll = Instant::now();
                }
            }
            if !recorded {
                continue;
            }
            let error = step.attempt.error;
            let error_name = format!("{error:?}");
            self.metrics
                .attempts
                .get_or_create(&StatusClass::of(step.attempt.status_code, &error_name))
                .inc();
            self.metrics
                .attempt_duration
                .observe(f64::from(step.attempt.duration_ms) / 1000.0);
            if step.applied {
                self.metrics.delivery_moved(step.state);
            }
            if let Some(at) = step.next_attempt_at.filter(|_| {
                step.lease.is_some() && step.applied && step.state == DeliveryState::Failed
            }) {
                let wait = (at - now).to_std().unwrap_or_default();
                let at = Instant::now() + wait;
                self.retry_wakeups.push(std::cmp::Reverse(at));
                self.next_poll = self.next_poll.min(at);
            }
        }
        if !recorded {
            return;
        }
        for step in steps {
            if let Some(record) = step.record {
                // No watcher is not an error.
                let _ = self.records.send(record);
            }
        }
    }

    /// Records every result received so far and waits until it is written; makes one more try
    /// for results whose write failed.
    async fn settle_results(&mut self) {
        let mut retried = false;
        loop {
            if self.writing {
                match self.written_rx.recv().await {
                    Some(written) => self.written(written),
                    None => return,
                }
            } else if !self.pending_results.is_empty() || (!retried && !self.unwritten.is_empty()) {
                retried = true;
                self.rewrite_at = None;
                self.flush_results().await;
            } else {
                return;
            }
        }
    }

    /// Decides what one result means (no IO but the subscription cache).
    async fn plan(
        &mut self,
        result: pb::JobResult,
        lease: Option<Lease>,
        agent_id: &str,
        region: &str,
        now: DateTime<Utc>,
    ) -> Step {
        let error = AttemptError::from_i32(result.error);
        let retry_after = result
            .response_headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
            .and_then(|h| retry::parse_retry_after(&h.value, now));
        let outcome = retry::classify(result.status_code, error, retry_after);
        let attempt = Attempt {
            id: ids::new(ids::ATTEMPT),
            delivery_id: result.delivery_id.clone(),
            agent_id: agent_id.to_owned(),
            region: region.to_owned(),
            started_at: result
                .started_at
                .as_ref()
                .and_then(herald_proto::from_timestamp)
                .unwrap_or(now),
            duration_ms: result.duration_ms,
            status_code: result.status_code,
            response_headers: result
                .response_headers
                .iter()
                .take(16)
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
            response_excerpt: result.response_excerpt.chars().take(4096).collect(),
            error,
            error_message: result.error_message.chars().take(1024).collect(),
        };
        let (mut state, mut next_attempt_at, mut subscription_disabled) =
            (DeliveryState::InFlight, None, false);
        if let Some(lease) = &lease {
            let subscription = self.subscription(&lease.delivery.subscription_id).await;
            let max_attempts = subscription.as_ref().map_or(1, |s| s.max_attempts);
            (state, next_attempt_at) = retry::next_step(
                &self.settings.retry_schedule,
                max_attempts,
                lease.attempt,
                &outcome,
                now,
                &mut self.rng,
            );
            subscription_disabled = subscription
                .as_ref()
                .is_some_and(|s| s.status == SubscriptionStatus::Disabled);
            if subscription_disabled && state == DeliveryState::Failed {
                state = DeliveryState::Dead;
                next_attempt_at = None;
            }
        }
        Step {
            planned: (state, next_attempt_at, attempt.error),
            lease,
            outcome,
            attempt,
            state,
            next_attempt_at,
            subscription_disabled,
            applied: false,
            record: None,
        }
    }
}

/// What one dispatch round leased: attempt counts of the leased deliveries, the ones deferred
/// for lack of cluster-wide slots, and their events' bodies.
struct Round {
    claimed: HashMap<String, u32>,
    deferred: HashSet<String>,
    payloads: EventBodies,
    now: DateTime<Utc>,
}

/// A results write, finished.
struct Written {
    steps: Vec<Step>,
    outcome: Result<Vec<String>, storage::Error>,
    now: DateTime<Utc>,
}

/// Writes a batch of planned results in one transaction; returns the subscriptions it disabled.
async fn write(
    store: &Store,
    replica_id: &str,
    disable_after: Duration,
    steps: &mut [Step],
    now: DateTime<Utc>,
) -> Result<Vec<String>, storage::Error> {
    let txn = store.begin_scheduler_write().await?;
    // The newest applied step per subscription decides its summary and health; a 410
    // anywhere in the batch disables it.
    let mut per_subscription: HashMap<String, (usize, bool)> = HashMap::new();
    // Results with the same outcome (most often: 200, succeeded) move their deliveries in
    // one statement each; a lease that is no longer valid is simply not among those moved.
    let mut groups: HashMap<(i32, Option<i64>, u32, i32), Vec<usize>> = HashMap::new();
    for (index, step) in steps.iter().enumerate() {
        if step.lease.is_some() {
            let key = (
                step.state as i32,
                step.next_attempt_at.map(|at| at.timestamp_millis()),
                step.attempt.status_code,
                step.attempt.error as i32,
            );
            groups.entry(key).or_default().push(index);
        }
    }
    for indices in groups.values() {
        for chunk in indices.chunks(200) {
            let first = &steps[chunk[0]];
            let leases: Vec<(&str, &str)> = chunk
                .iter()
                .filter_map(|&i| steps[i].lease.as_ref())
                .map(|lease| (lease.delivery.id.as_str(), lease.lease_id.as_str()))
                .collect();
            let outcome = deliveries::Completion {
                state: first.state,
                next_attempt_at: first.next_attempt_at,
                status_code: first.attempt.status_code,
                error: first.attempt.error,
            };
            let moved: std::collections::HashSet<String> =
                deliveries::complete_many(&txn, &leases, &outcome, now)
                    .await?
                    .into_iter()
                    .collect();
            for &i in chunk {
                let applied = steps[i]
                    .lease
                    .as_ref()
                    .is_some_and(|lease| moved.contains(&lease.delivery.id));
                steps[i].applied = applied;
            }
        }
    }
    for (index, step) in steps.iter_mut().enumerate() {
        let delivery = match &step.lease {
            Some(lease) => lease.delivery.clone(),
            // A result this replica did not lease, or no longer holds.
            None => match deliveries::get_any(&txn, &step.attempt.delivery_id).await? {
                Some(delivery) => delivery,
                None => continue,
            },
        };
        if !step.applied {
            step.attempt.error = AttemptError::LeaseExpired;
            step.state = delivery.state;
        } else {
            let gone = step.outcome == retry::Outcome::Gone;
            let entry = per_subscription
                .entry(delivery.subscription_id.clone())
                .or_insert((index, gone));
            if gone || !entry.1 {
                *entry = (index, gone);
            }
        }
        step.record = Some(AttemptRecord {
            tenant_id: delivery.tenant_id,
            delivery_id: delivery.id,
            subscription_id: delivery.subscription_id,
            event_id: delivery.event_id,
            attempt: step.attempt.clone(),
            state: step.state,
        });
    }
    let attempts: Vec<Attempt> = steps
        .iter()
        .filter(|s| s.record.is_some())
        .map(|s| s.attempt.clone())
        .collect();
    deliveries::insert_attempts(&txn, &attempts).await?;
    let mut disabled = Vec::new();
    for (subscription_id, (index, _)) in per_subscription {
        let step = &steps[index];
        let last = LastDelivery {
            state: step.state,
            status_code: step.attempt.status_code,
            at: now,
        };
        subscriptions::record_last_delivery(&txn, &subscription_id, &last).await?;
        if step.subscription_disabled || step.outcome == retry::Outcome::Delivered {
            continue;
        }
        let failing_since = subscriptions::failing_since(&txn, &subscription_id).await?;
        if let Some(reason) = health::disable_reason(
            &step.outcome,
            step.attempt.status_code,
            failing_since,
            disable_after,
            now,
        ) {
            subscriptions::set_status(
                &txn,
                &subscription_id,
                SubscriptionStatus::Disabled,
                Some(&reason),
                now,
            )
            .await?;
            // Waiting deliveries, the ones just made FAILED included, go DEAD (replayable).
            deliveries::kill_waiting(&txn, &subscription_id, now).await?;
            tracing::warn!(%subscription_id, %reason, "subscription disabled");
            disabled.push(subscription_id);
        }
    }
    for step in steps.iter_mut() {
        let killed = step.state == DeliveryState::Failed
            && step
                .record
                .as_ref()
                .is_some_and(|r| disabled.contains(&r.subscription_id));
        if killed {
            step.state = DeliveryState::Dead;
            step.next_attempt_at = None;
            if let Some(record) = &mut step.record {
                record.state = DeliveryState::Dead;
            }
        }
    }
    if store.shared() {
        // Watchers on the other replicas hear of these attempts once they are committed.
        let recorded: Vec<(String, DeliveryState)> = steps
            .iter()
            .filter_map(|s| s.record.as_ref())
            .map(|r| (r.attempt.id.clone(), r.state))
            .collect();
        for payload in watch::encode(replica_id, &recorded) {
            storage::notify(&txn, watch::CHANNEL, &payload).await?;
        }
    }
    txn.commit().await?;
    Ok(disabled)
}

/// One result on its way to storage.
struct Step {
    /// The state, next attempt and error planned from the result, before a write changed them
    /// (a write that failed is done again from these).
    planned: (DeliveryState, Option<DateTime<Utc>>, AttemptError),
    lease: Option<Lease>,
    outcome: retry::Outcome,
    attempt: Attempt,
    state: DeliveryState,
    next_attempt_at: Option<DateTime<Utc>>,
    subscription_disabled: bool,
    /// Whether the result moved its delivery (its lease was still valid).
    applied: bool,
    record: Option<AttemptRecord>,
}

impl Step {
    /// Back to the step as planned, for another write.
    fn reset(&mut self) {
        (self.state, self.next_attempt_at, self.attempt.error) = self.planned;
        self.applied = false;
        self.record = None;
    }
}

/// Makes a departed agent's leased deliveries pending again, in one transaction.
async fn release(store: &Store, leases: &[(String, String)]) -> Result<u64, storage::Error> {
    let txn = store.begin_scheduler_write().await?;
    let released = deliveries::release(&txn, leases, Utc::now()).await?;
    txn.commit().await?;
    Ok(released)
}

/// Asks an agent to take nothing new, finish, report and close.
fn drain(agent: &mut Agent) {
    agent.draining = true;
    let _ = agent.outbox.try_send(pb::ControlMessage {
        message: Some(pb::control_message::Message::Drain(pb::Drain {
            reason: "control plane shutting down".into(),
        })),
    });
}

/// Builds the ready-to-send request of one attempt, signed now with every valid secret.
fn build_job(
    delivery: &Delivery,
    subscription: &Subscription,
    body: &Bytes,
    traceparent: Option<&str>,
    lease_id: &str,
    attempt: u32,
    now: DateTime<Utc>,
) -> pb::Job {
    let timestamp = now.timestamp();
    let secrets: Vec<webhook::Secret> = subscription
        .signing_secrets(now)
        .into_iter()
        .filter_map(|s| webhook::Secret::parse(s).ok())
        .collect();
    let signature = webhook::signature_header(&secrets, &delivery.event_id, timestamp, body);
    let header = |name: &str, value: &str| pb::Header {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    let mut headers = vec![
        header("content-type", "application/json"),
        header("user-agent", USER_AGENT),
        header(webhook::HEADER_ID, &delivery.event_id),
        header(webhook::HEADER_TIMESTAMP, &timestamp.to_string()),
        header(webhook::HEADER_SIGNATURE, &signature),
    ];
    if let Some(key) = &subscription.api_key {
        headers.push(header(&subscription.api_key_header, key));
    }
    if let Some(traceparent) = traceparent {
        headers.push(header("traceparent", traceparent));
    }
    pb::Job {
        delivery_id: delivery.id.clone(),
        lease_id: lease_id.to_owned(),
        url: subscription.url.clone(),
        headers,
        body: body.clone(),
        timeout_ms: u32::try_from(subscription.timeout.as_millis()).unwrap_or(60_000),
        attempt,
        subscription_id: delivery.subscription_id.clone(),
        event_id: delivery.event_id.clone(),
    }
}
