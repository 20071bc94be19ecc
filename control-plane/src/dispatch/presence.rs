//! Publishes this replica's connected agents to the `agents` table (PostgreSQL), so that
//! `ListAgents` on any replica shows every replica's agents: at once when an agent connects or
//! goes, and every [`REFRESH`] (in-flight counts, last seen). A replica that dies stops
//! refreshing, and its rows stop showing after [`ROW_TTL`].

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::registry::Registry;
use crate::storage::{Store, agents};

/// How often the rows are rewritten.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Rows not refreshed for this long belong to a replica that is gone.
pub const ROW_TTL: Duration = Duration::from_secs(10);
/// Rows this old are deleted (any replica does it).
const PURGE_AFTER: Duration = Duration::from_secs(300);

/// Keeps the rows of `registry`'s replica current until `stop`. The caller deletes them after
/// the agents are drained (see [`agents::delete_replica`]).
pub async fn run(store: Store, registry: Registry, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purge = tokio::time::interval(PURGE_AFTER / 5);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = registry.changed() => {}
            _ = tick.tick() => {}
            _ = purge.tick() => {
                let before = Utc::now()
                    - chrono::Duration::from_std(PURGE_AFTER).unwrap_or_default();
                if let Err(err) = agents::delete_stale(&store.writer, before).await {
                    tracing::debug!(error = %err, "could not purge stale agent rows");
                }
                continue;
            }
        }
        if let Err(err) = publish(&store, &registry).await {
            tracing::warn!(error = %err, "could not publish the connected agents");
        }
    }
}

async fn publish(store: &Store, registry: &Registry) -> Result<(), crate::storage::Error> {
    let txn = store.begin_write().await?;
    agents::replace_for_replica(
        &txn,
        registry.replica_id(),
        &registry.connections(),
        Utc::now(),
    )
    .await?;
    txn.commit().await?;
    Ok(())
}
