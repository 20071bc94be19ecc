//! The numbers of a run, their medians over `--repeat N`, and how they are shown: a table for
//! people, one JSON object for tools.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::deploy::Usage;
use crate::receiver::Record;
use crate::workload::{After, Ceiling, Load, Measured, Spec, Workload, first_successes};

/// The numbers of one run of a workload.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Publish calls made in the measured phase, and how many failed.
    pub published: usize,
    pub publish_errors: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_publish_error: Option<String>,
    /// Publish calls/s: calls / (last call end - first call start).
    pub publish_per_s: f64,
    pub publish_p50_ms: f64,
    pub publish_p99_ms: f64,
    /// Deliveries expected (successful publishes x subscriptions) and arrived (unique by
    /// subscription and `webhook-id`, answered 2xx).
    pub expected: usize,
    pub delivered: usize,
    /// Unique deliveries / (last first-arrival - first publish start).
    pub deliveries_per_s: f64,
    /// Payload bytes of each event, and payload MB (MiB) delivered per second.
    pub payload_bytes: usize,
    pub delivered_mb_per_s: f64,
    /// Publish call start -> the receiver's first 2xx-answered request of the delivery.
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    /// 2xx-answered requests beyond the first per delivery.
    pub duplicates: usize,
    /// Expected deliveries that did not arrive before the deadline (must be 0).
    pub lost: usize,
    /// Requests answered 500 by the receiver (the `failures` workload's first attempts).
    pub failed_attempts: usize,
    /// 2xx-answered requests for an event id this run did not publish.
    pub unknown: usize,
    /// CPU seconds per 1,000 deliveries during the measured phase.
    pub control_plane_cpu_s_per_1k: f64,
    /// `None` with the built-in agent (its CPU is the control plane's).
    pub agents_cpu_s_per_1k: Option<f64>,
    /// This process: publishers, receiver and bookkeeping.
    pub bench_cpu_s_per_1k: f64,
    /// The PostgreSQL backends serving the control plane; `None` on SQLite (in-process).
    pub database_cpu_s_per_1k: Option<f64>,
    /// Peak resident set (VmHWM) at the end of the measured phase; agents: the largest.
    pub control_plane_peak_rss_mb: f64,
    pub agents_peak_rss_mb: Option<f64>,
    /// Database transactions committed per 1,000 published events, from the measured phase's
    /// start to the control plane's exit (publishes, leases, results); `None` on SQLite.
    pub commits_per_1k_events: Option<f64>,
    /// Rows inserted, updated or deleted per delivery, from the measured phase's start to the
    /// control planes' exit; `None` on SQLite.
    pub rows_per_delivery: Option<f64>,
    /// The same, per table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_per_delivery_by_table: Option<std::collections::BTreeMap<String, f64>>,
    /// WAL bytes written per delivery over the same span (the server's, all databases); `None`
    /// on SQLite.
    pub wal_bytes_per_delivery: Option<f64>,
    /// Growth of the database's files per delivery (tables, indexes, dead rows not yet
    /// vacuumed); `None` on SQLite.
    pub stored_bytes_per_delivery: Option<f64>,
    /// The same receiver driven by a plain reqwest client with the same concurrency.
    pub ceiling_per_s: f64,
    /// `deliveries_per_s / ceiling_per_s`.
    pub of_ceiling: f64,
    /// The measures of a workload that has its own (slow-mix, tenants, backlog, chaos).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

