//! `WatchDeliveries` across replicas (PostgreSQL): a replica that records attempts announces
//! them with `NOTIFY herald_attempts` in the same transaction (so only committed attempts are
//! announced), and every replica `LISTEN`s and re-publishes the other replicas' attempts to its
//! own watchers. A notification carries attempt ids and states only (PostgreSQL caps a payload at
//! 8,000 bytes); a replica reads the rows only while someone watches it.

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::changes;
use super::scheduler::AttemptRecord;
use crate::domain::model::DeliveryState;
use crate::storage::{self, Store, deliveries};

/// The channel attempts are announced on.
pub const CHANNEL: &str = "herald_attempts";
/// Attempts per notification: about 40 bytes each, well under the 8,000-byte payload cap.
const PER_NOTIFICATION: usize = 100;

/// One notification: attempts recorded (and committed) by `replica`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub replica: String,
    /// (attempt id, the delivery's state after the attempt, as the proto enum's integer).
    pub attempts: Vec<(String, i32)>,
}

/// Returns the payloads announcing `attempts` (id, state) recorded by `replica`.
pub fn encode(replica: &str, attempts: &[(String, DeliveryState)]) -> Vec<String> {
    attempts
        .chunks(PER_NOTIFICATION)
        .filter_map(|chunk| {
            serde_json::to_string(&Announcement {
                replica: replica.to_owned(),
                attempts: chunk
                    .iter()
                    .map(|(id, state)| (id.clone(), *state as i32))
                    .collect(),
            })
            .ok()
        })
        .collect()
}

/// Returns the announcement in a payload; `None` for a payload Herald did not write.
pub fn decode(payload: &str) -> Option<Announcement> {
    serde_json::from_str(payload).ok()
}

/// Listens on [`CHANNEL`] and on the change channel; returns once listening, so attempts and
/// changes committed after it are seen.
pub async fn listen(url: &str) -> Result<PgListener, storage::Error> {
    let unavailable = |err: sea_orm::sqlx::Error| storage::Error::Unavailable(err.to_string());
    let mut listener = PgListener::connect(url).await.map_err(unavailable)?;
    listener
        .listen_all([CHANNEL, changes::CHANNEL])
        .await
        .map_err(unavailable)?;
    Ok(listener)
}

/// Applies another replica's change to this one.
pub type ChangeSink = std::sync::Arc<
    dyn Fn(changes::Change) -> futures::future::BoxFuture<'static, ()> + Send + Sync,
>;

/// Re-publishes the attempts other replicas announce to this replica's watchers, and applies
/// their changes, until `stop`. The listener reconnects by itself after a broken connection;
/// what was announced meanwhile is not replayed (watchers see live attempts, the delivery log
/// keeps them all; caches expire by themselves).
pub async fn relay(
    mut listener: PgListener,
    store: Store,
    replica_id: String,
    records: broadcast::Sender<AttemptRecord>,
    apply: ChangeSink,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = listener.recv() => received,
        };
        let notification = match received {
            Ok(notification) => notification,
            Err(err) => {
                tracing::warn!(error = %err, "attempt notifications interrupted; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if notification.channel() == changes::CHANNEL {
            match changes::decode(notification.payload()) {
                Some(change) if change.replica != replica_id => apply(change.change).await,
                _ => {}
            }
            continue;
        }
        let Some(announcement) = decode(notification.payload()) else {
            continue;
        };
        // Its own attempts went to its watchers when they were recorded; nobody watching
        // means nothing to read.
        if announcement.replica == replica_id || records.receiver_count() == 0 {
            continue;
        }
        let states: HashMap<String, i32> = announcement.attempts.into_iter().collect();
        let ids: Vec<String> = states.keys().cloned().collect();
        match deliveries::attempts_with_deliveries(&store.db, &ids).await {
            Ok(found) => {
                for (attempt, delivery) in found {
                    let state = states
                        .get(&attempt.id)
                        .and_then(|s| DeliveryState::from_i32(*s))
                        .unwrap_or(delivery.state);
                    // No watcher left is not an error.
                    let _ = records.send(AttemptRecord {
                        tenant_id: delivery.tenant_id,
                        delivery_id: delivery.id,
                        subscription_id: delivery.subscription_id,
                        event_id: delivery.event_id,
                        attempt,
                        state,
                    });
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, attempts = ids.len(), "could not read announced attempts")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip_in_payloads_under_the_cap() {
        let attempts: Vec<(String, DeliveryState)> = (0..250)
            .map(|n| (format!("att_01j{n:024}"), DeliveryState::Succeeded))
            .collect();
        let payloads = encode("cp-1", &attempts);
        assert_eq!(payloads.len(), 3);
        assert!(
            payloads.iter().all(|p| p.len() < 8000),
            "{}",
            payloads[0].len()
        );
        let decoded: Vec<(String, i32)> = payloads
            .iter()
            .flat_map(|p| decode(p).unwrap().attempts)
            .collect();
        assert_eq!(decoded.len(), 250);
        assert_eq!(decoded[0], (attempts[0].0.clone(), 3));
        assert_eq!(decode(&payloads[0]).unwrap().replica, "cp-1");
    }

    #[test]
    fn foreign_payloads_are_ignored() {
        assert_eq!(decode("hello"), None);
        assert_eq!(decode(r#"{"replica":1}"#), None);
    }
}
