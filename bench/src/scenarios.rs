//! The paired workloads, each reported as its faulty run beside a clean one: `slow-mix`
//! (healthy subscriptions beside slow ones, then with none slow) and `tenants` (light tenants
//! beside a heavy one, then alone, on one deployment of many tenants).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use herald_client::{HeraldClient, v1 as pb};
use tokio::task::JoinSet;

use crate::deploy::{Database, Deployment};
use crate::receiver::{Receiver, Record};
use crate::report::{self, Detail, Run, millis, percentile, ratio};
use crate::workload::{
    After, Ceiling, Finished, Settings, Spec, TENANT_SUBSCRIPTIONS, fail, first_successes,
    measure_phase, publish_open_with, run_once, wait_for_agents,
};

/// Returns each delivery's target and e2e latency (publish start -> first 2xx arrival), for
/// the ids in `starts`.
pub fn e2e_by_target(
    records: &[Record],
    starts: &HashMap<String, Instant>,
) -> Vec<(u32, Duration)> {
    first_successes(records)
        .into_iter()
        .filter_map(|((target, id), at)| {
            starts
                .get(id)
                .map(|start| (target, at.saturating_duration_since(*start)))
        })
        .collect()
}

/// Returns the sorted latencies of the deliveries to targets `keep` accepts.
fn latencies(e2e: &[(u32, Duration)], keep: impl Fn(u32) -> bool) -> Vec<Duration> {
    let mut kept: Vec<Duration> = e2e
        .iter()
        .filter(|(target, _)| keep(*target))
        .map(|(_, d)| *d)
        .collect();
    kept.sort_unstable();
    kept
}

/// `slow-mix`: the run with slow subscriptions, then the same run with none slow; reports the
/// first with the healthy subscriptions' p99 of both.
pub async fn slow_mix(spec: &Spec, settings: &Settings) -> anyhow::Result<Run> {
    let slow = spec.slow.context("slow-mix needs slow subscriptions")?;
    let with_slow = run_once(spec, settings).await?;
    let none_slow = run_once(
        &Spec {
            slow: None,
            ..*spec
        },
        settings,
    )
    .await?;
    let healthy = |finished: &Finished| {
        let e2e = e2e_by_target(&finished.records, &finished.starts);
        latencies(&e2e, |target| target as usize >= slow.subscriptions)
    };
    let (healthy_slow, healthy_none) = (healthy(&with_slow), healthy(&none_slow));
    let e2e = e2e_by_target(&with_slow.records, &with_slow.starts);
    let slow_delivered = e2e
        .iter()
        .filter(|(target, _)| (*target as usize) < slow.subscriptions)
        .count();
    // Event n goes to subscription n mod subscriptions: exact when every publish succeeded and
    // the events divide evenly.
    let slow_expected = with_slow.run.expected * slow.subscriptions / spec.subscriptions.max(1);
    let p99 = |v: &[Duration]| millis(percentile(v, 0.99));
    let p50 = |v: &[Duration]| millis(percentile(v, 0.50));
    let mut run = with_slow.run;
    run.detail = Some(Detail::SlowMix(report::SlowMix {
        routing: "one-each",
        slow_subscriptions: slow.subscriptions,
        slow_delay_ms: millis(slow.delay),
        healthy_p99_ms: p99(&healthy_slow),
        healthy_p99_none_slow_ms: p99(&healthy_none),
        ratio: ratio(p99(&healthy_slow), p99(&healthy_none)),
        healthy_p50_ms: p50(&healthy_slow),
        healthy_p50_none_slow_ms: p50(&healthy_none),
        slow_expected,
        slow_delivered,
        none_slow_deliveries_per_s: none_slow.run.deliveries_per_s,
        none_slow_lost: none_slow.run.lost,
    }));
    Ok(run)
}

/// The heavy tenant of `tenants`: tenant 0, subscriptions `0..5`.
const HEAVY: usize = 0;
/// Concurrent calls while creating tenants and subscriptions.
const SETUP_CONCURRENCY: usize = 8;