impl Run {
    pub fn compute(
        spec: &Spec,
        measured: &Measured,
        records: &[Record],
        after: &After,
        ceiling: Ceiling,
    ) -> Self {
        let subscriptions = spec.subscriptions as u32;
        let first = first_successes(records);
        let ok_requests = records.iter().filter(|r| r.ok).count();
        let mut e2e = Vec::with_capacity(first.len());
        let mut last_arrival = measured.first_start;
        let mut unknown = 0;
        for ((target, id), at) in &first {
            match measured.starts.get(*id) {
                Some(start) if *target < subscriptions => {
                    e2e.push(at.saturating_duration_since(*start));
                    last_arrival = last_arrival.max(*at);
                }
                _ => unknown += 1,
            }
        }
        e2e.sort_unstable();
        let delivered = e2e.len();
        let mut calls = measured.calls.clone();
        calls.sort_unstable();
        let per_1k = |usage: &[Usage]| {
            let cpu: f64 = usage.iter().map(|u| u.cpu.as_secs_f64()).sum();
            cpu * 1000.0 / delivered.max(1) as f64
        };
        let mb = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let deliveries_per_s = rate(delivered, since(measured.first_start, last_arrival));
        let rows_by_table = match (&measured.rows_before, &after.rows) {
            (Some(before), Some(after)) => Some(
                after
                    .iter()
                    .map(|(table, rows)| {
                        let written = rows.saturating_sub(before.get(table).copied().unwrap_or(0));
                        (table.clone(), written as f64 / delivered.max(1) as f64)
                    })
                    .filter(|(_, per)| *per > 0.0)
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
            _ => None,
        };
        let ceiling_per_s = rate(ceiling.requests, ceiling.elapsed);
        Self {
            published: measured.published,
            publish_errors: measured.publish_errors,
            first_publish_error: measured.first_error.clone(),
            publish_per_s: rate(
                measured.calls.len(),
                since(measured.first_start, measured.last_end),
            ),
            publish_p50_ms: millis(percentile(&calls, 0.50)),
            publish_p99_ms: millis(percentile(&calls, 0.99)),
            expected: measured.expected,
            delivered,
            deliveries_per_s,
            payload_bytes: spec.payload_bytes(),
            delivered_mb_per_s: deliveries_per_s * spec.payload_bytes() as f64 / (1024.0 * 1024.0),
            e2e_p50_ms: millis(percentile(&e2e, 0.50)),
            e2e_p90_ms: millis(percentile(&e2e, 0.90)),
            e2e_p99_ms: millis(percentile(&e2e, 0.99)),
            e2e_max_ms: millis(e2e.last().copied().unwrap_or_default()),
            duplicates: ok_requests - first.len(),
            lost: measured.expected.saturating_sub(delivered),
            failed_attempts: records.len() - ok_requests,
            unknown,
            control_plane_cpu_s_per_1k: per_1k(&measured.control_planes),
            agents_cpu_s_per_1k: (!measured.agents.is_empty()).then(|| per_1k(&measured.agents)),
            bench_cpu_s_per_1k: per_1k(&[measured.bench]),
            database_cpu_s_per_1k: measured
                .database_cpu
                .map(|cpu| cpu.as_secs_f64() * 1000.0 / delivered.max(1) as f64),
            control_plane_peak_rss_mb: mb(measured
                .control_planes
                .iter()
                .map(|u| u.peak_rss_bytes)
                .max()
                .unwrap_or(0)),
            agents_peak_rss_mb: measured
                .agents
                .iter()
                .map(|u| u.peak_rss_bytes)
                .max()
                .map(mb),
            commits_per_1k_events: match (measured.commits_before, after.commits) {
                (Some(before), Some(after)) => Some(
                    after.saturating_sub(before) as f64 * 1000.0
                        / measured.starts.len().max(1) as f64,
                ),
                _ => None,
            },
            rows_per_delivery_by_table: rows_by_table.clone(),
            rows_per_delivery: rows_by_table
                .as_ref()
                .map(|by_table| by_table.values().sum()),
            wal_bytes_per_delivery: match (measured.wal_before, after.wal) {
                (Some(before), Some(after)) => {
                    Some(after.saturating_sub(before) as f64 / delivered.max(1) as f64)
                }
                _ => None,
            },
            stored_bytes_per_delivery: match (measured.size_before, after.size) {
                (Some(before), Some(after)) => {
                    Some(after.saturating_sub(before) as f64 / delivered.max(1) as f64)
                }
                _ => None,
            },
            ceiling_per_s,
            of_ceiling: if ceiling.requests == 0 {
                0.0
            } else {
                deliveries_per_s / ceiling_per_s.max(f64::MIN_POSITIVE)
            },
            detail: None,
        }
    }
}

/// The measures of a workload that has its own, beside the common ones.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Detail {
    SlowMix(SlowMix),
    Tenants(Tenants),
    Backlog(Backlog),
    Chaos(Chaos),
}

