//! Console sessions and one-time sign-in links, in the database so that every replica serves
//! them and a restart keeps users signed in. Rows are keyed by the SHA-256 of the secret value
//! (the cookie, the link's token): a database dump hands out no live session.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, Set};

use super::entity::{console_link, console_session};
use super::{Error, ms, time};

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub tenant_id: String,
    pub token_id: String,
    /// The pending one-shot notice (JSON), if any.
    pub notice: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// A stored sign-in link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLink {
    pub tenant_id: String,
    pub token_id: String,
    pub expires_at: DateTime<Utc>,
}

pub async fn insert_session(
    db: &impl ConnectionTrait,
    id_hash: &str,
    session: &StoredSession,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    console_session::Entity::insert(console_session::ActiveModel {
        id_hash: Set(id_hash.to_owned()),
        tenant_id: Set(session.tenant_id.clone()),
        token_id: Set(session.token_id.clone()),
        notice: Set(session.notice.clone()),
        created_at: Set(ms(now)),
        expires_at: Set(ms(session.expires_at)),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Returns the session of `id_hash` unless it expired by `now`.
pub async fn find_session(
    db: &impl ConnectionTrait,
    id_hash: &str,
    now: DateTime<Utc>,
) -> Result<Option<StoredSession>, Error> {
    Ok(console_session::Entity::find_by_id(id_hash.to_owned())
        .filter(console_session::Column::ExpiresAt.gt(ms(now)))
        .one(db)
        .await?
        .map(|m| StoredSession {
            tenant_id: m.tenant_id,
            token_id: m.token_id,
            notice: m.notice,
            expires_at: time(m.expires_at),
        }))
}

/// Ends a session; returns whether it existed.
pub async fn delete_session(db: &impl ConnectionTrait, id_hash: &str) -> Result<bool, Error> {
    Ok(console_session::Entity::delete_by_id(id_hash.to_owned())
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// Ends every session opened by a token (it was revoked); returns how many.
pub async fn delete_sessions_of_token(
    db: &impl ConnectionTrait,
    token_id: &str,
) -> Result<u64, Error> {
    Ok(console_session::Entity::delete_many()
        .filter(console_session::Column::TokenId.eq(token_id))
        .exec(db)
        .await?
        .rows_affected)
}

/// Sets (`Some`) or clears (`None`) a session's pending notice.
pub async fn set_notice(
    db: &impl ConnectionTrait,
    id_hash: &str,
    notice: Option<&str>,
) -> Result<(), Error> {
    console_session::Entity::update_many()
        .col_expr(console_session::Column::Notice, Expr::value(notice))
        .filter(console_session::Column::IdHash.eq(id_hash))
        .exec(db)
        .await?;
    Ok(())
}

pub async fn insert_link(
    db: &impl ConnectionTrait,
    id_hash: &str,
    link: &StoredLink,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    console_link::Entity::insert(console_link::ActiveModel {
        id_hash: Set(id_hash.to_owned()),
        tenant_id: Set(link.tenant_id.clone()),
        token_id: Set(link.token_id.clone()),
        created_at: Set(ms(now)),
        expires_at: Set(ms(link.expires_at)),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Uses up a link: deletes it and returns it when it was still valid at `now`. Of two replicas
/// redeeming one link at once, only the one whose delete removed the row gets it.
pub async fn redeem_link(
    db: &impl ConnectionTrait,
    id_hash: &str,
    now: DateTime<Utc>,
) -> Result<Option<StoredLink>, Error> {
    let Some(m) = console_link::Entity::find_by_id(id_hash.to_owned())
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let removed = console_link::Entity::delete_by_id(id_hash.to_owned())
        .exec(db)
        .await?
        .rows_affected;
    Ok(
        (removed == 1 && m.expires_at > ms(now)).then(|| StoredLink {
            tenant_id: m.tenant_id,
            token_id: m.token_id,
            expires_at: time(m.expires_at),
        }),
    )
}

/// Deletes sessions and links that expired by `now`; returns how many rows went.
pub async fn delete_expired(db: &impl ConnectionTrait, now: DateTime<Utc>) -> Result<u64, Error> {
    let sessions = console_session::Entity::delete_many()
        .filter(console_session::Column::ExpiresAt.lte(ms(now)))
        .exec(db)
        .await?
        .rows_affected;
    let links = console_link::Entity::delete_many()
        .filter(console_link::Column::ExpiresAt.lte(ms(now)))
        .exec(db)
        .await?
        .rows_affected;
    Ok(sessions + links)
}
