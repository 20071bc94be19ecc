//! The scheduling model: every decision of dispatch, as plain state that takes the time as an
//! argument and does no IO. It owns the queues (per tenant, per subscription and, for ordered
//! subscriptions, per entity), the agents' credits (never above what an agent granted in its
//! hello), the leases in memory with their expiry, the subscriptions' slots and rate buckets,
//! region choice and fair shares. The scheduler actor (`scheduler.rs`) feeds it what happened
//! (a delivery due, an agent's hello, credits, a result, the time) and carries out what it
//! returns (claims, jobs, attempts to record, agents to disconnect).
//!
//! Invariants (unit- and property-tested below):
//! - a delivery is queued or leased at most once (`known`);
//! - an agent never holds more leases plus credits than the capacity of its hello;
//! - every lease ends: by its result, by its expiry (`expire`), or with its agent (`agent_gone`);
//! - a subscription never has more than `max_concurrency` deliveries picked or leased here; it
//!   takes more than its fair share of its region's agent capacity only out of credits that no
//!   subscription within its share could use in the same pick, and never an agent's reserve
//!   (an eighth of its capacity, kept for work that arrives next);
//! - an ordered subscription's entity has at most one delivery picked or leased, and one whose
//!   lease was released waits until that lease would have expired;
//! - every tenant with queued work is visited in each round (round-robin).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::RegionFallback;
use crate::domain::model::{Delivery, Subscription, SubscriptionStatus};

/// An agent's connection, as the scheduler numbers them.
pub type AgentKey = u64;

/// The model's settings.
#[derive(Debug, Clone)]
pub struct Limits {
    pub lease_grace: Duration,
    pub region_fallback: RegionFallback,
    /// An agent silent this long (no heartbeat, credit or result) is disconnected.
    pub silence_limit: Duration,
    /// An agent whose leases expire this many times in a row, with no result in between, is
    /// disconnected.
    pub expiries_in_a_row: u32,
    /// Results for jobs an agent was never sent after which its stream is closed.
    pub foreign_results_allowed: u32,
    /// Most deliveries queued in memory, and per subscription; beyond, the poller finds them.
    pub max_queued: usize,
    pub max_queued_per_subscription: usize,
}

/// Why the model asks for an agent to be disconnected (`herald_agent_disconnects_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Its leases expired `expiries_in_a_row` times with no result in between.
    LeasesExpired,
    /// Nothing heard from it for `silence_limit`.
    Silent,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LeasesExpired => "leases_expired",
            Self::Silent => "silent",
        }
    }
}

/// What a result an agent reported is, for this model.
#[derive(Debug)]
pub enum Reported {
    /// The result of a lease this agent holds: it ends now.
    Current(Box<Lease>),
    /// The late result of a lease sent on this stream that expired meanwhile: recorded as
    /// `LEASE_EXPIRED`, it changes nothing.
    Late,
    /// A (delivery, lease) pair never sent on this stream, or reported already: refused.
    /// `close`: the agent has now reported too many of them.
    Foreign { close: bool },
}

/// A delivery leased to an agent.
#[derive(Debug, Clone)]
pub struct Lease {
    pub agent: AgentKey,
    pub lease_id: String,
    pub delivery: Delivery,
    /// The attempt number this lease makes (attempts before + 1).
    pub attempt: u32,
    pub expires_at: Instant,
}

/// The credits of an agent that work beyond its subscription's fair share may not take: an
/// eighth of its capacity (at least one), so work that arrives next starts at once.
fn reserve_of(capacity: u32) -> u32 {
    (capacity / 8).max(1)
}

#[derive(Debug)]
struct AgentSlot {
    region: String,
    capacity: u32,
    credits: u32,
    /// Leases held, plus deliveries picked for it and not yet leased or given back.
    holding: u32,
    draining: bool,
    last_heard: Instant,
    expired_in_a_row: u32,
    /// Leases sent on this stream that expired: (delivery id, lease id). A late result of one
    /// is still this agent's to report; kept until the stream ends.
    expired: HashSet<(String, String)>,
    /// Results it reported for jobs it was never sent.
    foreign_results: u32,
}