/// `slow-mix`: the healthy subscriptions' latency with and without slow ones beside them.
#[derive(Debug, Clone, Serialize)]
pub struct SlowMix {
    /// How events reach subscriptions: `one-each` (one event type per subscription, so each
    /// event is one delivery).
    pub routing: &'static str,
    pub slow_subscriptions: usize,
    pub slow_delay_ms: f64,
    /// The healthy subscriptions' e2e p99 beside the slow ones, and in the run with none slow.
    pub healthy_p99_ms: f64,
    pub healthy_p99_none_slow_ms: f64,
    /// `healthy_p99_ms / healthy_p99_none_slow_ms` (target: at most 1.5).
    pub ratio: f64,
    pub healthy_p50_ms: f64,
    pub healthy_p50_none_slow_ms: f64,
    /// Deliveries to slow subscriptions: expected and arrived.
    pub slow_expected: usize,
    pub slow_delivered: usize,
    /// The run with none slow: deliveries/s and lost.
    pub none_slow_deliveries_per_s: f64,
    pub none_slow_lost: usize,
}

/// `tenants`: light tenants' latency beside a heavy tenant and without it.
#[derive(Debug, Clone, Serialize)]
pub struct Tenants {
    pub tenants: usize,
    pub subscriptions_per_tenant: usize,
    /// Deliveries per light tenant, and the heavy tenant's share of all events with it.
    pub deliveries_per_light_tenant: usize,
    pub heavy_share_of_events: f64,
    /// Light events published per second (the heavy tenant publishes as many again).
    pub light_events_per_s: u32,
    /// The 95th percentile over light tenants of each one's e2e p99: with the heavy tenant,
    /// and in the phase without it.
    pub light_p95_of_p99_ms: f64,
    pub light_p95_of_p99_alone_ms: f64,
    /// `light_p95_of_p99_ms / light_p95_of_p99_alone_ms` (target: at most 2).
    pub ratio: f64,
    /// Every light delivery's e2e p99 pooled, with and without the heavy tenant.
    pub light_p99_ms: f64,
    pub light_p99_alone_ms: f64,
    pub heavy_p99_ms: f64,
    /// The phase without the heavy tenant: deliveries/s and lost.
    pub alone_deliveries_per_s: f64,
    pub alone_lost: usize,
    /// Seconds taken to create the tenants, tokens and subscriptions.
    pub setup_s: f64,
}

/// `backlog`: a backlog published with no agent of its region, then drained by one agent.
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    pub deliveries: usize,
    pub subscriptions: usize,
    /// How long publishing the backlog took (PublishEvents batches of 500), and its rate.
    pub publish_s: f64,
    pub published_deliveries_per_s: f64,
    /// From the agent's connection to the last delivery's arrival.
    pub drain_s: f64,
    pub drain_deliveries_per_s: f64,
    /// The control plane's peak resident set (VmHWM) at the end of the drain.
    pub control_plane_peak_rss_mb: f64,
    /// The prober during the drain: PublishEvent calls (20/s, another subscription served by
    /// the built-in agent) and ListDeliveries calls (5/s, a backlog subscription's first page).
    pub probe_publishes: usize,
    pub probe_publish_errors: usize,
    pub probe_publish_p50_ms: f64,
    pub probe_publish_p99_ms: f64,
    pub probe_list_calls: usize,
    pub probe_list_errors: usize,
    pub probe_list_p50_ms: f64,
    pub probe_list_p99_ms: f64,
    /// The probe subscription's e2e p99 during the drain.
    pub probe_e2e_p99_ms: f64,
}

