//! The scheduler actor: one task that carries out what the scheduling model (`model.rs`)
//! decides. It feeds the model what happens — deliveries committed just now (the hand-off) and
//! found by polling (per subscription, so one backlog never hides another's work), agents'
//! hellos, credits, heartbeats and results, the time — and does the IO the model's decisions
//! need: claims leases in the database, builds and sends jobs (`jobs.rs`), records results and
//! expired leases (`results.rs`), disconnects agents the model gives up on.
//!
//! Leases live in the database (`deliveries.lease_id`, `lease_expires_at`) and in the model
//! with the same expiry: a claim is a conditional update, so no delivery is leased twice; a
//! lease without a result ends at its expiry even while its agent stays connected; work held by
//! a dead process is found again once its lease expires.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::{self, AgentKey, Lease, Model};
use super::registry::{AgentInfo, Registry};
use super::results::{self, Step};
use super::{EventBodies, changes, jobs};
use crate::config::RegionFallback;
use crate::domain::model::{Attempt, Delivery, DeliveryState, Subscription};
use crate::metrics::{Metrics, StatusClass};
use crate::storage::{self, Store, deliveries, subscriptions};
use herald_agent::telemetry;

/// How often the database is polled for due work when nothing is expected sooner.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most deliveries under an expired lease read per poll.
const EXPIRED_LEASES_PER_POLL: u64 = 1_000;
/// Most commands handled between two assignment rounds.
const MAX_COMMANDS_PER_TURN: usize = 1024;
/// Most payload bytes kept in memory from hand-offs; beyond it, payloads are read back.
const MAX_CARRIED_BYTES: usize = 64 << 20;
/// Most deliveries queued in memory, in all and per subscription (the poller finds the rest).
const MAX_QUEUED: usize = 100_000;
const MAX_QUEUED_PER_SUBSCRIPTION: usize = 4_096;
/// Consecutive expired leases, with no result in between, after which an agent is disconnected.
const EXPIRIES_IN_A_ROW: u32 = 3;
/// How long a cached subscription is used without reading it again, whatever was announced.
const SUBSCRIPTION_CACHE_TTL: Duration = Duration::from_secs(60);
/// Results for jobs an agent was never sent, after which its stream is closed.
const FOREIGN_RESULTS_ALLOWED: u32 = 10;
/// How long a subscription whose `max_concurrency` other replicas fill up waits before this
/// replica tries to lease its deliveries again.
const CLUSTER_FULL_BACKOFF: Duration = Duration::from_millis(100);
/// How long after a failed results write the next one starts.
const RESULTS_REWRITE_DELAY: Duration = Duration::from_secs(1);

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
    /// Cancelled to close the agent's stream (its credential was revoked, it is unresponsive).
    pub disconnect: CancellationToken,
    /// Cancelled to end the agent's stream with `PERMISSION_DENIED` (it reported results for
    /// jobs it was never sent).
    pub refuse: CancellationToken,
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
    /// An agent silent this long is disconnected (three heartbeat intervals).
    pub silence_limit: Duration,
}

/// A connected agent's stream, as the actor reaches it.
struct Session {
    agent_id: String,
    region: String,
    credential_id: Option<String>,
    disconnect: CancellationToken,
    refuse: CancellationToken,
    outbox: mpsc::Sender<pb::ControlMessage>,
    /// Asked to go (the model gave up on it, or its credential was revoked).
    disconnecting: bool,
}

impl Session {
    /// Asks the agent to take nothing new, finish, report and close.
    fn drain(&self) {
        let _ = self.outbox.try_send(pb::ControlMessage {
            message: Some(pb::control_message::Message::Drain(pb::Drain {
                reason: "control plane shutting down".into(),
            })),
        });
    }
}

