//! Results: what one agent's result (or a lease's expiry) means for its delivery, and the
//! transaction that records a batch of them — each attempt always, each delivery's new state
//! only under a lease that is still its own, the subscriptions' last delivery and endpoint
//! health, and (PostgreSQL) a notification for the other replicas' watchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_proto::v1 as pb;
use sea_orm::ConnectionTrait;

use super::model::Lease;
use super::scheduler::AttemptRecord;
use super::watch;
use crate::domain::model::{
    Attempt, AttemptError, DeliveryState, LastDelivery, Subscription, SubscriptionStatus,
};
use crate::domain::{health, ids, retry};
use crate::storage::{self, Store, deliveries, subscriptions};

/// Decides what one result means (no IO): the attempt to record and, under a lease this replica
/// holds, the delivery's next state.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    result: pb::JobResult,
    lease: Option<Lease>,
    subscription: Option<&Subscription>,
    agent_id: &str,
    region: &str,
    retry_schedule: &[Duration],
    now: DateTime<Utc>,
    rng: &mut impl rand::Rng,
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
        let max_attempts = subscription.map_or(1, |s| s.max_attempts);
        (state, next_attempt_at) = retry::next_step(
            retry_schedule,
            max_attempts,
            lease.attempt,
            &outcome,
            now,
            rng,
        );
        subscription_disabled =
            subscription.is_some_and(|s| s.status == SubscriptionStatus::Disabled);
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
        at_expiry: false,
        applied: false,
        record: None,
    }
}

/// The step of a lease that ended at its expiry without a result: a `TIMEOUT` attempt that
/// counts toward `max_attempts`, planned as the result the agent never sent.
pub fn timed_out(
    lease: Lease,
    subscription: Option<&Subscription>,
    agent_id: &str,
    region: &str,
    retry_schedule: &[Duration],
    now: DateTime<Utc>,
    rng: &mut impl rand::Rng,
) -> Step {
    let result = pb::JobResult {
        delivery_id: lease.delivery.id.clone(),
        lease_id: lease.lease_id.clone(),
        error: AttemptError::Timeout as i32,
        error_message: format!("no result from agent {agent_id} within timeout + grace"),
        ..Default::default()
    };
    let mut step = plan(
        result,
        Some(lease),
        subscription,
        agent_id,
        region,
        retry_schedule,
        now,
        rng,
    );
    step.at_expiry = true;
    step
}

/// The subscriptions a results write disabled, each with its kind (`gone`, `failing`).
pub type Disabled = Vec<(String, &'static str)>;

/// Results that move their deliveries alike: state, next attempt, status, error, at expiry.
type CompletionKey = (i32, Option<i64>, u32, i32, bool);

/// Writes a batch of planned results in one transaction; returns the subscriptions it disabled.
/// How long a subscription's "last delivery" summary may lag when nothing in it but its time
/// changed: a steady stream of successes rewrites the row once a second, not once a result.
pub const SUMMARY_REFRESH: Duration = Duration::from_secs(1);
/// The most subscriptions whose last summary is remembered (then all are forgotten).
const SUMMARIES_KEPT: usize = 100_000;

/// A summary as written: (state, status code, when).
type Written = (DeliveryState, u32, std::time::Instant);

/// The last summary this replica wrote per subscription.
#[derive(Clone, Default)]
pub struct Summaries(Arc<Mutex<HashMap<String, Written>>>);

impl Summaries {
    /// Whether the summary `(state, status)` must be written at `now`: it differs from the last
    /// one written, or that one is [`SUMMARY_REFRESH`] old. Records it as written when so.
    pub fn due(
        &self,
        subscription_id: &str,
        state: DeliveryState,
        status: u32,
        now: std::time::Instant,
    ) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(s, c, at)) = last.get(subscription_id)
            && s == state
            && c == status
            && now.saturating_duration_since(at) < SUMMARY_REFRESH
        {
            return false;
        }
        if last.len() >= SUMMARIES_KEPT {
            last.clear();
        }
        last.insert(subscription_id.to_owned(), (state, status, now));
        true
    }

    /// Forgets a subscription's summary (its write did not commit, or it changed elsewhere).
    pub fn forget(&self, subscription_id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(subscription_id);
    }
}

pub async fn write(
    store: &Store,
    replica_id: &str,
    disable_after: Duration,
    summaries: &Summaries,
    steps: &mut [Step],
    now: DateTime<Utc>,
) -> Result<Disabled, storage::Error> {
    let tick = std::time::Instant::now();
    let mut summarized = Vec::new();
    let mut batch = Batch {
        replica_id,
        disable_after,
        summaries,
        summarized: &mut summarized,
        now,
        tick,
        shared: store.shared(),
    };
    let written: Result<Disabled, storage::Error> = async {
        // On SQLite the leases' moves in one hand-off, the rest and the COMMIT in another.
        let txn = store.begin_batched_write(true).await?;
        let disabled = batch.write_steps(&txn, steps).await?;
        txn.commit().await.map_err(|(err, _)| err)?;
        Ok(disabled)
    }
    .await;
    if written.is_err() {
        // What this write summarized is not in the database: the next write does it again.
        for id in &summarized {
            summaries.forget(id);
        }
    }
    written
}

/// One results write's settings and bookkeeping.
struct Batch<'a> {
    replica_id: &'a str,
    disable_after: Duration,
    summaries: &'a Summaries,
    /// Subscriptions whose summary this write rewrites.
    summarized: &'a mut Vec<String>,
    now: DateTime<Utc>,
    tick: std::time::Instant,
    shared: bool,
}

