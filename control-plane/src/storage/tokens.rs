//! API tokens, stored only as SHA-256 hashes of their plaintext.

use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::entity::token;
use super::tenants::paginate;
use super::{Error, ms, time};
use crate::domain::model::{Page, PageRequest, Scope, Token};

/// A token row with what authentication needs.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub token: Token,
    pub revoked: bool,
}

pub async fn insert(
    db: &impl ConnectionTrait,
    t: &Token,
    hash: &str,
    bootstrap: bool,
) -> Result<(), Error> {
    let (tenant_id, admin) = match &t.scope {
        Scope::Admin => (None, true),
        Scope::Tenant(id) => (Some(id.clone()), false),
    };
    token::Entity::insert(token::ActiveModel {
        id: Set(t.id.clone()),
        tenant_id: Set(tenant_id),
        name: Set(t.name.clone()),
        hash: Set(hash.to_owned()),
        admin: Set(admin),
        bootstrap: Set(bootstrap),
        created_at: Set(ms(t.created_at)),
        last_used_at: Set(None),
        revoked_at: Set(None),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

pub async fn find_by_hash(
    db: &impl ConnectionTrait,
    hash: &str,
) -> Result<Option<StoredToken>, Error> {
    Ok(token::Entity::find()
        .filter(token::Column::Hash.eq(hash))
        .one(db)
        .await?
        .map(|m| StoredToken {
            revoked: m.revoked_at.is_some(),
            token: from_model(m),
        }))
}

pub async fn get(db: &impl ConnectionTrait, id: &str) -> Result<Option<StoredToken>, Error> {
    Ok(token::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(|m| StoredToken {
            revoked: m.revoked_at.is_some(),
            token: from_model(m),
        }))
}

/// Lists unrevoked tokens, of one tenant or all.
pub async fn list(
    db: &impl ConnectionTrait,
    tenant_id: Option<&str>,
    page: &PageRequest,
) -> Result<Page<Token>, Error> {
    let mut query = token::Entity::find()
        .filter(token::Column::RevokedAt.is_null())
        .order_by_asc(token::Column::Id);
    if let Some(tenant_id) = tenant_id {
        query = query.filter(token::Column::TenantId.eq(tenant_id));
    }
    if let Some(after) = &page.after {
        query = query.filter(token::Column::Id.gt(after.clone()));
    }
    let rows = query.limit(page.size + 1).all(db).await?;
    Ok(paginate(
        rows.into_iter().map(from_model).collect(),
        page,
        |t| &t.id,
    ))
}

/// Revokes a token; returns whether an unrevoked one was found.
pub async fn revoke(
    db: &impl ConnectionTrait,
    id: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, Error> {
    let result = token::Entity::update_many()
        .col_expr(token::Column::RevokedAt, Expr::value(ms(at)))
        .filter(token::Column::Id.eq(id))
        .filter(token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected == 1)
}

/// Revokes every generated (bootstrap) admin token; returns how many.
pub async fn revoke_bootstrap(
    db: &impl ConnectionTrait,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    let result = token::Entity::update_many()
        .col_expr(token::Column::RevokedAt, Expr::value(ms(at)))
        .filter(token::Column::Bootstrap.eq(true))
        .filter(token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}

/// Returns whether an unrevoked admin token exists in the database.
pub async fn any_admin(db: &impl ConnectionTrait) -> Result<bool, Error> {
    Ok(token::Entity::find()
        .filter(token::Column::Admin.eq(true))
        .filter(token::Column::RevokedAt.is_null())
        .one(db)
        .await?
        .is_some())
}

pub async fn touch(
    db: &impl ConnectionTrait,
    id: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), Error> {
    token::Entity::update_many()
        .col_expr(token::Column::LastUsedAt, Expr::value(ms(at)))
        .filter(token::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

fn from_model(m: token::Model) -> Token {
    Token {
        id: m.id,
        name: m.name,
        scope: match m.tenant_id {
            Some(tenant) if !m.admin => Scope::Tenant(tenant),
            _ => Scope::Admin,
        },
        created_at: time(m.created_at),
        last_used_at: m.last_used_at.map(time),
    }
}
