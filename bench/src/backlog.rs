//! `backlog`: deliveries published while no agent of their region is connected
//! (`HERALD_REGION_FALLBACK=wait`), then drained by one `herald-agent` of that region while a
//! light prober publishes (to a subscription the built-in agent serves) and lists deliveries.
//!
//! Timeline: publish the backlog (`PublishEvents` batches of 500, fanned out to 10
//! subscriptions of region `backlog`), then measure from the agent's start to the last
//! delivery: the drain rate, the control plane's peak RSS, and the prober's call latencies.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use herald_client::{HeraldClient, v1 as pb};
use tokio::task::JoinSet;

use crate::deploy::{Database, Deployment, Process};
use crate::receiver::{OkBelow, Receiver};
use crate::report::{self, Detail, Run, millis, percentile};
use crate::scenarios::e2e_by_target;
use crate::workload::{
    After, Ceiling, Load, Published, Settings, Spec, fail, measure_phase, publish_one,
    tenant_token, wait_for_agents,
};

/// The region of the backlog's subscriptions, served by no agent until the drain.
const REGION: &str = "backlog";
/// Events per `PublishEvents` call (the API's limit).
const BATCH: usize = 500;
/// The prober's publishes and lists per second during the drain.
const PROBE_PUBLISH_PER_S: u64 = 20;
const PROBE_LIST_PER_S: u64 = 5;
/// The longest the drain may take, whatever `--drain-timeout` says.
const DRAIN_LIMIT: Duration = Duration::from_secs(30 * 60);
/// The event type only the probe subscription receives.
const PROBE_TYPE: &str = "bench.probe";

/// What the prober measured during the drain.
#[derive(Default)]
struct Probe {
    publishes: Vec<Published>,
    lists: Vec<Result<Duration, String>>,
    /// When the agent was started, and when the last backlog delivery was seen.
    connected: Option<Instant>,
    drained: Option<Instant>,
    agent: Option<Process>,
}

pub async fn run(spec: &Spec, settings: &Settings) -> anyhow::Result<Run> {
    let deliveries = spec.load.events() * spec.subscriptions;
    let receiver = Receiver::start(deliveries + deliveries / 10 + 100_000).await?;
    settings
        .on_fresh_database(async |database| run_on(spec, settings, &receiver, database).await)
        .await
}

async fn run_on(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
) -> anyhow::Result<Run> {
    let mut plan = settings.plan.clone();
    plan.control_plane_env
        .push(("HERALD_REGION_FALLBACK", "wait".to_owned()));
    let mut deployment = Deployment::start(&plan, database).await?;
    let mut probe = Probe::default();
    let measured = measure(
        spec,
        settings,
        receiver,
        database,
        &mut deployment,
        &mut probe,
    )
    .await;
    if let Some(agent) = probe.agent.take() {
        agent.stop().await;
    }
    let (measured, publish_s) = match measured {
        Ok(measured) => measured,
        Err(err) => return Err(fail(deployment, err).await),
    };
    deployment.stop().await;
    let after = After::read(database).await?;
    let records = receiver.take();
    let no_ceiling = Ceiling {
        requests: 0,
        elapsed: Duration::from_secs(1),
    };
    let mut run = Run::compute(spec, &measured, &records, &after, no_ceiling);

    let probe_target = spec.subscriptions as u32;
    let probe_starts = probe
        .publishes
        .iter()
        .filter_map(|p| p.id.as_ref().ok().map(|id| (id.clone(), p.start)))
        .collect();
    let mut probe_e2e: Vec<Duration> = e2e_by_target(&records, &probe_starts)
        .into_iter()
        .filter(|(target, _)| *target == probe_target)
        .map(|(_, d)| d)
        .collect();
    probe_e2e.sort_unstable();
    let mut publish_calls: Vec<Duration> = probe
        .publishes
        .iter()
        .filter(|p| p.id.is_ok())
        .map(|p| p.end - p.start)
        .collect();
    publish_calls.sort_unstable();
    let mut list_calls: Vec<Duration> = probe.lists.iter().filter_map(|l| l.clone().ok()).collect();
    list_calls.sort_unstable();
    let drain = match (probe.connected, probe.drained) {
        (Some(connected), Some(drained)) => drained.saturating_duration_since(connected),
        _ => Duration::ZERO,
    };
    run.detail = Some(Detail::Backlog(report::Backlog {
        deliveries: measured.expected,
        subscriptions: spec.subscriptions,
        publish_s,
        published_deliveries_per_s: measured.expected as f64 / publish_s.max(1e-6),
        drain_s: drain.as_secs_f64(),
        drain_deliveries_per_s: run.delivered as f64 / drain.as_secs_f64().max(1e-6),
        control_plane_peak_rss_mb: run.control_plane_peak_rss_mb,
        probe_publishes: probe.publishes.len(),
        probe_publish_errors: probe.publishes.iter().filter(|p| p.id.is_err()).count(),
        probe_publish_p50_ms: millis(percentile(&publish_calls, 0.50)),
        probe_publish_p99_ms: millis(percentile(&publish_calls, 0.99)),
        probe_list_calls: probe.lists.len(),
        probe_list_errors: probe.lists.iter().filter(|l| l.is_err()).count(),
        probe_list_p50_ms: millis(percentile(&list_calls, 0.50)),
        probe_list_p99_ms: millis(percentile(&list_calls, 0.99)),
        probe_e2e_p99_ms: millis(percentile(&probe_e2e, 0.99)),
    }));
    Ok(run)
}

