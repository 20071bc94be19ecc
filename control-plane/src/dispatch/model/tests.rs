//! The model's rules with time passed in: no socket, no database, no runtime.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proptest::prelude::*;

use super::*;
use crate::domain::model::DeliveryState;

fn limits() -> Limits {
    Limits {
        lease_grace: Duration::from_secs(2),
        region_fallback: RegionFallback::Wait,
        silence_limit: Duration::from_secs(30),
        expiries_in_a_row: 3,
        foreign_results_allowed: 10,
        max_queued: 10_000,
        max_queued_per_subscription: 1_000,
    }
}

fn subscription(id: &str, tenant: &str) -> Subscription {
    Subscription::example(id, tenant)
}

fn delivery(id: &str, subscription: &Subscription, entity: Option<&str>) -> Delivery {
    Delivery {
        id: id.into(),
        tenant_id: subscription.tenant_id.clone(),
        event_id: format!("evt_{id}"),
        subscription_id: subscription.id.clone(),
        state: DeliveryState::Pending,
        attempt_count: 0,
        next_attempt_at: DateTime::<Utc>::default(),
        ordering_key: entity.map(str::to_owned),
        event_type: "user.new".into(),
        last_status_code: None,
        last_error: None,
        created_at: DateTime::<Utc>::default(),
    }
}

fn subs(list: &[Subscription]) -> HashMap<String, Arc<Subscription>> {
    list.iter()
        .map(|s| (s.id.clone(), Arc::new(s.clone())))
        .collect()
}

/// Leases every pick as the actor would after a successful claim.
fn lease_all(model: &mut Model, picks: Picks, now: Instant) -> Vec<Lease> {
    let mut leases = Vec::new();
    for (agent, batch) in picks {
        for (delivery, subscription) in batch {
            let lease = Lease {
                agent,
                lease_id: format!("lse_{}", delivery.id),
                attempt: delivery.attempt_count + 1,
                expires_at: now + model.lease_duration(&subscription),
                delivery,
            };
            model.lease(lease.clone());
            leases.push(lease);
        }
    }
    leases
}

fn picked_ids(picks: &Picks) -> Vec<String> {
    let mut ids: Vec<String> = picks
        .values()
        .flatten()
        .map(|(d, _)| d.id.clone())
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_lease_without_a_result_expires_at_timeout_plus_grace_and_keeps_its_credit() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 5, t0);
    let sub = subscription("sub_a", "t1");
    for i in 0..5 {
        model.enqueue(delivery(&format!("d{i}"), &sub, None));
    }
    let picks = model.pick(t0, &subs(std::slice::from_ref(&sub)));
    assert_eq!(picks[&1].len(), 5);
    lease_all(&mut model, picks, t0);
    // Timeout 2 s + grace 2 s.
    assert_eq!(model.next_deadline(), Some(t0 + Duration::from_secs(4)));
    assert!(
        model
            .expire(t0 + Duration::from_millis(3_999))
            .leases
            .is_empty()
    );
    let expired = model.expire(t0 + Duration::from_secs(4));
    assert_eq!(expired.leases.len(), 5);
    assert_eq!(model.leased(), 0);
    // Five in a row with no result: the agent is disconnected once.
    assert_eq!(
        expired.disconnect,
        vec![(1, DisconnectReason::LeasesExpired)]
    );
    // The credits stay with the agent (it may still be working); the slots are busy until the
    // TIMEOUT attempts are recorded.
    model.enqueue(delivery("d9", &sub, None));
    assert!(
        model
            .pick(
                t0 + Duration::from_secs(4),
                &subs(std::slice::from_ref(&sub))
            )
            .is_empty()
    );
    for lease in &expired.leases {
        model.recorded(&lease.delivery);
    }
    assert!(
        model
            .pick(t0 + Duration::from_secs(4), &subs(&[sub]))
            .is_empty()
    );
}

