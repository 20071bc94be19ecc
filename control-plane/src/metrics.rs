//! The control plane's Prometheus metrics (names start with `herald_`), registered in the
//! process registry that `/metrics` serves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

pub use herald_agent::telemetry::{Metrics as Registry, StatusClass};

use crate::domain::model::DeliveryState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Region {
    pub region: String,
}

/// Every metric the control plane updates; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub events_published: Counter,
    pub deliveries: Family<Outcome, Counter>,
    pub attempts: Family<StatusClass, Counter>,
    pub attempt_duration: Histogram,
    pub delivery_lag: Histogram,
    pub deliveries_pending: Gauge,
    pub leases_in_flight: Gauge,
    pub agents_connected: Family<Region, Gauge>,
    pub publish_commits: Counter,
    pub leases_expired: Counter,
    pub agent_results_rejected: Counter,
    pub agent_disconnects: Family<Reason, Counter>,
}

impl Metrics {
    /// Creates the metrics in `registry`.
    pub fn register(registry: &Registry) -> Self {
        let metrics = Self {
            events_published: Counter::default(),
            deliveries: Family::default(),
            attempts: Family::default(),
            attempt_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            delivery_lag: Histogram::new(exponential_buckets(0.0005, 2.0, 20)),
            deliveries_pending: Gauge::default(),
            leases_in_flight: Gauge::default(),
            agents_connected: Family::default(),
            publish_commits: Counter::default(),
            leases_expired: Counter::default(),
            agent_results_rejected: Counter::default(),
            agent_disconnects: Family::default(),
        };
        registry.register(|r| {
            r.register(
                "events_published",
                "Events accepted by PublishEvent(s)",
                metrics.events_published.clone(),
            );
            r.register(
                "deliveries",
                "Attempts that moved a delivery, by the delivery's new state",
                metrics.deliveries.clone(),
            );
            r.register(
                "attempts",
                "Attempts recorded, by HTTP status class or error",
                metrics.attempts.clone(),
            );
            r.register(
                "attempt_duration_seconds",
                "Duration of attempts as the agents measured them",
                metrics.attempt_duration.clone(),
            );
            r.register(
                "delivery_lag_seconds",
                "Time from when a delivery was due to when it was sent",
                metrics.delivery_lag.clone(),
            );
            r.register(
                "deliveries_pending",
                "Deliveries due and waiting for an agent, as this replica sees them",
                metrics.deliveries_pending.clone(),
            );
            r.register(
                "leases_in_flight",
                "Deliveries leased to agents of this replica",
                metrics.leases_in_flight.clone(),
            );
            r.register(
                "agents_connected",
                "Agents connected to this replica, by region",
                metrics.agents_connected.clone(),
            );
            r.register(
                "publish_commits",
                "Transactions committed by the publish path (group commit)",
                metrics.publish_commits.clone(),
            );
            r.register(
                "leases_expired",
                "Leases that ended at their expiry without a result (recorded as TIMEOUT attempts)",
                metrics.leases_expired.clone(),
            );
            r.register(
                "agent_results_rejected",
                "Results refused because their job was never sent on the stream that reported them",
                metrics.agent_results_rejected.clone(),
            );
            r.register(
                "agent_disconnects",
                "Agents this replica disconnected, by reason (leases_expired, silent, foreign_results)",
                metrics.agent_disconnects.clone(),
            );
        });
        metrics
    }

    /// Counts an attempt that moved its delivery to `state`.
    pub fn delivery_moved(&self, state: DeliveryState) {
        let outcome = match state {
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Failed => "failed",
            DeliveryState::Dead => "dead",
            DeliveryState::Pending | DeliveryState::InFlight => return,
        };
        self.deliveries.get_or_create(&Outcome { outcome }).inc();
    }
}
