//! Deliveries (one event x one subscription) and their attempts: the delivery log, and the lease
//! columns through which agents own work.

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::entity::{attempt, delivery};
use super::tenants::paginate;
use super::{Error, ms, time};
use crate::domain::model::{Attempt, AttemptError, Delivery, DeliveryState, Page, PageRequest};

const INSERT_CHUNK: usize = 1000;

/// Which deliveries a list shows.
#[derive(Debug, Clone)]
pub enum ListBy {
    Tenant,
    Subscription(String),
    Event(String),
}

pub async fn insert_many(db: &impl ConnectionTrait, deliveries: &[Delivery]) -> Result<(), Error> {
    for chunk in deliveries.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|d| delivery::ActiveModel {
            id: Set(d.id.clone()),
            tenant_id: Set(d.tenant_id.clone()),
            event_id: Set(d.event_id.clone()),
            subscription_id: Set(d.subscription_id.clone()),
            state: Set(d.state as i32),
            attempt_count: Set(d.attempt_count as i32),
            next_attempt_at: Set(ms(d.next_attempt_at)),
            lease_id: Set(None),
            lease_expires_at: Set(None),
            agent_id: Set(None),
            ordering_key: Set(d.ordering_key.clone()),
            event_type: Set(Some(d.event_type.clone())),
            last_status_code: Set(d.last_status_code.map(|c| c as i32)),
            last_error: Set(d.last_error.map(|e| e as i32)),
            created_at: Set(ms(d.created_at)),
            updated_at: Set(ms(d.created_at)),
        });
        delivery::Entity::insert_many(rows)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Returns the ids of an event's deliveries, oldest first (the publish reply's order).
pub async fn ids_for_event(
    db: &impl ConnectionTrait,
    event_id: &str,
) -> Result<Vec<String>, Error> {
    Ok(delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::EventId.eq(event_id))
        .order_by_asc(delivery::Column::Id)
        .into_tuple()
        .all(db)
        .await?)
}