#[test]
fn a_result_counts_only_on_the_stream_its_lease_was_sent_on() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 5, t0);
    model.agent_connected(2, "local", 5, t0);
    let sub = subscription("sub_a", "t1");
    model.enqueue(delivery("d1", &sub, None));
    model.enqueue(delivery("d2", &sub, None));
    let picks = model_pick(&mut model, t0, &sub);
    let leases = lease_all(&mut model, picks, t0);
    let lease = leases.iter().find(|l| l.delivery.id == "d1").unwrap();
    let other = if lease.agent == 1 { 2 } else { 1 };
    // Another stream, a guessed lease id: refused.
    assert!(matches!(
        model.end_lease(other, "d1", &lease.lease_id, t0),
        Reported::Foreign { close: false }
    ));
    assert!(matches!(
        model.end_lease(lease.agent, "d1", "lse_wrong", t0),
        Reported::Foreign { .. }
    ));
    assert!(matches!(
        model.end_lease(lease.agent, "d1", &lease.lease_id, t0),
        Reported::Current(_)
    ));
    // Reported twice: the second is refused.
    assert!(matches!(
        model.end_lease(lease.agent, "d1", &lease.lease_id, t0),
        Reported::Foreign { .. }
    ));
    // A late result of a lease that expired on this stream is still this agent's.
    let d2 = leases.iter().find(|l| l.delivery.id == "d2").unwrap();
    let later = t0 + Duration::from_secs(60);
    assert_eq!(model.expire(later).leases.len(), 1);
    assert!(matches!(
        model.end_lease(d2.agent, "d2", &d2.lease_id, later),
        Reported::Late
    ));
    assert!(matches!(
        model.end_lease(d2.agent, "d2", &d2.lease_id, later),
        Reported::Foreign { .. }
    ));
}

#[test]
fn an_agent_reporting_foreign_results_is_closed_after_ten() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 5, t0);
    let closes: Vec<bool> = (0..12)
        .map(
            |i| match model.end_lease(1, &format!("dlv_{i}"), "lse_guess", t0) {
                Reported::Foreign { close } => close,
                other => panic!("{other:?}"),
            },
        )
        .collect();
    assert_eq!(closes.iter().filter(|c| **c).count(), 1);
    assert!(closes[9]);
}

fn model_pick(model: &mut Model, now: Instant, sub: &Subscription) -> Picks {
    model.pick(now, &subs(std::slice::from_ref(sub)))
}

#[test]
fn a_silent_agent_is_disconnected_after_the_silence_limit() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 5, t0);
    model.agent_connected(2, "local", 5, t0);
    model.agent_heard(2, t0 + Duration::from_secs(20));
    let expired = model.expire(t0 + Duration::from_secs(30));
    assert_eq!(expired.disconnect, vec![(1, DisconnectReason::Silent)]);
}

#[test]
fn credits_never_exceed_the_capacity_of_the_hello() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 4, t0);
    let sub = subscription("sub_a", "t1");
    for i in 0..10 {
        model.enqueue(delivery(&format!("d{i}"), &sub, None));
    }
    // A misbehaving agent hands back credits it never had.
    model.grant(1, 1_000, t0);
    let picks = model.pick(t0, &subs(std::slice::from_ref(&sub)));
    assert_eq!(picks[&1].len(), 4);
    lease_all(&mut model, picks, t0);
    model.grant(1, 1_000, t0);
    assert!(model.pick(t0, &subs(&[sub])).is_empty());
}

#[test]
fn max_concurrency_and_rate_limits_hold() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 256, t0);
    let mut limited = subscription("sub_a", "t1");
    limited.max_concurrency = 3;
    let mut rated = subscription("sub_b", "t1");
    rated.rate_limit_per_s = 2;
    for i in 0..10 {
        model.enqueue(delivery(&format!("a{i}"), &limited, None));
        model.enqueue(delivery(&format!("b{i}"), &rated, None));
    }
    let all = subs(&[limited, rated]);
    let picks = model.pick(t0, &all);
    let count = |prefix: &str| {
        picks
            .values()
            .flatten()
            .filter(|(d, _)| d.id.starts_with(prefix))
            .count()
    };
    assert_eq!(count("a"), 3);
    assert_eq!(count("b"), 2);
    lease_all(&mut model, picks, t0);
    // Half a second later: one more token.
    let later = model.pick(t0 + Duration::from_millis(500), &all);
    assert_eq!(picked_ids(&later), vec!["b2".to_owned()]);
}

