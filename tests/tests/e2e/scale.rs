//! Scale-out: several control-plane processes on one PostgreSQL database, agents spread over
//! them, publishes spread over them; a replica killed with SIGKILL mid-run, a rolling restart
//! under load, cluster-wide ListAgents and WatchDeliveries, limits and order across replicas,
//! concurrent first starts; and SQLite's one replica per file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use herald_client::{HeraldClient, Options, v1 as pb};
use herald_tests::harness::{self, Backend, TestDatabase};
use herald_tests::receiver::Reply;
use herald_tests::{Received, Receiver, eventually};
use sea_orm::ConnectionTrait as _;

/// How long any single wait of these tests may take.
const DEADLINE: Duration = Duration::from_secs(30);
/// The lease margin of every replica: a dead replica's deliveries are taken over this long after
/// their time-out.
const LEASE_GRACE: &str = "2s";
/// The time-out of the subscriptions these tests deliver to.
const TIMEOUT_MS: u32 = 2_000;

/// Control planes (child processes) on one fresh PostgreSQL database, each on a port of its
/// own that it keeps across restarts (so agents find it again), and agents spread over them.
struct Cluster {
    database: TestDatabase,
    ports: Vec<u16>,
    replicas: Vec<Option<harness::Child>>,
    agents: Vec<harness::Child>,
}

impl Cluster {
    /// Starts `n` replicas at once on a fresh database.
    async fn start(n: usize) -> Self {
        let database = TestDatabase::new(Backend::Postgres).await;
        let ports = free_ports(n);
        let mut cluster = Self {
            database,
            ports,
            replicas: (0..n).map(|_| None).collect(),
            agents: Vec::new(),
        };
        let envs: Vec<_> = (0..n).map(|i| cluster.env(i)).collect();
        let started =
            futures::future::join_all(envs.iter().map(|env| harness::spawn_control_plane(env)))
                .await;
        for (slot, child) in cluster.replicas.iter_mut().zip(started) {
            *slot = Some(child);
        }
        cluster
    }

    fn env(&self, i: usize) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD_LISTEN", format!("127.0.0.1:{}", self.ports[i])),
            ("HERALD_DATABASE_URL", self.database.url.clone()),
            ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
            ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
            ("HERALD_BUILTIN_AGENT", "false".to_owned()),
            ("HERALD_LEASE_GRACE", LEASE_GRACE.to_owned()),
            ("HERALD_RETRY_SCHEDULE", "100ms".to_owned()),
            ("HERALD_SHUTDOWN_GRACE", "10s".to_owned()),
        ]
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    /// Starts agent `agent_id` knowing the replicas `replicas`, in that order.
    fn spawn_agent(&mut self, agent_id: &str, replicas: &[usize]) {
        let addresses: Vec<String> = replicas.iter().map(|&i| self.url(i)).collect();
        self.agents.push(harness::spawn_agent(&[
            ("HERALD_CONTROL_PLANE", addresses.join(",")),
            ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
            ("HERALD_AGENT_ID", agent_id.to_owned()),
            ("HERALD_CAPACITY", "16".to_owned()),
            ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
        ]));
    }

    /// Starts one agent per replica, each knowing every replica (in a rotated order). An agent
    /// starts at a random address of its list, so one that lands where another agent already is
    /// is started again until it lands on a replica of its own: every run is alike.
    async fn spawn_spread_agents(&mut self) {
        let n = self.ports.len();
        let mut taken: HashSet<String> = HashSet::new();
        for k in 0..n {
            let order: Vec<usize> = (0..n).map(|j| (k + j) % n).collect();
            let agent_id = format!("agent-{k}");
            for _ in 0..50 {
                self.spawn_agent(&agent_id, &order);
                let agents = self.agents_listed(0, k + 1).await;
                let replica = agents
                    .iter()
                    .find(|a| a.agent_id == agent_id)
                    .map(|a| a.replica_id.clone())
                    .expect("the new agent is listed");
                if taken.insert(replica) {
                    break;
                }
                let mut crowded = self.agents.pop().expect("the agent just started");
                crowded.kill().await;
                self.agents_listed(0, k).await;
            }
        }
        assert_eq!(taken.len(), n, "the agents spread over the replicas");
    }

    fn admin(&self, i: usize) -> HeraldClient {
        client(&self.url(i), harness::ADMIN_TOKEN)
    }

    /// Creates a tenant and a token; returns one tenant client per replica.
    async fn tenant(&self) -> Vec<HeraldClient> {
        let (_, token) = harness::create_tenant(&self.admin(0), "acme", "scale").await;
        (0..self.ports.len())
            .map(|i| client(&self.url(i), &token))
            .collect()
    }

    /// Waits until ListAgents on replica `i` shows `n` agents; returns them.
    async fn agents_listed(&self, i: usize, n: usize) -> Vec<pb::AgentInfo> {
        let admin = self.admin(i);
        let what = format!("{n} agents listed by replica {i}");
        eventually(&what, DEADLINE, || {
            let admin = admin.clone();
            async move {
                let agents = admin
                    .admin()
                    .list_agents(pb::ListAgentsRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .agents;
                (agents.len() == n).then_some(agents)
            }
        })
        .await
    }

    fn replica(&mut self, i: usize) -> &mut harness::Child {
        self.replicas[i].as_mut().expect("the replica is running")
    }

    /// Stops everything and drops the database.
    async fn stop(mut self) {
        for agent in &mut self.agents {
            agent.kill().await;
        }
        for replica in self.replicas.iter_mut().flatten() {
            replica.kill().await;
        }
        self.database.drop_database().await;
    }
}

