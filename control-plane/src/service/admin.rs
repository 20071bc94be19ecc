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
        self.tenant_name(tenant_id).await.map(drop)
    }

    /// Returns the name of a tenant (`NOT_FOUND` unless it exists): the console's header shows it.
    pub async fn tenant_name(&self, tenant_id: &str) -> Result<String, Error> {
        if let Some(name) = self.known_tenants.name(tenant_id) {
            return Ok(name);
        }
        let tenant = if ids::has_prefix(tenant_id, ids::TENANT) {
            tenants::get(&self.store.db, tenant_id).await?
        } else {
            None
        };
        let tenant = tenant.ok_or_else(|| Error::not_found("tenant", tenant_id))?;
        self.known_tenants.insert(tenant_id, &tenant.name);
        Ok(tenant.name)
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

/// Tenants known to exist, with their names. Tenants are never deleted or renamed, so an entry
/// never goes stale; the map is bounded (emptied when full) so a flood of tenants cannot grow it
/// without limit.
#[derive(Clone, Default)]
pub struct KnownTenants(Arc<std::sync::RwLock<std::collections::HashMap<String, String>>>);

impl KnownTenants {
    const MAX: usize = 100_000;

    fn name(&self, tenant_id: &str) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant_id)
            .cloned()
    }

    fn insert(&self, tenant_id: &str, name: &str) {
        let mut known = self.0.write().unwrap_or_else(|e| e.into_inner());
        if known.len() >= Self::MAX {
            known.clear();
        }
        known.insert(tenant_id.to_owned(), name.to_owned());
    }
}
