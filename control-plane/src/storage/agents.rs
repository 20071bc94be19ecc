//! The agents of every replica (PostgreSQL): each replica publishes its connected agents here
//! every few seconds, so `ListAgents` on any replica shows them all. Rows of a replica that died
//! without deleting them age out by `refreshed_at`.

use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use super::entity::agent;
use super::{Error, ms, time};
use crate::domain::model::AgentInfo;

/// Replaces the rows of `replica_id` with `agents` (connection key, agent), refreshed `now`.
pub async fn replace_for_replica(
    db: &impl ConnectionTrait,
    replica_id: &str,
    agents: &[(u64, AgentInfo)],
    now: DateTime<Utc>,
) -> Result<(), Error> {
    delete_replica(db, replica_id).await?;
    if agents.is_empty() {
        return Ok(());
    }
    let rows = agents.iter().map(|(key, a)| agent::ActiveModel {
        connection_id: Set(format!("{replica_id}/{key}")),
        agent_id: Set(a.agent_id.clone()),
        region: Set(a.region.clone()),
        capacity: Set(a.capacity.min(i32::MAX as u32) as i32),
        in_flight: Set(a.in_flight.min(i32::MAX as u32) as i32),
        version: Set(a.version.clone()),
        identity: Set(a.identity.clone()),
        replica_id: Set(replica_id.to_owned()),
        connected_at: Set(ms(a.connected_at)),
        last_seen_at: Set(ms(a.last_seen_at)),
        refreshed_at: Set(ms(now)),
    });
    agent::Entity::insert_many(rows)
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Deletes the rows of one replica (it stops, or replaces them).
pub async fn delete_replica(db: &impl ConnectionTrait, replica_id: &str) -> Result<u64, Error> {
    Ok(agent::Entity::delete_many()
        .filter(agent::Column::ReplicaId.eq(replica_id))
        .exec(db)
        .await?
        .rows_affected)
}

/// Deletes rows not refreshed since `before` (their replica died without cleaning up).
pub async fn delete_stale(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64, Error> {
    Ok(agent::Entity::delete_many()
        .filter(agent::Column::RefreshedAt.lt(ms(before)))
        .exec(db)
        .await?
        .rows_affected)
}

/// Returns the agents of every replica but `except_replica`, refreshed since `since`.
pub async fn list_live(
    db: &impl ConnectionTrait,
    except_replica: &str,
    since: DateTime<Utc>,
) -> Result<Vec<AgentInfo>, Error> {
    Ok(agent::Entity::find()
        .filter(agent::Column::ReplicaId.ne(except_replica))
        .filter(agent::Column::RefreshedAt.gte(ms(since)))
        .order_by_asc(agent::Column::AgentId)
        .all(db)
        .await?
        .into_iter()
        .map(|m| AgentInfo {
            agent_id: m.agent_id,
            region: m.region,
            capacity: m.capacity.max(0) as u32,
            in_flight: m.in_flight.max(0) as u32,
            version: m.version,
            identity: m.identity,
            replica_id: m.replica_id,
            connected_at: time(m.connected_at),
            last_seen_at: time(m.last_seen_at),
        })
        .collect())
}