/// `chaos`: fanout-1 per tenant through agents that stop, hold, crash, and a receiver that
/// hangs.
#[derive(Debug, Clone, Serialize)]
pub struct Chaos {
    /// What was done, in order, with the second it was done at.
    pub faults: Vec<String>,
    /// Unaffected tenants' expected deliveries, arrived, lost (must be 0) and duplicates.
    pub unaffected_expected: usize,
    pub unaffected_lost: usize,
    pub unaffected_duplicates: usize,
    /// Unaffected tenants' e2e p99 with faults and in the run without.
    pub unaffected_p99_ms: f64,
    pub unaffected_p99_no_faults_ms: f64,
    /// `unaffected_p99_ms / unaffected_p99_no_faults_ms` (target: at most 1.5).
    pub ratio: f64,
    /// The hanging tenant's deliveries, and how many ended `DEAD` after `TIMEOUT` attempts
    /// only (must be all of them).
    pub hanging_deliveries: usize,
    pub hanging_dead_by_timeout: usize,
    /// Jobs the stand-in agent received and never answered.
    pub withheld_jobs: usize,
    /// The run without faults: deliveries/s and lost.
    pub no_faults_deliveries_per_s: f64,
    pub no_faults_lost: usize,
}

impl Detail {
    /// Renders the lines of the table's detail section.
    fn lines(&self) -> String {
        match self {
            Self::SlowMix(d) => format!(
                "  healthy p99 {:.1} ms beside {} subscriptions answering after {:.0} ms; {:.1} ms with none slow; ratio {:.2}\n  \
                 healthy p50 {:.1} / {:.1} ms; slow deliveries {} of {}; routing {}; none slow: {:.0} deliveries/s, lost {}\n",
                d.healthy_p99_ms,
                d.slow_subscriptions,
                d.slow_delay_ms,
                d.healthy_p99_none_slow_ms,
                d.ratio,
                d.healthy_p50_ms,
                d.healthy_p50_none_slow_ms,
                d.slow_delivered,
                d.slow_expected,
                d.routing,
                d.none_slow_deliveries_per_s,
                d.none_slow_lost,
            ),
            Self::Tenants(d) => format!(
                "  {} tenants x {} subscriptions, {} deliveries per light tenant, light {} events/s, heavy share {:.0}% of events\n  \
                 light tenants' p95 of p99s {:.1} ms with the heavy tenant, {:.1} ms without; ratio {:.2}\n  \
                 pooled light p99 {:.1} / {:.1} ms; heavy p99 {:.1} ms; without heavy: {:.0} deliveries/s, lost {}; setup {:.1} s\n",
                d.tenants,
                d.subscriptions_per_tenant,
                d.deliveries_per_light_tenant,
                d.light_events_per_s,
                d.heavy_share_of_events * 100.0,
                d.light_p95_of_p99_ms,
                d.light_p95_of_p99_alone_ms,
                d.ratio,
                d.light_p99_ms,
                d.light_p99_alone_ms,
                d.heavy_p99_ms,
                d.alone_deliveries_per_s,
                d.alone_lost,
                d.setup_s,
            ),
            Self::Backlog(d) => format!(
                "  {} deliveries over {} subscriptions published in {:.1} s ({:.0}/s); drained in {:.1} s: {:.0} deliveries/s; control plane peak RSS {:.0} MB\n  \
                 during the drain: PublishEvent p50 {:.1} / p99 {:.1} ms ({} calls, {} failed), ListDeliveries p50 {:.1} / p99 {:.1} ms ({} calls, {} failed), probe e2e p99 {:.1} ms\n",
                d.deliveries,
                d.subscriptions,
                d.publish_s,
                d.published_deliveries_per_s,
                d.drain_s,
                d.drain_deliveries_per_s,
                d.control_plane_peak_rss_mb,
                d.probe_publish_p50_ms,
                d.probe_publish_p99_ms,
                d.probe_publishes,
                d.probe_publish_errors,
                d.probe_list_p50_ms,
                d.probe_list_p99_ms,
                d.probe_list_calls,
                d.probe_list_errors,
                d.probe_e2e_p99_ms,
            ),
            Self::Chaos(d) => format!(
                "  faults: {}\n  \
                 unaffected tenants: {} expected, lost {}, duplicates {}; p99 {:.1} ms, {:.1} ms without faults; ratio {:.2}\n  \
                 hanging tenant: {} of {} deliveries dead after TIMEOUT attempts; stand-in withheld {} jobs; without faults: {:.0} deliveries/s, lost {}\n",
                d.faults.join("; "),
                d.unaffected_expected,
                d.unaffected_lost,
                d.unaffected_duplicates,
                d.unaffected_p99_ms,
                d.unaffected_p99_no_faults_ms,
                d.ratio,
                d.hanging_dead_by_timeout,
                d.hanging_deliveries,
                d.withheld_jobs,
                d.no_faults_deliveries_per_s,
                d.no_faults_lost,
            ),
        }
    }
}

