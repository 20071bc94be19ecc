//! The control plane's Prometheus metrics (names start with `herald_`), registered in the
//! process registry that `/metrics` serves.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::sync::atomic::AtomicU64;

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

/// A failed gRPC call: the method (`PublishEvent`; `unknown` for a path no service serves, so
/// callers cannot grow the label set) and the status code (`UNAVAILABLE`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rpc {
    pub method: String,
    pub code: &'static str,
}

/// The status codes of failures on the server's side (the `HeraldPublishErrors` alert's), as
/// `herald_rpc_errors_total` names them; the others are the caller's (invalid input, unknown
/// tokens) or its choice (`RESOURCE_EXHAUSTED` is also an oversized payload or a throttled
/// authentication, and a full disk has `herald_storage_errors_total{kind="full"}`).
pub const SERVER_ERROR_CODES: [&str; 5] = [
    "INTERNAL",
    "UNAVAILABLE",
    "UNKNOWN",
    "DATA_LOSS",
    "DEADLINE_EXCEEDED",
];

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
    /// Seconds since the oldest waiting delivery (pending or failed) became due, 0 when none is
    /// due; read from the database, so every replica reports the cluster's backlog.
    pub oldest_due_delivery_age: Gauge<f64, AtomicU64>,
    pub subscriptions_disabled: Family<Reason, Counter>,
    pub rpc_errors: Family<Rpc, Counter>,
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
            oldest_due_delivery_age: Gauge::default(),
            subscriptions_disabled: Family::default(),
            rpc_errors: Family::default(),
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
            r.register(
                "oldest_due_delivery_age_seconds",
                "Seconds since the oldest waiting delivery became due (0: nothing is due), cluster-wide",
                metrics.oldest_due_delivery_age.clone(),
            );
            r.register(
                "subscriptions_disabled",
                "Subscriptions endpoint health disabled, by reason (gone: 410 Gone; failing: no success for HERALD_DISABLE_AFTER)",
                metrics.subscriptions_disabled.clone(),
            );
            r.register(
                "rpc_errors",
                "gRPC calls that ended with a status other than OK, by method and code",
                metrics.rpc_errors.clone(),
            );
        });
        // The series alerts watch exist from the start at 0: Prometheus's `increase()` cannot see
        // a counter's first step when the series appears with it.
        for outcome in ["succeeded", "failed", "dead"] {
            let _ = metrics.deliveries.get_or_create(&Outcome { outcome });
        }
        for reason in ["gone", "failing"] {
            let _ = metrics
                .subscriptions_disabled
                .get_or_create(&Reason { reason });
        }
        for method in ["PublishEvent", "PublishEvents"] {
            for code in SERVER_ERROR_CODES {
                let _ = metrics.rpc_errors.get_or_create(&Rpc {
                    method: method.to_owned(),
                    code,
                });
            }
        }
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

/// How often the gauges read from the database are refreshed (a scrape every 15 s sees values
/// at most this old).
pub const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the gauges that come from the database up to date until `stop`:
/// `herald_oldest_due_delivery_age_seconds`, and a `herald_agents_connected` series (0 until an
/// agent of it connects here) for every region that enabled subscriptions name, so "no agent in
/// this region" is a value an alert can see rather than a missing series.
pub async fn refresh_from_storage(
    store: crate::storage::Store,
    metrics: Metrics,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(REFRESH_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match crate::storage::deliveries::oldest_waiting(&store.db).await {
            Ok(oldest) => {
                let age = oldest
                    .and_then(|due| (chrono::Utc::now() - due).to_std().ok())
                    .map_or(0.0, |age| age.as_secs_f64());
                metrics.oldest_due_delivery_age.set(age);
            }
            Err(err) => tracing::debug!(error = %err, "cannot read the backlog's age"),
        }
        match crate::storage::subscriptions::regions_in_use(&store.db).await {
            Ok(regions) => {
                for region in regions {
                    // Created at 0 when missing; an existing count is left as it is.
                    let _ = metrics.agents_connected.get_or_create(&Region { region });
                }
            }
            Err(err) => tracing::debug!(error = %err, "cannot read the regions in use"),
        }
    }
}
