//! Changes every replica must hear at once (PostgreSQL, several replicas): a subscription
//! changed (update, delete, rotation, (de)activation, enable, disabled by endpoint health), an
//! agent credential revoked, an API token revoked, a console session ended. The replica that
//! makes a change applies it
//! itself and announces it with `NOTIFY herald_changes`; every replica listens (on the
//! connection that already listens for attempts) and applies the others' changes. Caches keep
//! a time-to-live as a backstop for a notification lost while a listener reconnected.

use serde::{Deserialize, Serialize};

use crate::storage::{self, Store};

/// The channel changes are announced on.
pub const CHANNEL: &str = "herald_changes";

/// One change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Change {
    /// A subscription's cached copy is stale.
    Subscription(String),
    /// An agent credential was revoked: its streams end everywhere.
    AgentCredentialRevoked(String),
    /// An API token was revoked: cached verdicts are dropped everywhere.
    TokenRevoked(String),
    /// A console session ended (sign-out, its token revoked): open live views re-check theirs.
    ConsoleSessionEnded,
}

/// A change as announced: by which replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub replica: String,
    pub change: Change,
}

/// Returns the announcement in a payload; `None` for a payload Herald did not write.
pub fn decode(payload: &str) -> Option<Announcement> {
    serde_json::from_str(payload).ok()
}

/// Announces what a replica changed (committed already) to the other replicas.
#[derive(Clone)]
pub struct Announcer {
    store: Store,
    replica_id: String,
}

impl Announcer {
    pub fn new(store: Store, replica_id: String) -> Self {
        Self { store, replica_id }
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Sends the change to the other replicas (nothing to do on SQLite: one replica). A failure
    /// is logged: the others' caches expire by themselves.
    pub async fn announce(&self, change: Change) {
        if !self.store.shared() {
            return;
        }
        let announcement = Announcement {
            replica: self.replica_id.clone(),
            change,
        };
        let Ok(payload) = serde_json::to_string(&announcement) else {
            return;
        };
        if let Err(err) = storage::notify(&self.store.db, CHANNEL, &payload).await {
            tracing::warn!(error = %err, change = ?announcement.change, "could not announce a change to the other replicas");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_foreign_payloads_are_ignored() {
        for change in [
            Change::Subscription("sub_1".into()),
            Change::AgentCredentialRevoked("agc_1".into()),
            Change::TokenRevoked("tok_1".into()),
            Change::ConsoleSessionEnded,
        ] {
            let announcement = Announcement {
                replica: "cp-1".into(),
                change,
            };
            let payload = serde_json::to_string(&announcement).unwrap();
            assert!(payload.len() < 8000);
            assert_eq!(decode(&payload), Some(announcement));
        }
        assert_eq!(decode("hello"), None);
        assert_eq!(
            decode(r#"{"replica":"cp-1","change":{"kind":"drop"}}"#),
            None
        );
    }
}
