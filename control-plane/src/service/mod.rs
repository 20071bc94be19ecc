//! Use cases: each function authorizes nothing (the caller did), validates through `domain`,
//! reads and writes through `storage`, and returns domain values or an [`Error`].

pub mod admin;
pub mod agents;
pub mod auth;
pub mod deliveries;
pub mod events;
pub mod publish;
pub mod subscriptions;

use std::sync::Arc;

use crate::domain::validate::{Invalid, Limits, PayloadError};
use crate::storage::{self, Store};

/// What went wrong in a use case; the gRPC edge maps each variant to one status code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    TooLarge(String),
    /// Too many of something from one caller (failed authentications).
    #[error("{0}")]
    RateLimited(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

impl Error {
    pub fn not_found(what: &'static str, id: &str) -> Self {
        Self::NotFound {
            what,
            id: id.to_owned(),
        }
    }
}

impl From<PayloadError> for Error {
    fn from(err: PayloadError) -> Self {
        match err {
            PayloadError::TooLarge { .. } => Self::TooLarge(err.to_string()),
            PayloadError::Invalid(invalid) => Self::Invalid(invalid),
        }
    }
}

/// Everything the use cases share; cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub store: Store,
    pub limits: Arc<Limits>,
    pub auth: auth::Auth,
    pub publisher: publish::Publisher,
    pub agents: crate::dispatch::registry::Registry,
    pub dispatcher: crate::dispatch::Handle,
    pub records: tokio::sync::broadcast::Sender<crate::dispatch::scheduler::AttemptRecord>,
    /// Cancelled when shutdown begins: long-lived server streams end then.
    pub stopping: tokio_util::sync::CancellationToken,
    /// The web console's sessions and sign-in links (`CreateConsoleSession` issues links).
    pub console: crate::console::Sessions,
    /// Tenants seen to exist, so the publish path does not read the tenant for every call.
    pub known_tenants: admin::KnownTenants,
    /// Tells the other replicas what changed here.
    pub changes: crate::dispatch::changes::Announcer,
}

impl Services {
    /// A subscription changed: this replica's scheduler and every other replica's drop their
    /// cached copy.
    pub async fn subscription_changed(&self, id: &str) {
        self.dispatcher.subscription_changed(id).await;
        self.changes
            .announce(crate::dispatch::changes::Change::Subscription(
                id.to_owned(),
            ))
            .await;
    }

    /// Subscribes to every attempt recorded from now on.
    pub fn watch(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::dispatch::scheduler::AttemptRecord> {
        self.records.subscribe()
    }
}
