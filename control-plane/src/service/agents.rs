//! Agent credentials: per-agent tokens (shown once, stored hashed, optionally pinned to a
//! region) beside the shared agent token — `HERALD_AGENT_TOKEN`, or generated at first start and
//! stored hashed like the others (`reset-agent-token` replaces it).

use chrono::Utc;

use super::{Error, Services, auth};
use crate::dispatch::{Command, presence};
use crate::domain::model::{AgentInfo, Page, PageRequest};
use crate::domain::{ids, validate};
use crate::storage::agent_credentials::{self, AgentCredential};
use crate::storage::{Store, agents};

/// The name the generated shared agent token is listed under (`ListAgentCredentials`).
pub const SHARED_TOKEN_NAME: &str = "shared agent token";

/// Returns a new random agent credential (`hrla_…`).
pub fn new_agent_token() -> String {
    auth::new_token().replacen(auth::TOKEN_PREFIX, AGENT_TOKEN_PREFIX, 1)
}

/// Stores a new shared agent token; returns its plaintext.
async fn insert_shared(db: &impl sea_orm::ConnectionTrait) -> Result<String, Error> {
    let credential = AgentCredential {
        id: ids::new(ids::AGENT_CREDENTIAL),
        name: SHARED_TOKEN_NAME.into(),
        region: None,
        created_at: Utc::now(),
        last_used_at: None,
    };
    let token = new_agent_token();
    agent_credentials::insert(db, &credential, &auth::hash(&token), true).await?;
    Ok(token)
}

/// At a start without `HERALD_AGENT_TOKEN`: makes the shared agent token when none is stored and
/// returns its plaintext (printed once), or `None` when one exists already.
pub async fn bootstrap_shared_token(store: &Store) -> Result<Option<String>, Error> {
    if agent_credentials::any_shared(&store.db).await? {
        return Ok(None);
    }
    Ok(Some(insert_shared(&store.writer).await?))
}

/// `reset-agent-token`: revokes the stored shared agent token(s) and makes a new one, in one
/// transaction. Returns the revoked credentials' ids (whose streams must end on every replica)
/// and the new plaintext.
pub async fn reset_shared_token(store: &Store) -> Result<(Vec<String>, String), Error> {
    let txn = store.writer.begin().await?;
    let revoked = agent_credentials::revoke_shared(&txn, Utc::now()).await?;
    let token = insert_shared(&txn).await?;
    txn.commit().await?;
    Ok((revoked, token))
}

/// Prefix of agent credentials, so they are told apart from API tokens at a glance.
pub const AGENT_TOKEN_PREFIX: &str = "hrla_";

impl Services {
    /// Returns the agents connected to every replica, by agent id: this replica's as they are
    /// now, the others' as they published them (PostgreSQL; refreshed every few seconds).
    pub async fn list_agents(&self) -> Result<Vec<AgentInfo>, Error> {
        let mut list = self.agents.list();
        if self.store.shared() {
            let since =
                Utc::now() - chrono::Duration::from_std(presence::ROW_TTL).unwrap_or_default();
            list.extend(agents::list_live(&self.store.db, self.agents.replica_id(), since).await?);
            list.sort_by(|a, b| {
                (&a.agent_id, &a.replica_id, a.connected_at).cmp(&(
                    &b.agent_id,
                    &b.replica_id,
                    b.connected_at,
                ))
            });
        }
        Ok(list)
    }

    /// Creates a credential; returns it with its plaintext token (shown once).
    pub async fn create_agent_credential(
        &self,
        name: &str,
        region: &str,
    ) -> Result<(AgentCredential, String), Error> {
        let credential = AgentCredential {
            id: ids::new(ids::AGENT_CREDENTIAL),
            name: validate::name("name", name)?,
            region: validate::region(region)?,
            created_at: Utc::now(),
            last_used_at: None,
        };
        let token = new_agent_token();
        agent_credentials::insert(&self.store.writer, &credential, &auth::hash(&token), false)
            .await?;
        Ok((credential, token))
    }

    pub async fn list_agent_credentials(
        &self,
        page: PageRequest,
    ) -> Result<Page<AgentCredential>, Error> {
        Ok(agent_credentials::list(&self.store.db, &page).await?)
    }

    /// Revokes a credential and disconnects its agents at once (their leases are re-queued).
    pub async fn revoke_agent_credential(&self, id: &str) -> Result<(), Error> {
        if !agent_credentials::revoke(&self.store.writer, id, Utc::now()).await? {
            return Err(Error::not_found("agent credential", id));
        }
        self.dispatcher
            .send(Command::RevokeCredential(id.to_owned()))
            .await;
        self.changes
            .announce(crate::dispatch::changes::Change::AgentCredentialRevoked(
                id.to_owned(),
            ))
            .await;
        Ok(())
    }

    /// Returns the per-agent credential a token belongs to, if any.
    pub async fn find_agent_credential(
        &self,
        token: &str,
    ) -> Result<Option<AgentCredential>, Error> {
        let found = agent_credentials::find_by_hash(&self.store.db, &auth::hash(token)).await?;
        if let Some(credential) = &found {
            let store = self.store.clone();
            let id = credential.id.clone();
            // Informational: off the connection path.
            tokio::spawn(async move {
                let _ = agent_credentials::touch(&store.writer, &id, Utc::now()).await;
            });
        }
        Ok(found)
    }
}
