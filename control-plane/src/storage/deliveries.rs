//! Deliveries (one event x one subscription) and their attempts: the delivery log, and the lease
//! columns through which agents own work.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};

use super::entity::{attempt, delivery};
use super::tenants::paginate;
use super::{Error, ms, time};
use crate::domain::model::{Attempt, AttemptError, Delivery, DeliveryState, Page, PageRequest};

const INSERT_CHUNK: usize = 1000;

/// Which deliveries a list shows.
#[derive(Debug, Clone)]
pub enum ListBy {
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
            last_status_code: Set(d.last_status_code.map(|c| c as i32)),
            last_error: Set(d.last_error.map(|e| e as i32)),
            created_at: Set(ms(d.created_at)),
            updated_at: Set(ms(d.created_at)),
        });
        delivery::Entity::insert_many(rows).exec_without_returning(db).await?;
    }
    Ok(())
}

/// Returns the ids of an event's deliveries, oldest first (the publish reply's order).
pub async fn ids_for_event(db: &impl ConnectionTrait, event_id: &str) -> Result<Vec<String>, Error> {
    Ok(delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::EventId.eq(event_id))
        .order_by_asc(delivery::Column::Id)
        .into_tuple()
        .all(db)
        .await?)
}

pub async fn get(db: &impl ConnectionTrait, tenant_id: &str, id: &str) -> Result<Option<Delivery>, Error> {
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
    Ok(paginate(rows.into_iter().map(from_model).collect(), page, |d| &d.id))
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
            response_headers: Set(serde_json::to_string(&a.response_headers).unwrap_or_else(|_| "[]".into())),
            response_excerpt: Set(a.response_excerpt.clone()),
            error: Set(a.error as i32),
            error_message: Set(a.error_message.clone()),
        });
        attempt::Entity::insert_many(rows).exec_without_returning(db).await?;
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
