//! `chaos`: fanout-1 for three unaffected tenants (open loop, one subscription each) over four
//! agents while they fail, and a fourth tenant whose receiver never answers; then the same run
//! without faults, for the unaffected tenants' p99 beside it.
//!
//! The faults, on a control plane without its built-in agent, `HERALD_LEASE_GRACE=1s`,
//! `HERALD_RETRY_SCHEDULE=100ms` and unaffected subscriptions with `timeout_ms` 2,000:
//! - `chaos-withhold`, the stand-in ([`crate::standin`]): keeps its stream and heartbeats,
//!   never reports (from the start);
//! - `chaos-stop`: `SIGSTOP` at 20% of the publishing, `SIGKILL` at the end;
//! - `chaos-crash`: `SIGKILL` at 40%, started again at 50%;
//! - `chaos-steady`: untouched;
//! - the hanging tenant: 100 events published before the measured phase to a subscription
//!   with `timeout_ms` 1,000 and `max_attempts` 2, whose receiver never answers: each delivery
//!   must end `DEAD` after `TIMEOUT` attempts.
//!
//! The run without faults has four `herald-agent` processes and a hanging tenant that answers.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use herald_client::{HeraldClient, v1 as pb};
use nix::sys::signal::Signal;

use crate::deploy::{AgentLauncher, Database, Deployment, Process};
use crate::receiver::{Answer, Receiver};
use crate::report::{self, Detail, Run};
use crate::standin::Withholder;
use crate::workload::{
    After, Ceiling, Load, Measured, Settings, Spec, fail, measure_phase, publish_one,
    publish_open_with, wait_for_agents,
};

/// The hanging tenant's events, and its subscription's limits.
const HANGING_EVENTS: usize = 100;
const HANGING_TIMEOUT_MS: u32 = 1_000;
const HANGING_MAX_ATTEMPTS: u32 = 2;
/// The unaffected subscriptions' time-out: with the lease grace, how long a withheld job waits.
const UNAFFECTED_TIMEOUT_MS: u32 = 2_000;
/// The agents' region (herald-agent's default); the subscriptions name none.
const REGION: &str = "default";
/// Capacity of every agent (herald-agent's default).
const CAPACITY: u32 = 256;
/// The longest wait for the hanging tenant's deliveries to end.
const HANGING_LIMIT: Duration = Duration::from_secs(120);

/// What one run of chaos produced.
struct Outcome {
    run: Run,
    faults: Vec<String>,
    hanging_deliveries: usize,
    hanging_dead_by_timeout: usize,
    withheld: usize,
}

pub async fn run(spec: &Spec, settings: &Settings) -> anyhow::Result<Run> {
    let faulty = run_once(spec, settings, true).await?;
    let clean = run_once(spec, settings, false).await?;
    let mut run = faulty.run;
    run.detail = Some(Detail::Chaos(report::Chaos {
        faults: faulty.faults,
        unaffected_expected: run.expected,
        unaffected_lost: run.lost,
        unaffected_duplicates: run.duplicates,
        unaffected_p99_ms: run.e2e_p99_ms,
        unaffected_p99_no_faults_ms: clean.run.e2e_p99_ms,
        ratio: report::ratio(run.e2e_p99_ms, clean.run.e2e_p99_ms),
        hanging_deliveries: faulty.hanging_deliveries,
        hanging_dead_by_timeout: faulty.hanging_dead_by_timeout,
        withheld_jobs: faulty.withheld,
        no_faults_deliveries_per_s: clean.run.deliveries_per_s,
        no_faults_lost: clean.run.lost,
    }));
    // A loss in the clean run is a loss too.
    run.lost += clean.run.lost;
    Ok(run)
}

async fn run_once(spec: &Spec, settings: &Settings, faults: bool) -> anyhow::Result<Outcome> {
    let receiver = Receiver::start(2 * spec.load.events() + 1024).await?;
    settings
        .on_fresh_database(async |database| {
            run_on(spec, settings, &receiver, database, faults).await
        })
        .await
}

/// The agents of a chaos run, owned here (not by the deployment, whose liveness check would
/// fail on the killed one).
struct Agents {
    launcher: AgentLauncher,
    stop: Process,
    crash: Process,
    steady: Process,
    /// The stand-in, or with no faults a fourth herald-agent.
    withhold: Result<Withholder, Process>,
}

