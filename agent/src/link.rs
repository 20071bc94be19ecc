//! How an agent reaches a control plane: over gRPC (`AgentService.Connect`, a remote agent), or
//! in the same process (the control plane's built-in agent), where jobs and results cross as
//! values on channels: no encoding, no HTTP/2 framing, no socket, no credential.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use herald_proto::v1 as pb;
use tonic::Status;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Endpoint;

/// The control plane's side of a stream, as `AgentService.Connect` answers it (`Sync`: the
/// agent's stream state is shared by reference while it awaits).
pub type ControlStream =
    Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send + Sync + 'static>>;
/// The agent's side of a stream: the hello first.
pub type AgentStream = BoxStream<'static, pb::AgentMessage>;

/// A control plane in the same process as the agent.
pub trait InProcess: Send + Sync + 'static {
    /// Opens one stream the way `AgentService.Connect` does; no credential is checked, since
    /// only code of this process holds the handle.
    fn connect(&self, outbound: AgentStream) -> BoxFuture<'static, Result<ControlStream, Status>>;
}

/// A handle to an in-process control plane, for [`crate::Config::in_process`].
#[derive(Clone)]
pub struct InProcessLink(pub Arc<dyn InProcess>);

impl fmt::Debug for InProcessLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InProcessLink")
    }
}

/// One control plane the agent can connect to.
#[derive(Clone, Debug)]
pub(crate) enum Link {
    Grpc {
        url: String,
        /// Boxed: an endpoint is large beside the in-process handle.
        endpoint: Box<Endpoint>,
        /// `Bearer <token>`: never logged.
        authorization: AsciiMetadataValue,
    },
    InProcess(InProcessLink),
}

impl Link {
    /// What logs call this control plane.
    pub(crate) fn name(&self) -> &str {
        match self {
            Link::Grpc { url, .. } => url,
            Link::InProcess(_) => "in-process",
        }
    }
}