/// A client that tries once: the tests fail over to another replica themselves.
fn client(url: &str, token: &str) -> HeraldClient {
    HeraldClient::with_options(
        url,
        token,
        Options {
            max_attempts: 1,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .unwrap()
}

/// Returns `n` different ports nobody listens on now.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn invoice(n: usize) -> pb::PublishEventRequest {
    pb::PublishEventRequest {
        event_type: "invoice.new".into(),
        payload: format!(r#"{{"invoice":{n}}}"#),
        ..Default::default()
    }
}

/// Publishes `event` on replica `first`, and on the next ones while a replica fails, with one
/// idempotency key throughout (so a publish committed before its reply was lost is not
/// published twice); returns the reply once a replica acknowledged it, `None` if none did.
async fn publish_anywhere(
    clients: &[HeraldClient],
    first: usize,
    mut event: pb::PublishEventRequest,
) -> Option<pb::PublishEventResponse> {
    event.idempotency_key = herald_client::new_idempotency_key();
    for round in 0..3 {
        for j in 0..clients.len() {
            let i = (first + j) % clients.len();
            if let Ok(reply) = clients[i].publish(event.clone()).await {
                return Some(reply);
            }
        }
        tokio::time::sleep(Duration::from_millis(100 * (round + 1))).await;
    }
    None
}

/// Publishers running in the background: `tasks` tasks publish invoice events, event `n` first
/// on replica `n % replicas`, until stopped (or `limit` events).
struct Load {
    stop: Arc<AtomicBool>,
    next: Arc<AtomicUsize>,
    acknowledged: Arc<std::sync::Mutex<Vec<pb::PublishEventResponse>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(clients: &[HeraldClient], tasks: usize, limit: usize, pause: Duration) -> Self {
        let mut load = Self {
            stop: Arc::default(),
            next: Arc::default(),
            acknowledged: Arc::default(),
            tasks: tokio::task::JoinSet::new(),
        };
        for _ in 0..tasks {
            let (stop, next, acknowledged) = (
                load.stop.clone(),
                load.next.clone(),
                load.acknowledged.clone(),
            );
            let clients = clients.to_vec();
            load.tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= limit {
                        return;
                    }
                    if let Some(reply) =
                        publish_anywhere(&clients, n % clients.len(), invoice(n)).await
                    {
                        acknowledged.lock().unwrap().push(reply);
                    }
                    tokio::time::sleep(pause).await;
                }
            });
        }
        load
    }

    /// Stops publishing; returns every acknowledged publish.
    async fn finish(self) -> Vec<pb::PublishEventResponse> {
        self.stop.store(true, Ordering::Relaxed);
        self.complete().await
    }

    /// Waits until every event is published; returns every acknowledged publish.
    async fn complete(mut self) -> Vec<pb::PublishEventResponse> {
        while self.tasks.join_next().await.is_some() {}
        self.acknowledged.lock().unwrap().clone()
    }

    fn attempted(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }
}

fn webhook_ids(received: &[Received]) -> HashSet<String> {
    received
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.header("webhook-id"))
        .map(str::to_owned)
        .collect()
}

/// Waits until the receiver got every acknowledged event (answered 200).
async fn every_event_delivered(receiver: &Receiver, acknowledged: &[pb::PublishEventResponse]) {
    let expected: HashSet<String> = acknowledged.iter().map(|p| p.event_id.clone()).collect();
    eventually("every acknowledged event delivered", DEADLINE, || {
        let got = webhook_ids(&receiver.received());
        let missing = expected.difference(&got).count();
        async move { (missing == 0).then_some(()) }
    })
    .await;
}

/// Returns how many requests of the same event the receiver answered 200 beyond the first.
fn duplicate_requests(receiver: &Receiver) -> usize {
    let mut per_event: HashMap<String, usize> = HashMap::new();
    for request in receiver.received().iter().filter(|r| r.status == 200) {
        if let Some(id) = request.header("webhook-id") {
            *per_event.entry(id.to_owned()).or_default() += 1;
        }
    }
    per_event.values().map(|n| n - 1).sum()
}

/// What the attempt log says about a set of deliveries.
#[derive(Debug, Default)]
struct Log {
    /// Deliveries with more than one 2xx attempt recorded.
    recorded_twice: usize,
    /// Attempts that did not answer 200 or were recorded with an error.
    failed_attempts: usize,
    states: HashMap<i32, usize>,
}

/// Reads every delivery's attempts and asserts that no two of them were in flight at once: each
/// attempt starts at or after the end (`started_at + duration_ms`) of the one before.
async fn check_attempt_log(client: &HeraldClient, deliveries: &[String]) -> Log {
    let mut log = Log::default();
    for id in deliveries {
        let delivery = client
            .deliveries()
            .get_delivery(pb::GetDeliveryRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        *log.states.entry(delivery.state).or_default() += 1;
        let mut spans: Vec<(i64, i64)> = delivery
            .attempts
            .iter()
            .map(|a| {
                let started = a.started_at.as_ref().unwrap();
                let start = started.seconds * 1000 + i64::from(started.nanos) / 1_000_000;
                (start, start + i64::from(a.duration_ms))
            })
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "delivery {id} had two attempts in flight at once: {:?}",
                delivery.attempts
            );
        }
        let succeeded = delivery
            .attempts
            .iter()
            .filter(|a| (200..300).contains(&a.status_code))
            .count();
        if succeeded > 1 {
            log.recorded_twice += 1;
        }
        log.failed_attempts += delivery
            .attempts
            .iter()
            .filter(|a| a.status_code != 200 || a.error != pb::AttemptError::None as i32)
            .count();
    }
    log
}

