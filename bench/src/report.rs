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
            of_ceiling: deliveries_per_s / ceiling_per_s.max(f64::MIN_POSITIVE),
        }
    }
}

fn since(start: Instant, end: Instant) -> Duration {
    end.saturating_duration_since(start)
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-6)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Returns the `p` quantile (nearest rank) of sorted values; zero when empty.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
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
        }
    }
}

/// One workload's results.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    pub workload: Workload,
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
                .map(|w| w.workload.name())
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
                    w.workload.name().to_owned(),
                    format!("{:.0}", m.publish_per_s),
                    format!("{:.1}", m.publish_p50_ms),
                    format!("{:.1}", m.publish_p99_ms),
                    format!("{:.0}", m.deliveries_per_s),
                    format!(
                        "({:.0}-{:.0})",
                        m.deliveries_per_s_min, m.deliveries_per_s_max
                    ),
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
            if w.median.publish_errors > 0 {
                let first = w
                    .runs
                    .iter()
                    .find_map(|r| r.first_publish_error.as_deref())
                    .unwrap_or("");
                out.push_str(&format!(
                    "{}: {} publishes failed in a run ({first})\n",
                    w.workload.name(),
                    w.median.publish_errors
                ));
            }
        }
        out.push_str(LEGEND);
        out
    }
}

const LEGEND: &str = "
publish/s, p50/p99: PublishEvent calls (closed loop: N publishers; steady: open loop at a fixed rate)
deliveries/s: unique (subscription, webhook-id) answered 2xx / (last arrival - first publish start)
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
