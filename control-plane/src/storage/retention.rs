//! Retention: events older than `HERALD_RETENTION` are removed with their deliveries and
//! attempts, except events with a delivery still pending, in flight or failing, in small batches so that a purge never holds the writer for long.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::entity::{attempt, delivery, event};
use super::{Error, Store, ms};

/// Removes up to `batch` events that occurred before `cutoff`, with their deliveries and
/// attempts, in one transaction; returns how many events it removed.
pub async fn purge_batch(
    store: &Store,
    cutoff: chrono::DateTime<chrono::Utc>,
    batch: u64,
) -> Result<u64, Error> {
    let event_ids: Vec<String> = event::Entity::find()
        .select_only()
        .column(event::Column::Id)
        .filter(event::Column::OccurredAt.lt(ms(cutoff)))
        // An event with a delivery still to be made (pending, in flight or failing) stays,
        // however old: retention never removes work.
        .filter(sea_orm::sea_query::Expr::cust(
            "NOT EXISTS (SELECT 1 FROM deliveries AS unfinished \
             WHERE unfinished.event_id = events.id AND unfinished.state IN (1, 2, 4))",
        ))
        .order_by_asc(event::Column::Id)
        .limit(batch)
        .into_tuple()
        .all(&store.db)
        .await?;
    if event_ids.is_empty() {
        return Ok(0);
    }
    let txn = store.begin_write().await?;
    if store.shared() && !purge_lock(&txn).await? {
        // Another replica is purging: one purger at a time, so they never delete the same
        // rows in a different order (a deadlock) nor do the work twice.
        return Ok(0);
    }
    let delivery_ids: Vec<String> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::EventId.is_in(event_ids.iter().cloned()))
        .into_tuple()
        .all(&txn)
        .await?;
    for chunk in delivery_ids.chunks(500) {
        attempt::Entity::delete_many()
            .filter(attempt::Column::DeliveryId.is_in(chunk.iter().cloned()))
            .exec(&txn)
            .await?;
        delivery::Entity::delete_many()
            .filter(delivery::Column::Id.is_in(chunk.iter().cloned()))
            .exec(&txn)
            .await?;
    }
    let removed = event::Entity::delete_many()
        .filter(event::Column::Id.is_in(event_ids.iter().cloned()))
        .exec(&txn)
        .await?
        .rows_affected;
    txn.commit().await?;
    Ok(removed)
}

/// Takes the cluster-wide purge lock for this transaction, without waiting (PostgreSQL).
async fn purge_lock(txn: &impl ConnectionTrait) -> Result<bool, Error> {
    let row = txn
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_try_advisory_xact_lock(4242003)",
        ))
        .await?;
    Ok(row
        .and_then(|row| row.try_get_by_index::<bool>(0).ok())
        .unwrap_or(false))
}

/// Purges everything older than `cutoff`, batch by batch, yielding between batches so
/// publishes interleave; returns how many events it removed.
pub async fn purge(
    store: &Store,
    cutoff: chrono::DateTime<chrono::Utc>,
    batch: u64,
) -> Result<u64, Error> {
    let mut total = 0;
    loop {
        let removed = purge_batch(store, cutoff, batch).await?;
        total += removed;
        if removed < batch {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Helper for tests: the number of events, deliveries and attempts stored.
pub async fn counts(db: &impl ConnectionTrait) -> Result<(u64, u64, u64), Error> {
    use sea_orm::PaginatorTrait;
    Ok((
        event::Entity::find().count(db).await?,
        delivery::Entity::find().count(db).await?,
        attempt::Entity::find().count(db).await?,
    ))
}