async fn subscribe(
    client: &HeraldClient,
    receiver: &Receiver,
    f: impl FnOnce(&mut pb::CreateSubscriptionRequest),
) -> pb::Subscription {
    let mut request = pb::CreateSubscriptionRequest {
        name: "hook".into(),
        url: receiver.url("/hook"),
        timeout_ms: TIMEOUT_MS,
        ..Default::default()
    };
    f(&mut request);
    client
        .subscriptions()
        .create_subscription(request)
        .await
        .unwrap()
        .into_inner()
}

/// Three replicas, agents and publishes spread over them; replica 0 is killed with SIGKILL
/// mid-run. Every acknowledged event is delivered, the attempt log never shows two attempts of
/// a delivery in flight at once, and the survivors take over the dead replica's deliveries once
/// their leases expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_work_and_take_over_from_a_killed_one() {
    let mut cluster = Cluster::start(3).await;
    cluster.spawn_spread_agents().await;
    let agents = cluster.agents_listed(0, 3).await;
    let replicas: HashSet<&str> = agents.iter().map(|a| a.replica_id.as_str()).collect();
    assert_eq!(replicas.len(), 3, "one agent per replica: {agents:?}");
    let clients = cluster.tenant().await;
    let receiver = Receiver::start().await;
    receiver.default_reply(Reply {
        status: 200,
        headers: vec![],
        delay: Duration::from_millis(150),
    });
    subscribe(&clients[0], &receiver, |_| {}).await;

    let total = 240;
    let load = Load::start(&clients, 6, total, Duration::from_millis(40));
    // Kill replica 0 a third of the way in, with requests open at the receiver.
    eventually("a third of the events delivered", DEADLINE, || {
        let progress = receiver.received().len();
        let open = receiver.open_now();
        async move { (progress >= total / 3 && open > 0).then_some(()) }
    })
    .await;
    let acknowledged_before: Vec<pb::PublishEventResponse> =
        load.acknowledged.lock().unwrap().clone();
    cluster.replica(0).kill().await;
    let killed_at = Instant::now();
    assert!(
        load.attempted() < total,
        "the kill happened while publishing"
    );

    // Take-over: every delivery acknowledged before the kill is finished in the log, those the
    // dead replica held included (once their leases expired).
    let before: HashSet<String> = acknowledged_before
        .iter()
        .flat_map(|p| p.delivery_ids.clone())
        .collect();
    let client = &clients[1];
    eventually("the dead replica's deliveries taken over", DEADLINE, || {
        let before = &before;
        async move {
            for state in [
                pb::DeliveryState::Pending,
                pb::DeliveryState::InFlight,
                pb::DeliveryState::Failed,
            ] {
                let unfinished = client
                    .deliveries()
                    .list_deliveries(pb::ListDeliveriesRequest {
                        state: state as i32,
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .deliveries;
                if unfinished.iter().any(|d| before.contains(&d.id)) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let take_over = killed_at.elapsed();
    let acknowledged = load.complete().await;
    every_event_delivered(&receiver, &acknowledged).await;
    let all_delivered = killed_at.elapsed();
    assert!(
        acknowledged.len() >= total * 9 / 10,
        "most publishes were acknowledged ({} of {total})",
        acknowledged.len()
    );

    let deliveries: Vec<String> = acknowledged
        .iter()
        .flat_map(|p| p.delivery_ids.clone())
        .collect();
    let log = eventually("every delivery succeeded", DEADLINE, || async {
        let log = check_attempt_log(client, &deliveries).await;
        (log.states.get(&(pb::DeliveryState::Succeeded as i32)) == Some(&deliveries.len()))
            .then_some(log)
    })
    .await;
    let duplicates = duplicate_requests(&receiver);
    println!(
        "scale: SIGKILL of 1 of 3 replicas: take-over of its work {take_over:?}, every \
         acknowledged event delivered {all_delivered:?} after the kill; {} events acknowledged; \
         {duplicates} duplicate requests (lease expired), {} deliveries with two successes recorded",
        acknowledged.len(),
        log.recorded_twice,
    );
    assert_eq!(
        log.recorded_twice, 0,
        "a dead replica's results are never recorded"
    );
    cluster.stop().await;
}

/// A rolling restart of three replicas, one by one under load: every replica stops gracefully
/// (its agents drain and move to another), and nothing is lost, failed or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_and_fails_nothing() {
    let mut cluster = Cluster::start(3).await;
    cluster.spawn_spread_agents().await;
    let clients = cluster.tenant().await;
    let receiver = Receiver::start().await;
    receiver.default_reply(Reply {
        status: 200,
        headers: vec![],
        delay: Duration::from_millis(50),
    });
    subscribe(&clients[0], &receiver, |_| {}).await;

    let load = Load::start(&clients, 3, usize::MAX, Duration::from_millis(10));
    for i in 0..3 {
        let before = receiver.received().len();
        eventually("deliveries flowing", DEADLINE, || {
            let now = receiver.received().len();
            async move { (now >= before + 20).then_some(()) }
        })
        .await;
        let stopping = Instant::now();
        let replica = cluster.replica(i);
        let status = tokio::time::timeout(DEADLINE, replica.terminate())
            .await
            .expect("the replica stops within the deadline");
        assert!(status.success(), "{status:?}\n{}", replica.logs());
        let stopped = stopping.elapsed();
        let env = cluster.env(i);
        cluster.replicas[i] = Some(harness::spawn_control_plane(&env).await);
        println!(
            "scale: rolling restart: replica {i} stopped in {stopped:?}, serving again after {:?}",
            stopping.elapsed()
        );
    }
    let before = receiver.received().len();
    eventually("deliveries flowing after the restarts", DEADLINE, || {
        let now = receiver.received().len();
        async move { (now >= before + 20).then_some(()) }
    })
    .await;
    let acknowledged = load.finish().await;
    every_event_delivered(&receiver, &acknowledged).await;

    let deliveries: Vec<String> = acknowledged
        .iter()
        .flat_map(|p| p.delivery_ids.clone())
        .collect();
    let client = &clients[0];
    let log = eventually("every delivery succeeded", DEADLINE, || async {
        let log = check_attempt_log(client, &deliveries).await;
        (log.states.get(&(pb::DeliveryState::Succeeded as i32)) == Some(&deliveries.len()))
            .then_some(log)
    })
    .await;
    println!(
        "scale: rolling restart: {} events acknowledged and delivered",
        acknowledged.len()
    );
    assert_eq!(log.failed_attempts, 0, "no attempt failed: {log:?}");
    assert_eq!(log.recorded_twice, 0, "{log:?}");
    assert_eq!(
        duplicate_requests(&receiver),
        0,
        "a graceful hand-over sends nothing twice"
    );
    cluster.stop().await;
}

/// ListAgents on any replica shows every replica's agents with the replica they are connected
/// to; WatchDeliveries on a replica with no agent streams the attempts other replicas record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_agents_and_watch_deliveries_are_cluster_wide() {
    let mut cluster = Cluster::start(3).await;
    cluster.spawn_agent("left", &[0]);
    cluster.spawn_agent("right", &[1]);
    let mut views = Vec::new();
    for i in 0..3 {
        let mut agents: Vec<(String, String)> = cluster
            .agents_listed(i, 2)
            .await
            .into_iter()
            .map(|a| (a.agent_id, a.replica_id))
            .collect();
        agents.sort();
        views.push(agents);
    }
    assert!(
        views.iter().all(|v| *v == views[0]),
        "every replica lists the same agents: {views:?}"
    );
    assert_ne!(
        views[0][0].1, views[0][1].1,
        "each agent with its own replica: {views:?}"
    );

    let clients = cluster.tenant().await;
    let receiver = Receiver::start().await;
    let sub = subscribe(&clients[0], &receiver, |_| {}).await;
    // Replica 2 has no agent: whatever its watchers see was recorded elsewhere.
    let mut stream = clients[2]
        .deliveries()
        .watch_deliveries(pb::WatchDeliveriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut expected = HashSet::new();
    for (i, n) in [(0, 1), (1, 2)] {
        let published = clients[i].publish(invoice(n)).await.unwrap();
        expected.insert(published.delivery_ids[0].clone());
    }
    let mut seen = HashMap::new();
    tokio::time::timeout(DEADLINE, async {
        while seen.len() < expected.len() {
            let message = stream.message().await.unwrap().expect("the stream ended");
            assert_eq!(message.subscription_id, sub.id);
            if message.state() == pb::DeliveryState::Succeeded {
                seen.insert(message.delivery_id.clone(), message);
            }
        }
    })
    .await
    .expect("replica 2 streamed the attempts recorded by replicas 0 and 1");
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), expected);
    for message in seen.values() {
        let attempt = message.attempt.as_ref().unwrap();
        assert_eq!(attempt.status_code, 200);
        assert!(
            ["left", "right"].contains(&attempt.agent_id.as_str()),
            "{attempt:?}"
        );
    }
    drop(stream);

    // A replica that stops takes its agents off every list at once ("right" knows no other).
    let status = cluster.replica(1).terminate().await;
    assert!(status.success());
    cluster.replicas[1] = None;
    let left = cluster.agents_listed(0, 1).await;
    assert_eq!(left[0].agent_id, "left");
    cluster.stop().await;
}

/// A subscription's `max_concurrency` holds across replicas, and an ordered subscription
/// delivers each entity's events in publish order although they were published on (and
/// delivered through) different replicas, retries included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_and_entity_order_hold_across_replicas() {
    let mut cluster = Cluster::start(3).await;
    cluster.spawn_spread_agents().await;
    let clients = cluster.tenant().await;

    let limited = Receiver::start().await;
    limited.default_reply(Reply {
        status: 200,
        headers: vec![],
        delay: Duration::from_millis(300),
    });
    subscribe(&clients[0], &limited, |r| {
        r.event_types = vec!["invoice.new".into()];
        r.max_concurrency = 2;
    })
    .await;
    let ordered = Receiver::start().await;
    ordered.script([500]);
    subscribe(&clients[0], &ordered, |r| {
        r.event_types = vec!["user.update".into()];
        r.ordered = true;
    })
    .await;

    // Twelve invoices at once, four on each replica.
    let publishes = (0..12).map(|n| {
        let clients = clients.clone();
        async move { clients[n % 3].publish(invoice(n)).await.unwrap() }
    });
    futures::future::join_all(publishes).await;
    // Three entities at once; each entity's events one after the other, each on the next replica.
    let entities = (1..=3).map(|user: u32| {
        let clients = clients.clone();
        async move {
            for seq in 1..=4u32 {
                let event = pb::PublishEventRequest {
                    event_type: "user.update".into(),
                    payload: format!(r#"{{"entity":"user:{user}","seq":{seq}}}"#),
                    entity_type: "user".into(),
                    entity_id: user.to_string(),
                    action: "update".into(),
                    ..Default::default()
                };
                clients[(user + seq) as usize % 3]
                    .publish(event)
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(entities).await;

    let got = limited.wait_for(12, DEADLINE).await;
    assert_eq!(webhook_ids(&got).len(), 12);
    assert!(
        limited.max_concurrent() <= 2,
        "{} requests were open at once across replicas",
        limited.max_concurrent()
    );

    // Twelve successes and the one scripted failure.
    let got = ordered.wait_for(13, DEADLINE).await;
    let arrivals: Vec<(String, u64, u16)> = got
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            (
                body["entity"].as_str().unwrap().to_owned(),
                body["seq"].as_u64().unwrap(),
                r.status,
            )
        })
        .collect();
    for user in 1..=3 {
        let entity = format!("user:{user}");
        let of_entity: Vec<(u64, u16)> = arrivals
            .iter()
            .filter(|a| a.0 == entity)
            .map(|a| (a.1, a.2))
            .collect();
        let succeeded: Vec<u64> = of_entity
            .iter()
            .filter(|a| a.1 == 200)
            .map(|a| a.0)
            .collect();
        assert_eq!(
            succeeded,
            vec![1, 2, 3, 4],
            "{entity} in publish order: {arrivals:?}"
        );
        assert!(
            of_entity.windows(2).all(|pair| pair[0].0 <= pair[1].0),
            "{entity}: an event went out before an earlier one succeeded: {arrivals:?}"
        );
    }
    cluster.stop().await;
}

/// Three replicas starting at once on an empty database: the migrations run once, and every
/// replica serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_an_empty_database_once() {
    let cluster = Cluster::start(3).await;
    let db = sea_orm::Database::connect(&cluster.database.url)
        .await
        .unwrap();
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT version FROM seaql_migrations ORDER BY version",
        ))
        .await
        .unwrap();
    let versions: Vec<String> = rows
        .iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect();
    assert_eq!(
        versions,
        [
            "m0001_initial",
            "m0002_delivery_log",
            "m0003_agent_credentials",
            "m0004_replicas",
            "m0005_waiting_by_subscription",
            "m0006_console_sessions",
            "m0007_payload_filters",
            "m0008_custom_headers",
            "m0009_shared_agent_token"
        ],
        "each migration ran once"
    );
    let _ = db.close().await;
    for i in 0..3 {
        cluster
            .admin(i)
            .admin()
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .unwrap();
    }
    cluster.stop().await;
}

/// SQLite allows one control plane per file: a second one is refused with a message saying so;
/// once the first is killed with SIGKILL, a new one starts at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_control_plane_on_one_sqlite_file_is_refused() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let env = vec![
        ("HERALD_LISTEN", "127.0.0.1:0".to_owned()),
        ("HERALD_DATABASE_URL", database.url.clone()),
        ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_BUILTIN_AGENT", "false".to_owned()),
        ("HERALD_CONSOLE_LISTEN", String::new()),
    ];
    let mut first = harness::spawn_control_plane(&env).await;
    let output = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(harness::binary("herald-control-plane"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output(),
    )
    .await
    .expect("the second control plane exits at once")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let path = database.sqlite_path().unwrap();
    assert!(
        stderr.contains(&format!(
            "HERALD_DATABASE_URL: {} is in use by another control plane (SQLite allows one \
             replica; use PostgreSQL for several)",
            path.display()
        )),
        "{stderr}"
    );
    // The first one was not disturbed.
    client(
        &format!("http://{}", first.addr.unwrap()),
        harness::ADMIN_TOKEN,
    )
    .admin()
    .list_tenants(pb::ListTenantsRequest::default())
    .await
    .unwrap();

    first.kill().await;
    let restarting = Instant::now();
    let mut second = harness::spawn_control_plane(&env).await;
    assert!(
        restarting.elapsed() < Duration::from_secs(10),
        "the kernel released the lock with the killed process"
    );
    second.terminate().await;
}

