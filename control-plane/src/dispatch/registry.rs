//! The agents connected to this replica, for `ListAgents`: a shared read view that the
//! scheduler writes.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

/// What `ListAgents` shows of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub agent_id: String,
    pub region: String,
    pub capacity: u32,
    pub in_flight: u32,
    pub version: String,
    pub identity: String,
    pub replica_id: String,
    pub connected_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// Connected agents by connection key.
#[derive(Clone, Default)]
pub struct Registry {
    agents: Arc<RwLock<BTreeMap<u64, AgentInfo>>>,
}

impl Registry {
    pub fn upsert(&self, key: u64, info: AgentInfo) {
        self.agents
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, info);
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
}
