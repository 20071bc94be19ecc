//! Subscriptions, with their API key and signing secrets sealed at rest.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::NotSet, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use super::entity::subscription;
use super::tenants::paginate;
use super::{Error, Sealer, ms, time};
use crate::domain::model::{
    CustomHeader, DeliveryState, LastDelivery, Page, PageRequest, PreviousSecret, Subscription,
    SubscriptionStatus, api_key_hint,
};
use crate::domain::payload_filter::PayloadFilter;

fn to_active(s: &Subscription, sealer: &Sealer) -> subscription::ActiveModel {
    subscription::ActiveModel {
        id: Set(s.id.clone()),
        tenant_id: Set(s.tenant_id.clone()),
        name: Set(s.name.clone()),
        url: Set(s.url.clone()),
        event_types: Set(serde_json::to_string(&s.event_types).unwrap_or_else(|_| "[]".into())),
        active: Set(s.active),
        status: Set(s.status as i32),
        disabled_reason: Set(s.disabled_reason.clone()),
        api_key: Set(s.api_key.as_deref().map(|key| sealer.seal(key))),
        api_key_hint: Set(s.api_key.as_deref().map(api_key_hint)),
        api_key_header: Set(s.api_key_header.clone()),
        signing_secret: Set(sealer.seal(&s.signing_secret)),
        previous_secret: Set(s.previous_secret.as_ref().map(|p| sealer.seal(&p.secret))),
        previous_secret_expires_at: Set(s.previous_secret.as_ref().map(|p| ms(p.expires_at))),
        region: Set(s.region.clone()),
        timeout_ms: Set(i32::try_from(s.timeout.as_millis()).unwrap_or(i32::MAX)),
        max_attempts: Set(s.max_attempts as i32),
        max_concurrency: Set(s.max_concurrency as i32),
        rate_limit_per_s: Set(s.rate_limit_per_s as i32),
        ordered: Set(s.ordered),
        payload_filter: Set(s.payload_filter.as_ref().map(|f| f.text.clone())),
        headers: Set(seal_headers(&s.headers, sealer)),
        // Written by delivery results only (see `record_last_delivery`).
        last_delivery_state: NotSet,
        last_delivery_status: NotSet,
        last_delivery_at: NotSet,
        last_success_at: NotSet,
        failing_since: NotSet,
        created_at: Set(ms(s.created_at)),
        updated_at: Set(ms(s.updated_at)),
    }
}

/// The headers as stored: JSON, secret values sealed; `None` when there are none.
pub(crate) fn seal_headers(headers: &[CustomHeader], sealer: &Sealer) -> Option<String> {
    if headers.is_empty() {
        return None;
    }
    let sealed: Vec<CustomHeader> = headers
        .iter()
        .map(|h| CustomHeader {
            value: if h.secret {
                sealer.seal(&h.value)
            } else {
                h.value.clone()
            },
            ..h.clone()
        })
        .collect();
    serde_json::to_string(&sealed).ok()
}

/// The headers of a stored row, secret values opened.
pub(crate) fn open_headers(
    stored: Option<&str>,
    sealer: &Sealer,
) -> Result<Vec<CustomHeader>, Error> {
    let Some(text) = stored else {
        return Ok(Vec::new());
    };
    let mut headers: Vec<CustomHeader> =
        serde_json::from_str(text).map_err(|err| Error::Internal(err.to_string()))?;
    for header in headers.iter_mut().filter(|h| h.secret) {
        header.value = sealer.open(&header.value)?;
    }
    Ok(headers)
}

fn from_model(m: subscription::Model, sealer: &Sealer) -> Result<Subscription, Error> {
    let previous_secret = match (m.previous_secret, m.previous_secret_expires_at) {
        (Some(secret), Some(expires_at)) => Some(PreviousSecret {
            secret: sealer.open(&secret)?,
            expires_at: time(expires_at),
        }),
        _ => None,
    };
    let last_delivery = match (m.last_delivery_state, m.last_delivery_at) {
        (Some(state), Some(at)) => DeliveryState::from_i32(state).map(|state| LastDelivery {
            state,
            status_code: m.last_delivery_status.unwrap_or(0).max(0) as u32,
            at: time(at),
        }),
        _ => None,
    };
    let payload_filter = match m.payload_filter.as_deref() {
        None => None,
        Some(text) => PayloadFilter::parse(text).map_err(|err| {
            Error::Internal(format!("subscription {}: payload_filter: {err}", m.id))
        })?,
    };
    let headers = open_headers(m.headers.as_deref(), sealer)
        .map_err(|err| Error::Internal(format!("subscription {}: headers: {err}", m.id)))?;
    Ok(Subscription {
        event_types: serde_json::from_str(&m.event_types)
            .map_err(|err| Error::Internal(format!("subscription {}: event_types: {err}", m.id)))?,
        api_key: m
            .api_key
            .as_deref()
            .map(|key| sealer.open(key))
            .transpose()?,
        signing_secret: sealer.open(&m.signing_secret)?,
        id: m.id,
        tenant_id: m.tenant_id,
        name: m.name,
        url: m.url,
        active: m.active,
        status: SubscriptionStatus::from_i32(m.status),
        disabled_reason: m.disabled_reason,
        api_key_header: m.api_key_header,
        previous_secret,
        region: m.region,
        timeout: std::time::Duration::from_millis(m.timeout_ms.max(0) as u64),
        max_attempts: m.max_attempts.max(1) as u32,
        max_concurrency: m.max_concurrency.max(1) as u32,
        rate_limit_per_s: m.rate_limit_per_s.max(0) as u32,
        ordered: m.ordered,
        payload_filter,
        headers,
        last_delivery,
        created_at: time(m.created_at),
        updated_at: time(m.updated_at),
    })
}