/// Changes made on replica A reach replica B at once (the `herald_changes` channel), not after
/// B's caches expire: an update and a rotation change what B sends, a delete stops it, an agent
/// credential revoked on A cuts the agent connected to B, an API token revoked on A is refused
/// by B. Every wait is at most 10 s; the subscription cache's backstop is 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_on_one_replica_reach_the_others() {
    const SOON: Duration = Duration::from_secs(10);
    let mut cluster = Cluster::start(2).await;
    let (a, b) = (cluster.admin(0), cluster.admin(1));
    // The agent, with a credential of its own, knows replica B only: B sends everything.
    let credential = a
        .admin()
        .create_agent_credential(pb::CreateAgentCredentialRequest {
            name: "b-only".into(),
            region: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    cluster.agents.push(harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", cluster.url(1)),
        ("HERALD_AGENT_TOKEN", credential.token.clone()),
        ("HERALD_AGENT_ID", "b-agent".to_owned()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
    ]));
    cluster.agents_listed(1, 1).await;
    let tenants = cluster.tenant().await;
    let (on_a, on_b) = (&tenants[0], &tenants[1]);
    let first = Receiver::start().await;
    let second = Receiver::start().await;
    let sub = subscribe(on_a, &first, |_| {}).await;
    on_b.publish(invoice(1)).await.unwrap();
    first.wait_for(1, SOON).await;

    // An update on A: B's next request goes to the new URL.
    on_a.subscriptions()
        .update_subscription(pb::UpdateSubscriptionRequest {
            id: sub.id.clone(),
            url: Some(second.url("/hook")),
            ..Default::default()
        })
        .await
        .unwrap();
    on_b.publish(invoice(2)).await.unwrap();
    let got = second.wait_for(1, SOON).await;
    assert_eq!(
        first.received().len(),
        1,
        "nothing more went to the old URL"
    );
    // A rotation on A with no grace: B signs with the new secret only.
    let rotated = on_a
        .subscriptions()
        .rotate_secret(pb::RotateSecretRequest {
            id: sub.id.clone(),
            grace_period_s: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.signing_secret, sub.signing_secret);
    on_b.publish(invoice(3)).await.unwrap();
    let got = second.wait_for(got.len() + 1, SOON).await;
    let last = got.last().unwrap();
    let new_secret = standardwebhooks::Webhook::new(&rotated.signing_secret).unwrap();
    new_secret.verify(&last.body, &last.headers).unwrap();
    let old_secret = standardwebhooks::Webhook::new(&sub.signing_secret).unwrap();
    assert!(old_secret.verify(&last.body, &last.headers).is_err());
    // A delete on A: B sends nothing more for it.
    on_a.subscriptions()
        .delete_subscription(pb::DeleteSubscriptionRequest {
            id: sub.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    on_b.publish(invoice(4)).await.unwrap();

    // An API token revoked on A is refused by B.
    let token = a
        .admin()
        .create_token(pb::CreateTokenRequest {
            tenant_id: String::new(),
            name: "short-lived".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let holder_on_b = client(&cluster.url(1), &token.token);
    holder_on_b
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap();
    a.admin()
        .revoke_token(pb::RevokeTokenRequest {
            token_id: token.token_id.clone(),
        })
        .await
        .unwrap();
    eventually("B refuses the revoked token", SOON, || async {
        let refused = holder_on_b
            .admin()
            .list_tenants(pb::ListTenantsRequest::default())
            .await
            .err()?;
        (refused.code() == tonic::Code::Unauthenticated).then_some(())
    })
    .await;

    // The agent credential revoked on A: the agent on B is cut off.
    a.admin()
        .revoke_agent_credential(pb::RevokeAgentCredentialRequest {
            credential_id: credential.credential_id.clone(),
        })
        .await
        .unwrap();
    eventually("the agent on B is disconnected", SOON, || async {
        let agents = b
            .admin()
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .ok()?
            .into_inner()
            .agents;
        agents.is_empty().then_some(())
    })
    .await;
    assert_eq!(
        second.received().len(),
        2,
        "nothing was sent for the deleted subscription"
    );
    cluster.stop().await;
}

const OLD_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const NEW_KEY: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";

/// A database written without a master key holds no secret in clear after a start with one;
/// `rotate-master-key` with two replicas running both keys, then a start with the new key
/// alone, still delivers with the old subscriptions' secrets and Ed25519 keys, and the old key
/// alone is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_keys_are_set_and_rotated_without_losing_a_secret() {
    let database = TestDatabase::new(Backend::Postgres).await;
    let ports = free_ports(2);
    let env = |i: usize, keys: &[(&'static str, &str)]| {
        let mut env = vec![
            ("HERALD_LISTEN", format!("127.0.0.1:{}", ports[i])),
            ("HERALD_DATABASE_URL", database.url.clone()),
            ("HERALD_ADMIN_TOKEN", harness::ADMIN_TOKEN.to_owned()),
            ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
            ("HERALD_BUILTIN_AGENT", "false".to_owned()),
        ];
        env.extend(keys.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env
    };
    let stored_secrets = || async {
        let db = sea_orm::Database::connect(&database.url).await.unwrap();
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT signing_secret, COALESCE(api_key, '') FROM subscriptions",
            ))
            .await
            .unwrap();
        let _ = db.close().await;
        rows.iter()
            .flat_map(|r| {
                [
                    r.try_get_by_index::<String>(0).unwrap(),
                    r.try_get_by_index::<String>(1).unwrap(),
                ]
            })
            .filter(|v| !v.is_empty())
            .collect::<Vec<String>>()
    };
    // Written without a key.
    let mut plain = harness::spawn_control_plane(&env(0, &[])).await;
    let admin = client(
        &format!("http://127.0.0.1:{}", ports[0]),
        harness::ADMIN_TOKEN,
    );
    let tenant = admin
        .admin()
        .create_tenant(pb::CreateTenantRequest {
            name: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let receiver = Receiver::start().await;
    let sub = admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant.id.clone(),
            name: "hook".into(),
            url: receiver.url("/hook"),
            api_key: "receiver-key-0123".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ed25519 = admin
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            tenant_id: tenant.id.clone(),
            name: "ed25519 hook".into(),
            url: receiver.url("/ed25519"),
            signature_scheme: pb::SignatureScheme::Ed25519 as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let stored = stored_secrets().await;
    assert!(stored.iter().any(|v| v == &sub.signing_secret));
    assert!(stored.iter().any(|v| v.starts_with("whsk_")), "{stored:?}");
    plain.terminate().await;

    // Two replicas with the old key: nothing stays in clear.
    let mut replicas = Vec::new();
    for i in 0..2 {
        replicas
            .push(harness::spawn_control_plane(&env(i, &[("HERALD_MASTER_KEY", OLD_KEY)])).await);
    }
    let secrets = stored_secrets().await;
    assert_eq!(secrets.len(), 3);
    assert!(
        secrets.iter().all(|v| v.starts_with("sealed1:")),
        "{secrets:?}"
    );
    for replica in &mut replicas {
        replica.terminate().await;
    }

    // Rotation: both replicas with both keys, rotate, then the new key alone.
    let both = [
        ("HERALD_MASTER_KEY", NEW_KEY),
        ("HERALD_MASTER_KEY_PREVIOUS", OLD_KEY),
    ];
    let mut replicas = Vec::new();
    for i in 0..2 {
        replicas.push(harness::spawn_control_plane(&env(i, &both)).await);
    }
    let before = stored_secrets().await;
    let rotate = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .arg("rotate-master-key")
        .envs(env(0, &both))
        .env("HERALD_CONSOLE_LISTEN", "")
        .output()
        .await
        .unwrap();
    assert!(
        rotate.status.success(),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    assert!(String::from_utf8_lossy(&rotate.stdout).contains("re-sealed 3 secrets"));
    let after = stored_secrets().await;
    assert!(
        after
            .iter()
            .all(|v| v.starts_with("sealed1:") && !before.contains(v))
    );
    for replica in &mut replicas {
        replica.terminate().await;
    }
    // The old key alone no longer opens the data.
    let refused = tokio::process::Command::new(harness::binary("herald-control-plane"))
        .envs(env(0, &[("HERALD_MASTER_KEY", OLD_KEY)]))
        .env("HERALD_CONSOLE_LISTEN", "")
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("HERALD_MASTER_KEY"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let mut replica =
        harness::spawn_control_plane(&env(0, &[("HERALD_MASTER_KEY", NEW_KEY)])).await;
    let mut agent = harness::spawn_agent(&[
        (
            "HERALD_CONTROL_PLANE",
            format!("http://127.0.0.1:{}", ports[0]),
        ),
        ("HERALD_AGENT_TOKEN", harness::AGENT_TOKEN.to_owned()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".to_owned()),
    ]);
    let admin = client(
        &format!("http://127.0.0.1:{}", ports[0]),
        harness::ADMIN_TOKEN,
    );
    let mut event = invoice(1);
    event.tenant_id = tenant.id.clone();
    admin.publish(event).await.unwrap();
    let mut got = receiver.wait_for(2, DEADLINE).await;
    got.sort_by(|a, b| a.path.cmp(&b.path));
    let (ed25519_request, hmac_request) = (&got[0], &got[1]);
    let webhook = standardwebhooks::Webhook::new(&sub.signing_secret).unwrap();
    webhook
        .verify(&hmac_request.body, &hmac_request.headers)
        .unwrap();
    assert_eq!(hmac_request.header("x-api-key"), Some("receiver-key-0123"));
    // The Ed25519 key survived sealing and rotation: the public key given at creation verifies.
    let public_key = herald_proto::webhook::PublicKey::parse(&ed25519.signing_public_key).unwrap();
    herald_proto::webhook::verify(
        &public_key,
        ed25519_request.header("webhook-id"),
        ed25519_request.header("webhook-timestamp"),
        ed25519_request.header("webhook-signature"),
        &ed25519_request.body,
        chrono::Utc::now().timestamp(),
        300,
    )
    .unwrap();
    agent.kill().await;
    replica.terminate().await;
    let mut database = database;
    database.drop_database().await;
}

/// A fresh PostgreSQL database with Herald's schema (made by a store, which stays open) and a
/// connection of the test's own, for tests of what the planner makes of Herald's statements.
struct PlannerSchema {
    database: TestDatabase,
    store: herald_control_plane::storage::Store,
    db: sea_orm::DatabaseConnection,
}

impl PlannerSchema {
    async fn new() -> Self {
        use herald_control_plane::storage::{Store, StoreOptions};
        let database = TestDatabase::new(Backend::Postgres).await;
        let store = Store::open(StoreOptions {
            url: database.url.clone(),
            max_connections: 2,
            master_key: None,
            previous_master_key: None,
            sqlite_page_limit: None,
        })
        .await
        .unwrap();
        let db = sea_orm::Database::connect(&database.url).await.unwrap();
        Self {
            database,
            store,
            db,
        }
    }

    async fn finish(mut self) {
        let _ = self.db.close().await;
        self.store.close().await;
        self.database.drop_database().await;
    }
}

/// Returns the plan of `statement` as `prefix` (`EXPLAIN`, `EXPLAIN (ANALYZE, BUFFERS)`) prints it.
async fn explain(
    db: &impl sea_orm::ConnectionTrait,
    prefix: &str,
    statement: sea_orm::Statement,
) -> String {
    let statement = sea_orm::Statement {
        sql: format!("{prefix} {}", statement.sql),
        ..statement
    };
    let lines: Vec<String> = db
        .query_all_raw(statement)
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect();
    lines.join("\n")
}

/// The delivery log of one subscription reads its newest page from the subscription's index,
/// whatever PostgreSQL's statistics say. Behind a burst of publishes the table has not been
/// analyzed yet (autovacuum's analyze comes later, or never where it is off), and with default
/// estimates the planner intersected the tenant's and the subscription's indexes and sorted the
/// whole subscription: `herald-bench --workload backlog --backend postgres` measured 2.9 s per
/// `ListDeliveries` page, eleven such calls at once, and the drain at 150 deliveries/s.
#[tokio::test]
async fn a_subscriptions_delivery_log_reads_its_index_before_statistics_exist() {
    use herald_control_plane::domain::model::PageRequest;
    use herald_control_plane::storage::deliveries::{self, ListBy};

    let schema = PlannerSchema::new().await;
    let db = &schema.db;
    // A backlog: 40,000 deliveries of one tenant over four subscriptions, never analyzed.
    db.execute_unprepared(
        "ALTER TABLE deliveries SET (autovacuum_enabled = false);
             INSERT INTO deliveries (id, tenant_id, event_id, subscription_id, state,
                 attempt_count, next_attempt_at, created_at, updated_at)
             SELECT 'dlv_' || lpad(n::text, 8, '0'), 'ten_a', 'evt_' || (n / 4),
                    'sub_' || (n % 4), 1, 0, 0, 0, 0
             FROM generate_series(1, 40000) AS n",
    )
    .await
    .unwrap();

    let by = ListBy::Subscription("sub_1".into());
    let page = PageRequest {
        size: 10,
        after: None,
    };
    let statement =
        deliveries::list_statement(sea_orm::DbBackend::Postgres, "ten_a", &by, None, &page);
    let plan = explain(db, "EXPLAIN", statement).await;
    assert!(
        plan.contains("Index Scan Backward using deliveries_subscription")
            && !plan.contains("Sort"),
        "the newest page should walk deliveries_subscription backwards, without a sort:\n{plan}"
    );

    // And it is the subscription's newest page.
    let listed = deliveries::list(db, "ten_a", &by, None, &page)
        .await
        .unwrap();
    let ids: Vec<&str> = listed.items.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), 10);
    assert_eq!(ids[0], "dlv_00039997");
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    schema.finish().await;
}

/// The cluster-wide claim counts each subscription's deliveries in flight through the partial
/// index `deliveries_in_flight`. Every lease that ended left a dead entry there until `VACUUM`
/// (behind a backlog of a million with autovacuum off, 121,482 entries for 154 live ones, and
/// the drain fell from 6,000/s to under 1,000/s). The claim's count must skip them once met:
/// a plain index scan marks them dead, a bitmap scan visits every dead row's heap page at
/// every claim.
#[tokio::test]
async fn the_claims_in_flight_count_skips_finished_leases_once_met() {
    use herald_control_plane::storage::deliveries::{self, ClaimGroup, LeaseClaim};
    use sea_orm::TransactionTrait as _;

    let schema = PlannerSchema::new().await;
    let db = &schema.db;
    // 20,000 leases of one subscription of which 10 are still out (the rest finished: dead
    // entries in the index) and one more whose lease expired (it holds no slot), 50 pending
    // deliveries to claim, and one pending for each of four more subscriptions (a claim round
    // counts several at once); never vacuumed nor analyzed.
    db.execute_unprepared(
        "ALTER TABLE deliveries SET (autovacuum_enabled = false);
         INSERT INTO deliveries (id, tenant_id, event_id, subscription_id, state, attempt_count,
             next_attempt_at, lease_id, lease_expires_at, created_at, updated_at)
         SELECT 'dlv_' || lpad(n::text, 8, '0'), 'ten_a', 'evt_' || n, 'sub_a', 2, 1, 0,
                'lse_old', 9000000000000, 0, 0
         FROM generate_series(1, 20000) AS n;
         UPDATE deliveries SET state = 3, lease_id = NULL WHERE id <= 'dlv_00019990';
         INSERT INTO deliveries (id, tenant_id, event_id, subscription_id, state, attempt_count,
             next_attempt_at, lease_id, lease_expires_at, created_at, updated_at)
         VALUES ('dlv_expired', 'ten_a', 'evt_expired', 'sub_a', 2, 1, 0, 'lse_gone', 1, 0, 0);
         INSERT INTO deliveries (id, tenant_id, event_id, subscription_id, state, attempt_count,
             next_attempt_at, created_at, updated_at)
         SELECT 'dlv_' || lpad(n::text, 8, '0'), 'ten_a', 'evt_' || n, 'sub_a', 1, 0, 0, 0, 0
         FROM generate_series(20001, 20050) AS n;
         INSERT INTO deliveries (id, tenant_id, event_id, subscription_id, state, attempt_count,
             next_attempt_at, created_at, updated_at)
         SELECT 'dlv_' || lpad(n::text, 8, '0'), 'ten_a', 'evt_' || n, 'sub_' || n, 1, 0, 0, 0, 0
         FROM generate_series(20051, 20054) AS n",
    )
    .await
    .unwrap();

    let now = chrono::Utc::now();
    let claim = LeaseClaim {
        lease_id: "lse_new".into(),
        agent_id: "agt_a".into(),
        expires_at: now + chrono::Duration::seconds(60),
        groups: std::iter::once(ClaimGroup {
            subscription_id: "sub_a".into(),
            max_concurrency: 20,
            ids: (20001..=20050).map(|n| format!("dlv_{n:08}")).collect(),
        })
        .chain((20051..=20054).map(|n| ClaimGroup {
            subscription_id: format!("sub_{n}"),
            max_concurrency: 5,
            ids: vec![format!("dlv_{n:08}")],
        }))
        .collect(),
    };
    let subscriptions: Vec<&str> = claim
        .groups
        .iter()
        .map(|group| group.subscription_id.as_str())
        .collect();
    // Two claim rounds, as the scheduler runs them; in the second's transaction, what its count
    // read.
    let first = db.begin().await.unwrap();
    let claimed = deliveries::claim_leases(&first, std::slice::from_ref(&claim), now, true)
        .await
        .unwrap();
    first.commit().await.unwrap();
    assert_eq!(
        claimed.leased.len(),
        10 + 4,
        "sub_a: 20 slots, 10 of them taken (an expired lease takes none)"
    );
    assert_eq!(claimed.deferred.len(), 40);

    let second = db.begin().await.unwrap();
    let claimed = deliveries::claim_leases(&second, std::slice::from_ref(&claim), now, true)
        .await
        .unwrap();
    assert!(claimed.leased.is_empty(), "{claimed:?}");
    assert_eq!(claimed.deferred.len(), 50, "sub_a is full");
    let count = deliveries::in_flight_count(&subscriptions, now);
    let plan = explain(&second, "EXPLAIN (ANALYZE, BUFFERS)", count).await;
    second.rollback().await.unwrap();
    let heap_pages: i64 = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_relation_size('deliveries') / current_setting('block_size')::bigint",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    // The first "Buffers: shared" line is the top node's: every page the count touched, found
    // in shared buffers (hit) or not (read).
    let buffers: i64 = plan
        .lines()
        .find_map(|line| line.trim().strip_prefix("Buffers: shared "))
        .map(|counts| {
            counts
                .split_whitespace()
                .filter_map(|count| count.split_once('='))
                .filter(|(kind, _)| matches!(*kind, "hit" | "read"))
                .filter_map(|(_, n)| n.parse::<i64>().ok())
                .sum()
        })
        .unwrap_or_else(|| panic!("no buffer count in the plan:\n{plan}"));
    assert!(
        plan.contains("using deliveries_in_flight") && !plan.contains("Bitmap"),
        "the count should scan deliveries_in_flight with a plain index scan:\n{plan}"
    );
    assert!(
        buffers * 10 < heap_pages,
        "the count read {buffers} pages of a {heap_pages}-page table for 24 live leases:\n{plan}"
    );
    schema.finish().await;
}