impl Batch<'_> {
    /// Writes the steps in `txn` (the caller commits); returns the subscriptions disabled.
    async fn write_steps(
        &mut self,
        txn: &impl ConnectionTrait,
        steps: &mut [Step],
    ) -> Result<Disabled, storage::Error> {
        let (replica_id, disable_after, summaries, now, tick) = (
            self.replica_id,
            self.disable_after,
            self.summaries,
            self.now,
            self.tick,
        );
        let summarized = &mut *self.summarized;
        // The newest applied step per subscription decides its summary and health; a 410
        // anywhere in the batch disables it.
        let mut per_subscription: HashMap<String, (usize, bool)> = HashMap::new();
        for step in steps.iter_mut() {
            step.reset();
        }
        // Results with the same outcome (most often: 200, succeeded) move their deliveries in
        // one statement each; a lease that is no longer valid is simply not among those moved.
        let mut groups: HashMap<CompletionKey, Vec<usize>> = HashMap::new();
        for (index, step) in steps.iter().enumerate() {
            if step.lease.is_some() {
                let key = (
                    step.state as i32,
                    step.next_attempt_at.map(|at| at.timestamp_millis()),
                    step.attempt.status_code,
                    step.attempt.error as i32,
                    step.at_expiry,
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
                    at_expiry: first.at_expiry,
                };
                let moved: std::collections::HashSet<String> =
                    deliveries::complete_many(txn, &leases, &outcome, now)
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
                None => match deliveries::get_any(txn, &step.attempt.delivery_id).await? {
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
        deliveries::insert_attempts(txn, &attempts).await?;
        let mut disabled = Vec::new();
        for (subscription_id, (index, _)) in per_subscription {
            let step = &steps[index];
            if step.outcome == retry::Outcome::Delivered {
                // Successes in a row change only the summary's time: written once a second.
                if summaries.due(&subscription_id, step.state, step.attempt.status_code, tick) {
                    summarized.push(subscription_id.clone());
                    let last = LastDelivery {
                        state: step.state,
                        status_code: step.attempt.status_code,
                        at: now,
                    };
                    subscriptions::record_last_delivery(txn, &subscription_id, &last).await?;
                }
                continue;
            }
            // Anything else is written every time (and the next success is too).
            summaries.forget(&subscription_id);
            let last = LastDelivery {
                state: step.state,
                status_code: step.attempt.status_code,
                at: now,
            };
            subscriptions::record_last_delivery(txn, &subscription_id, &last).await?;
            if step.subscription_disabled {
                continue;
            }
            let failing_since = subscriptions::failing_since(txn, &subscription_id).await?;
            if let Some(health::Disable { kind, reason }) = health::disable_reason(
                &step.outcome,
                step.attempt.status_code,
                failing_since,
                disable_after,
                now,
            ) {
                subscriptions::set_status(
                    txn,
                    &subscription_id,
                    SubscriptionStatus::Disabled,
                    Some(&reason),
                    now,
                )
                .await?;
                // Waiting deliveries, the ones just made FAILED included, go DEAD (replayable).
                deliveries::kill_waiting(txn, &subscription_id, now).await?;
                tracing::warn!(%subscription_id, %reason, "subscription disabled");
                disabled.push((subscription_id, kind));
            }
        }
        for step in steps.iter_mut() {
            let killed = step.state == DeliveryState::Failed
                && step
                    .record
                    .as_ref()
                    .is_some_and(|r| disabled.iter().any(|(id, _)| *id == r.subscription_id));
            if killed {
                step.state = DeliveryState::Dead;
                step.next_attempt_at = None;
                if let Some(record) = &mut step.record {
                    record.state = DeliveryState::Dead;
                }
            }
        }
        if self.shared {
            // Watchers on the other replicas hear of these attempts once they are committed.
            let recorded: Vec<(String, DeliveryState)> = steps
                .iter()
                .filter_map(|s| s.record.as_ref())
                .map(|r| (r.attempt.id.clone(), r.state))
                .collect();
            for payload in watch::encode(replica_id, &recorded) {
                storage::notify(txn, watch::CHANNEL, &payload).await?;
            }
        }
        Ok(disabled)
    }
}

/// One result on its way to storage.
pub struct Step {
    /// The state, next attempt and error planned from the result, before a write changed them
    /// (a write that failed is done again from these).
    planned: (DeliveryState, Option<DateTime<Utc>>, AttemptError),
    pub lease: Option<Lease>,
    pub outcome: retry::Outcome,
    pub attempt: Attempt,
    pub state: DeliveryState,
    pub next_attempt_at: Option<DateTime<Utc>>,
    subscription_disabled: bool,
    /// No result came: the lease ended at its expiry (a `TIMEOUT`).
    at_expiry: bool,
    /// Whether the result moved its delivery (its lease was still valid).
    pub applied: bool,
    pub record: Option<AttemptRecord>,
}

impl Step {
    /// Back to the step as planned, for another write.
    fn reset(&mut self) {
        (self.state, self.next_attempt_at, self.attempt.error) = self.planned;
        self.applied = false;
        self.record = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_is_rewritten_when_it_changes_or_once_a_second() {
        let summaries = Summaries::default();
        let t0 = std::time::Instant::now();
        let ok = DeliveryState::Succeeded;
        assert!(summaries.due("sub_a", ok, 200, t0), "the first one");
        assert!(!summaries.due("sub_a", ok, 200, t0 + Duration::from_millis(999)));
        assert!(summaries.due("sub_b", ok, 200, t0), "per subscription");
        assert!(summaries.due("sub_a", ok, 204, t0), "another status");
        assert!(
            summaries.due("sub_a", ok, 204, t0 + SUMMARY_REFRESH),
            "a second later"
        );
        summaries.forget("sub_a");
        assert!(
            summaries.due("sub_a", ok, 204, t0 + SUMMARY_REFRESH),
            "forgotten"
        );
    }
}
