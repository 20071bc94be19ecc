//! Tenants and tokens (admin only).

use std::sync::Arc;

use chrono::Utc;

use super::{Error, Services};
use crate::domain::model::{Page, PageRequest, Scope, Tenant, Token};
use crate::domain::{ids, validate};
use crate::storage::{tenants, tokens};

impl Services {
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant, Error> {
        let tenant = Tenant {
            id: ids::new(ids::TENANT),
            name: validate::name("name", name)?,
            created_at: Utc::now(),
        };
        tenants::insert(&self.store.writer, &tenant).await?;
        Ok(tenant)
    }

    pub async fn list_tenants(&self, page: PageRequest) -> Result<Page<Tenant>, Error> {
        Ok(tenants::list(&self.store.db, &page).await?)
    }

    /// Returns `NOT_FOUND` unless the tenant exists (an admin may name any id).
    pub async fn ensure_tenant(&self, tenant_id: &str) -> Result<(), Error> {
        if self.known_tenants.contains(tenant_id) {
            return Ok(());
        }
        if !ids::has_prefix(tenant_id, ids::TENANT)
            || tenants::get(&self.store.db, tenant_id).await?.is_none()
        {
            return Err(Error::not_found("tenant", tenant_id));
        }
        self.known_tenants.insert(tenant_id);
        Ok(())
    }

    /// Creates a token for a tenant, or an admin token when `tenant_id` is empty.
    pub async fn create_token(
        &self,
        tenant_id: &str,
        name: &str,
    ) -> Result<(Token, String), Error> {
        let name = validate::name("name", name)?;
        let scope = if tenant_id.is_empty() {
            Scope::Admin
        } else {
            self.ensure_tenant(tenant_id).await?;
            Scope::Tenant(tenant_id.to_owned())
        };
        self.auth.create_token(scope, name, false).await
    }

    pub async fn list_tokens(
        &self,
        tenant_id: &str,
        page: PageRequest,
    ) -> Result<Page<Token>, Error> {
        let tenant = (!tenant_id.is_empty()).then_some(tenant_id);
        Ok(tokens::list(&self.store.db, tenant, &page).await?)
    }

    pub async fn revoke_token(&self, token_id: &str) -> Result<(), Error> {
        let txn = self.store.writer.begin().await?;
        if !tokens::revoke(&txn, token_id, Utc::now()).await? {
            txn.rollback().await?;
            return Err(Error::not_found("token", token_id));
        }
        // Its console sessions end with it (each console request also re-checks the token).
        crate::storage::console_sessions::delete_sessions_of_token(&txn, token_id).await?;
        txn.commit().await?;
        self.auth.forget_all();
        self.console.session_ended();
        self.changes
            .announce(crate::dispatch::changes::Change::TokenRevoked(
                token_id.to_owned(),
            ))
            .await;
        Ok(())
    }
}

/// Tenant ids known to exist. Tenants are never deleted, so an entry never goes stale; the set
/// is bounded (emptied when full) so a flood of tenants cannot grow it without limit.
#[derive(Clone, Default)]
pub struct KnownTenants(Arc<std::sync::RwLock<std::collections::HashSet<String>>>);

impl KnownTenants {
    const MAX: usize = 100_000;

    fn contains(&self, tenant_id: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(tenant_id)
    }

    fn insert(&self, tenant_id: &str) {
        let mut known = self.0.write().unwrap_or_else(|e| e.into_inner());
        if known.len() >= Self::MAX {
            known.clear();
        }
        known.insert(tenant_id.to_owned());
    }
}