#[test]
fn slow_subscriptions_get_no_more_than_their_fair_share_of_an_agent() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 256, t0);
    let slow: Vec<Subscription> = (0..10)
        .map(|i| subscription(&format!("slow{i}"), "t1"))
        .collect();
    for sub in &slow {
        for i in 0..100 {
            model.enqueue(delivery(&format!("{}-{i}", sub.id), sub, None));
        }
    }
    let healthy = subscription("healthy", "t2");
    let mut all = slow.clone();
    all.push(healthy.clone());
    let picks = model.pick(t0, &subs(&all));
    // 256 credits over 10 subscriptions with work: 25 each, 6 left.
    assert_eq!(picks[&1].len(), 250);
    lease_all(&mut model, picks, t0);
    // A healthy subscription's work arrives: it goes at once on a credit left over, and the
    // slow ones, over their new share (23 = 256 ÷ 11), take none of the rest.
    model.enqueue(delivery("h1", &healthy, None));
    let picks = model.pick(t0, &subs(&all));
    assert_eq!(picked_ids(&picks), vec!["h1".to_owned()]);
}

/// Fair shares do not leave credits idle: with a hundred subscriptions holding one delivery each
/// (share 2 = 256 ÷ 101), a busy one takes what they leave, all but the agent's reserve (32), so
/// a newcomer's work still goes at once.
#[test]
fn a_busy_subscription_uses_the_credits_others_leave_idle_all_but_the_reserve() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 256, t0);
    let light: Vec<Subscription> = (0..100)
        .map(|i| subscription(&format!("light{i}"), &format!("t{i}")))
        .collect();
    for sub in &light {
        model.enqueue(delivery(&format!("{}-0", sub.id), sub, None));
    }
    let mut busy = subscription("busy", "heavy");
    busy.max_concurrency = 512;
    for i in 0..1_000 {
        model.enqueue(delivery(&format!("busy-{i}"), &busy, None));
    }
    let newcomer = subscription("new", "late");
    let mut all = light.clone();
    all.push(busy.clone());
    all.push(newcomer.clone());
    let picks = model.pick(t0, &subs(&all));
    let ids = picked_ids(&picks);
    let busy_picked = ids.iter().filter(|id| id.starts_with("busy-")).count();
    assert_eq!(
        ids.len() - busy_picked,
        100,
        "every light subscription served"
    );
    assert_eq!(
        busy_picked,
        256 - 32 - 100,
        "the busy one takes all but the reserve"
    );
    lease_all(&mut model, picks, t0);
    model.enqueue(delivery("n1", &newcomer, None));
    let picks = model.pick(t0, &subs(&all));
    assert_eq!(picked_ids(&picks), vec!["n1".to_owned()]);
}

#[test]
fn an_entity_goes_one_at_a_time_and_a_hot_one_does_not_hold_back_the_others() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 256, t0);
    let mut sub = subscription("sub_a", "t1");
    sub.ordered = true;
    for i in 0..500 {
        model.enqueue(delivery(&format!("hot{i:03}"), &sub, Some("user:1")));
    }
    model.enqueue(delivery("cold", &sub, Some("user:2")));
    model.enqueue(delivery("free", &sub, None));
    let picks = model_pick(&mut model, t0, &sub);
    assert_eq!(picked_ids(&picks), vec!["cold", "free", "hot000"]);
    let leases = lease_all(&mut model, picks, t0);
    assert!(model_pick(&mut model, t0, &sub).is_empty());
    let hot = leases.iter().find(|l| l.delivery.id == "hot000").unwrap();
    let Reported::Current(ended) = model.end_lease(1, "hot000", &hot.lease_id, t0) else {
        panic!("hot000's lease is current");
    };
    let ended = *ended;
    // Free once its result is recorded, not before.
    assert!(model_pick(&mut model, t0, &sub).is_empty());
    model.recorded(&ended.delivery);
    assert_eq!(
        picked_ids(&model_pick(&mut model, t0, &sub)),
        vec!["hot001"]
    );
}

