//! Agent credentials: per-agent tokens (shown once, stored hashed, optionally pinned to a
//! region) beside the shared `HERALD_AGENT_TOKEN`.

use chrono::Utc;

use super::{Error, Services, auth};
use crate::dispatch::{Command, presence};
use crate::domain::model::{AgentInfo, Page, PageRequest};
use crate::domain::{ids, validate};
use crate::storage::agent_credentials::{self, AgentCredential};
use crate::storage::agents;

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
        let token = auth::new_token().replacen(auth::TOKEN_PREFIX, AGENT_TOKEN_PREFIX, 1);
        agent_credentials::insert(&self.store.writer, &credential, &auth::hash(&token)).await?;
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