impl Agents {
    async fn stop(self) {
        for agent in [self.stop, self.crash, self.steady] {
            agent.stop().await;
        }
        if let Err(agent) = self.withhold {
            agent.stop().await;
        }
    }
}

async fn run_on(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
    faults: bool,
) -> anyhow::Result<Outcome> {
    let mut plan = settings.plan.clone();
    plan.agents = 0;
    plan.retry_schedule = Some("100ms".into());
    plan.control_plane_env.extend([
        ("HERALD_BUILTIN_AGENT", "false".to_owned()),
        ("HERALD_LEASE_GRACE", "1s".to_owned()),
    ]);
    let mut deployment = Deployment::start(&plan, database).await?;
    let launcher = deployment.launcher();
    let agents = match start_agents(&launcher, &deployment, REGION, faults) {
        Ok(agents) => agents,
        Err(err) => return Err(fail(deployment, err).await),
    };
    let result = measure(
        spec,
        settings,
        receiver,
        database,
        &mut deployment,
        agents,
        faults,
    )
    .await;
    match result {
        Ok((measured, outcome_parts)) => {
            deployment.stop().await;
            let after = After::read(database).await?;
            let records = receiver.take();
            let no_ceiling = Ceiling {
                requests: 0,
                elapsed: Duration::from_secs(1),
            };
            let run = Run::compute(spec, &measured, &records, &after, no_ceiling);
            let (faults, hanging_deliveries, hanging_dead_by_timeout, withheld) = outcome_parts;
            Ok(Outcome {
                run,
                faults,
                hanging_deliveries,
                hanging_dead_by_timeout,
                withheld,
            })
        }
        Err(err) => Err(fail(deployment, err).await),
    }
}

fn start_agents(
    launcher: &AgentLauncher,
    deployment: &Deployment,
    region: &str,
    faults: bool,
) -> anyhow::Result<Agents> {
    let withhold = if faults {
        Ok(Withholder::start(
            deployment.url(0),
            launcher.token().to_owned(),
            "chaos-withhold".into(),
            region.into(),
            CAPACITY,
        ))
    } else {
        Err(launcher.spawn("chaos-fourth", region, CAPACITY)?)
    };
    Ok(Agents {
        launcher: launcher.clone(),
        stop: launcher.spawn("chaos-stop", region, CAPACITY)?,
        crash: launcher.spawn("chaos-crash", region, CAPACITY)?,
        steady: launcher.spawn("chaos-steady", region, CAPACITY)?,
        withhold,
    })
}

type Parts = (Vec<String>, usize, usize, usize);

