//! The agents connected to this replica: a shared read view that the scheduler writes. `ListAgents`
//! shows it together with the other replicas' agents, which [`super::presence`] publishes through
//! the database on PostgreSQL.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;

pub use crate::domain::model::AgentInfo;

/// Connected agents by connection key.
#[derive(Clone)]
pub struct Registry {
    replica_id: Arc<str>,
    agents: Arc<RwLock<BTreeMap<u64, AgentInfo>>>,
    /// Woken when an agent connects or goes, so the shared view follows at once.
    changed: Arc<Notify>,
}

impl Registry {
    pub fn new(replica_id: &str) -> Self {
        Self {
            replica_id: replica_id.into(),
            agents: Arc::default(),
            changed: Arc::default(),
        }
    }

    /// Returns the id of the replica this registry belongs to.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    pub fn upsert(&self, key: u64, info: AgentInfo) {
        self.agents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, info);
        self.changed.notify_one();
    }

    pub fn update(&self, key: u64, f: impl FnOnce(&mut AgentInfo)) {
        if let Some(info) = self
            .agents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&key)
        {
            f(info);
        }
    }

    pub fn remove(&self, key: u64) {
        self.agents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        self.changed.notify_one();
    }

    /// Returns every connected agent, by agent id.
    pub fn list(&self) -> Vec<AgentInfo> {
        let mut agents: Vec<AgentInfo> = self
            .agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        agents
    }

    /// Returns every connected agent with its connection key.
    pub fn connections(&self) -> Vec<(u64, AgentInfo)> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(key, info)| (*key, info.clone()))
            .collect()
    }

    /// Waits until an agent connects or goes.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