#[derive(Debug, Default)]
struct Load {
    /// Picked or leased here, until the result is recorded (`max_concurrency`).
    in_flight: u32,
    /// Picked or leased here and not yet answered: what the subscription holds of the agents'
    /// credits (the fair share). A result being recorded no longer holds a credit.
    at_agents: u32,
    /// Until when other replicas hold every slot: no picks before then.
    full_until: Option<Instant>,
    tokens: f64,
    refilled_at: Option<Instant>,
}

/// One subscription's queued deliveries: deliveries without an entity (or of an unordered
/// subscription) in due order, and for an ordered subscription one queue per entity.
#[derive(Debug, Default)]
struct SubscriptionQueue {
    free: VecDeque<Delivery>,
    entities: HashMap<String, VecDeque<Delivery>>,
    /// Entities with queued work, in turn order (busy ones are skipped when picking).
    entity_turns: VecDeque<String>,
    len: usize,
    /// Whether the next take tries a free delivery first.
    free_next: bool,
}

impl SubscriptionQueue {
    fn push(&mut self, delivery: Delivery) {
        self.len += 1;
        match delivery.ordering_key.clone() {
            Some(key) => {
                let queue = self.entities.entry(key.clone()).or_default();
                if queue.is_empty() {
                    self.entity_turns.push_back(key);
                }
                queue.push_back(delivery);
            }
            None => self.free.push_back(delivery),
        }
    }

    /// Takes the next delivery whose entity `ready` allows: entity queues and free deliveries
    /// alternate, so a hot entity never holds back the rest, nor the rest the entities.
    fn take(&mut self, ready: impl Fn(&str) -> bool) -> Option<Delivery> {
        self.free_next = !self.free_next;
        if self.free_next
            && let Some(delivery) = self.free.pop_front()
        {
            self.len -= 1;
            return Some(delivery);
        }
        for _ in 0..self.entity_turns.len() {
            let Some(key) = self.entity_turns.pop_front() else {
                break;
            };
            if !ready(&key) {
                self.entity_turns.push_back(key);
                continue;
            }
            let Some(queue) = self.entities.get_mut(&key) else {
                continue;
            };
            let delivery = queue.pop_front();
            if queue.is_empty() {
                self.entities.remove(&key);
            } else {
                self.entity_turns.push_back(key);
            }
            if delivery.is_some() {
                self.len -= 1;
                return delivery;
            }
        }
        let delivery = self.free.pop_front();
        if delivery.is_some() {
            self.len -= 1;
        }
        delivery
    }

    fn drain(&mut self) -> Vec<Delivery> {
        self.len = 0;
        self.entity_turns.clear();
        let mut all: Vec<Delivery> = self.free.drain(..).collect();
        for (_, queue) in self.entities.drain() {
            all.extend(queue);
        }
        all
    }
}

/// The deliveries one round picked, per agent, with their subscriptions.
pub type Picks = HashMap<AgentKey, Vec<(Delivery, Arc<Subscription>)>>;

/// What [`Model::expire`] ended.
#[derive(Debug, Default)]
pub struct Expired {
    /// Leases without a result by their expiry: each is recorded as a `TIMEOUT` attempt.
    pub leases: Vec<Lease>,
    /// Agents to disconnect.
    pub disconnect: Vec<(AgentKey, DisconnectReason)>,
}

/// The scheduling state of one replica.
#[derive(Debug)]
pub struct Model {
    limits: Limits,
    agents: HashMap<AgentKey, AgentSlot>,
    leases: HashMap<String, Lease>,
    /// Lease expiries in time order: (expires at, delivery id).
    expiries: BTreeSet<(Instant, String)>,
    /// Deliveries queued or leased here.
    known: HashSet<String>,
    queues: HashMap<String, SubscriptionQueue>,
    queued: usize,
    /// Tenants with queued work, in turn order, each with its subscriptions in turn.
    tenants: VecDeque<String>,
    tenant_subscriptions: HashMap<String, VecDeque<String>>,
    load: HashMap<String, Load>,
    /// Entities of ordered subscriptions that may not go now: in flight (`None`) or waiting
    /// until a released lease would have expired (`Some`).
    busy_entities: HashMap<(String, String), Option<Instant>>,
}