/// `tenants`: one deployment with `spec.tenants` tenants of 5 subscriptions each (subscription
/// `t * 5 + k` is tenant `t`'s `k`-th); phase 1 publishes only the light tenants' events (open
/// loop at `rate`), phase 2 the same light events interleaved one for one with the heavy
/// tenant's (at twice the rate). Every event fans out to its tenant's 5 subscriptions.
pub async fn tenants(spec: &Spec, settings: &Settings) -> anyhow::Result<Run> {
    let light_events = spec.load.events();
    let capacity = 3 * light_events * TENANT_SUBSCRIPTIONS + 1024;
    let receiver = Receiver::start(capacity).await?;
    settings
        .on_fresh_database(async |database| tenants_on(spec, settings, &receiver, database).await)
        .await
}

async fn tenants_on(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
) -> anyhow::Result<Run> {
    let mut deployment = Deployment::start(&settings.plan, database).await?;
    match tenants_phases(spec, settings, receiver, database, &mut deployment).await {
        Ok(phases) => {
            deployment.stop().await;
            let after = After::read(database).await?;
            Ok(phases.into_run(spec, &after))
        }
        Err(err) => Err(fail(deployment, err).await),
    }
}

/// What the two phases of `tenants` measured.
struct TenantPhases {
    alone: crate::workload::Measured,
    alone_records: Vec<Record>,
    heavy: crate::workload::Measured,
    heavy_records: Vec<Record>,
    setup: Duration,
}

async fn tenants_phases(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
    deployment: &mut Deployment,
) -> anyhow::Result<TenantPhases> {
    let admin = HeraldClient::connect(&deployment.url(0), &deployment.admin_token)
        .context("control plane address")?;
    let agents = match settings.plan.agents {
        0 => deployment.addrs.len(),
        n => n,
    };
    wait_for_agents(&admin, deployment, agents).await?;
    let setup_started = Instant::now();
    let tenant_ids = create_tenants(&admin, receiver, spec.tenants).await?;
    let setup = setup_started.elapsed();
    let light: Vec<usize> = (0..spec.tenants).filter(|t| *t != HEAVY).collect();
    let Load { rate, events } = open_load(spec);
    let request = |tenant: usize, n: usize| pb::PublishEventRequest {
        tenant_id: tenant_ids[tenant].clone(),
        ..spec.event(n)
    };
    let clients = [admin.clone()];

    // Phase 1: the light tenants alone.
    let alone = {
        let publish = publish_open_with(&clients, rate, events, |n| {
            request(light[n % light.len()], n)
        });
        measure_phase(
            settings,
            receiver,
            database,
            deployment,
            TENANT_SUBSCRIPTIONS,
            publish,
        )
        .await?
    };
    // Late retries of phase 1 would count in phase 2 as unknown ids.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let alone_records = receiver.take();

    // Phase 2: the same light events, each followed by one of the heavy tenant's.
    let heavy = {
        let publish = publish_open_with(&clients, rate.saturating_mul(2), events * 2, |n| {
            if n % 2 == 0 {
                request(light[(n / 2) % light.len()], n)
            } else {
                request(HEAVY, n)
            }
        });
        measure_phase(
            settings,
            receiver,
            database,
            deployment,
            TENANT_SUBSCRIPTIONS,
            publish,
        )
        .await?
    };
    let heavy_records = receiver.take();
    Ok(TenantPhases {
        alone,
        alone_records,
        heavy,
        heavy_records,
        setup,
    })
}

/// The open loop of `tenants`: light events per second and in all.
struct Load {
    rate: u32,
    events: usize,
}

fn open_load(spec: &Spec) -> Load {
    match spec.load {
        crate::workload::Load::Open { rate, .. } => Load {
            rate,
            events: spec.load.events(),
        },
        crate::workload::Load::Closed { events, .. } => Load { rate: 600, events },
    }
}