/// Returns `a / b`, or 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn since(start: Instant, end: Instant) -> Duration {
    end.saturating_duration_since(start)
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-6)
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Returns the `p` quantile (nearest rank) of sorted values; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Returns the median (the mean of the middle two for an even count); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// Medians over the runs of one workload; counts that must stay 0 are the largest instead.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub runs: usize,
    pub publish_per_s: f64,
    pub publish_p50_ms: f64,
    pub publish_p99_ms: f64,
    pub deliveries_per_s: f64,
    pub deliveries_per_s_min: f64,
    pub deliveries_per_s_max: f64,
    pub delivered_mb_per_s: f64,
    pub e2e_p50_ms: f64,
    pub e2e_p90_ms: f64,
    pub e2e_p99_ms: f64,
    pub e2e_max_ms: f64,
    pub duplicates: f64,
    /// The largest over the runs.
    pub lost: usize,
    /// The largest over the runs.
    pub publish_errors: usize,
    pub control_plane_cpu_s_per_1k: f64,
    pub agents_cpu_s_per_1k: Option<f64>,
    pub bench_cpu_s_per_1k: f64,
    pub database_cpu_s_per_1k: Option<f64>,
    pub control_plane_peak_rss_mb: f64,
    pub agents_peak_rss_mb: Option<f64>,
    pub commits_per_1k_events: Option<f64>,
    pub rows_per_delivery: Option<f64>,
    pub wal_bytes_per_delivery: Option<f64>,
    pub stored_bytes_per_delivery: Option<f64>,
    pub ceiling_per_s: f64,
    pub of_ceiling: f64,
}

impl Summary {
    pub fn of(runs: &[Run]) -> Self {
        let med = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect()).unwrap_or(0.0);
        let med_opt = |f: fn(&Run) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let deliveries = runs.iter().map(|r| r.deliveries_per_s);
        Self {
            runs: runs.len(),
            publish_per_s: med(|r| r.publish_per_s),
            publish_p50_ms: med(|r| r.publish_p50_ms),
            publish_p99_ms: med(|r| r.publish_p99_ms),
            deliveries_per_s: med(|r| r.deliveries_per_s),
            deliveries_per_s_min: deliveries.clone().fold(f64::INFINITY, f64::min),
            deliveries_per_s_max: deliveries.fold(0.0, f64::max),
            delivered_mb_per_s: med(|r| r.delivered_mb_per_s),
            e2e_p50_ms: med(|r| r.e2e_p50_ms),
            e2e_p90_ms: med(|r| r.e2e_p90_ms),
            e2e_p99_ms: med(|r| r.e2e_p99_ms),
            e2e_max_ms: med(|r| r.e2e_max_ms),
            duplicates: med(|r| r.duplicates as f64),
            lost: runs.iter().map(|r| r.lost).max().unwrap_or(0),
            publish_errors: runs.iter().map(|r| r.publish_errors).max().unwrap_or(0),
            control_plane_cpu_s_per_1k: med(|r| r.control_plane_cpu_s_per_1k),
            agents_cpu_s_per_1k: med_opt(|r| r.agents_cpu_s_per_1k),
            bench_cpu_s_per_1k: med(|r| r.bench_cpu_s_per_1k),
            database_cpu_s_per_1k: med_opt(|r| r.database_cpu_s_per_1k),
            control_plane_peak_rss_mb: med(|r| r.control_plane_peak_rss_mb),
            agents_peak_rss_mb: med_opt(|r| r.agents_peak_rss_mb),
            commits_per_1k_events: med_opt(|r| r.commits_per_1k_events),
            rows_per_delivery: med_opt(|r| r.rows_per_delivery),
            wal_bytes_per_delivery: med_opt(|r| r.wal_bytes_per_delivery),
            stored_bytes_per_delivery: med_opt(|r| r.stored_bytes_per_delivery),
            ceiling_per_s: med(|r| r.ceiling_per_s),
            of_ceiling: med(|r| r.of_ceiling),
        }
    }
}