impl Model {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            agents: HashMap::new(),
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            known: HashSet::new(),
            queues: HashMap::new(),
            queued: 0,
            tenants: VecDeque::new(),
            tenant_subscriptions: HashMap::new(),
            load: HashMap::new(),
            busy_entities: HashMap::new(),
        }
    }

    // --- agents -------------------------------------------------------------------------------

    /// An agent said hello: its capacity is its first credit grant.
    pub fn agent_connected(&mut self, key: AgentKey, region: &str, capacity: u32, now: Instant) {
        self.agents.insert(
            key,
            AgentSlot {
                region: region.to_owned(),
                capacity,
                credits: capacity,
                holding: 0,
                draining: false,
                last_heard: now,
                expired_in_a_row: 0,
                expired: HashSet::new(),
                foreign_results: 0,
            },
        );
    }

    /// Anything heard from an agent (a heartbeat, credits, results) shows it is alive.
    pub fn agent_heard(&mut self, key: AgentKey, now: Instant) {
        if let Some(agent) = self.agents.get_mut(&key) {
            agent.last_heard = now;
        }
    }

    /// Credits handed back, never beyond the capacity of the agent's hello.
    pub fn grant(&mut self, key: AgentKey, credits: u32, now: Instant) {
        if let Some(agent) = self.agents.get_mut(&key) {
            let room = agent.capacity.saturating_sub(agent.holding);
            agent.credits = agent.credits.saturating_add(credits).min(room);
            agent.last_heard = now;
        }
    }

    /// The agent takes nothing new.
    pub fn drain_agent(&mut self, key: AgentKey) {
        if let Some(agent) = self.agents.get_mut(&key) {
            agent.draining = true;
        }
    }

    /// The agent's stream closed: its leases end now. Returns them (their deliveries go back to
    /// pending in the database). Deliveries of ordered subscriptions wait until the lease would
    /// have expired (the old request may still reach the receiver); the others are queued again.
    pub fn agent_gone(&mut self, key: AgentKey, now: Instant) -> Vec<Lease> {
        if self.agents.remove(&key).is_none() {
            return Vec::new();
        }
        let held: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.agent == key)
            .map(|(id, _)| id.clone())
            .collect();
        let mut released = Vec::with_capacity(held.len());
        for id in held {
            let Some(lease) = self.remove_lease(&id) else {
                continue;
            };
            self.unload(
                &lease.delivery,
                Some(lease.expires_at).filter(|at| *at > now),
            );
            self.known.remove(&lease.delivery.id);
            released.push(lease);
        }
        released
    }

    pub fn agent_ids(&self) -> impl Iterator<Item = AgentKey> + '_ {
        self.agents.keys().copied()
    }

    pub fn has_agents(&self) -> bool {
        !self.agents.is_empty()
    }

    /// Jobs an agent holds (leased, or picked for it and being leased).
    pub fn holding(&self, key: AgentKey) -> u32 {
        self.agents.get(&key).map_or(0, |a| a.holding)
    }

    // --- work ---------------------------------------------------------------------------------

    /// Queues a due delivery; false if it is already queued or leased here, or memory is full
    /// (the poller finds it later).
    pub fn enqueue(&mut self, delivery: Delivery) -> bool {
        if self.known.contains(&delivery.id) || self.queued >= self.limits.max_queued {
            return false;
        }
        let queue = self
            .queues
            .entry(delivery.subscription_id.clone())
            .or_default();
        if queue.len >= self.limits.max_queued_per_subscription {
            return false;
        }
        let first = queue.len == 0;
        let (tenant, subscription) = (delivery.tenant_id.clone(), delivery.subscription_id.clone());
        self.known.insert(delivery.id.clone());
        queue.push(delivery);
        self.queued += 1;
        if first {
            let subs = self.tenant_subscriptions.entry(tenant.clone()).or_default();
            if subs.is_empty() {
                self.tenants.push_back(tenant);
            }
            if !subs.contains(&subscription) {
                subs.push_back(subscription);
            }
        }
        true
    }

    /// Whether a delivery is queued or leased here.
    pub fn knows(&self, delivery_id: &str) -> bool {
        self.known.contains(delivery_id)
    }

    /// How many of this subscription's oldest due deliveries the poller should read (the ones
    /// queued here already among them): 0 while it has no use for more (saturated, deferred,
    /// disabled, no agent for its region, or its queue is full).
    pub fn room_for(&self, subscription: &Subscription, now: Instant) -> usize {
        let queued = self.queues.get(&subscription.id).map_or(0, |q| q.len);
        let load = self.load.get(&subscription.id);
        if load.is_some_and(|l| l.full_until.is_some_and(|until| until > now)) {
            return 0;
        }
        if subscription.status == SubscriptionStatus::Disabled || !self.can_serve(subscription) {
            return 0;
        }
        let in_flight = load.map_or(0, |l| l.in_flight) as usize;
        let wanted = (subscription.max_concurrency as usize)
            .saturating_mul(2)
            .clamp(16, self.limits.max_queued_per_subscription);
        if queued + in_flight >= wanted || self.queued >= self.limits.max_queued {
            return 0;
        }
        // The oldest due rows are the ones queued here already: read past them.
        wanted - in_flight
    }

    /// Whether any agent could take this subscription's jobs now (its region, or any with
    /// `HERALD_REGION_FALLBACK=any` while its region has none).
    pub fn can_serve(&self, subscription: &Subscription) -> bool {
        self.eligible_agents(subscription.region.as_deref())
            .next()
            .is_some()
    }

    /// Drops a subscription's queue (deleted, disabled): its deliveries are forgotten here;
    /// their rows say what becomes of them.
    pub fn drop_subscription(&mut self, subscription_id: &str) -> usize {
        let Some(mut queue) = self.queues.remove(subscription_id) else {
            return 0;
        };
        let dropped = queue.drain();
        self.queued -= dropped.len();
        for delivery in &dropped {
            self.known.remove(&delivery.id);
        }
        dropped.len()
    }

    /// The events whose bodies queued deliveries still need.
    pub fn queued_event_ids(&self) -> HashSet<&str> {
        self.queues
            .values()
            .flat_map(|q| q.free.iter().chain(q.entities.values().flatten()))
            .map(|d| d.event_id.as_str())
            .collect()
    }

    /// Subscriptions with queued deliveries.
    pub fn queued_subscriptions(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn leased(&self) -> usize {
        self.leases.len()
    }

    /// Other replicas hold every slot of the subscription: no picks until `until`.
    pub fn defer(&mut self, subscription_id: &str, until: Instant) {
        self.load
            .entry(subscription_id.to_owned())
            .or_default()
            .full_until = Some(until);
    }

    // --- picking ------------------------------------------------------------------------------

    /// Picks queued deliveries for agents with credit: round-robin over tenants, then over each
    /// tenant's subscriptions, one delivery per visit, within each subscription's limits and
    /// fair share. `subscriptions` must hold every queued subscription that still exists.
    /// Picked deliveries take a credit, a slot and their entity until [`Model::lease`] or
    /// [`Model::give_back`].
    pub fn pick(
        &mut self,
        now: Instant,
        subscriptions: &HashMap<String, Arc<Subscription>>,
    ) -> Picks {
        let mut picks: Picks = HashMap::new();
        let shares = self.fair_shares(subscriptions);
        self.pick_round(now, subscriptions, Some(&shares), &mut picks);
        // Work-conserving: the credits nobody within their fair share could use go, turn by
        // turn, to subscriptions with more work than their share, all but a reserve per agent
        // kept for work that arrives next. Without this, hundreds of subscriptions with a
        // little work each would hold a busy one to a credit or two while most sat idle.
        let spare = self
            .agents
            .values()
            .any(|agent| agent.credits > reserve_of(agent.capacity));
        if spare && !self.tenants.is_empty() {
            self.pick_round(now, subscriptions, None, &mut picks);
        }
        picks
    }

    /// One round of [`Model::pick`]: within the fair `shares`, or (`None`) beyond them out of
    /// the credits above each agent's reserve.
    fn pick_round(
        &mut self,
        now: Instant,
        subscriptions: &HashMap<String, Arc<Subscription>>,
        shares: Option<&HashMap<Option<&str>, u32>>,
        picks: &mut Picks,
    ) {
        // A round ends when every queued subscription was visited since the last pick: tenants
        // take turns and each tenant's subscriptions take turns, so that is at most
        // tenants × the most subscriptions of one tenant visits.
        let most = self
            .tenant_subscriptions
            .values()
            .map(VecDeque::len)
            .max()
            .unwrap_or(0);
        let full_turn = self.tenants.len() * most;
        let mut idle = 0;
        while !self.tenants.is_empty() && idle < full_turn {
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
            let picked = match subscriptions.get(&subscription_id) {
                Some(subscription) => {
                    let share = shares.map_or(u32::MAX, |shares| {
                        shares
                            .get(&subscription.region.as_deref())
                            .copied()
                            .unwrap_or(u32::MAX)
                    });
                    self.pick_from(subscription, share, shares.is_none(), now, picks)
                }
                None => false,
            };
            let left = self.queues.get(&subscription_id).is_some_and(|q| q.len > 0);
            if !left {
                self.queues.remove(&subscription_id);
            }
            let subs = self.tenant_subscriptions.entry(tenant.clone()).or_default();
            if left {
                subs.push_back(subscription_id);
            }
            if subs.is_empty() {
                self.tenant_subscriptions.remove(&tenant);
            } else {
                self.tenants.push_back(tenant);
            }
            idle = if picked { 0 } else { idle + 1 };
        }
    }

    /// The fair share of each region's agent capacity (by the subscriptions' region, `None`: any
    /// agent): max(1, capacity ÷ subscriptions with work there), work being queued or at an
    /// agent. Rounded down: the credits left over are what a subscription whose work arrives
    /// next starts with, while the others hold theirs.
    fn fair_shares<'a>(
        &self,
        subscriptions: &'a HashMap<String, Arc<Subscription>>,
    ) -> HashMap<Option<&'a str>, u32> {
        let mut contenders: HashMap<Option<&'a str>, u32> = HashMap::new();
        let at_agents = self
            .load
            .iter()
            .filter(|(id, l)| l.at_agents > 0 && !self.queues.contains_key(*id))
            .map(|(id, _)| id);
        for id in self.queues.keys().chain(at_agents) {
            if let Some(subscription) = subscriptions.get(id) {
                *contenders
                    .entry(subscription.region.as_deref())
                    .or_default() += 1;
            }
        }
        contenders
            .into_iter()
            .map(|(region, competing)| {
                let capacity: u32 = self
                    .eligible_agents(region)
                    .map(|(_, agent)| agent.capacity)
                    .sum();
                (region, (capacity / competing.max(1)).max(1))
            })
            .collect()
    }

    /// Takes the next eligible delivery of one subscription; returns whether it took one.
    fn pick_from(
        &mut self,
        subscription: &Arc<Subscription>,
        share: u32,
        beyond_share: bool,
        now: Instant,
        picks: &mut Picks,
    ) -> bool {
        let id = subscription.id.as_str();
        if subscription.status == SubscriptionStatus::Disabled {
            self.drop_subscription(id);
            return false;
        }
        let load = self.load.get(id);
        let (in_flight, at_agents) = load.map_or((0, 0), |l| (l.in_flight, l.at_agents));
        if in_flight >= subscription.max_concurrency
            || at_agents >= share
            || load.is_some_and(|l| l.full_until.is_some_and(|until| until > now))
        {
            return false;
        }
        let reserve = |agent: &AgentSlot| {
            if beyond_share {
                reserve_of(agent.capacity)
            } else {
                0
            }
        };
        let Some(agent_key) = self.agent_for(subscription.region.as_deref(), reserve) else {
            return false;
        };
        // A quick look before taking a rate token: is there anything to take?
        let Some(queue) = self.queues.get(id) else {
            return false;
        };
        let any_ready = !queue.free.is_empty()
            || queue
                .entity_turns
                .iter()
                .any(|key| entity_ready(&self.busy_entities, id, key, now));
        if !any_ready || !self.take_rate_token(subscription, now) {
            return false;
        }
        let busy = &self.busy_entities;
        let ready = |key: &str| entity_ready(busy, id, key, now);
        let Some(delivery) = self.queues.get_mut(id).and_then(|q| q.take(ready)) else {
            return false;
        };
        self.queued -= 1;
        if let Some(key) = &delivery.ordering_key {
            self.busy_entities
                .insert((id.to_owned(), key.clone()), None);
        }
        let load = self.load.entry(id.to_owned()).or_default();
        load.in_flight += 1;
        load.at_agents += 1;
        if let Some(agent) = self.agents.get_mut(&agent_key) {
            agent.credits -= 1;
            agent.holding += 1;
        }
        picks
            .entry(agent_key)
            .or_default()
            .push((delivery, subscription.clone()));
        true
    }

    fn eligible_agents<'a>(
        &'a self,
        region: Option<&'a str>,
    ) -> impl Iterator<Item = (AgentKey, &'a AgentSlot)> + 'a {
        let in_region = move |agent: &AgentSlot| region.is_none_or(|r| agent.region == r);
        let region_has_agents = self.agents.values().any(|a| !a.draining && in_region(a));
        let any = region.is_some()
            && !region_has_agents
            && self.limits.region_fallback == RegionFallback::Any;
        self.agents
            .iter()
            .filter(move |(_, a)| !a.draining && (any || in_region(a)))
            .map(|(key, a)| (*key, a))
    }

    /// The agent that should take a job of `region` (None = any): the eligible one with the
    /// most credits.
    /// The agent with the most credits above `reserve` for a subscription of `region`.
    fn agent_for(
        &self,
        region: Option<&str>,
        reserve: impl Fn(&AgentSlot) -> u32,
    ) -> Option<AgentKey> {
        self.eligible_agents(region)
            .filter(|(_, a)| a.credits > reserve(a))
            .max_by_key(|(key, a)| (a.credits, std::cmp::Reverse(*key)))
            .map(|(key, _)| key)
    }

    fn take_rate_token(&mut self, subscription: &Subscription, now: Instant) -> bool {
        if subscription.rate_limit_per_s == 0 {
            return true;
        }
        let rate = f64::from(subscription.rate_limit_per_s);
        let load = self.load.entry(subscription.id.clone()).or_default();
        let elapsed = load
            .refilled_at
            .map_or(1.0, |at| now.saturating_duration_since(at).as_secs_f64());
        load.tokens = (load.tokens + elapsed * rate).min(rate);
        load.refilled_at = Some(now);
        if load.tokens >= 1.0 {
            load.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    // --- leases -------------------------------------------------------------------------------

    /// A picked delivery was leased in the database: it is sent now and its lease expires at
    /// `expires_at` unless a result comes first.
    pub fn lease(&mut self, lease: Lease) {
        self.expiries
            .insert((lease.expires_at, lease.delivery.id.clone()));
        self.leases.insert(lease.delivery.id.clone(), lease);
    }

    /// A picked delivery was not leased (another replica holds it, it is no longer due, its
    /// payload could not be read, or its subscription is full cluster-wide): the agent's credit
    /// and the slot come back. `requeue` queues it again; otherwise it is forgotten and the
    /// poller finds it when it is due.
    pub fn give_back(&mut self, agent: AgentKey, delivery: Delivery, requeue: bool) {
        if let Some(slot) = self.agents.get_mut(&agent) {
            slot.credits += 1;
            slot.holding = slot.holding.saturating_sub(1);
        }
        if let Some(load) = self.load.get_mut(&delivery.subscription_id) {
            load.at_agents = load.at_agents.saturating_sub(1);
        }
        self.unload(&delivery, None);
        self.known.remove(&delivery.id);
        if requeue {
            self.enqueue(delivery);
        }
    }

    /// A job that never reached its agent (its outbox is full or closed): the lease ends now,
    /// its credit and slot come back. Returns the lease, to release in the database.
    pub fn unsend(&mut self, agent: AgentKey, delivery_id: &str, lease_id: &str) -> Option<Lease> {
        if self.leases.get(delivery_id)?.lease_id != lease_id {
            return None;
        }
        let lease = self.remove_lease(delivery_id)?;
        if let Some(slot) = self.agents.get_mut(&agent) {
            slot.credits = (slot.credits + 1).min(slot.capacity.saturating_sub(slot.holding));
        }
        self.unload(&lease.delivery, None);
        self.known.remove(delivery_id);
        Some(lease)
    }

    /// A result arrived on `agent`'s stream: only a (delivery, lease) pair sent on this same
    /// stream counts — an agent id proves nothing and lease ids can be guessed. A current lease
    /// ends now; its slot and entity stay taken until [`Model::recorded`].
    pub fn end_lease(
        &mut self,
        agent: AgentKey,
        delivery_id: &str,
        lease_id: &str,
        now: Instant,
    ) -> Reported {
        let current = self
            .leases
            .get(delivery_id)
            .is_some_and(|lease| lease.lease_id == lease_id && lease.agent == agent);
        let Some(slot) = self.agents.get_mut(&agent) else {
            return Reported::Foreign { close: false };
        };
        let late = !current
            && slot
                .expired
                .remove(&(delivery_id.to_owned(), lease_id.to_owned()));
        if !current && !late {
            slot.foreign_results += 1;
            return Reported::Foreign {
                close: slot.foreign_results == self.limits.foreign_results_allowed,
            };
        }
        slot.expired_in_a_row = 0;
        slot.last_heard = now;
        if late {
            return Reported::Late;
        }
        match self.remove_lease(delivery_id) {
            Some(lease) => Reported::Current(Box::new(lease)),
            None => Reported::Foreign { close: false },
        }
    }

    /// The outcome of a lease is in the database: its slot and entity are free.
    pub fn recorded(&mut self, delivery: &Delivery) {
        self.unload(delivery, None);
        self.known.remove(&delivery.id);
    }

    /// Ends every lease whose expiry has come, and names the agents to disconnect.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut expired = Expired::default();
        while let Some((at, id)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            let Some(lease) = self.remove_lease_only(&id) else {
                continue;
            };
            if let Some(agent) = self.agents.get_mut(&lease.agent) {
                // Its credit is not returned: the agent may still be working on it.
                agent
                    .expired
                    .insert((lease.delivery.id.clone(), lease.lease_id.clone()));
                agent.expired_in_a_row += 1;
                if agent.expired_in_a_row == self.limits.expiries_in_a_row {
                    expired
                        .disconnect
                        .push((lease.agent, DisconnectReason::LeasesExpired));
                }
            }
            expired.leases.push(lease);
        }
        for (key, agent) in &self.agents {
            let silent =
                now.saturating_duration_since(agent.last_heard) >= self.limits.silence_limit;
            if silent && !expired.disconnect.iter().any(|(k, _)| k == key) {
                expired.disconnect.push((*key, DisconnectReason::Silent));
            }
        }
        expired
    }

    /// When [`Model::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let lease = self.expiries.first().map(|(at, _)| *at);
        let silence = self
            .agents
            .values()
            .map(|a| a.last_heard + self.limits.silence_limit)
            .min();
        match (lease, silence) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The time a lease of `subscription` sent now lasts: its timeout plus the grace.
    pub fn lease_duration(&self, subscription: &Subscription) -> Duration {
        subscription.timeout + self.limits.lease_grace
    }

    /// Removes a lease (the agent's holding count and the expiry index too).
    fn remove_lease(&mut self, delivery_id: &str) -> Option<Lease> {
        let lease = self.remove_lease_only(delivery_id)?;
        self.expiries
            .remove(&(lease.expires_at, delivery_id.to_owned()));
        Some(lease)
    }

    fn remove_lease_only(&mut self, delivery_id: &str) -> Option<Lease> {
        let lease = self.leases.remove(delivery_id)?;
        if let Some(load) = self.load.get_mut(&lease.delivery.subscription_id) {
            load.at_agents = load.at_agents.saturating_sub(1);
        }
        if let Some(agent) = self.agents.get_mut(&lease.agent) {
            agent.holding = agent.holding.saturating_sub(1);
        }
        Some(lease)
    }

    /// Frees a delivery's slot and entity; `blocked_until` keeps the entity waiting.
    fn unload(&mut self, delivery: &Delivery, blocked_until: Option<Instant>) {
        if let Some(load) = self.load.get_mut(&delivery.subscription_id) {
            load.in_flight = load.in_flight.saturating_sub(1);
        }
        if let Some(key) = &delivery.ordering_key {
            let entity = (delivery.subscription_id.clone(), key.clone());
            match blocked_until {
                Some(until) => {
                    self.busy_entities.insert(entity, Some(until));
                }
                None => {
                    self.busy_entities.remove(&entity);
                }
            }
        }
    }

    /// Forgets what no longer matters: entities whose wait is over, loads of idle subscriptions.
    pub fn tidy(&mut self, now: Instant) {
        self.busy_entities
            .retain(|_, until| until.is_none_or(|at| at > now));
        self.load.retain(|id, load| {
            load.in_flight > 0
                || load.full_until.is_some_and(|until| until > now)
                || load
                    .refilled_at
                    .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(2))
                || self.queues.contains_key(id)
        });
    }
}

/// Whether an ordered subscription's entity may have a delivery picked now: none in flight, and
/// no released lease still running.
fn entity_ready(
    busy: &HashMap<(String, String), Option<Instant>>,
    subscription_id: &str,
    key: &str,
    now: Instant,
) -> bool {
    match busy.get(&(subscription_id.to_owned(), key.to_owned())) {
        None => true,
        Some(Some(until)) => *until <= now,
        Some(None) => false,
    }
}

#[cfg(test)]
mod tests;