#[test]
fn an_entity_whose_lease_was_released_waits_until_that_lease_would_have_expired() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 8, t0);
    model.agent_connected(2, "local", 8, t0);
    let mut sub = subscription("sub_a", "t1");
    sub.ordered = true;
    model.enqueue(delivery("d1", &sub, Some("user:1")));
    model.enqueue(delivery("d2", &sub, Some("user:1")));
    let picks = model_pick(&mut model, t0, &sub);
    let leases = lease_all(&mut model, picks, t0);
    let released = model.agent_gone(leases[0].agent, t0 + Duration::from_secs(1));
    assert_eq!(released.len(), 1);
    // d2 waits for d1's lease (2 s + 2 s) to have expired: the old request may still arrive.
    assert!(model_pick(&mut model, t0 + Duration::from_secs(3), &sub).is_empty());
    assert_eq!(
        picked_ids(&model_pick(&mut model, t0 + Duration::from_secs(4), &sub)),
        vec!["d2"]
    );
}

#[test]
fn jobs_go_to_their_region_and_wait_or_fall_back_when_it_has_no_agent() {
    let t0 = Instant::now();
    for fallback in [RegionFallback::Wait, RegionFallback::Any] {
        let mut model = Model::new(Limits {
            region_fallback: fallback,
            ..limits()
        });
        model.agent_connected(1, "us", 8, t0);
        model.agent_connected(2, "eu", 8, t0);
        let mut eu = subscription("sub_eu", "t1");
        eu.region = Some("eu".into());
        let mut ap = subscription("sub_ap", "t1");
        ap.region = Some("ap".into());
        model.enqueue(delivery("e1", &eu, None));
        model.enqueue(delivery("a1", &ap, None));
        let picks = model.pick(t0, &subs(&[eu.clone(), ap.clone()]));
        assert_eq!(
            picked_ids(&HashMap::from([(2, picks[&2].clone())])),
            vec!["e1"]
        );
        match fallback {
            RegionFallback::Wait => {
                assert!(!picks.contains_key(&1));
                assert_eq!(model.room_for(&ap, t0), 0, "the poller brings none");
            }
            RegionFallback::Any => assert_eq!(picks.values().flatten().count(), 2),
        }
    }
}

#[test]
fn memory_is_bounded_and_the_poller_is_told_where_there_is_room() {
    let t0 = Instant::now();
    let mut model = Model::new(Limits {
        max_queued: 50,
        max_queued_per_subscription: 20,
        ..limits()
    });
    model.agent_connected(1, "local", 8, t0);
    let a = subscription("sub_a", "t1");
    let b = subscription("sub_b", "t1");
    let accepted = (0..30)
        .filter(|i| model.enqueue(delivery(&format!("a{i}"), &a, None)))
        .count();
    assert_eq!(accepted, 20);
    assert_eq!(model.room_for(&a, t0), 0);
    assert!(model.room_for(&b, t0) > 0);
    model.defer(&b.id, t0 + Duration::from_millis(100));
    assert_eq!(
        model.room_for(&b, t0),
        0,
        "a subscription full cluster-wide waits"
    );
}

