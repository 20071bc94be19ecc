//! `AgentService.Connect`: one bidirectional stream per agent. The edge checks the agent
//! credential and the hello, then relays messages between the stream and the scheduler. The
//! built-in agent attaches the same way in process ([`AgentApi::in_process`]): the same hello,
//! welcome, jobs and results, as values on channels instead of over loopback HTTP/2.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use herald_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::bearer;
use crate::console::session::constant_time_eq;
use crate::dispatch::{self, Command, scheduler::AgentHello};
use crate::service::Services;

/// How long an agent has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the control plane tells agents it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

pub struct AgentApi {
    /// `HERALD_AGENT_TOKEN`, when set.
    configured_token: Option<Arc<str>>,
    services: Services,
    /// With `HERALD_TLS_CLIENT_CA`: agents must present a client certificate from that CA.
    certificate_required: bool,
    streams: Arc<Streams>,
}

/// What attaches an authenticated agent's stream to the scheduler (gRPC or in process).
struct Streams {
    services: Services,
    replica_id: String,
    next_key: AtomicU64,
}

/// Who an agent is, once its credentials are checked.
struct AgentAuth {
    identity: String,
    credential_id: Option<String>,
    /// The region its credential is pinned to.
    region: Option<String>,
}

impl AgentApi {
    pub fn new(
        configured_token: Option<&str>,
        services: Services,
        certificate_required: bool,
        replica_id: String,
    ) -> Self {
        Self {
            configured_token: configured_token.map(Arc::from),
            services: services.clone(),
            certificate_required,
            streams: Arc::new(Streams {
                services,
                replica_id,
                next_key: AtomicU64::new(1),
            }),
        }
    }

    /// The link the built-in agent connects through: no socket, no credential (only this
    /// process holds it).
    pub fn in_process(&self) -> herald_agent::InProcessLink {
        herald_agent::InProcessLink(Arc::new(InProcessAgents(self.streams.clone())))
    }

    /// Checks the client certificate (when required) and the agent token: `HERALD_AGENT_TOKEN`,
    /// or a stored credential (per agent, or the generated shared token). API tokens are
    /// refused.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<AgentAuth, Status> {
        let certificate = request.peer_certs().and_then(|certs| {
            certs.first().map(|cert| {
                crate::tls::certificate_identity(cert)
                    .unwrap_or_else(|| "client certificate".into())
            })
        });
        if self.certificate_required && certificate.is_none() {
            return Err(Status::unauthenticated(
                "client certificate: agents must present one issued by HERALD_TLS_CLIENT_CA",
            ));
        }
        let token = bearer(request)?;
        if self
            .configured_token
            .as_deref()
            .is_some_and(|expected| constant_time_eq(token, expected))
        {
            return Ok(AgentAuth {
                identity: certificate.unwrap_or_else(|| "shared agent token".into()),
                credential_id: None,
                region: None,
            });
        }
        // A flood of bad credentials costs no database reads (see `domain::throttle`).
        let peer = request.remote_addr().map(|addr| addr.ip());
        let token_hash = crate::service::auth::hash(token);
        self.services.auth.screen(peer, &token_hash)?;
        let found = self.services.find_agent_credential(token).await?;
        self.services
            .auth
            .settle(peer, &token_hash, found.is_some());
        match found {
            Some(credential) => Ok(AgentAuth {
                identity: certificate
                    .unwrap_or_else(|| format!("{} ({})", credential.name, credential.id)),
                credential_id: Some(credential.id),
                region: credential.region,
            }),
            None => Err(Status::unauthenticated(
                "authorization: not a valid agent credential (API tokens are not agent credentials)",
            )),
        }
    }
}

type ControlStream = herald_agent::link::ControlStream;