pub struct Scheduler {
    store: Store,
    settings: Settings,
    commands: mpsc::Receiver<Command>,
    registry: Registry,
    records: broadcast::Sender<AttemptRecord>,
    metrics: Metrics,
    rng: rand::rngs::StdRng,
    changes: changes::Announcer,
    model: Model,
    /// Subscriptions as last read; emptied every `SUBSCRIPTION_CACHE_TTL` too, a backstop for a
    /// change announced while this replica was not listening.
    subscriptions: HashMap<String, Arc<Subscription>>,
    subscriptions_read_at: Instant,
    sessions: HashMap<AgentKey, Session>,
    /// Bodies of handed-off events whose deliveries are queued, and their total payload bytes.
    bodies: EventBodies,
    carried_bytes: usize,
    next_poll: Instant,
    /// Retries this replica scheduled before the next regular poll: each wakes the poller.
    retry_wakeups: std::collections::BinaryHeap<std::cmp::Reverse<Instant>>,
    drains: Vec<(Instant, oneshot::Sender<()>)>,
    /// Set by the first `Drain`: agents that connect from then on are asked to drain at once.
    draining: bool,
    /// Results received but not yet recorded: (agent, results, credits handed back).
    pending_results: Vec<(AgentKey, Vec<pb::JobResult>, u32)>,
    /// Leases that ended at their expiry, to record as `TIMEOUT` attempts.
    timed_out: Vec<Lease>,
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
    /// The last "last delivery" summary written per subscription (rewritten once a second).
    summaries: results::Summaries,
}

/// A results write, finished.
struct Written {
    steps: Vec<Step>,
    outcome: Result<results::Disabled, storage::Error>,
    now: DateTime<Utc>,
}