/// One step of a random run.
#[derive(Debug, Clone)]
enum Op {
    Enqueue { sub: usize, entity: Option<u8> },
    Pick,
    Result { nth: usize },
    Recorded,
    Tick { ms: u64 },
    Grant { agent: u64, credits: u32 },
    Gone { agent: u64 },
    Connect { agent: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..4, proptest::option::of(0u8..3))
            .prop_map(|(sub, entity)| Op::Enqueue { sub, entity }),
        3 => Just(Op::Pick),
        2 => (0usize..8).prop_map(|nth| Op::Result { nth }),
        2 => Just(Op::Recorded),
        2 => (0u64..3_000).prop_map(|ms| Op::Tick { ms }),
        1 => (1u64..4, 0u32..300).prop_map(|(agent, credits)| Op::Grant { agent, credits }),
        1 => (1u64..4).prop_map(|agent| Op::Gone { agent }),
        1 => (1u64..4).prop_map(|agent| Op::Connect { agent }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever happens: no delivery leased twice, credits within the hello's capacity,
    /// `max_concurrency` and entity order held, every lease ends by its expiry, and every
    /// tenant with work is served once an agent has credit.
    #[test]
    fn invariants_hold_in_any_run(ops in proptest::collection::vec(op(), 1..120)) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut model = Model::new(limits());
        let capacity = 6;
        let mut connected: HashSet<u64> = HashSet::new();
        model.agent_connected(1, "local", capacity, now);
        connected.insert(1);
        let subscriptions: Vec<Subscription> = (0..4)
            .map(|i| {
                let mut s = subscription(&format!("sub{i}"), &format!("t{}", i % 2));
                s.max_concurrency = 2 + i as u32;
                s.ordered = i % 2 == 0;
                s
            })
            .collect();
        let all = subs(&subscriptions);
        let mut next_id = 0;
        // Leases as the actor sees them, and results ended but not yet recorded.
        let mut live: Vec<Lease> = Vec::new();
        let mut ended: Vec<Delivery> = Vec::new();
        // The last delivery leased per entity: ids grow with publish order.
        let mut last_of_entity: HashMap<(String, String), String> = HashMap::new();
        for op in ops {
            match op {
                Op::Enqueue { sub, entity } => {
                    next_id += 1;
                    let s = &subscriptions[sub];
                    let key = entity.map(|e| format!("user:{e}")).filter(|_| s.ordered);
                    model.enqueue(delivery(&format!("d{next_id:05}"), s, key.as_deref()));
                }
                Op::Pick => {
                    let picks = model.pick(now, &all);
                    for lease in lease_all(&mut model, picks, now) {
                        if let Some(key) = &lease.delivery.ordering_key {
                            let entity = (lease.delivery.subscription_id.clone(), key.clone());
                            if let Some(last) = last_of_entity.get(&entity) {
                                prop_assert!(*last < lease.delivery.id, "entity order: {} after {last}", lease.delivery.id);
                            }
                            last_of_entity.insert(entity, lease.delivery.id.clone());
                        }
                        prop_assert!(
                            !live.iter().any(|l| l.delivery.id == lease.delivery.id),
                            "leased twice: {}", lease.delivery.id
                        );
                        live.push(lease);
                    }
                }
                Op::Result { nth } => {
                    if !live.is_empty() {
                        let lease = live.remove(nth % live.len());
                        let ended_lease = model.end_lease(
                            lease.agent, &lease.delivery.id, &lease.lease_id, now);
                        prop_assert!(matches!(ended_lease, Reported::Current(_)));
                        ended.push(lease.delivery);
                    }
                }
                Op::Recorded => {
                    for delivery in ended.drain(..) {
                        model.recorded(&delivery);
                    }
                }
                Op::Tick { ms } => {
                    now += Duration::from_millis(ms);
                    let expired = model.expire(now);
                    for lease in expired.leases {
                        prop_assert!(lease.expires_at <= now);
                        live.retain(|l| l.delivery.id != lease.delivery.id);
                        ended.push(lease.delivery);
                    }
                    // No lease outlives its expiry.
                    prop_assert!(live.iter().all(|l| l.expires_at > now));
                    model.tidy(now);
                }
                Op::Grant { agent, credits } => model.grant(agent, credits, now),
                Op::Gone { agent } => {
                    let released = model.agent_gone(agent, now);
                    connected.remove(&agent);
                    for lease in released {
                        prop_assert_eq!(lease.agent, agent);
                        live.retain(|l| l.delivery.id != lease.delivery.id);
                    }
                    prop_assert!(live.iter().all(|l| l.agent != agent));
                }
                Op::Connect { agent } => {
                    if connected.insert(agent) {
                        model.agent_connected(agent, "local", capacity, now);
                    }
                }
            }
            // Credits and leases of an agent stay within its hello's capacity.
            for agent in &connected {
                let leases = live.iter().filter(|l| l.agent == *agent).count() as u32;
                let slot = &model.agents[agent];
                prop_assert!(slot.credits + leases <= capacity,
                    "agent {agent}: {} credits + {leases} leases > {capacity}", slot.credits);
            }
            // max_concurrency and one delivery per entity at a time.
            for s in &subscriptions {
                let mine: Vec<&Lease> = live.iter().filter(|l| l.delivery.subscription_id == s.id).collect();
                prop_assert!(mine.len() as u32 <= s.max_concurrency);
                let mut entities = HashSet::new();
                for lease in mine {
                    if let Some(key) = &lease.delivery.ordering_key {
                        prop_assert!(entities.insert(key.clone()), "entity {key} twice in flight");
                    }
                }
            }
        }
        // Liveness: with every lease ended and recorded, and an agent with credit, one round
        // serves every tenant that has work.
        now += Duration::from_secs(3_600);
        for lease in model.expire(now).leases {
            ended.push(lease.delivery);
        }
        for delivery in ended.drain(..) {
            model.recorded(&delivery);
        }
        model.tidy(now);
        let fresh = 99;
        model.agent_connected(fresh, "local", 1_000, now);
        let tenants_with_work: HashSet<String> = model
            .queued_subscriptions()
            .filter_map(|id| all.get(id))
            .map(|s| s.tenant_id.clone())
            .collect();
        let picks = model.pick(now, &all);
        let served: HashSet<String> = picks.values().flatten().map(|(d, _)| d.tenant_id.clone()).collect();
        prop_assert_eq!(served, tenants_with_work);
    }
}