/// The parameters a workload ran with.
#[derive(Debug, Clone, Serialize)]
pub struct SpecReport {
    pub events: usize,
    pub subscriptions: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    pub receiver_fails_first_attempts: bool,
    pub payload_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenants: Option<usize>,
    /// Subscriptions that answer late, and after how long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_subscriptions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_delay_ms: Option<f64>,
    /// Every subscription had a payload filter (that every event passes).
    pub payload_filter: bool,
}

impl From<&Spec> for SpecReport {
    fn from(spec: &Spec) -> Self {
        let (publishers, rate_per_s, duration_s) = match spec.load {
            Load::Closed { publishers, .. } => (Some(publishers), None, None),
            Load::Open { rate, duration } => (None, Some(rate), Some(duration.as_secs_f64())),
        };
        Self {
            events: spec.load.events(),
            subscriptions: spec.subscriptions,
            publishers,
            rate_per_s,
            duration_s,
            receiver_fails_first_attempts: spec.failures,
            payload_bytes: spec.payload_bytes(),
            tenants: (spec.tenants > 1).then_some(spec.tenants),
            slow_subscriptions: spec.slow.map(|slow| slow.subscriptions),
            slow_delay_ms: spec.slow.map(|slow| millis(slow.delay)),
            payload_filter: spec.payload_filter,
        }
    }
}

/// One workload's results.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    pub workload: Workload,
    /// The workload's name, with its rate for a `steady` of a `--rates` sweep (`steady@200`).
    pub label: String,
    pub spec: SpecReport,
    pub median: Summary,
    pub runs: Vec<Run>,
}

/// Everything `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub backend: crate::deploy::Backend,
    /// 0: the control plane's built-in agent (one per replica).
    pub agents: usize,
    /// Control planes on the one database.
    pub replicas: usize,
    pub repeat: usize,
    pub cpus: usize,
    pub runtime_s: f64,
    pub workloads: Vec<WorkloadReport>,
}