impl Scheduler {
    pub fn new(
        store: Store,
        settings: Settings,
        commands: mpsc::Receiver<Command>,
        registry: Registry,
        records: broadcast::Sender<AttemptRecord>,
        metrics: Metrics,
        changes: changes::Announcer,
    ) -> Self {
        use rand::SeedableRng;
        let (written_tx, written_rx) = mpsc::unbounded_channel();
        let model = Model::new(model::Limits {
            lease_grace: settings.lease_grace,
            region_fallback: settings.region_fallback,
            silence_limit: settings.silence_limit,
            expiries_in_a_row: EXPIRIES_IN_A_ROW,
            foreign_results_allowed: FOREIGN_RESULTS_ALLOWED,
            max_queued: MAX_QUEUED,
            max_queued_per_subscription: MAX_QUEUED_PER_SUBSCRIPTION,
        });
        Self {
            store,
            settings,
            commands,
            registry,
            records,
            metrics,
            rng: rand::rngs::StdRng::from_os_rng(),
            changes,
            model,
            subscriptions: HashMap::new(),
            subscriptions_read_at: Instant::now(),
            sessions: HashMap::new(),
            bodies: HashMap::new(),
            carried_bytes: 0,
            next_poll: Instant::now(),
            retry_wakeups: std::collections::BinaryHeap::new(),
            drains: Vec::new(),
            draining: false,
            pending_results: Vec::new(),
            timed_out: Vec::new(),
            writing: false,
            unwritten: Vec::new(),
            rewrite_at: None,
            written_tx,
            written_rx,
            summaries: results::Summaries::default(),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut rate_tick = tokio::time::interval(Duration::from_millis(100));
        rate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .model
                .next_deadline()
                .map(Instant::from_std)
                .map_or(self.next_poll, |at| at.min(self.next_poll));
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
                }
                Some(written) = self.written_rx.recv() => self.written(written),
                _ = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= self.next_poll {
                        self.poll().await;
                    }
                }
                _ = rate_tick.tick(), if self.model.queued() > 0 => {}
            }
            self.expire();
            self.flush_results().await;
            self.assign().await;
            self.finish_drains();
            self.metrics
                .leases_in_flight
                .set(self.model.leased() as i64);
            self.metrics
                .deliveries_pending
                .set(self.model.queued() as i64);
        }
        // Results already received are recorded before the replica goes.
        self.settle_results().await;
        for (_, done) in self.drains.drain(..) {
            let _ = done.send(());
        }
    }

    async fn handle(&mut self, command: Command) {
        let tick = Instant::now().into_std();
        match command {
            Command::Submit { deliveries, bodies } => {
                for delivery in deliveries {
                    let event_id = delivery.event_id.clone();
                    // When memory is full the delivery is left to the poller.
                    if self.model.enqueue(delivery)
                        && !self.bodies.contains_key(&event_id)
                        && let Some(body) = bodies.get(&event_id)
                        && self.carried_bytes + body.payload.len() <= MAX_CARRIED_BYTES
                    {
                        self.carried_bytes += body.payload.len();
                        self.bodies.insert(event_id, body.clone());
                    }
                }
            }
            Command::SubscriptionChanged(id) => {
                self.subscriptions.remove(&id);
            }
            Command::Wake => self.next_poll = Instant::now(),
            Command::AgentConnected { key, hello } => self.agent_connected(key, hello),
            Command::Credit { key, credits } => {
                self.model.grant(key, credits, tick);
                self.registry.update(key, |a| a.last_seen_at = Utc::now());
            }
            Command::Results {
                key,
                results,
                credits,
            } => {
                self.model.agent_heard(key, tick);
                // Recorded together with every other result taken in this turn.
                self.pending_results.push((key, results, credits));
            }
            Command::Heartbeat { key } => {
                self.model.agent_heard(key, tick);
                self.registry.update(key, |a| a.last_seen_at = Utc::now());
            }
            Command::AgentGone { key } => {
                // Its last results first: they arrived before the stream closed.
                self.settle_results().await;
                self.agent_gone(key).await
            }
            Command::RevokeCredential(id) => {
                self.settle_results().await;
                let revoked: Vec<AgentKey> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.credential_id.as_deref() == Some(id.as_str()))
                    .map(|(key, _)| *key)
                    .collect();
                for key in revoked {
                    if let Some(session) = self.sessions.get(&key) {
                        tracing::warn!(agent_id = %session.agent_id, credential_id = %id, "credential revoked; disconnecting the agent");
                        session.disconnect.cancel();
                    }
                    self.agent_gone(key).await;
                }
            }
            Command::Drain { deadline, done } => {
                self.draining = true;
                let keys: Vec<AgentKey> = self.sessions.keys().copied().collect();
                for key in keys {
                    self.model.drain_agent(key);
                    if let Some(session) = self.sessions.get(&key) {
                        session.drain();
                    }
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
        let idle = self.model.leased() == 0
            && !self.writing
            && self.pending_results.is_empty()
            && self.timed_out.is_empty()
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

    fn agent_connected(&mut self, key: AgentKey, hello: AgentHello) {
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
        self.model.agent_connected(
            key,
            &hello.region,
            hello.capacity,
            Instant::now().into_std(),
        );
        let session = Session {
            agent_id: hello.agent_id,
            region: hello.region,
            credential_id: hello.credential_id,
            disconnect: hello.disconnect,
            refuse: hello.refuse,
            outbox: hello.outbox,
            disconnecting: false,
        };
        if self.draining {
            // This replica is stopping: the agent goes on to the next control plane it knows.
            self.model.drain_agent(key);
            session.drain();
        }
        self.sessions.insert(key, session);
        // Work that waited for an agent of this region may go now.
        self.next_poll = Instant::now();
    }

    async fn agent_gone(&mut self, key: AgentKey) {
        let Some(session) = self.sessions.remove(&key) else {
            return;
        };
        self.metrics
            .agents_connected
            .get_or_create(&crate::metrics::Region {
                region: session.region.clone(),
            })
            .dec();
        self.registry.remove(key);
        let released = self.model.agent_gone(key, Instant::now().into_std());
        tracing::info!(agent_id = %session.agent_id, in_flight = released.len(), "agent disconnected");
        // Re-queued at once: the agent's results can no longer arrive on its closed stream.
        self.release(released).await;
    }

    /// Gives leases back in the database (one transaction) and queues their deliveries again;
    /// if that fails, their leases expire instead and the poller finds them then.
    async fn release(&mut self, released: Vec<Lease>) {
        if released.is_empty() {
            return;
        }
        let pairs: Vec<(String, String)> = released
            .iter()
            .map(|lease| (lease.delivery.id.clone(), lease.lease_id.clone()))
            .collect();
        match release(&self.store, &pairs).await {
            Ok(_) => {
                for lease in released {
                    let mut delivery = lease.delivery;
                    delivery.state = DeliveryState::Pending;
                    self.model.enqueue(delivery);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not re-queue released leases; they expire instead");
            }
        }
    }

    /// Ends the leases whose expiry has come (recorded as `TIMEOUT` attempts) and disconnects
    /// the agents the model gives up on.
    fn expire(&mut self) {
        let expired = self.model.expire(Instant::now().into_std());
        if !expired.leases.is_empty() {
            self.metrics
                .leases_expired
                .inc_by(expired.leases.len() as u64);
            self.timed_out.extend(expired.leases);
        }
        for (key, reason) in expired.disconnect {
            let Some(session) = self.sessions.get_mut(&key) else {
                continue;
            };
            if session.disconnecting {
                continue;
            }
            session.disconnecting = true;
            tracing::warn!(agent_id = %session.agent_id, reason = reason.as_str(), "disconnecting an unresponsive agent");
            self.metrics
                .agent_disconnects
                .get_or_create(&crate::metrics::Reason {
                    reason: reason.as_str(),
                })
                .inc();
            self.model.drain_agent(key);
            session.disconnect.cancel();
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
        self.model.tidy(tick.into_std());
        if tick.duration_since(self.subscriptions_read_at) >= SUBSCRIPTION_CACHE_TTL {
            self.subscriptions.clear();
            self.subscriptions_read_at = tick;
        }
        if let Err(err) = self.discover(now, tick).await {
            tracing::warn!(error = %err, "could not read due deliveries");
        }
    }

    /// Reads due work: deliveries under an expired lease, then each subscription's oldest due
    /// ones, as many as it has room for (none for a subscription that is saturated, deferred,
    /// rate-limited or waiting for a region). One statement for the subscriptions with waiting
    /// work, one per 64 of them for their deliveries.
    async fn discover(&mut self, now: DateTime<Utc>, tick: Instant) -> Result<(), storage::Error> {
        for delivery in
            deliveries::under_expired_lease(&self.store.db, now, EXPIRED_LEASES_PER_POLL).await?
        {
            self.model.enqueue(delivery);
        }
        let waiting = deliveries::subscriptions_with_waiting_work(&self.store.db).await?;
        self.load_subscriptions(&waiting).await?;
        let wanted: Vec<(String, u64)> = waiting
            .into_iter()
            .filter_map(|id| {
                let subscription = self.subscriptions.get(&id)?;
                let room = self.model.room_for(subscription, tick.into_std());
                (room > 0).then_some((id, room as u64))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        for delivery in deliveries::due_of(&self.store.db, now, &wanted).await? {
            self.model.enqueue(delivery);
        }
        Ok(())
    }

    /// Loads subscriptions missing from the cache. Deliveries left waiting by a subscription that
    /// no longer exists (deleted before deletes ended their work) are made `DEAD`.
    async fn load_subscriptions(&mut self, ids: &[String]) -> Result<(), storage::Error> {
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !self.subscriptions.contains_key(*id))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let found = subscriptions::get_many(&self.store.db, &self.store.sealer, &missing).await?;
        for subscription in found {
            self.subscriptions
                .insert(subscription.id.clone(), Arc::new(subscription));
        }
        for id in missing {
            if !self.subscriptions.contains_key(&id) {
                self.model.drop_subscription(&id);
                deliveries::kill_waiting(&self.store.writer, &id, Utc::now()).await?;
            }
        }
        Ok(())
    }

    /// Forgets the bodies no queued delivery needs any more.
    fn drop_unneeded_bodies(&mut self) {
        if self.bodies.is_empty() {
            return;
        }
        let needed = self.model.queued_event_ids();
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
        match self.load_subscriptions(&[id.to_owned()]).await {
            Ok(()) => self.subscriptions.get(id).cloned(),
            Err(err) => {
                tracing::warn!(error = %err, subscription_id = id, "could not read subscription");
                None
            }
        }
    }

    /// Picks queued deliveries for agents with credit (see [`Model::pick`]) and sends them.
    async fn assign(&mut self) {
        if self.model.queued() == 0 || !self.model.has_agents() {
            return;
        }
        let missing: Vec<String> = self
            .model
            .queued_subscriptions()
            .filter(|id| !self.subscriptions.contains_key(*id))
            .map(str::to_owned)
            .collect();
        if let Err(err) = self.load_subscriptions(&missing).await {
            tracing::warn!(error = %err, "could not read subscriptions");
            return;
        }
        let picks = self
            .model
            .pick(Instant::now().into_std(), &self.subscriptions);
        if !picks.is_empty() {
            self.dispatch(picks).await;
        }
    }

    async fn dispatch(&mut self, picks: model::Picks) {
        let now = Utc::now();
        let mut claims: Vec<deliveries::LeaseClaim> = Vec::with_capacity(picks.len());
        let mut batches = Vec::with_capacity(picks.len());
        for (key, batch) in picks {
            let Some(agent_id) = self.sessions.get(&key).map(|s| s.agent_id.clone()) else {
                for (delivery, _) in batch {
                    self.model.give_back(key, delivery, true);
                }
                continue;
            };
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
                lease_id: crate::domain::ids::new(crate::domain::ids::LEASE),
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
            .filter(|(delivery, _)| claimed.contains_key(&delivery.id))
            .map(|(delivery, _)| delivery.event_id.as_str());
        let payloads = match jobs::bodies(&self.store, &self.bodies, leased).await {
            Ok(payloads) => payloads,
            Err(err) => {
                tracing::warn!(error = %err, "could not read event payloads; leases will expire");
                EventBodies::new()
            }
        };
        let round = Round {
            claimed,
            deferred,
            payloads,
            now,
        };
        let mut unsent = Vec::new();
        for ((key, batch), claim) in batches.into_iter().zip(&claims) {
            unsent.extend(self.send_jobs(key, claim, batch, &round));
        }
        // A failed send gives its jobs back at once.
        self.release(unsent).await;
    }

    /// Sends one agent the signed jobs of the deliveries leased to it; gives the rest back.
    /// Returns the leases whose jobs could not be sent.
    fn send_jobs(
        &mut self,
        key: AgentKey,
        claim: &deliveries::LeaseClaim,
        batch: Vec<(Delivery, Arc<Subscription>)>,
        round: &Round,
    ) -> Vec<Lease> {
        let Round {
            claimed,
            deferred,
            payloads,
            now,
        } = round;
        let now = *now;
        let tick = Instant::now().into_std();
        let (agent_id, lease_id) = (claim.agent_id.as_str(), claim.lease_id.as_str());
        let mut jobs = Vec::with_capacity(batch.len());
        for (mut delivery, subscription) in batch {
            if deferred.contains(&delivery.id) {
                // Other replicas hold the subscription's every slot: it waits a moment.
                self.model
                    .defer(&delivery.subscription_id, tick + CLUSTER_FULL_BACKOFF);
                self.model.give_back(key, delivery, true);
                continue;
            }
            // Not leased: someone else holds it, it is no longer due, or (ordered) an earlier
            // event of its entity is unfinished. Or its payload could not be read (its lease
            // expires). The poller finds it again.
            let (Some(&attempt_count), Some(body)) =
                (claimed.get(&delivery.id), payloads.get(&delivery.event_id))
            else {
                self.model.give_back(key, delivery, false);
                continue;
            };
            // The row as leased: its attempt count is the truth, whoever attempted it before.
            delivery.attempt_count = attempt_count;
            delivery.state = DeliveryState::InFlight;
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
            jobs.push(jobs::build(
                &delivery,
                &subscription,
                &body.payload,
                job_traceparent.as_deref(),
                lease_id,
                attempt,
                now,
            ));
            self.model.lease(Lease {
                agent: key,
                lease_id: lease_id.to_owned(),
                expires_at: tick + self.model.lease_duration(&subscription),
                delivery,
                attempt,
            });
        }
        let in_flight = self.model.holding(key);
        self.registry.update(key, |a| a.in_flight = in_flight);
        let Some(session) = self.sessions.get(&key) else {
            return Vec::new();
        };
        let mut unsent = Vec::new();
        let mut failed = false;
        for message in jobs::messages(jobs) {
            let message = if failed {
                message
            } else {
                match session.outbox.try_send(message) {
                    Ok(()) => continue,
                    Err(refused) => refused.into_inner(),
                }
            };
            failed = true;
            if let Some(pb::control_message::Message::Jobs(lost)) = message.message {
                for job in lost.jobs {
                    unsent.extend(self.model.unsend(key, &job.delivery_id, &job.lease_id));
                }
            }
        }
        if failed {
            tracing::warn!(agent_id = %agent_id, jobs = unsent.len(), "agent outbox full or closed; jobs given back");
        }
        unsent
    }

    /// Takes the leases in one transaction (see [`deliveries::claim_leases`]).
    async fn claim(
        &self,
        claims: &[deliveries::LeaseClaim],
        now: DateTime<Utc>,
    ) -> Result<deliveries::Claimed, storage::Error> {
        let shared = self.store.shared();
        if deliveries::claim_is_one_statement(claims, shared) {
            // Most claims at everyday rates: one agent, a few deliveries. BEGIN and COMMIT
            // would be two more hand-offs to the database connection's thread.
            return deliveries::claim_leases(&self.store.writer, claims, now, shared).await;
        }
        let txn = self.store.begin_scheduler_write().await?;
        let claimed = deliveries::claim_leases(&txn, claims, now, shared).await?;
        txn.commit().await?;
        Ok(claimed)
    }

    /// Starts recording every result received since the last flush, and every lease that
    /// expired, in one transaction written in the background while this task goes on leasing
    /// and sending. One write at a time: results arriving meanwhile wait for the next one.
    async fn flush_results(&mut self) {
        let nothing = self.pending_results.is_empty()
            && self.timed_out.is_empty()
            && self.unwritten.is_empty();
        if nothing || self.writing {
            return;
        }
        if self.rewrite_at.is_some_and(|at| Instant::now() < at) {
            // The last write failed: the storage gets a moment before the next one.
            return;
        }
        self.rewrite_at = None;
        let now = Utc::now();
        let tick = Instant::now().into_std();
        let mut planned = std::mem::take(&mut self.unwritten);
        for (key, results, credits) in std::mem::take(&mut self.pending_results) {
            let (agent_id, region) = self.agent_names(key);
            for result in results {
                let lease =
                    match self
                        .model
                        .end_lease(key, &result.delivery_id, &result.lease_id, tick)
                    {
                        model::Reported::Current(lease) => Some(*lease),
                        model::Reported::Late => None,
                        model::Reported::Foreign { close } => {
                            self.refuse_result(key, &result.delivery_id, close);
                            continue;
                        }
                    };
                let subscription = match &lease {
                    Some(lease) => self.subscription(&lease.delivery.subscription_id).await,
                    None => None,
                };
                planned.push(results::plan(
                    result,
                    lease,
                    subscription.as_deref(),
                    &agent_id,
                    &region,
                    &self.settings.retry_schedule,
                    now,
                    &mut self.rng,
                ));
            }
            // The agent has finished these jobs: its credits are back now. The subscriptions'
            // slots (and ordered entities) are freed once the results are recorded.
            self.model.grant(key, credits, tick);
            let in_flight = self.model.holding(key);
            self.registry.update(key, |a| {
                a.in_flight = in_flight;
                a.last_seen_at = now;
            });
        }
        for lease in std::mem::take(&mut self.timed_out) {
            let (agent_id, region) = self.agent_names(lease.agent);
            let subscription = self.subscription(&lease.delivery.subscription_id).await;
            planned.push(results::timed_out(
                lease,
                subscription.as_deref(),
                &agent_id,
                &region,
                &self.settings.retry_schedule,
                now,
                &mut self.rng,
            ));
        }
        self.writing = true;
        let store = self.store.clone();
        let replica_id = self.settings.replica_id.clone();
        let disable_after = self.settings.disable_after;
        let summaries = self.summaries.clone();
        let done = self.written_tx.clone();
        tokio::spawn(async move {
            let mut steps = planned;
            let outcome = results::write(
                &store,
                &replica_id,
                disable_after,
                &summaries,
                &mut steps,
                now,
            )
            .await;
            // The scheduler is gone only at shutdown; its leases expire then.
            let _ = done.send(Written {
                steps,
                outcome,
                now,
            });
        });
    }

    /// A result for a job this stream was never sent: nothing is recorded; after too many, the
    /// stream is closed with `PERMISSION_DENIED`.
    fn refuse_result(&mut self, key: AgentKey, delivery_id: &str, close: bool) {
        self.metrics.agent_results_rejected.inc();
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        tracing::warn!(agent_id = %session.agent_id, %delivery_id, "refused a result for a job this agent was not sent");
        if close && !session.disconnecting {
            session.disconnecting = true;
            self.metrics
                .agent_disconnects
                .get_or_create(&crate::metrics::Reason {
                    reason: "foreign_results",
                })
                .inc();
            self.model.drain_agent(key);
            session.refuse.cancel();
        }
    }

    fn agent_names(&self, key: AgentKey) -> (String, String) {
        self.sessions
            .get(&key)
            .map(|s| (s.agent_id.clone(), s.region.clone()))
            .unwrap_or_default()
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
        match outcome {
            Ok(disabled) => {
                for (id, kind) in disabled {
                    self.metrics
                        .subscriptions_disabled
                        .get_or_create(&crate::metrics::Reason { reason: kind })
                        .inc();
                    self.subscriptions.remove(&id);
                    // Endpoint health disabled it: the other replicas stop sending too.
                    let changes = self.changes.clone();
                    tokio::spawn(async move {
                        changes.announce(changes::Change::Subscription(id)).await;
                    });
                }
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
        }
        let next_regular_poll = Instant::now() + POLL_INTERVAL;
        for step in &steps {
            if let Some(lease) = &step.lease {
                self.model.recorded(&lease.delivery);
                if lease.delivery.ordering_key.is_some() {
                    // The entity's next event may go now.
                    self.next_poll = Instant::now();
                }
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
                // Only retries due before the next regular poll need a wake-up of their own.
                let at = Instant::now() + (at - now).to_std().unwrap_or_default();
                if at < next_regular_poll {
                    self.retry_wakeups.push(std::cmp::Reverse(at));
                    self.next_poll = self.next_poll.min(at);
                }
            }
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
            } else if !self.pending_results.is_empty()
                || !self.timed_out.is_empty()
                || (!retried && !self.unwritten.is_empty())
            {
                retried = true;
                self.rewrite_at = None;
                self.flush_results().await;
            } else {
                return;
            }
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

/// Makes leased deliveries pending again, in one transaction.
async fn release(store: &Store, leases: &[(String, String)]) -> Result<u64, storage::Error> {
    let txn = store.begin_scheduler_write().await?;
    let released = deliveries::release(&txn, leases, Utc::now()).await?;
    txn.commit().await?;
    Ok(released)
}