async fn measure(
    spec: &Spec,
    settings: &Settings,
    receiver: &Receiver,
    database: &Database,
    deployment: &mut Deployment,
    mut agents: Agents,
    faults: bool,
) -> anyhow::Result<(Measured, Parts)> {
    let admin = HeraldClient::connect(&deployment.url(0), &deployment.admin_token)
        .context("control plane address")?;
    if let Err(err) = wait_for_agents(&admin, deployment, 4).await {
        agents.stop().await;
        return Err(err);
    }
    // Tenants 0..3 unaffected, tenant 3 hanging; subscription n of tenant n, target n.
    let hanging = spec.subscriptions;
    let mut tenant_ids = Vec::new();
    let mut hanging_subscription = String::new();
    for n in 0..=hanging {
        let tenant = admin
            .admin()
            .create_tenant(pb::CreateTenantRequest {
                name: format!("chaos-{n}"),
            })
            .await
            .context("create tenant")?
            .into_inner();
        let (timeout_ms, max_attempts, max_concurrency) = if n == hanging {
            (HANGING_TIMEOUT_MS, HANGING_MAX_ATTEMPTS, 0)
        } else {
            (UNAFFECTED_TIMEOUT_MS, 0, 1024)
        };
        let subscription = admin
            .subscriptions()
            .create_subscription(pb::CreateSubscriptionRequest {
                tenant_id: tenant.id.clone(),
                name: format!("chaos {n}"),
                url: receiver.url(n),
                timeout_ms,
                max_attempts,
                max_concurrency,
                ..Default::default()
            })
            .await
            .context("create subscription")?
            .into_inner();
        if n == hanging {
            hanging_subscription = subscription.id;
        }
        tenant_ids.push(tenant.id);
    }
    if faults {
        receiver.answer(hanging, Answer::Never);
    }
    let hanging_tenant = tenant_ids[hanging].clone();
    for n in 0..HANGING_EVENTS {
        let request = pb::PublishEventRequest {
            tenant_id: hanging_tenant.clone(),
            ..crate::workload::event(n)
        };
        let published = publish_one(&admin, request, Instant::now()).await;
        if let Err(message) = published.id {
            bail!("publish to the hanging tenant: {message}");
        }
    }

    let Load::Open { rate, duration } = spec.load else {
        bail!("chaos publishes an open loop");
    };
    let events = spec.load.events();
    let clients = [admin.clone()];
    let mut log = Vec::new();
    let publish = async {
        let publish = publish_open_with(&clients, rate, events, |n| pb::PublishEventRequest {
            tenant_id: tenant_ids[n % spec.subscriptions].clone(),
            ..crate::workload::event(n)
        });
        let script = async {
            if !faults {
                return;
            }
            let started = Instant::now();
            log.push("0.0 s: chaos-withhold (stand-in) holds every job it gets".to_owned());
            let at = |fraction: f64| started + duration.mul_f64(fraction);
            let stamp = |started: Instant| format!("{:.1} s", started.elapsed().as_secs_f64());
            tokio::time::sleep_until(at(0.2).into()).await;
            agents.stop.signal(Signal::SIGSTOP);
            log.push(format!("{}: SIGSTOP chaos-stop", stamp(started)));
            tokio::time::sleep_until(at(0.4).into()).await;
            agents.crash.kill().await;
            log.push(format!("{}: SIGKILL chaos-crash", stamp(started)));
            tokio::time::sleep_until(at(0.5).into()).await;
            match agents.launcher.spawn("chaos-crash", REGION, CAPACITY) {
                Ok(agent) => {
                    agents.crash = agent;
                    log.push(format!("{}: chaos-crash started again", stamp(started)));
                }
                Err(err) => log.push(format!("restart of chaos-crash failed: {err:#}")),
            }
        };
        let (published, ()) = tokio::join!(publish, script);
        published
    };
    let measured = measure_phase(settings, receiver, database, deployment, 1, publish).await;
    if faults {
        agents.stop.kill().await;
        log.push("end: SIGKILL chaos-stop".to_owned());
    }
    let withheld = agents.withhold.as_ref().map_or(0, Withholder::withheld);
    if let Ok(withholder) = &agents.withhold {
        log.push(format!(
            "chaos-withhold's stream was welcomed {} times",
            withholder.connections()
        ));
    }
    let hanging = hanging_outcome(&admin, &hanging_tenant, &hanging_subscription).await;
    agents.stop().await;
    let measured = measured?;
    let (deliveries, dead_by_timeout) = hanging?;
    Ok((measured, (log, deliveries, dead_by_timeout, withheld)))
}

/// Waits (at most [`HANGING_LIMIT`]) for the hanging tenant's deliveries to end; returns how
/// many there are and how many ended `DEAD` with a `TIMEOUT` last attempt.
async fn hanging_outcome(
    admin: &HeraldClient,
    tenant_id: &str,
    subscription_id: &str,
) -> anyhow::Result<(usize, usize)> {
    let deadline = Instant::now() + HANGING_LIMIT;
    loop {
        let mut deliveries = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = admin
                .deliveries()
                .list_deliveries(pb::ListDeliveriesRequest {
                    tenant_id: tenant_id.to_owned(),
                    subscription_id: subscription_id.to_owned(),
                    page_size: 100,
                    page_token,
                    ..Default::default()
                })
                .await
                .context("list the hanging tenant's deliveries")?
                .into_inner();
            deliveries.extend(page.deliveries);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let ended = deliveries
            .iter()
            .filter(|d| {
                matches!(
                    d.state(),
                    pb::DeliveryState::Dead | pb::DeliveryState::Succeeded
                )
            })
            .count();
        if ended == deliveries.len() || Instant::now() > deadline {
            let dead_by_timeout = deliveries
                .iter()
                .filter(|d| {
                    d.state() == pb::DeliveryState::Dead
                        && d.last_error() == pb::AttemptError::Timeout
                })
                .count();
            return Ok((deliveries.len(), dead_by_timeout));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
