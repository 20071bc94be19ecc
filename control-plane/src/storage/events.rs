//! Events: the payload bytes exactly as published, the idempotency record, and the trace context.

use std::collections::HashMap;

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::entity::event;
use super::tenants::paginate;
use super::{Error, ms, time};
use crate::domain::model::{Event, Page, PageRequest};

/// Rows per multi-row INSERT: well under the bind-parameter limits of SQLite and PostgreSQL.
const INSERT_CHUNK: usize = 1000;

/// What an earlier publish with the same idempotency key left.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub event_id: String,
    pub request_hash: String,
}

pub async fn insert_many(
    db: &impl ConnectionTrait,
    events: &[(Event, Option<String>)],
) -> Result<(), Error> {
    for chunk in events.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|(e, request_hash)| event::ActiveModel {
            id: Set(e.id.clone()),
            tenant_id: Set(e.tenant_id.clone()),
            event_type: Set(e.event_type.clone()),
            entity_type: Set(e.entity_type.clone()),
            entity_id: Set(e.entity_id.clone()),
            action: Set(e.action.clone()),
            payload: Set(e.payload.clone()),
            idempotency_key: Set(e.idempotency_key.clone()),
            request_hash: Set(request_hash.clone()),
            traceparent: Set(e.traceparent.clone()),
            occurred_at: Set(ms(e.occurred_at)),
        });
        event::Entity::insert_many(rows)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Returns the records of the given idempotency keys of one tenant that exist.
pub async fn find_keys(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    keys: &[String],
) -> Result<HashMap<String, KeyRecord>, Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Option<String>, String, Option<String>)> = event::Entity::find()
        .select_only()
        .column(event::Column::IdempotencyKey)
        .column(event::Column::Id)
        .column(event::Column::RequestHash)
        .filter(event::Column::TenantId.eq(tenant_id))
        .filter(event::Column::IdempotencyKey.is_in(keys.iter().cloned()))
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(key, event_id, hash)| {
            Some((
                key?,
                KeyRecord {
                    event_id,
                    request_hash: hash.unwrap_or_default(),
                },
            ))
        })
        .collect())
}

pub async fn get(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<Option<Event>, Error> {
    Ok(event::Entity::find_by_id(id.to_owned())
        .filter(event::Column::TenantId.eq(tenant_id))
        .one(db)
        .await?
        .map(from_model))
}

/// Returns events by id, whatever their tenant (the dispatcher's view).
pub async fn get_many(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<Event>, Error> {
    Ok(event::Entity::find()
        .filter(event::Column::Id.is_in(ids.iter().cloned()))
        .all(db)
        .await?
        .into_iter()
        .map(from_model)
        .collect())
}

/// Lists a tenant's events, newest first.
pub async fn list(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    event_type: Option<&str>,
    page: &PageRequest,
) -> Result<Page<Event>, Error> {
    let mut query = event::Entity::find()
        .filter(event::Column::TenantId.eq(tenant_id))
        .order_by_desc(event::Column::Id);
    if let Some(event_type) = event_type {
        query = query.filter(event::Column::EventType.eq(event_type));
    }
    if let Some(after) = &page.after {
        query = query.filter(event::Column::Id.lt(after.clone()));
    }
    let rows = query.limit(page.size + 1).all(db).await?;
    Ok(paginate(
        rows.into_iter().map(from_model).collect(),
        page,
        |e| &e.id,
    ))
}

/// Returns the event types a tenant has published with their counts, by type name.
pub async fn type_counts(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    exclude: &str,
) -> Result<Vec<(String, u64)>, Error> {
    use sea_orm::sea_query::ExprTrait as _;
    let rows: Vec<(String, i64)> = event::Entity::find()
        .select_only()
        .column(event::Column::EventType)
        .column_as(Expr::col(event::Column::Id).count(), "count")
        .filter(event::Column::TenantId.eq(tenant_id))
        .filter(event::Column::EventType.ne(exclude))
        .group_by(event::Column::EventType)
        .order_by_asc(event::Column::EventType)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(t, n)| (t, u64::try_from(n).unwrap_or(0)))
        .collect())
}

/// Counts how many of these events are stored (a publish whose `COMMIT` outcome is unknown).
pub async fn count_present(db: &impl ConnectionTrait, ids: &[String]) -> Result<u64, Error> {
    use sea_orm::PaginatorTrait;
    let mut present = 0;
    for chunk in ids.chunks(1_000) {
        present += event::Entity::find()
            .filter(event::Column::Id.is_in(chunk.iter().cloned()))
            .count(db)
            .await?;
    }
    Ok(present)
}

/// Counts a tenant's events (tests and benchmarks use it).
pub async fn count(db: &impl ConnectionTrait) -> Result<u64, Error> {
    use sea_orm::PaginatorTrait;
    Ok(event::Entity::find().count(db).await?)
}

fn from_model(m: event::Model) -> Event {
    Event {
        id: m.id,
        tenant_id: m.tenant_id,
        event_type: m.event_type,
        entity_type: m.entity_type,
        entity_id: m.entity_id,
        action: m.action,
        payload: m.payload,
        idempotency_key: m.idempotency_key,
        traceparent: m.traceparent,
        occurred_at: time(m.occurred_at),
    }
}
