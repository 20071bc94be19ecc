//! Per-agent credentials, stored only as SHA-256 hashes of their plaintext.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::entity::agent_credential;
use super::tenants::paginate;
use super::{Error, ms, time};
use crate::domain::model::{Page, PageRequest};

/// A per-agent credential (never its plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCredential {
    pub id: String,
    pub name: String,
    /// The only region its agents may announce; `None` = any.
    pub region: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Stores a credential; `shared` marks the shared agent token generated at first start.
pub async fn insert(
    db: &impl ConnectionTrait,
    c: &AgentCredential,
    hash: &str,
    shared: bool,
) -> Result<(), Error> {
    agent_credential::Entity::insert(agent_credential::ActiveModel {
        id: Set(c.id.clone()),
        name: Set(c.name.clone()),
        region: Set(c.region.clone()),
        hash: Set(hash.to_owned()),
        created_at: Set(ms(c.created_at)),
        last_used_at: Set(None),
        revoked_at: Set(None),
        shared: Set(shared),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Returns the unrevoked credential with this hash.
pub async fn find_by_hash(
    db: &impl ConnectionTrait,
    hash: &str,
) -> Result<Option<AgentCredential>, Error> {
    Ok(agent_credential::Entity::find()
        .filter(agent_credential::Column::Hash.eq(hash))
        .filter(agent_credential::Column::RevokedAt.is_null())
        .one(db)
        .await?
        .map(from_model))
}

pub async fn list(
    db: &impl ConnectionTrait,
    page: &PageRequest,
) -> Result<Page<AgentCredential>, Error> {
    let mut query = agent_credential::Entity::find()
        .filter(agent_credential::Column::RevokedAt.is_null())
        .order_by_asc(agent_credential::Column::Id);
    if let Some(after) = &page.after {
        query = query.filter(agent_credential::Column::Id.gt(after.clone()));
    }
    let rows = query.limit(page.size + 1).all(db).await?;
    Ok(paginate(
        rows.into_iter().map(from_model).collect(),
        page,
        |c| &c.id,
    ))
}

/// Revokes a credential; returns whether an unrevoked one was found.
pub async fn revoke(db: &impl ConnectionTrait, id: &str, at: DateTime<Utc>) -> Result<bool, Error> {
    Ok(agent_credential::Entity::update_many()
        .col_expr(agent_credential::Column::RevokedAt, Expr::value(ms(at)))
        .filter(agent_credential::Column::Id.eq(id))
        .filter(agent_credential::Column::RevokedAt.is_null())
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// Whether an unrevoked shared agent token is stored.
pub async fn any_shared(db: &impl ConnectionTrait) -> Result<bool, Error> {
    Ok(agent_credential::Entity::find()
        .filter(agent_credential::Column::Shared.eq(true))
        .filter(agent_credential::Column::RevokedAt.is_null())
        .one(db)
        .await?
        .is_some())
}

/// Revokes every unrevoked shared agent token; returns their ids.
pub async fn revoke_shared(
    db: &impl ConnectionTrait,
    at: DateTime<Utc>,
) -> Result<Vec<String>, Error> {
    let ids: Vec<String> = agent_credential::Entity::find()
        .filter(agent_credential::Column::Shared.eq(true))
        .filter(agent_credential::Column::RevokedAt.is_null())
        .all(db)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    if !ids.is_empty() {
        agent_credential::Entity::update_many()
            .col_expr(agent_credential::Column::RevokedAt, Expr::value(ms(at)))
            .filter(agent_credential::Column::Id.is_in(ids.clone()))
            .exec(db)
            .await?;
    }
    Ok(ids)
}

pub async fn touch(db: &impl ConnectionTrait, id: &str, at: DateTime<Utc>) -> Result<(), Error> {
    agent_credential::Entity::update_many()
        .col_expr(agent_credential::Column::LastUsedAt, Expr::value(ms(at)))
        .filter(agent_credential::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

fn from_model(m: agent_credential::Model) -> AgentCredential {
    AgentCredential {
        id: m.id,
        name: m.name,
        region: m.region,
        created_at: time(m.created_at),
        last_used_at: m.last_used_at.map(time),
    }
}
