//! Subscriptions: create, read, update, delete, secrets, and Herald's enable switch.

use chrono::Utc;
use rand::RngCore;

use super::{Error, Services};
use crate::domain::model::{
    CustomHeader, Page, PageRequest, SignatureScheme, Subscription, SubscriptionStatus,
};
use crate::domain::{ids, validate};
use crate::storage::{deliveries, events, subscriptions};

/// The fields of a new subscription, as sent (validated by [`Services::create_subscription`]).
#[derive(Debug, Clone, Default)]
pub struct NewSubscription {
    pub name: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub api_key: String,
    pub api_key_header: String,
    pub region: String,
    pub active: Option<bool>,
    pub timeout_ms: u32,
    pub max_attempts: u32,
    pub max_concurrency: u32,
    pub rate_limit_per_s: u32,
    pub ordered: bool,
    /// Empty: none.
    pub payload_filter: String,
    pub headers: Vec<CustomHeader>,
    /// `None`: HMAC-SHA256.
    pub signature_scheme: Option<SignatureScheme>,
}

/// Changes to a subscription: `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionPatch {
    pub name: Option<String>,
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub active: Option<bool>,
    pub api_key: Option<String>,
    pub api_key_header: Option<String>,
    pub region: Option<String>,
    pub timeout_ms: Option<u32>,
    pub max_attempts: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub rate_limit_per_s: Option<u32>,
    pub ordered: Option<bool>,
    /// `Some("")` removes the filter.
    pub payload_filter: Option<String>,
    /// The new list; a secret header sent with an empty value keeps its current value.
    pub headers: Option<Vec<CustomHeader>>,
    /// Another scheme than the current one rotates to a new key of it, with the default grace.
    pub signature_scheme: Option<SignatureScheme>,
}

/// The default grace period of a secret rotation.
pub const DEFAULT_ROTATION_GRACE_S: u32 = 86_400;

/// Returns a new signing key of `scheme` from 32 random bytes: an HMAC secret (`whsec_…`) or
/// an Ed25519 private key (`whsk_…`, the seed).
pub fn new_signing_key(scheme: SignatureScheme) -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    match scheme {
        SignatureScheme::HmacSha256 => {
            herald_proto::webhook::Secret::from_bytes(key.to_vec()).to_text()
        }
        SignatureScheme::Ed25519 => herald_proto::webhook::PrivateKey::from_seed(key).to_text(),
    }
}

impl Services {
    pub async fn create_subscription(
        &self,
        tenant_id: &str,
        new: NewSubscription,
    ) -> Result<Subscription, Error> {
        let now = Utc::now();
        let subscription = Subscription {
            id: ids::new(ids::SUBSCRIPTION),
            tenant_id: tenant_id.to_owned(),
            name: validate::name("name", &new.name)?,
            url: validate::url(&new.url, &self.limits)?,
            event_types: validate::filters(&new.event_types)?,
            active: new.active.unwrap_or(true),
            status: SubscriptionStatus::Enabled,
            disabled_reason: None,
            api_key: validate::api_key(&new.api_key)?,
            api_key_header: validate::api_key_header(&new.api_key_header)?,
            signing_secret: new_signing_key(
                new.signature_scheme.unwrap_or(SignatureScheme::HmacSha256),
            ),
            previous_secret: None,
            region: validate::region(&new.region)?,
            timeout: validate::timeout(new.timeout_ms)?,
            max_attempts: validate::max_attempts(new.max_attempts)?,
            max_concurrency: validate::max_concurrency(new.max_concurrency)?,
            rate_limit_per_s: validate::rate_limit(new.rate_limit_per_s)?,
            ordered: new.ordered,
            payload_filter: validate::payload_filter(&new.payload_filter)?,
            headers: new.headers,
            last_delivery: None,
            created_at: now,
            updated_at: now,
        };
        validate::custom_headers(&subscription.headers, &subscription.api_key_header)?;
        self.ensure_tenant(tenant_id).await?;
        subscriptions::insert(&self.store.writer, &self.store.sealer, &subscription).await?;
        Ok(subscription)
    }

    pub async fn get_subscription(&self, tenant_id: &str, id: &str) -> Result<Subscription, Error> {
        if !ids::has_prefix(id, ids::SUBSCRIPTION) {
            return Err(Error::not_found("subscription", id));
        }
        subscriptions::get(&self.store.db, &self.store.sealer, tenant_id, id)
            .await?
            .ok_or_else(|| Error::not_found("subscription", id))
    }

    pub async fn list_subscriptions(
        &self,
        tenant_id: &str,
        page: PageRequest,
    ) -> Result<Page<Subscription>, Error> {
        Ok(subscriptions::list(&self.store.db, &self.store.sealer, tenant_id, &page).await?)
    }