fn validate_hello(hello: &pb::Hello) -> Result<(), Status> {
    if hello.agent_id.is_empty() || hello.agent_id.len() > 200 {
        return Err(Status::invalid_argument(
            "hello.agent_id: must be 1 to 200 characters",
        ));
    }
    if hello.region.is_empty() || hello.region.len() > 64 {
        return Err(Status::invalid_argument(
            "hello.region: must be 1 to 64 characters",
        ));
    }
    if hello.capacity == 0 || hello.capacity > 65_536 {
        return Err(Status::invalid_argument(
            "hello.capacity: must be between 1 and 65536",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type ConnectStream = ControlStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let auth = self.authenticate(&request).await?;
        let stream = self.streams.attach(auth, request.into_inner()).await?;
        Ok(Response::new(stream))
    }
}

/// The built-in agent's side door: [`Streams::attach`] without a credential.
struct InProcessAgents(Arc<Streams>);

impl herald_agent::InProcess for InProcessAgents {
    fn connect(
        &self,
        outbound: herald_agent::link::AgentStream,
    ) -> futures::future::BoxFuture<'static, Result<ControlStream, Status>> {
        let streams = self.0.clone();
        Box::pin(async move {
            let auth = AgentAuth {
                identity: "built-in agent".into(),
                credential_id: None,
                region: None,
            };
            streams.attach(auth, outbound.map(Ok)).await
        })
    }
}

impl Streams {
    /// Reads the hello, registers the agent with the scheduler, relays its messages to it,
    /// and returns the stream of the agent's jobs (the welcome first).
    async fn attach(
        &self,
        auth: AgentAuth,
        mut inbound: impl Stream<Item = Result<pb::AgentMessage, Status>> + Send + Unpin + 'static,
    ) -> Result<ControlStream, Status> {
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("hello: not received in time"))?
            .transpose()?;
        let Some(pb::AgentMessage {
            message: Some(pb::agent_message::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "hello: the first message must be a hello",
            ));
        };
        validate_hello(&hello)?;
        if let Some(pinned) = auth
            .region
            .as_deref()
            .filter(|pinned| *pinned != hello.region)
        {
            return Err(Status::permission_denied(format!(
                "hello.region: this credential is pinned to region {pinned}, not {}",
                hello.region
            )));
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        // Room for a full credit's worth of jobs (in messages of up to 64) plus control messages.
        let (outbox, jobs) =
            mpsc::channel::<pb::ControlMessage>((hello.capacity as usize).max(64) + 16);
        let welcome = pb::ControlMessage {
            message: Some(pb::control_message::Message::Welcome(pb::Welcome {
                replica_id: self.replica_id.clone(),
                heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
            })),
        };
        outbox
            .try_send(welcome)
            .map_err(|_| Status::internal("could not queue the welcome"))?;
        let agent_id = hello.agent_id.clone();
        let disconnect = tokio_util::sync::CancellationToken::new();
        let refuse = tokio_util::sync::CancellationToken::new();
        self.services
            .dispatcher
            .send(Command::AgentConnected {
                key,
                hello: AgentHello {
                    agent_id: hello.agent_id,
                    region: hello.region,
                    capacity: hello.capacity,
                    version: hello.version,
                    identity: auth.identity,
                    credential_id: auth.credential_id,
                    disconnect: disconnect.clone(),
                    refuse: refuse.clone(),
                    outbox: outbox.clone(),
                },
            })
            .await;
        let dispatcher = self.services.dispatcher.clone();
        let refused = refuse.clone();
        tokio::spawn(async move {
            let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
            loop {
                tokio::select! {
                    // Revoked or unresponsive: the stream closes (the scheduler re-queues its
                    // leases when it hears the agent is gone).
                    _ = disconnect.cancelled() => break,
                    _ = refuse.cancelled() => break,
                    message = inbound.next() => match message {
                        // Waits while the scheduler's queue is full: the agent's stream slows down.
                        Some(Ok(message)) => relay(&dispatcher, key, message).await,
                        None => break,
                        Some(Err(status)) => {
                            tracing::debug!(%agent_id, code = ?status.code(), "agent stream ended");
                            break;
                        }
                    },
                    _ = heartbeat.tick() => {
                        let beat = pb::ControlMessage {
                            message: Some(pb::control_message::Message::Heartbeat(pb::Heartbeat {
                                sent_at: Some(herald_proto::timestamp(chrono::Utc::now())),
                            })),
                        };
                        if outbox.send(beat).await.is_err() {
                            break;
                        }
                    }
                }
            }
            dispatcher.send(Command::AgentGone { key }).await;
        });
        let stream = async_stream::stream! {
            let mut jobs = ReceiverStream::new(jobs);
            loop {
                tokio::select! {
                    biased;
                    _ = refused.cancelled() => {
                        yield Err(Status::permission_denied(
                            "results: this agent reported results for jobs it was not sent",
                        ));
                        break;
                    }
                    message = futures::StreamExt::next(&mut jobs) => match message {
                        Some(message) => yield Ok(message),
                        None => break,
                    },
                }
            }
        };
        Ok(Box::pin(stream))
    }
}

async fn relay(dispatcher: &dispatch::Handle, key: u64, message: pb::AgentMessage) {
    use pb::agent_message::Message;
    let command = match message.message {
        Some(Message::Results(results)) => Command::Results {
            key,
            results: results.results,
            credits: results.credits,
        },
        Some(Message::Credit(credit)) => Command::Credit {
            key,
            credits: credit.credits,
        },
        Some(Message::Heartbeat(_)) => Command::Heartbeat { key },
        Some(Message::Hello(_)) | None => return,
    };
    dispatcher.send(command).await;
}
