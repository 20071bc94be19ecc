//! One `AgentService.Connect` stream to one control plane: hello, credits, jobs, results,
//! heartbeats, drain and shutdown.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use herald_proto::v1 as pb;
use pb::agent_message::Message as Outbound;
use pb::control_message::Message as Inbound;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout_at};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Status};
use tracing::{Instrument, debug, error, info, warn};

use crate::deliver::Deliverer;
use crate::link::{ControlStream, Link};

/// How long the control plane may take to answer the hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, after half-closing, the control plane may take to close its side.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most results sent in one `Results` message (each is at most about 8 KiB).
const MAX_RESULTS_PER_MESSAGE: usize = 128;
/// The largest control message accepted: a `Jobs` batch carries whole payloads.
const MAX_INBOUND_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Outbound messages buffered before sending waits for the stream.
const OUTBOUND_BUFFER: usize = 64;

/// What one stream needs to know, checked once by `lib.rs`.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) agent_id: String,
    pub(crate) region: String,
    pub(crate) capacity: u32,
    pub(crate) version: String,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) shutdown_grace: Duration,
    /// Told whether a welcomed stream is open (the binary's health service).
    pub(crate) connected: Option<tokio::sync::watch::Sender<bool>>,
}

/// How a welcomed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The control plane asked to drain; in-flight jobs were reported and the stream closed.
    Drained,
    /// Shutdown was requested; in-flight jobs were reported (or abandoned after the grace period).
    Shutdown,
    /// The control plane ended the stream without a drain; in-flight results were dropped.
    Closed,
}

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("connect: {}", with_sources(.0))]
    Connect(#[source] tonic::transport::Error),
    #[error("refused: {:?}: {}", .0.code(), .0.message())]
    Refused(Status),
    #[error("no welcome within {} s", WELCOME_TIMEOUT.as_secs())]
    NoWelcome,
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("stream broken: {:?}: {}", .0.code(), .0.message())]
    Broken(Status),
    #[error("stream broken: the request stream was closed")]
    RequestStreamClosed,
}

/// The state of one welcomed stream: the only owner of its jobs and of the credit count.
struct Stream<'a> {
    settings: &'a Settings,
    deliverer: Arc<Deliverer>,
    outbound: mpsc::Sender<pb::AgentMessage>,
    inbound: ControlStream,
    jobs: JoinSet<pb::JobResult>,
    /// Bounds concurrency to the capacity even if the control plane oversends.
    permits: Arc<Semaphore>,
    /// Jobs the control plane may still send: granted and not yet received.
    credit: u64,
    /// No credits are granted once draining; in-flight jobs still finish and are reported.
    draining: bool,
    /// When shutting down: the end of the grace period.
    deadline: Option<Instant>,
}

impl Error {
    /// Returns true when the control plane refused the agent's credential.
    pub(crate) fn is_credential_refusal(&self) -> bool {
        matches!(self, Error::Refused(status)
            if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied))
    }

    /// Returns true when the stream had been welcomed before it failed, so the next connection
    /// attempt starts from the shortest backoff.
    pub(crate) fn after_welcome(&self) -> bool {
        matches!(self, Error::Broken(_) | Error::RequestStreamClosed)
    }
}

/// Connects to one control plane and serves its stream until it ends: the hello's capacity is
/// the first credit grant, each finished job grants its credit back with its result, heartbeats
/// go out every heartbeat interval, and a drain or `shutdown` finishes in-flight jobs, reports
/// them and half-closes the stream. A stream that breaks drops the results of its in-flight jobs
/// (the control plane hands their leases out again).
pub(crate) async fn run(
    link: &Link,
    settings: &Settings,
    deliverer: Arc<Deliverer>,
    shutdown: &CancellationToken,
) -> Result<Ended, Error> {
    let connected = tokio::select! {
        () = shutdown.cancelled() => return Ok(Ended::Shutdown),
        connected = open(link, settings) => connected?,
    };
    let (outbound, inbound, heartbeat_interval) = connected;
    if let Some(connected) = &settings.connected {
        connected.send_replace(true);
    }
    let stream = Stream {
        settings,
        deliverer,
        outbound,
        inbound,
        jobs: JoinSet::new(),
        permits: Arc::new(Semaphore::new(settings.capacity as usize)),
        credit: u64::from(settings.capacity),
        draining: false,
        deadline: None,
    };
    stream.serve(heartbeat_interval, shutdown).await
}

