//! Test doubles on 127.0.0.1: a recording HTTP receiver and a scripted control plane.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use herald_proto::v1 as pb;
use pb::agent_message::Message as Outbound;
use pb::agent_service_server::{AgentService, AgentServiceServer};
use pb::control_message::Message as Inbound;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// How long a test waits for something it expects before failing.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test after [`PATIENCE`].
pub(crate) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A request as the receiver read it off the wire.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) target: String,
    /// In wire order, names lowercased.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

/// What the receiver does with each request.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// Writes these bytes and closes the connection.
    Raw(Vec<u8>),
    /// Writes these bytes and holds the connection open.
    RawThenHold(Vec<u8>),
    /// Never answers (holds the connection open).
    Never,
    /// Answers `200 ok` once the test adds a permit to the gate.
    Gated(Arc<Semaphore>),
}

/// A hand-rolled HTTP/1.1 receiver on 127.0.0.1: records every request, answers as told.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Recorded>,
    task: JoinHandle<()>,
}

impl Receiver {
    pub(crate) async fn start(reply: Reply) -> Self {
        Self::start_with(reply, None).await
    }

    /// Starts a receiver that speaks HTTPS with `tls`.
    pub(crate) async fn start_tls(reply: Reply, tls: tokio_rustls::TlsAcceptor) -> Self {
        Self::start_with(reply, Some(tls)).await
    }

    async fn start_with(reply: Reply, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, requests) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (reply, sender, tls) = (reply.clone(), sender.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(socket, reply, sender).await,
                        Some(tls) => {
                            if let Ok(socket) = tls.accept(socket).await {
                                serve(socket, reply, sender).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            requests,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub(crate) async fn next_request(&mut self) -> Recorded {
        within("a request at the receiver", self.requests.recv())
            .await
            .expect("receiver stopped")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds a response with a length and `connection: close`.
pub(crate) fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    reply: Reply,
    requests: mpsc::UnboundedSender<Recorded>,
) {
    // One request per connection: every reply ends or holds the connection.
    let mut buffer = Vec::new();
    let Some(request) = read_request(&mut socket, &mut buffer).await else {
        return;
    };
    let _ = requests.send(request);
    match &reply {
        Reply::Raw(bytes) => {
            let _ = socket.write_all(bytes).await;
            let _ = socket.shutdown().await;
        }
        Reply::RawThenHold(bytes) => {
            let _ = socket.write_all(bytes).await;
            hold(&mut socket).await;
        }
        Reply::Never => hold(&mut socket).await,
        Reply::Gated(gate) => {
            let Ok(permit) = gate.acquire().await else {
                return;
            };
            permit.forget();
            let _ = socket.write_all(&response("200 OK", &[], b"ok")).await;
            let _ = socket.shutdown().await;
        }
    }
}

/// Holds a connection open until the client goes away.
async fn hold<S: AsyncRead + Unpin>(socket: &mut S) {
    let mut sink = [0u8; 1024];
    while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Reads one request (head and `content-length` body); `None` at end of stream.
async fn read_request<S: AsyncRead + Unpin>(
    socket: &mut S,
    buffer: &mut Vec<u8>,
) -> Option<Recorded> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let mut chunk = [0u8; 8192];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let target = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().unwrap());
    buffer.drain(..head_end + 4);
    while buffer.len() < length {
        let mut chunk = [0u8; 8192];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer.drain(..length).collect();
    Some(Recorded {
        method,
        target,
        headers,
        body,
    })
}

/// A scripted control plane on 127.0.0.1: hands each accepted stream to the test.
pub(crate) struct ControlPlane {
    pub(crate) url: String,
    sessions: mpsc::UnboundedReceiver<Session>,
    refused: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// One agent stream as the control plane sees it.
pub(crate) struct Session {
    pub(crate) authorization: Option<String>,
    inbound: Streaming<pb::AgentMessage>,
    outbound: Option<mpsc::UnboundedSender<Result<pb::ControlMessage, Status>>>,
}

struct Service {
    sessions: mpsc::UnboundedSender<Session>,
    /// Connections still to refuse with `UNAUTHENTICATED`.
    to_refuse: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl ControlPlane {
    /// Starts a control plane that refuses the first `refuse` connections as unauthenticated.
    pub(crate) async fn start(refuse: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (sender, sessions) = mpsc::unbounded_channel();
        let refused = Arc::new(AtomicUsize::new(0));
        let service = Service {
            sessions: sender,
            to_refuse: Arc::new(AtomicUsize::new(refuse)),
            refused: refused.clone(),
        };
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Self {
            url,
            sessions,
            refused,
            task,
        }
    }

    pub(crate) async fn next_session(&mut self) -> Session {
        within("an agent stream", self.sessions.recv())
            .await
            .expect("control plane stopped")
    }

    pub(crate) fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tonic::async_trait]
impl AgentService for Service {
    type ConnectStream = UnboundedReceiverStream<Result<pb::ControlMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let refuse = self
            .to_refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unauthenticated(
                "authorization: unknown agent token",
            ));
        }
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let (outbound, receiver) = mpsc::unbounded_channel();
        let session = Session {
            authorization,
            inbound: request.into_inner(),
            outbound: Some(outbound),
        };
        self.sessions
            .send(session)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(UnboundedReceiverStream::new(receiver)))
    }
}

impl Session {
    /// Returns the next message from the agent; `None` once the agent half-closed.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        let message = within("a message from the agent", self.inbound.message())
            .await
            .expect("agent stream broke")?;
        Some(message.message.expect("an empty agent message"))
    }

    /// Returns the next message that is not a heartbeat.
    pub(crate) async fn recv_skipping_heartbeats(&mut self) -> Option<Outbound> {
        loop {
            match self.recv().await? {
                Outbound::Heartbeat(_) => continue,
                other => return Some(other),
            }
        }
    }

    pub(crate) async fn hello(&mut self) -> pb::Hello {
        match self.recv().await {
            Some(Outbound::Hello(hello)) => hello,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    pub(crate) fn send(&self, message: Inbound) {
        let outbound = self.outbound.as_ref().expect("stream already ended");
        let _ = outbound.send(Ok(pb::ControlMessage {
            message: Some(message),
        }));
    }

    pub(crate) fn welcome(&self, heartbeat_interval_ms: u32) {
        self.send(Inbound::Welcome(pb::Welcome {
            replica_id: "test-replica".into(),
            heartbeat_interval_ms,
        }));
    }

    /// Ends the control plane's side of the stream cleanly.
    pub(crate) fn end(&mut self) {
        self.outbound = None;
    }

    /// Breaks the stream with an error status.
    pub(crate) fn fail(&mut self, status: Status) {
        if let Some(outbound) = self.outbound.take() {
            let _ = outbound.send(Err(status));
        }
    }
}

/// A job for `url` with a small JSON body.
pub(crate) fn job(id: &str, url: &str, timeout_ms: u32) -> pb::Job {
    pb::Job {
        delivery_id: format!("dlv_{id}"),
        lease_id: format!("lease_{id}"),
        url: url.to_owned(),
        headers: vec![pb::Header {
            name: "content-type".into(),
            value: "application/json".into(),
        }],
        body: format!("{{\"id\":\"{id}\"}}").into(),
        timeout_ms,
        attempt: 1,
        subscription_id: "sub_1".into(),
        event_id: format!("evt_{id}"),
    }
}