pub async fn insert(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    s: &Subscription,
) -> Result<(), Error> {
    subscription::Entity::insert(to_active(s, sealer))
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Writes every field a caller can change (not the delivery summary).
pub async fn update(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    s: &Subscription,
) -> Result<(), Error> {
    subscription::Entity::update(to_active(s, sealer))
        .exec(db)
        .await?;
    Ok(())
}

/// Returns the subscription `id` of `tenant_id`; another tenant's is `None`.
pub async fn get(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    tenant_id: &str,
    id: &str,
) -> Result<Option<Subscription>, Error> {
    subscription::Entity::find_by_id(id.to_owned())
        .filter(subscription::Column::TenantId.eq(tenant_id))
        .one(db)
        .await?
        .map(|m| from_model(m, sealer))
        .transpose()
}

/// Returns subscriptions by id, whatever their tenant (the dispatcher's view).
pub async fn get_many(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    ids: &[String],
) -> Result<Vec<Subscription>, Error> {
    subscription::Entity::find()
        .filter(subscription::Column::Id.is_in(ids.iter().cloned()))
        .all(db)
        .await?
        .into_iter()
        .map(|m| from_model(m, sealer))
        .collect()
}

pub async fn list(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    tenant_id: &str,
    page: &PageRequest,
) -> Result<Page<Subscription>, Error> {
    let mut query = subscription::Entity::find()
        .filter(subscription::Column::TenantId.eq(tenant_id))
        .order_by_asc(subscription::Column::Id);
    if let Some(after) = &page.after {
        query = query.filter(subscription::Column::Id.gt(after.clone()));
    }
    let rows = query.limit(page.size + 1).all(db).await?;
    let items = rows
        .into_iter()
        .map(|m| from_model(m, sealer))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(paginate(items, page, |s| &s.id))
}

/// Returns the tenant's subscriptions that receive new events (active and enabled); the caller
/// applies the filters.
pub async fn receiving(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    tenant_id: &str,
) -> Result<Vec<Subscription>, Error> {
    subscription::Entity::find()
        .filter(subscription::Column::TenantId.eq(tenant_id))
        .filter(subscription::Column::Active.eq(true))
        .filter(subscription::Column::Status.eq(SubscriptionStatus::Enabled as i32))
        .order_by_asc(subscription::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(|m| from_model(m, sealer))
        .collect()
}

pub async fn delete(db: &impl ConnectionTrait, tenant_id: &str, id: &str) -> Result<bool, Error> {
    let result = subscription::Entity::delete_many()
        .filter(subscription::Column::Id.eq(id))
        .filter(subscription::Column::TenantId.eq(tenant_id))
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Records the newest attempt's result on the subscription, and the endpoint-health clock:
/// `last_success_at` on a success, `failing_since` set at the first failure after a success.
pub async fn record_last_delivery(
    db: &impl ConnectionTrait,
    id: &str,
    last: &LastDelivery,
) -> Result<(), Error> {
    use sea_orm::sea_query::ExprTrait as _;
    let mut update = subscription::Entity::update_many()
        .col_expr(
            subscription::Column::LastDeliveryState,
            Expr::value(last.state as i32),
        )
        .col_expr(
            subscription::Column::LastDeliveryStatus,
            Expr::value(last.status_code as i32),
        )
        .col_expr(
            subscription::Column::LastDeliveryAt,
            Expr::value(ms(last.at)),
        );
    if last.state == DeliveryState::Succeeded {
        update = update
            .col_expr(
                subscription::Column::LastSuccessAt,
                Expr::value(ms(last.at)),
            )
            .col_expr(
                subscription::Column::FailingSince,
                Expr::value(Option::<i64>::None),
            );
    } else {
        update = update.col_expr(
            subscription::Column::FailingSince,
            Expr::col(subscription::Column::FailingSince).if_null(ms(last.at)),
        );
    }
    update
        .filter(subscription::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Returns since when the subscription has been failing without a success, if it is.
pub async fn failing_since(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Error> {
    Ok(subscription::Entity::find_by_id(id.to_owned())
        .select_only()
        .column(subscription::Column::FailingSince)
        .into_tuple::<Option<i64>>()
        .one(db)
        .await?
        .flatten()
        .map(time))
}

/// Sets Herald's status (and reason) on a subscription; returns whether it changed.
pub async fn set_status(
    db: &impl ConnectionTrait,
    id: &str,
    status: SubscriptionStatus,
    reason: Option<&str>,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, Error> {
    let mut update = subscription::Entity::update_many()
        .col_expr(subscription::Column::Status, Expr::value(status as i32))
        .col_expr(
            subscription::Column::DisabledReason,
            Expr::value(reason.map(str::to_owned)),
        )
        .col_expr(subscription::Column::UpdatedAt, Expr::value(ms(at)))
        .filter(subscription::Column::Id.eq(id))
        .filter(subscription::Column::Status.ne(status as i32));
    if status == SubscriptionStatus::Enabled {
        // A fresh start for endpoint health.
        update = update.col_expr(
            subscription::Column::FailingSince,
            Expr::value(Option::<i64>::None),
        );
    }
    Ok(update.exec(db).await?.rows_affected == 1)
}

/// Returns the regions that enabled, active subscriptions name (the ones that need an agent).
pub async fn regions_in_use(db: &impl ConnectionTrait) -> Result<Vec<String>, Error> {
    let regions: Vec<Option<String>> = subscription::Entity::find()
        .select_only()
        .column(subscription::Column::Region)
        .filter(subscription::Column::Active.eq(true))
        .filter(subscription::Column::Status.eq(SubscriptionStatus::Enabled as i32))
        .distinct()
        .into_tuple()
        .all(db)
        .await?;
    Ok(regions.into_iter().flatten().collect())
}
