//! Tenants: the publisher's customers, who own subscriptions and events.

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::entity::tenant;
use super::{Error, ms, time};
use crate::domain::model::{Page, PageRequest, Tenant};

pub async fn insert(db: &impl ConnectionTrait, t: &Tenant) -> Result<(), Error> {
    tenant::Entity::insert(tenant::ActiveModel {
        id: Set(t.id.clone()),
        name: Set(t.name.clone()),
        created_at: Set(ms(t.created_at)),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Option<Tenant>, Error> {
    Ok(tenant::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(from_model))
}

pub async fn list(db: &impl ConnectionTrait, page: &PageRequest) -> Result<Page<Tenant>, Error> {
    let mut query = tenant::Entity::find().order_by_asc(tenant::Column::Id);
    if let Some(after) = &page.after {
        query = query.filter(tenant::Column::Id.gt(after.clone()));
    }
    let rows = query.limit(page.size + 1).all(db).await?;
    Ok(paginate(
        rows.into_iter().map(from_model).collect(),
        page,
        |t| &t.id,
    ))
}

pub async fn count(db: &impl ConnectionTrait) -> Result<u64, Error> {
    use sea_orm::PaginatorTrait;
    Ok(tenant::Entity::find().count(db).await?)
}

fn from_model(m: tenant::Model) -> Tenant {
    Tenant {
        id: m.id,
        name: m.name,
        created_at: time(m.created_at),
    }
}

/// Cuts a page fetched with one extra row, and makes the next page's token from the last id.
pub(crate) fn paginate<T>(
    mut items: Vec<T>,
    page: &PageRequest,
    id: impl Fn(&T) -> &String,
) -> Page<T> {
    let more = items.len() as u64 > page.size;
    items.truncate(page.size as usize);
    let next_page_token = if more {
        items.last().map(|item| id(item).clone())
    } else {
        None
    };
    Page {
        items,
        next_page_token,
    }
}