/// Opens the stream: sends the hello with the credential, waits for the welcome. Returns the
/// outbound sender, the inbound stream and the heartbeat interval to use.
async fn open(
    link: &Link,
    settings: &Settings,
) -> Result<(mpsc::Sender<pb::AgentMessage>, ControlStream, Duration), Error> {
    let (outbound, receiver) = mpsc::channel(OUTBOUND_BUFFER);
    let hello = Outbound::Hello(pb::Hello {
        agent_id: settings.agent_id.clone(),
        region: settings.region.clone(),
        capacity: settings.capacity,
        version: settings.version.clone(),
    });
    outbound
        .send(pb::AgentMessage {
            message: Some(hello),
        })
        .await
        .map_err(|_| Error::RequestStreamClosed)?;
    let mut inbound: ControlStream = match link {
        Link::Grpc {
            endpoint,
            authorization,
            ..
        } => {
            let channel = endpoint.connect().await.map_err(Error::Connect)?;
            let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
                .max_decoding_message_size(MAX_INBOUND_MESSAGE_BYTES);
            let mut request = Request::new(ReceiverStream::new(receiver));
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
            match timeout_at(Instant::now() + WELCOME_TIMEOUT, client.connect(request)).await {
                Err(_elapsed) => return Err(Error::NoWelcome),
                Ok(response) => Box::pin(response.map_err(Error::Refused)?.into_inner()),
            }
        }
        Link::InProcess(control_plane) => control_plane
            .0
            .connect(Box::pin(ReceiverStream::new(receiver)))
            .await
            .map_err(Error::Refused)?,
    };
    let deadline = Instant::now() + WELCOME_TIMEOUT;
    let welcome = match timeout_at(deadline, inbound.next()).await {
        Err(_elapsed) => return Err(Error::NoWelcome),
        Ok(Some(Err(status))) => return Err(Error::Refused(status)),
        Ok(None) => return Err(Error::Protocol("stream closed before the welcome")),
        Ok(Some(Ok(pb::ControlMessage {
            message: Some(Inbound::Welcome(welcome)),
        }))) => welcome,
        Ok(Some(Ok(_))) => return Err(Error::Protocol("the first message was not a welcome")),
    };
    // The control plane's heartbeat interval wins over the configured default.
    let heartbeat_interval = match welcome.heartbeat_interval_ms {
        0 => settings.heartbeat_interval,
        ms => Duration::from_millis(u64::from(ms)),
    };
    info!(
        replica_id = %welcome.replica_id,
        heartbeat_interval_ms = heartbeat_interval.as_millis(),
        capacity = settings.capacity,
        "connected"
    );
    Ok((outbound, inbound, heartbeat_interval))
}