/// Sets up, publishes the backlog, then measures the drain; returns the drain's measures and
/// how long publishing took (seconds).
async fn measure(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
    deployment: &mut Deployment,
    probe: &mut Probe,
) -> anyhow::Result<(crate::workload::Measured, f64)> {
    let admin = HeraldClient::connect(&deployment.url(0), &deployment.admin_token)
        .context("control plane address")?;
    let agents = match settings.plan.agents {
        0 => deployment.addrs.len(),
        n => n,
    };
    wait_for_agents(&admin, deployment, agents).await?;
    let token = tenant_token(&admin).await?;
    let client = HeraldClient::connect(&deployment.url(0), &token).context("tenant client")?;
    let mut backlog_subscriptions = Vec::new();
    for n in 0..spec.subscriptions {
        let subscription = client
            .subscriptions()
            .create_subscription(pb::CreateSubscriptionRequest {
                name: format!("backlog {n}"),
                url: receiver.url(n),
                event_types: vec!["user.new".into()],
                region: REGION.into(),
                max_concurrency: 1024,
                ..Default::default()
            })
            .await
            .context("create subscription")?
            .into_inner();
        backlog_subscriptions.push(subscription.id);
    }
    client
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            name: "probe".into(),
            url: receiver.url(spec.subscriptions),
            event_types: vec![PROBE_TYPE.into()],
            ..Default::default()
        })
        .await
        .context("create the probe subscription")?;

    let Load::Closed { events, publishers } = spec.load else {
        bail!("backlog publishes a closed loop");
    };
    let started = Instant::now();
    let backlog = publish_batches(spec, &client, events, publishers).await;
    let publish_s = started.elapsed().as_secs_f64();
    let ok = backlog.iter().filter(|p| p.id.is_ok()).count();
    eprintln!(
        "herald-bench: backlog: {} deliveries published in {publish_s:.1} s",
        ok * spec.subscriptions
    );
    if ok == 0 {
        bail!("backlog: no event was published");
    }
    // Nothing of the backlog may have been delivered without an agent of its region.
    let early = receiver.ok_count();
    if early > 0 {
        bail!("backlog: {early} deliveries arrived before any agent of region {REGION} connected");
    }

    let expected = (ok * spec.subscriptions) as u64;
    let launcher = deployment.launcher();
    let drain_limit = settings.drain_timeout.max(DRAIN_LIMIT);
    let list_subscription = backlog_subscriptions.first().cloned().unwrap_or_default();
    let drain = async {
        match launcher.spawn("backlog-1", REGION, 256) {
            Ok(agent) => probe.agent = Some(agent),
            Err(err) => {
                eprintln!("herald-bench: backlog: {err:#}");
                return backlog;
            }
        }
        let connected = Instant::now();
        probe.connected = Some(connected);
        let deadline = connected + drain_limit;
        let mut publishes = JoinSet::new();
        let mut lists = JoinSet::new();
        let sent = Arc::new(AtomicUsize::new(0));
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / PROBE_PUBLISH_PER_S));
        let mut ticks = 0u64;
        let mut last_check = Instant::now();
        let mut backlog_ok = OkBelow::new(spec.subscriptions as u32);
        loop {
            tick.tick().await;
            ticks += 1;
            let publisher = client.clone();
            let n = sent.fetch_add(1, Ordering::Relaxed);
            let at = Instant::now();
            publishes.spawn(async move {
                let request = pb::PublishEventRequest {
                    event_type: PROBE_TYPE.into(),
                    ..crate::workload::event(n)
                };
                publish_one(&publisher, request, at).await
            });
            if ticks.is_multiple_of(PROBE_PUBLISH_PER_S / PROBE_LIST_PER_S) {
                let lister = client.clone();
                let subscription_id = list_subscription.clone();
                lists.spawn(async move {
                    let at = Instant::now();
                    lister
                        .deliveries()
                        .list_deliveries(pb::ListDeliveriesRequest {
                            subscription_id,
                            page_size: 100,
                            ..Default::default()
                        })
                        .await
                        .map(|_| at.elapsed())
                        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
                });
            }
            // Probe deliveries count in ok_count too: check exactly at most once a second.
            if receiver.ok_count() >= expected && last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                let backlog_arrived = receiver.count_ok_below(&mut backlog_ok);
                if backlog_arrived as u64 >= expected {
                    break;
                }
            }
            if Instant::now() > deadline {
                eprintln!("herald-bench: backlog: the drain did not end within {drain_limit:?}");
                break;
            }
        }
        probe.drained = receiver.last_ok_below(spec.subscriptions as u32);
        while let Some(done) = publishes.join_next().await {
            if let Ok(done) = done {
                probe.publishes.push(done);
            }
        }
        while let Some(done) = lists.join_next().await {
            if let Ok(done) = done {
                probe.lists.push(done);
            }
        }
        backlog
    };
    let measured = measure_phase(
        settings,
        receiver,
        database,
        deployment,
        spec.subscriptions,
        drain,
    )
    .await?;
    Ok((measured, publish_s))
}