pub async fn get(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<Option<Delivery>, Error> {
    Ok(delivery::Entity::find_by_id(id.to_owned())
        .filter(delivery::Column::TenantId.eq(tenant_id))
        .one(db)
        .await?
        .map(from_model))
}

/// Lists deliveries newest first.
pub async fn list(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    by: &ListBy,
    state: Option<DeliveryState>,
    page: &PageRequest,
) -> Result<Page<Delivery>, Error> {
    let mut query = delivery::Entity::find()
        .filter(delivery::Column::TenantId.eq(tenant_id))
        .order_by_desc(delivery::Column::Id);
    query = match by {
        ListBy::Tenant => query,
        ListBy::Subscription(id) => query.filter(delivery::Column::SubscriptionId.eq(id.clone())),
        ListBy::Event(id) => query.filter(delivery::Column::EventId.eq(id.clone())),
    };
    if let Some(state) = state {
        query = query.filter(delivery::Column::State.eq(state as i32));
    }
    if let Some(after) = &page.after {
        query = query.filter(delivery::Column::Id.lt(after.clone()));
    }
    let rows = query.limit(page.size + 1).all(db).await?;
    Ok(paginate(
        rows.into_iter().map(from_model).collect(),
        page,
        |d| &d.id,
    ))
}

/// Returns a delivery's attempts, oldest first.
pub async fn attempts(db: &impl ConnectionTrait, delivery_id: &str) -> Result<Vec<Attempt>, Error> {
    Ok(attempt::Entity::find()
        .filter(attempt::Column::DeliveryId.eq(delivery_id))
        .order_by_asc(attempt::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(attempt_from_model)
        .collect())
}

pub async fn insert_attempts(db: &impl ConnectionTrait, attempts: &[Attempt]) -> Result<(), Error> {
    for chunk in attempts.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|a| attempt::ActiveModel {
            id: Set(a.id.clone()),
            delivery_id: Set(a.delivery_id.clone()),
            agent_id: Set(a.agent_id.clone()),
            region: Set(a.region.clone()),
            started_at: Set(ms(a.started_at)),
            duration_ms: Set(a.duration_ms.min(i32::MAX as u32) as i32),
            status_code: Set(a.status_code as i32),
            response_headers: Set(
                serde_json::to_string(&a.response_headers).unwrap_or_else(|_| "[]".into())
            ),
            response_excerpt: Set(a.response_excerpt.clone()),
            error: Set(a.error as i32),
            error_message: Set(a.error_message.clone()),
        });
        attempt::Entity::insert_many(rows)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

pub async fn count(db: &impl ConnectionTrait) -> Result<u64, Error> {
    use sea_orm::PaginatorTrait;
    Ok(delivery::Entity::find().count(db).await?)
}

pub(crate) fn from_model(m: delivery::Model) -> Delivery {
    Delivery {
        id: m.id,
        tenant_id: m.tenant_id,
        event_id: m.event_id,
        subscription_id: m.subscription_id,
        state: DeliveryState::from_i32(m.state).unwrap_or(DeliveryState::Pending),
        attempt_count: m.attempt_count.max(0) as u32,
        next_attempt_at: time(m.next_attempt_at),
        ordering_key: m.ordering_key,
        event_type: m.event_type.unwrap_or_default(),
        last_status_code: m.last_status_code.map(|c| c.max(0) as u32),
        last_error: m.last_error.map(AttemptError::from_i32),
        created_at: time(m.created_at),
    }
}

fn attempt_from_model(m: attempt::Model) -> Attempt {
    Attempt {
        id: m.id,
        delivery_id: m.delivery_id,
        agent_id: m.agent_id,
        region: m.region,
        started_at: time(m.started_at),
        duration_ms: m.duration_ms.max(0) as u32,
        status_code: m.status_code.max(0) as u32,
        response_headers: serde_json::from_str(&m.response_headers).unwrap_or_default(),
        response_excerpt: m.response_excerpt,
        error: AttemptError::from_i32(m.error),
        error_message: m.error_message,
    }
}

/// Returns deliveries that are due: pending or failed with their time come, or in flight with
/// an expired lease (the agent or the replica that held it is gone). Oldest due first.
pub async fn due(
    db: &impl ConnectionTrait,
    now: chrono::DateTime<chrono::Utc>,
    limit: u64,
) -> Result<Vec<Delivery>, Error> {
    use sea_orm::Condition;
    let now = ms(now);
    let rows =
        delivery::Entity::find()
            .filter(
                Condition::any()
                    .add(
                        Condition::all()
                            .add(delivery::Column::State.is_in([
                                DeliveryState::Pending as i32,
                                DeliveryState::Failed as i32,
                            ]))
                            .add(delivery::Column::NextAttemptAt.lte(now)),
                    )
                    .add(
                        Condition::all()
                            .add(delivery::Column::State.eq(DeliveryState::InFlight as i32))
                            .add(delivery::Column::LeaseExpiresAt.lte(now)),
                    ),
            )
            .order_by_asc(delivery::Column::NextAttemptAt)
            .limit(limit)
            .all(db)
            .await?;
    Ok(rows.into_iter().map(from_model).collect())
}

fn claimable(now: i64) -> sea_orm::Condition {
    use sea_orm::Condition;
    Condition::any()
        .add(
            Condition::all()
                .add(
                    delivery::Column::State
                        .is_in([DeliveryState::Pending as i32, DeliveryState::Failed as i32]),
                )
                .add(delivery::Column::NextAttemptAt.lte(now)),
        )
        .add(
            Condition::all()
                .add(delivery::Column::State.eq(DeliveryState::InFlight as i32))
                .add(delivery::Column::LeaseExpiresAt.lte(now)),
        )
}

/// Leases the claimable deliveries among `ids` to `agent_id` under `lease_id`; returns the ids
/// it leased. A delivery another replica or agent holds is left alone: the update is conditional.
pub async fn claim(
    db: &impl ConnectionTrait,
    ids: &[String],
    lease_id: &str,
    agent_id: &str,
    expires_at: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>, Error> {
    use sea_orm::sea_query::Expr;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    delivery::Entity::update_many()
        .col_expr(
            delivery::Column::State,
            Expr::value(DeliveryState::InFlight as i32),
        )
        .col_expr(delivery::Column::LeaseId, Expr::value(lease_id))
        .col_expr(
            delivery::Column::LeaseExpiresAt,
            Expr::value(ms(expires_at)),
        )
        .col_expr(delivery::Column::AgentId, Expr::value(agent_id))
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
        .filter(delivery::Column::Id.is_in(ids.iter().cloned()))
        .filter(claimable(ms(now)))
        .exec(db)
        .await?;
    Ok(delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::LeaseId.eq(lease_id))
        .filter(delivery::Column::Id.is_in(ids.iter().cloned()))
        .into_tuple()
        .all(db)
        .await?)
}

/// The new state of deliveries after results that share an outcome.
#[derive(Debug, Clone)]
pub struct Completion {
    pub state: DeliveryState,
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    pub status_code: u32,
    pub error: AttemptError,
}

/// Starts an update that makes deliveries due again now: `PENDING`, no lease.
fn back_to_pending(now: chrono::DateTime<chrono::Utc>) -> sea_orm::UpdateMany<delivery::Entity> {
    use sea_orm::sea_query::Expr;
    delivery::Entity::update_many()
        .col_expr(
            delivery::Column::State,
            Expr::value(DeliveryState::Pending as i32),
        )
        .col_expr(delivery::Column::NextAttemptAt, Expr::value(ms(now)))
        .col_expr(
            delivery::Column::LeaseId,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            delivery::Column::LeaseExpiresAt,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
}

/// Gives leased deliveries back (their agent went away): pending again at once.
pub async fn release(
    db: &impl ConnectionTrait,
    leases: &[(String, String)],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    let mut released = 0;
    for (id, lease_id) in leases {
        released += back_to_pending(now)
            .filter(delivery::Column::Id.eq(id.clone()))
            .filter(delivery::Column::LeaseId.eq(lease_id.clone()))
            .filter(delivery::Column::State.eq(DeliveryState::InFlight as i32))
            .exec(db)
            .await?
            .rows_affected;
    }
    Ok(released)
}

/// Makes every in-flight delivery pending again: at the start of the only replica (SQLite),
/// whose leases died with the previous process.
pub async fn release_all(
    db: &impl ConnectionTrait,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    Ok(back_to_pending(now)
        .filter(delivery::Column::State.eq(DeliveryState::InFlight as i32))
        .exec(db)
        .await?
        .rows_affected)
}

/// Schedules one more attempt now for a delivery that is not in flight; `None` when it does not
/// exist, `Some(false)` when it is in flight.
pub async fn retry_now(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<bool>, Error> {
    let result = back_to_pending(now)
        .filter(delivery::Column::Id.eq(id))
        .filter(delivery::Column::TenantId.eq(tenant_id))
        .filter(delivery::Column::State.ne(DeliveryState::InFlight as i32))
        .exec(db)
        .await?;
    if result.rows_affected == 1 {
        return Ok(Some(true));
    }
    Ok(get(db, tenant_id, id).await?.map(|_| false))
}

/// Puts every `DEAD` delivery of a subscription created since `since` back to `PENDING`.
pub async fn replay(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    since: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    Ok(back_to_pending(now)
        .filter(delivery::Column::SubscriptionId.eq(subscription_id))
        .filter(delivery::Column::State.eq(DeliveryState::Dead as i32))
        .filter(delivery::Column::CreatedAt.gte(ms(since)))
        .exec(db)
        .await?
        .rows_affected)
}

/// Makes a disabled subscription's waiting deliveries `DEAD` (replayable).
pub async fn kill_waiting(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    use sea_orm::sea_query::Expr;
    Ok(delivery::Entity::update_many()
        .col_expr(
            delivery::Column::State,
            Expr::value(DeliveryState::Dead as i32),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
        .filter(delivery::Column::SubscriptionId.eq(subscription_id))
        .filter(
            delivery::Column::State
                .is_in([DeliveryState::Pending as i32, DeliveryState::Failed as i32]),
        )
        .exec(db)
        .await?
        .rows_affected)
}

/// Returns whether an ordered delivery must wait: an earlier delivery of the same entity to the
/// same subscription is not finished yet (pending, in flight or failed).
pub async fn ordered_blocked(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    ordering_key: &str,
    id: &str,
) -> Result<bool, Error> {
    Ok(delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::SubscriptionId.eq(subscription_id))
        .filter(delivery::Column::OrderingKey.eq(ordering_key))
        .filter(delivery::Column::Id.lt(id))
        .filter(delivery::Column::State.is_in([
            DeliveryState::Pending as i32,
            DeliveryState::InFlight as i32,
            DeliveryState::Failed as i32,
        ]))
        .into_tuple::<String>()
        .one(db)
        .await?
        .is_some())
}

/// Returns a delivery by id, whatever its tenant (the scheduler's view).
pub async fn get_any(db: &impl ConnectionTrait, id: &str) -> Result<Option<Delivery>, Error> {
    Ok(delivery::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(from_model))
}

/// Applies results that share their outcome to many deliveries at once (one statement), each
/// only if its lease is still valid; returns the ids it moved.
pub async fn complete_many(
    db: &impl ConnectionTrait,
    leases: &[(&str, &str)],
    outcome: &Completion,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>, Error> {
    use sea_orm::Condition;
    use sea_orm::sea_query::{Expr, ExprTrait as _};
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let mut held = Condition::any();
    for (id, lease_id) in leases {
        held = held.add(
            Condition::all()
                .add(delivery::Column::Id.eq(*id))
                .add(delivery::Column::LeaseId.eq(*lease_id)),
        );
    }
    let moved = delivery::Entity::update_many()
        .col_expr(delivery::Column::State, Expr::value(outcome.state as i32))
        .col_expr(
            delivery::Column::AttemptCount,
            Expr::col(delivery::Column::AttemptCount).add(1),
        )
        .col_expr(
            delivery::Column::NextAttemptAt,
            Expr::value(ms(outcome.next_attempt_at.unwrap_or(now))),
        )
        .col_expr(
            delivery::Column::LeaseId,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            delivery::Column::LeaseExpiresAt,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(
            delivery::Column::LastStatusCode,
            Expr::value(outcome.status_code as i32),
        )
        .col_expr(
            delivery::Column::LastError,
            Expr::value(outcome.error as i32),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
        .filter(held)
        .filter(delivery::Column::State.eq(DeliveryState::InFlight as i32))
        .filter(delivery::Column::LeaseExpiresAt.gt(ms(now)))
        .exec_with_returning(db)
        .await?;
    Ok(moved.into_iter().map(|m| m.id).collect())
}