impl Stream<'_> {
    async fn serve(
        mut self,
        heartbeat_interval: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Ended, Error> {
        let heartbeat_interval = heartbeat_interval.max(Duration::from_millis(10));
        let mut heartbeat = interval_at(Instant::now() + heartbeat_interval, heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if self.draining && self.jobs.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if self.deadline.is_none() => {
                    info!(in_flight = self.jobs.len(), "shutting down; finishing in-flight jobs");
                    self.draining = true;
                    self.deadline = Some(Instant::now() + self.settings.shutdown_grace);
                }
                () = sleep_until_deadline(self.deadline) => {
                    warn!(
                        abandoned = self.jobs.len(),
                        "shutdown grace period over; results of in-flight jobs are dropped"
                    );
                    self.jobs.abort_all();
                    break;
                }
                Some(done) = self.jobs.join_next(), if !self.jobs.is_empty() => {
                    self.report(done).await?;
                }
                message = self.inbound.next() => match message {
                    Some(Ok(message)) => {
                        if let Some(message) = message.message {
                            self.handle(message);
                        }
                    }
                    None => {
                        if !self.jobs.is_empty() {
                            warn!(dropped = self.jobs.len(), "stream closed with jobs in flight");
                        }
                        return Ok(Ended::Closed);
                    }
                    Some(Err(status)) => {
                        if !self.jobs.is_empty() {
                            warn!(dropped = self.jobs.len(), "stream broke with jobs in flight");
                        }
                        return Err(Error::Broken(status));
                    }
                },
                _ = heartbeat.tick() => {
                    let beat = Outbound::Heartbeat(pb::Heartbeat {
                        sent_at: Some(herald_proto::timestamp(Utc::now())),
                    });
                    self.send(beat).await?;
                }
            }
        }
        // The loop ends only while draining: on shutdown (deadline set) or on a drain.
        let ended = if self.deadline.is_some() {
            Ended::Shutdown
        } else {
            Ended::Drained
        };
        self.close().await;
        Ok(ended)
    }

    /// Handles one control message.
    fn handle(&mut self, message: Inbound) {
        match message {
            Inbound::Jobs(pb::Jobs { jobs }) => {
                let received = jobs.len() as u64;
                if received > self.credit {
                    warn!(
                        received,
                        credit = self.credit,
                        "control plane sent more jobs than granted; they wait for a free slot"
                    );
                }
                self.credit = self.credit.saturating_sub(received);
                for job in jobs {
                    let deliverer = self.deliverer.clone();
                    let permits = self.permits.clone();
                    self.jobs.spawn(
                        async move {
                            // The semaphore is never closed; a failure only lifts the bound.
                            let _permit = permits.acquire_owned().await.ok();
                            deliverer.deliver(job).await
                        }
                        .in_current_span(),
                    );
                }
            }
            Inbound::Drain(pb::Drain { reason }) => {
                info!(%reason, in_flight = self.jobs.len(), "control plane asked to drain");
                self.draining = true;
            }
            Inbound::Heartbeat(_) => debug!("heartbeat from control plane"),
            Inbound::Welcome(_) => warn!("ignoring a second welcome"),
        }
    }

    /// Reports `first` and every other job that has finished too, in one `Results` message,
    /// granting their credits back unless draining.
    async fn report(&mut self, first: Result<pb::JobResult, JoinError>) -> Result<(), Error> {
        let (results, finished) = collect_finished(&mut self.jobs, first);
        let credits = if self.draining { 0 } else { finished };
        self.credit += u64::from(credits);
        debug!(results = results.len(), credits, "reporting results");
        if results.is_empty() {
            if credits > 0 {
                self.send(Outbound::Credit(pb::Credit { credits })).await?;
            }
            return Ok(());
        }
        self.send(Outbound::Results(pb::Results { results, credits }))
            .await
    }

    /// Sends one message; waits while the stream is full, but not past the shutdown deadline.
    async fn send(&self, message: Outbound) -> Result<(), Error> {
        let message = pb::AgentMessage {
            message: Some(message),
        };
        tokio::select! {
            sent = self.outbound.send(message) => sent.map_err(|_| Error::RequestStreamClosed),
            () = sleep_until_deadline(self.deadline) => Err(Error::RequestStreamClosed),
        }
    }

    /// Half-closes the request stream, then waits (briefly) for the control plane to end its
    /// side, so the last results are read before the connection goes away.
    async fn close(self) {
        let Stream {
            outbound,
            mut inbound,
            deadline,
            ..
        } = self;
        drop(outbound);
        let mut close_by = Instant::now() + CLOSE_TIMEOUT;
        if let Some(deadline) = deadline {
            close_by = close_by.min(deadline);
        }
        loop {
            match timeout_at(close_by, inbound.next()).await {
                Ok(Some(Ok(pb::ControlMessage {
                    message: Some(Inbound::Jobs(jobs)),
                }))) => {
                    warn!(
                        dropped = jobs.jobs.len(),
                        "jobs received after draining are not run"
                    );
                }
                Ok(Some(Ok(_))) => {}
                Ok(None) => {
                    info!("stream closed");
                    return;
                }
                Ok(Some(Err(status))) => {
                    debug!(code = ?status.code(), "stream ended with a status");
                    return;
                }
                Err(_elapsed) => {
                    debug!("control plane did not close the stream in time");
                    return;
                }
            }
        }
    }
}

/// Returns the result of `first` and of every other job that has finished too (up to one
/// message's worth), and how many jobs finished: a task that failed finished without a result.
fn collect_finished(
    jobs: &mut JoinSet<pb::JobResult>,
    first: Result<pb::JobResult, JoinError>,
) -> (Vec<pb::JobResult>, u32) {
    let mut results = Vec::new();
    let mut finished: u32 = 0;
    let mut next = Some(first);
    while let Some(done) = next {
        finished += 1;
        match done {
            Ok(result) => results.push(result),
            // Its lease expires and the control plane hands the job out again; its slot is free,
            // so its credit is granted back all the same.
            Err(err) => error!(error = %err, "delivery task failed; its result is lost"),
        }
        next = if results.len() < MAX_RESULTS_PER_MESSAGE {
            jobs.try_join_next()
        } else {
            None
        };
    }
    (results, finished)
}