/// Creates `tenants` tenants with 5 subscriptions each (`SETUP_CONCURRENCY` calls at a time);
/// returns their ids.
async fn create_tenants(
    admin: &HeraldClient,
    receiver: &Receiver,
    tenants: usize,
) -> anyhow::Result<Vec<String>> {
    let mut ids = vec![String::new(); tenants];
    let mut tasks = JoinSet::new();
    let mut next = 0;
    loop {
        while tasks.len() < SETUP_CONCURRENCY && next < tenants {
            let admin = admin.clone();
            let urls: Vec<String> = (0..TENANT_SUBSCRIPTIONS)
                .map(|k| receiver.url(next * TENANT_SUBSCRIPTIONS + k))
                .collect();
            let t = next;
            tasks.spawn(async move { (t, create_tenant(&admin, t, urls).await) });
            next += 1;
        }
        match tasks.join_next().await {
            Some(Ok((t, id))) => ids[t] = id?,
            Some(Err(err)) => anyhow::bail!("tenant setup task failed: {err}"),
            None => return Ok(ids),
        }
    }
}

async fn create_tenant(
    admin: &HeraldClient,
    t: usize,
    urls: Vec<String>,
) -> anyhow::Result<String> {
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: format!("bench-{t}"),
        })
        .await
        .context("create tenant")?
        .into_inner();
    for (k, url) in urls.into_iter().enumerate() {
        admin
            .subscriptions()
            .create_subscription(pb::CreateSubscriptionRequest {
                tenant_id: tenant.id.clone(),
                name: format!("bench {t}.{k}"),
                url,
                ..Default::default()
            })
            .await
            .context("create subscription")?;
    }
    Ok(tenant.id)
}

impl TenantPhases {
    fn into_run(self, spec: &Spec, after: &After) -> Run {
        let tenant_of = |target: u32| target as usize / TENANT_SUBSCRIPTIONS;
        let light_stats = |records: &[Record], starts: &HashMap<String, Instant>| {
            let e2e = e2e_by_target(records, starts);
            let mut per_tenant: HashMap<usize, Vec<Duration>> = HashMap::new();
            for (target, d) in &e2e {
                if tenant_of(*target) != HEAVY {
                    per_tenant.entry(tenant_of(*target)).or_default().push(*d);
                }
            }
            let mut p99s: Vec<Duration> = per_tenant
                .into_values()
                .map(|mut v| {
                    v.sort_unstable();
                    percentile(&v, 0.99)
                })
                .collect();
            p99s.sort_unstable();
            let pooled = latencies(&e2e, |t| tenant_of(t) != HEAVY);
            let heavy = latencies(&e2e, |t| tenant_of(t) == HEAVY);
            (
                millis(percentile(&p99s, 0.95)),
                millis(percentile(&pooled, 0.99)),
                millis(percentile(&heavy, 0.99)),
            )
        };
        let (p95_alone, pooled_alone, _) = light_stats(&self.alone_records, &self.alone.starts);
        let (p95_heavy, pooled_heavy, heavy_p99) =
            light_stats(&self.heavy_records, &self.heavy.starts);
        let no_ceiling = Ceiling {
            requests: 0,
            elapsed: Duration::from_secs(1),
        };
        let alone_run = Run::compute(spec, &self.alone, &self.alone_records, after, no_ceiling);
        let mut run = Run::compute(spec, &self.heavy, &self.heavy_records, after, no_ceiling);
        let events = open_load(spec).events;
        run.detail = Some(Detail::Tenants(report::Tenants {
            tenants: spec.tenants,
            subscriptions_per_tenant: TENANT_SUBSCRIPTIONS,
            deliveries_per_light_tenant: events / (spec.tenants - 1).max(1) * TENANT_SUBSCRIPTIONS,
            heavy_share_of_events: 0.5,
            light_events_per_s: open_load(spec).rate,
            light_p95_of_p99_ms: p95_heavy,
            light_p95_of_p99_alone_ms: p95_alone,
            ratio: ratio(p95_heavy, p95_alone),
            light_p99_ms: pooled_heavy,
            light_p99_alone_ms: pooled_alone,
            heavy_p99_ms: heavy_p99,
            alone_deliveries_per_s: alone_run.deliveries_per_s,
            alone_lost: alone_run.lost,
            setup_s: self.setup.as_secs_f64(),
        }));
        // Phase 1's losses count too.
        run.lost += alone_run.lost;
        run
    }
}