impl Report {
    /// Renders the table for people.
    pub fn table(&self) -> String {
        let agents = match self.agents {
            0 => "built-in agent".to_owned(),
            n => format!("{n} agent processes"),
        };
        let replicas = match self.replicas {
            0 | 1 => "1 control plane".to_owned(),
            n => format!("{n} control planes"),
        };
        let mut out = format!(
            "herald-bench: {}, {replicas}, {agents}, {} CPUs; {} (medians over {} run{}); {:.0} s\n\n",
            match self.backend {
                crate::deploy::Backend::Sqlite => "SQLite",
                crate::deploy::Backend::Postgres => "PostgreSQL",
            },
            self.cpus,
            self.workloads
                .iter()
                .map(|w| w.label.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.repeat,
            if self.repeat == 1 { "" } else { "s" },
            self.runtime_s,
        );
        let headers = [
            "workload",
            "publish/s",
            "p50 ms",
            "p99 ms",
            "deliveries/s",
            "(min-max)",
            "MB/s",
            "e2e p50",
            "p90",
            "p99",
            "max ms",
            "dup",
            "lost",
            "cpu s/1k cp",
            "agents",
            "db",
            "rss MB cp",
            "agents",
            "commits/1k",
            "rows/dlv",
            "WAL B/dlv",
            "stored B/dlv",
            "ceiling/s",
            "of ceiling",
        ];
        let na = || "n/a".to_owned();
        let rows: Vec<Vec<String>> = self
            .workloads
            .iter()
            .map(|w| {
                let m = &w.median;
                vec![
                    w.label.clone(),
                    format!("{:.0}", m.publish_per_s),
                    format!("{:.1}", m.publish_p50_ms),
                    format!("{:.1}", m.publish_p99_ms),
                    format!("{:.0}", m.deliveries_per_s),
                    format!(
                        "({:.0}-{:.0})",
                        m.deliveries_per_s_min, m.deliveries_per_s_max
                    ),
                    format!("{:.1}", m.delivered_mb_per_s),
                    format!("{:.1}", m.e2e_p50_ms),
                    format!("{:.1}", m.e2e_p90_ms),
                    format!("{:.1}", m.e2e_p99_ms),
                    format!("{:.1}", m.e2e_max_ms),
                    format!("{:.0}", m.duplicates),
                    m.lost.to_string(),
                    format!("{:.3}", m.control_plane_cpu_s_per_1k),
                    m.agents_cpu_s_per_1k.map_or_else(na, |v| format!("{v:.3}")),
                    m.database_cpu_s_per_1k
                        .map_or_else(na, |v| format!("{v:.3}")),
                    format!("{:.0}", m.control_plane_peak_rss_mb),
                    m.agents_peak_rss_mb.map_or_else(na, |v| format!("{v:.0}")),
                    m.commits_per_1k_events
                        .map_or_else(na, |v| format!("{v:.0}")),
                    m.rows_per_delivery.map_or_else(na, |v| format!("{v:.1}")),
                    m.wal_bytes_per_delivery
                        .map_or_else(na, |v| format!("{v:.0}")),
                    m.stored_bytes_per_delivery
                        .map_or_else(na, |v| format!("{v:.0}")),
                    format!("{:.0}", m.ceiling_per_s),
                    format!("{:.2}", m.of_ceiling),
                ]
            })
            .collect();
        let widths: Vec<usize> = headers
            .iter()
            .enumerate()
            .map(|(i, h)| rows.iter().map(|r| r[i].len()).fold(h.len(), usize::max))
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == 0 {
                        format!("{cell:<w$}", w = widths[i])
                    } else {
                        format!("{cell:>w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        out.push_str(&line(&headers.map(str::to_owned)));
        out.push('\n');
        for row in &rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        for w in &self.workloads {
            for (n, run) in w.runs.iter().enumerate() {
                if let Some(detail) = &run.detail {
                    out.push_str(&format!("{} run {}:\n{}", w.label, n + 1, detail.lines()));
                }
            }
        }
        for w in &self.workloads {
            if w.median.publish_errors > 0 {
                let first = w
                    .runs
                    .iter()
                    .find_map(|r| r.first_publish_error.as_deref())
                    .unwrap_or("");
                out.push_str(&format!(
                    "{}: {} publishes failed in a run ({first})\n",
                    w.label, w.median.publish_errors
                ));
            }
        }
        out.push_str(LEGEND);
        out
    }
}

const LEGEND: &str = "
publish/s, p50/p99: PublishEvent calls (closed loop: N publishers; steady: open loop at a fixed rate)
deliveries/s: unique (subscription, webhook-id) answered 2xx / (last arrival - first publish start); MB/s: their payload MiB/s
e2e: publish call start -> the receiver's first 2xx-answered request; dup: 2xx requests beyond the first
lost: expected deliveries missing at the deadline (must be 0)
cpu s/1k: CPU seconds per 1,000 deliveries (control plane, agent processes, PostgreSQL backends); rss: peak resident MB
commits/1k: transactions committed per 1,000 events, read-only ones included (PostgreSQL xact_commit; n/a on SQLite)
rows/dlv: rows inserted, updated or deleted per delivery (pg_stat_user_tables); WAL B/dlv: the server's WAL bytes per delivery
stored B/dlv: growth of the database's files per delivery (tables, indexes, dead rows not yet vacuumed)
ceiling/s: the same receiver driven by a plain reqwest client, same concurrency; of ceiling: deliveries/s / ceiling/s
";

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values = ms(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(percentile(&values, 0.5), Duration::from_millis(5));
        assert_eq!(percentile(&values, 0.9), Duration::from_millis(9));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(10));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