/// Formats an error with its sources: tonic's "transport error" alone says nothing.
fn with_sources(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Completes at `deadline`, or never without one.
async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinHandle;

    use crate::Config;
    use crate::testing::{ControlPlane, Receiver, Reply, Session, job, response, within};

    use super::*;

    fn config(control_plane: &ControlPlane, capacity: u32) -> Config {
        Config {
            control_planes: vec![control_plane.url.clone()],
            token: "agent-secret".into(),
            agent_id: "agent-1".into(),
            region: "eu".into(),
            capacity,
            allow_destinations: vec!["127.0.0.0/8".parse().unwrap()],
            extra_ca: None,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
            version: "9.9.9".into(),
            heartbeat_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            metrics: None,
            connected: None,
            in_process: None,
        }
    }

    fn start(config: Config) -> (CancellationToken, JoinHandle<Result<(), crate::Error>>) {
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn(crate::run(config, shutdown.clone()));
        (shutdown, agent)
    }

    async fn welcomed(control_plane: &mut ControlPlane) -> Session {
        let mut session = control_plane.next_session().await;
        session.hello().await;
        session.welcome(0);
        session
    }

    /// Collects results until `count` have arrived; returns them and the credits granted.
    async fn results(session: &mut Session, count: usize) -> (Vec<pb::JobResult>, u32) {
        let mut results = Vec::new();
        let mut credits = 0;
        while results.len() < count {
            match session.recv_skipping_heartbeats().await {
                Some(Outbound::Results(batch)) => {
                    credits += batch.credits;
                    results.extend(batch.results);
                }
                Some(Outbound::Credit(credit)) => credits += credit.credits,
                other => panic!("expected results, got {other:?}"),
            }
        }
        results.sort_by(|a, b| a.delivery_id.cmp(&b.delivery_id));
        (results, credits)
    }

    fn jobs(ids: &[&str], url: &str, timeout_ms: u32) -> Inbound {
        Inbound::Jobs(pb::Jobs {
            jobs: ids.iter().map(|id| job(id, url, timeout_ms)).collect(),
        })
    }

    async fn stopped(agent: JoinHandle<Result<(), crate::Error>>) {
        within("the agent to stop", agent).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn hello_comes_first_then_results_give_credits_back() {
        let mut control_plane = ControlPlane::start(0).await;
        let mut receiver = Receiver::start(Reply::Raw(response("200 OK", &[], b"ok"))).await;
        let (shutdown, agent) = start(config(&control_plane, 4));

        let mut session = control_plane.next_session().await;
        assert_eq!(
            session.authorization.as_deref(),
            Some("Bearer agent-secret")
        );
        assert_eq!(
            session.hello().await,
            pb::Hello {
                agent_id: "agent-1".into(),
                region: "eu".into(),
                capacity: 4,
                version: "9.9.9".into(),
            }
        );
        session.welcome(0);
        session.send(jobs(&["1", "2", "3"], &receiver.url(), 5000));

        let (results, credits) = results(&mut session, 3).await;
        assert_eq!(credits, 3);
        let ids: Vec<&str> = results.iter().map(|r| r.delivery_id.as_str()).collect();
        assert_eq!(ids, ["dlv_1", "dlv_2", "dlv_3"]);
        for result in &results {
            assert_eq!(result.status_code, 200);
            assert_eq!(
                result.lease_id,
                result.delivery_id.replace("dlv_", "lease_")
            );
        }
        for _ in 0..3 {
            receiver.next_request().await;
        }

        shutdown.cancel();
        assert!(session.recv().await.is_none(), "the agent half-closes");
        session.end();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn sends_heartbeats_at_the_welcomed_interval() {
        let mut control_plane = ControlPlane::start(0).await;
        let (shutdown, agent) = start(config(&control_plane, 1));
        let mut session = control_plane.next_session().await;
        session.hello().await;
        session.welcome(20);
        for _ in 0..2 {
            match session.recv().await {
                Some(Outbound::Heartbeat(beat)) => assert!(beat.sent_at.is_some()),
                other => panic!("expected a heartbeat, got {other:?}"),
            }
        }
        shutdown.cancel();
        assert!(session.recv_skipping_heartbeats().await.is_none());
        session.end();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn drain_finishes_in_flight_jobs_reports_them_and_reconnects() {
        let gate = Arc::new(Semaphore::new(0));
        let mut receiver = Receiver::start(Reply::Gated(gate.clone())).await;
        let mut control_plane = ControlPlane::start(0).await;
        let (shutdown, agent) = start(config(&control_plane, 3));
        let mut session = welcomed(&mut control_plane).await;

        session.send(jobs(&["1", "2"], &receiver.url(), 10_000));
        // Both are at the receiver at once: jobs run concurrently.
        receiver.next_request().await;
        receiver.next_request().await;
        session.send(Inbound::Drain(pb::Drain {
            reason: "replica restarting".into(),
        }));
        // A job that was already on its way when the drain went out still runs; its arrival
        // also shows the agent has read the drain (messages are handled in order).
        session.send(jobs(&["3"], &receiver.url(), 10_000));
        receiver.next_request().await;
        gate.add_permits(3);

        let (results, credits) = results(&mut session, 3).await;
        assert_eq!(results.len(), 3);
        assert!(results.iter().all(|r| r.status_code == 200));
        assert_eq!(credits, 0, "no credits while draining");
        assert!(session.recv().await.is_none(), "the agent half-closes");
        session.end();

        let mut again = control_plane.next_session().await;
        assert_eq!(again.hello().await.capacity, 3);
        shutdown.cancel();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn shutdown_reports_in_flight_jobs_before_returning() {
        let gate = Arc::new(Semaphore::new(0));
        let mut receiver = Receiver::start(Reply::Gated(gate.clone())).await;
        let mut control_plane = ControlPlane::start(0).await;
        let (shutdown, agent) = start(config(&control_plane, 2));
        let mut session = welcomed(&mut control_plane).await;

        session.send(jobs(&["1"], &receiver.url(), 10_000));
        receiver.next_request().await;
        shutdown.cancel();
        // The stream loop is biased towards the shutdown, so it is seen before the result.
        gate.add_permits(1);

        let (results, credits) = results(&mut session, 1).await;
        assert_eq!(results[0].status_code, 200);
        assert_eq!(credits, 0);
        assert!(session.recv().await.is_none(), "the agent half-closes");
        session.end();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn shutdown_abandons_jobs_still_running_after_the_grace_period() {
        let mut receiver = Receiver::start(Reply::Never).await;
        let mut control_plane = ControlPlane::start(0).await;
        let mut config = config(&control_plane, 2);
        config.shutdown_grace = Duration::from_millis(200);
        let (shutdown, agent) = start(config);
        let mut session = welcomed(&mut control_plane).await;

        session.send(jobs(&["1"], &receiver.url(), 60_000));
        receiver.next_request().await;
        shutdown.cancel();
        assert!(
            session.recv_skipping_heartbeats().await.is_none(),
            "no result, then the agent half-closes"
        );
        session.end();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn a_broken_stream_drops_in_flight_results_and_reconnects() {
        let mut receiver = Receiver::start(Reply::Never).await;
        let mut control_plane = ControlPlane::start(0).await;
        let (shutdown, agent) = start(config(&control_plane, 2));
        let mut session = welcomed(&mut control_plane).await;

        session.send(jobs(&["1"], &receiver.url(), 60_000));
        receiver.next_request().await;
        session.fail(Status::unavailable("replica going away"));

        let mut again = control_plane.next_session().await;
        assert_eq!(again.hello().await.capacity, 2);
        again.welcome(0);
        shutdown.cancel();
        assert!(again.recv_skipping_heartbeats().await.is_none());
        again.end();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn refused_credentials_are_retried() {
        let mut control_plane = ControlPlane::start(2).await;
        let (shutdown, agent) = start(config(&control_plane, 1));
        let mut session = control_plane.next_session().await;
        assert_eq!(control_plane.refused(), 2);
        session.hello().await;
        // Shutdown while waiting for the welcome returns at once.
        shutdown.cancel();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn tries_the_control_planes_in_turn() {
        let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut control_plane = ControlPlane::start(0).await;
        let mut config = config(&control_plane, 1);
        config.control_planes = vec![format!("http://{unreachable}"), control_plane.url.clone()];
        let (shutdown, agent) = start(config);
        control_plane.next_session().await.hello().await;
        shutdown.cancel();
        stopped(agent).await;
    }

    #[tokio::test]
    async fn finished_jobs_are_reported_together() {
        let mut jobs = JoinSet::new();
        let mut handles = Vec::new();
        for i in 0..3 {
            handles.push(jobs.spawn(async move {
                pb::JobResult {
                    delivery_id: format!("dlv_{i}"),
                    ..Default::default()
                }
            }));
        }
        handles.push(jobs.spawn(async { panic!("a bug in a delivery task") }));
        // Poll the condition (all tasks done) rather than sleeping.
        while !handles.iter().all(|h| h.is_finished()) {
            tokio::task::yield_now().await;
        }
        let first = jobs.join_next().await.unwrap();
        let (results, finished) = collect_finished(&mut jobs, first);
        assert_eq!(finished, 4, "a failed task gives its slot back too");
        assert_eq!(results.len(), 3);
        assert!(jobs.is_empty());
    }
}
