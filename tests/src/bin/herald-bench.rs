//! `herald-bench`: publish throughput of an in-process control plane on SQLite or PostgreSQL,
//! with a bounded number of events and concurrent publishers.
//!
//! `cargo run --release -p herald-tests --bin herald-bench -- --backend sqlite --events 20000 --concurrency 32`

use std::time::{Duration, Instant};

use herald_client::v1 as pb;
use herald_tests::{Backend, Herald, Receiver};

struct Args {
    backend: Backend,
    events: usize,
    concurrency: usize,
    deliver: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        backend: Backend::Sqlite,
        events: 20_000,
        concurrency: 32,
        deliver: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag}: needs a value"));
        match flag.as_str() {
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "sqlite" => Backend::Sqlite,
                    "postgres" => Backend::Postgres,
                    other => return Err(format!("--backend: {other} is not sqlite or postgres")),
                }
            }
            "--events" => args.events = value()?.parse().map_err(|_| "--events: not a number")?,
            "--concurrency" => {
                args.concurrency = value()?
                    .parse()
                    .map_err(|_| "--concurrency: not a number")?
            }
            "--deliver" => args.deliver = true,
            other => {
                return Err(format!(
                    "{other}: unknown flag (--backend, --events, --concurrency, --deliver)"
                ));
            }
        }
    }
    Ok(args)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("herald-bench: {err}");
            std::process::exit(2);
        }
    };
    let mut builder = Herald::builder(args.backend);
    if !args.deliver {
        builder = builder.no_builtin_agent();
    }
    let herald = builder.start().await;
    let receiver = Receiver::start().await;
    let (_, client) = herald.tenant("bench").await;
    let sub = client
        .subscriptions()
        .create_subscription(pb::CreateSubscriptionRequest {
            name: "bench".into(),
            url: receiver.url("/"),
            max_concurrency: 1024,
            ..Default::default()
        })
        .await
        .expect("create subscription")
        .into_inner();
    let store = herald
        .running
        .as_ref()
        .expect("running")
        .services
        .store
        .clone();
    let commits_before = store.commits();
    let started = Instant::now();
    let per_worker = args.events / args.concurrency;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_worker);
                for i in 0..per_worker {
                    let request = pb::PublishEventRequest {
                        event_type: "user.new".into(),
                        payload: format!(
                            r#"{{"entity_type":"user","entity_id":{},"action_type":"new"}}"#,
                            w * per_worker + i
                        ),
                        ..Default::default()
                    };
                    let t = Instant::now();
                    client.publish(request).await.expect("publish");
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let total = latencies.len();
    let commits = store.commits() - commits_before;
    println!(
        "backend={:?} events={total} concurrency={} publish: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms, {:.1} commits per 1000 events",
        args.backend,
        args.concurrency,
        total as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        commits as f64 * 1000.0 / total as f64,
    );
    if args.deliver {
        let deadline = Instant::now() + Duration::from_secs(120);
        while receiver.received().len() < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = receiver.received();
        let first = got.first().map(|r| r.at);
        let last = got.last().map(|r| r.at);
        let span = match (first, last) {
            (Some(a), Some(b)) => b.duration_since(a).max(Duration::from_millis(1)),
            _ => Duration::from_millis(1),
        };
        let mut ids: Vec<String> = got
            .iter()
            .filter_map(|r| r.header("webhook-id").map(str::to_owned))
            .collect();
        ids.sort();
        ids.dedup();
        println!(
            "delivered {} unique of {total} ({} requests) in {:.2} s after the first: {:.0} deliveries/s, total wall {:.2} s",
            ids.len(),
            got.len(),
            span.as_secs_f64(),
            got.len() as f64 / span.as_secs_f64(),
            started.elapsed().as_secs_f64(),
        );
    }
    let _ = sub;
    herald.stop().await;
}