/// Publishes `events` events in `PublishEvents` calls of [`BATCH`], `publishers` calls at a
/// time; each event's start is its call's.
async fn publish_batches(
    spec: &Spec,
    client: &HeraldClient,
    events: usize,
    publishers: usize,
) -> Vec<Published> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..publishers.max(1) {
        let (client, next, spec) = (client.clone(), next.clone(), *spec);
        tasks.spawn(async move {
            let mut done = Vec::new();
            loop {
                let first = next.fetch_add(BATCH, Ordering::Relaxed);
                if first >= events {
                    return done;
                }
                let batch: Vec<_> = (first..(first + BATCH).min(events))
                    .map(|n| spec.event(n))
                    .collect();
                let count = batch.len();
                let start = Instant::now();
                let result = client
                    .publish_many(pb::PublishEventsRequest { events: batch })
                    .await;
                let end = Instant::now();
                match result {
                    Ok(response) => done.extend(response.results.into_iter().map(|r| Published {
                        id: Ok(r.event_id),
                        start,
                        end,
                    })),
                    Err(status) => {
                        let message = format!("{:?}: {}", status.code(), status.message());
                        done.extend((0..count).map(|_| Published {
                            id: Err(message.clone()),
                            start,
                            end,
                        }));
                    }
                }
            }
        });
    }
    let mut published = Vec::with_capacity(events);
    while let Some(done) = tasks.join_next().await {
        published.extend(done.unwrap_or_default());
    }
    published
}