#[test]
fn tenants_are_served_in_turn_whatever_the_backlog() {
    let t0 = Instant::now();
    let mut model = Model::new(limits());
    model.agent_connected(1, "local", 4, t0);
    let mut big = subscription("sub_big", "tenant_a");
    big.max_concurrency = 1;
    let small = subscription("sub_small", "tenant_b");
    for i in 0..1_000 {
        model.enqueue(delivery(&format!("a{i:04}"), &big, None));
    }
    model.enqueue(delivery("b0", &small, None));
    let picks = model.pick(t0, &subs(&[big, small]));
    assert_eq!(picked_ids(&picks), vec!["a0000", "b0"]);
}

/// The model (and `domain`) decide; they never reach for a runtime, a database, gRPC or a clock.
#[test]
fn the_model_and_the_domain_do_no_io() {
    let sources = [
        ("dispatch/model.rs", include_str!("../model.rs")),
        ("domain/filter.rs", include_str!("../../domain/filter.rs")),
        ("domain/health.rs", include_str!("../../domain/health.rs")),
        ("domain/ids.rs", include_str!("../../domain/ids.rs")),
        ("domain/model.rs", include_str!("../../domain/model.rs")),
        ("domain/retry.rs", include_str!("../../domain/retry.rs")),
        (
            "domain/validate.rs",
            include_str!("../../domain/validate.rs"),
        ),
    ];
    for (file, source) in sources {
        // Only the code, not its tests.
        let code = source.split("#[cfg(test)]").next().unwrap_or(source);
        for forbidden in [
            "tokio::",
            "sea_orm::",
            "tonic::",
            "Utc::now",
            "Instant::now",
            "SystemTime",
            "reqwest::",
        ] {
            assert!(!code.contains(forbidden), "{file} uses {forbidden}");
        }
    }
}
