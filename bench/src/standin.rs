//! An agent stand-in speaking `AgentService.Connect` itself (herald-proto's generated client):
//! the one `chaos` needs that keeps its stream and its heartbeats but never reports a result.
//! When the control plane ends its stream (three expired leases in a row), it connects again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_client::v1 as pb;
use pb::agent_message::Message as Outbound;
use pb::control_message::Message as Inbound;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// How often the stand-in beats, whatever the welcome says (the control plane's silence limit
/// is three of its intervals).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// The pause before connecting again.
const RECONNECT_AFTER: Duration = Duration::from_millis(200);

/// A running stand-in that takes jobs and never answers them; aborted when dropped.
pub struct Withholder {
    withheld: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Withholder {
    /// Starts connecting to `url` as `agent_id` of `region` with `capacity`.
    pub fn start(
        url: String,
        token: String,
        agent_id: String,
        region: String,
        capacity: u32,
    ) -> Self {
        let withheld = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let hello = pb::Hello {
            agent_id,
            region,
            capacity,
            version: "herald-bench stand-in".into(),
        };
        let task = tokio::spawn({
            let (withheld, connections) = (withheld.clone(), connections.clone());
            async move {
                loop {
                    // Any end of the stream (refused, broken, closed) is followed by a new one.
                    let _ = serve(&url, &token, hello.clone(), &withheld, &connections).await;
                    tokio::time::sleep(RECONNECT_AFTER).await;
                }
            }
        });
        Self {
            withheld,
            connections,
            task,
        }
    }

    /// Jobs received and never answered so far.
    pub fn withheld(&self) -> usize {
        self.withheld.load(Ordering::Relaxed)
    }

    /// Streams welcomed so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Withholder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One stream: hello, then heartbeats, counting the jobs received, until it ends.
async fn serve(
    url: &str,
    token: &str,
    hello: pb::Hello,
    withheld: &AtomicUsize,
    connections: &AtomicUsize,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
        .max_decoding_message_size(64 << 20);
    let (outbound, receiver) = mpsc::channel(16);
    outbound
        .send(pb::AgentMessage {
            message: Some(Outbound::Hello(hello)),
        })
        .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let mut inbound = client.connect(request).await?.into_inner();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            message = inbound.message() => match message? {
                None => return Ok(()),
                Some(pb::ControlMessage { message: Some(Inbound::Welcome(_)) }) => {
                    connections.fetch_add(1, Ordering::Relaxed);
                }
                Some(pb::ControlMessage { message: Some(Inbound::Jobs(jobs)) }) => {
                    withheld.fetch_add(jobs.jobs.len(), Ordering::Relaxed);
                }
                Some(_) => {}
            },
            _ = heartbeat.tick() => {
                let beat = pb::AgentMessage {
                    message: Some(Outbound::Heartbeat(pb::Heartbeat { sent_at: None })),
                };
                outbound.send(beat).await?;
            }
        }
    }
}