    pub async fn update_subscription(
        &self,
        tenant_id: &str,
        id: &str,
        patch: SubscriptionPatch,
    ) -> Result<Subscription, Error> {
        let mut s = self.get_subscription(tenant_id, id).await?;
        if let Some(name) = patch.name {
            s.name = validate::name("name", &name)?;
        }
        if let Some(url) = patch.url {
            s.url = validate::url(&url, &self.limits)?;
        }
        if let Some(event_types) = patch.event_types {
            s.event_types = validate::filters(&event_types)?;
        }
        let deactivated = patch.active == Some(false) && s.active;
        if let Some(active) = patch.active {
            s.active = active;
        }
        if let Some(api_key) = patch.api_key {
            s.api_key = validate::api_key(&api_key)?;
        }
        if let Some(header) = patch.api_key_header {
            s.api_key_header = validate::api_key_header(&header)?;
        }
        if let Some(region) = patch.region {
            s.region = validate::region(&region)?;
        }
        if let Some(timeout_ms) = patch.timeout_ms {
            s.timeout = validate::timeout(timeout_ms)?;
        }
        if let Some(max_attempts) = patch.max_attempts {
            s.max_attempts = validate::max_attempts(max_attempts)?;
        }
        if let Some(max_concurrency) = patch.max_concurrency {
            s.max_concurrency = validate::max_concurrency(max_concurrency)?;
        }
        if let Some(rate) = patch.rate_limit_per_s {
            s.rate_limit_per_s = validate::rate_limit(rate)?;
        }
        if let Some(ordered) = patch.ordered {
            s.ordered = ordered;
        }
        if let Some(filter) = patch.payload_filter {
            s.payload_filter = validate::payload_filter(&filter)?;
        }
        if let Some(headers) = patch.headers {
            s.headers = headers
                .into_iter()
                .map(|mut header| {
                    if header.secret && header.value.is_empty() {
                        // Unchanged: the caller saw only its hint.
                        if let Some(current) = s
                            .headers
                            .iter()
                            .find(|h| h.secret && h.name.eq_ignore_ascii_case(&header.name))
                        {
                            header.value = current.value.clone();
                        }
                    }
                    header
                })
                .collect();
        }
        validate::custom_headers(&s.headers, &s.api_key_header)?;
        s.updated_at = Utc::now();
        if let Some(scheme) = patch.signature_scheme
            && scheme != s.signature_scheme()
        {
            // Receivers switch to the new key while the old one still signs beside it.
            s.rotate_signing_key(
                new_signing_key(scheme),
                chrono::Duration::seconds(i64::from(DEFAULT_ROTATION_GRACE_S)),
                s.updated_at,
            );
        }
        let txn = self.store.begin_write().await?;
        subscriptions::update(&txn, &self.store.sealer, &s).await?;
        if deactivated {
            // Nothing of an inactive subscription stays due; `ReplayDeliveries` after
            // re-activation brings it back.
            deliveries::kill_waiting(&txn, &s.id, s.updated_at).await?;
        }
        txn.commit().await?;
        self.subscription_changed(&s.id).await;
        Ok(s)
    }

    /// Deletes a subscription; its waiting deliveries become `DEAD` in the same transaction (they
    /// stay in the delivery log until retention).
    pub async fn delete_subscription(&self, tenant_id: &str, id: &str) -> Result<(), Error> {
        if !ids::has_prefix(id, ids::SUBSCRIPTION) {
            return Err(Error::not_found("subscription", id));
        }
        let txn = self.store.begin_write().await?;
        if !subscriptions::delete(&txn, tenant_id, id).await? {
            txn.rollback().await?;
            return Err(Error::not_found("subscription", id));
        }
        deliveries::kill_waiting(&txn, id, Utc::now()).await?;
        txn.commit().await?;
        self.subscription_changed(id).await;
        Ok(())
    }

    /// Issues a new signing key (of `scheme`, or of the current scheme); the current one keeps
    /// signing for `grace_period_s`.
    pub async fn rotate_secret(
        &self,
        tenant_id: &str,
        id: &str,
        grace_period_s: Option<u32>,
        scheme: Option<SignatureScheme>,
    ) -> Result<Subscription, Error> {
        let mut s = self.get_subscription(tenant_id, id).await?;
        let grace = grace_period_s.unwrap_or(DEFAULT_ROTATION_GRACE_S);
        if grace > 30 * 86_400 {
            return Err(validate::Invalid::new(
                "grace_period_s",
                "must be at most 2592000 (30 days)",
            )
            .into());
        }
        let scheme = scheme.unwrap_or_else(|| s.signature_scheme());
        s.rotate_signing_key(
            new_signing_key(scheme),
            chrono::Duration::seconds(i64::from(grace)),
            Utc::now(),
        );
        subscriptions::update(&self.store.writer, &self.store.sealer, &s).await?;
        self.subscription_changed(&s.id).await;
        Ok(s)
    }

    /// Clears a Herald-set `DISABLED` status; `active` stays as the tenant set it.
    pub async fn enable_subscription(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<Subscription, Error> {
        self.get_subscription(tenant_id, id).await?;
        subscriptions::set_status(
            &self.store.writer,
            id,
            SubscriptionStatus::Enabled,
            None,
            Utc::now(),
        )
        .await?;
        self.subscription_changed(id).await;
        self.get_subscription(tenant_id, id).await
    }

    /// Returns the event types the tenant has published, with counts (test events excluded).
    pub async fn list_event_types(&self, tenant_id: &str) -> Result<Vec<(String, u64)>, Error> {
        Ok(events::type_counts(&self.store.db, tenant_id, validate::TEST_EVENT_TYPE).await?)
    }
}
