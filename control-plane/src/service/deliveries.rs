//! The delivery log and its actions: list, get with attempts, retry, replay, test events.

use super::{Error, Services};
use crate::domain::ids;
use crate::domain::model::{Attempt, Delivery, DeliveryState, Page, PageRequest};
use crate::domain::validate::{Invalid, TEST_ACTION, TEST_EVENT_TYPE};
use crate::service::publish::{NewEvent, Published, Target};
use crate::storage::deliveries::{self, ListBy};

/// The default page size of the delivery log: "the last 10 requests".
pub const DEFAULT_PAGE_SIZE: u32 = 10;

impl Services {
    pub async fn list_deliveries(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        event_id: &str,
        state: Option<DeliveryState>,
        page: PageRequest,
    ) -> Result<Page<Delivery>, Error> {
        let by = match (subscription_id.is_empty(), event_id.is_empty()) {
            (false, true) => {
                self.get_subscription(tenant_id, subscription_id).await?;
                ListBy::Subscription(subscription_id.to_owned())
            }
            (true, false) => {
                self.get_event(tenant_id, event_id).await?;
                ListBy::Event(event_id.to_owned())
            }
            (true, true) => ListBy::Tenant,
            (false, false) => {
                return Err(Invalid::new(
                    "subscription_id",
                    "give at most one of subscription_id and event_id",
                )
                .into());
            }
        };
        Ok(deliveries::list(&self.store.db, tenant_id, &by, state, &page).await?)
    }

    pub async fn get_delivery(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<(Delivery, Vec<Attempt>), Error> {
        if !ids::has_prefix(id, ids::DELIVERY) {
            return Err(Error::not_found("delivery", id));
        }
        let delivery = deliveries::get(&self.store.db, tenant_id, id)
            .await?
            .ok_or_else(|| Error::not_found("delivery", id))?;
        let attempts = deliveries::attempts(&self.store.db, id).await?;
        Ok((delivery, attempts))
    }
}

impl Services {
    /// Schedules one more attempt now (any state but in flight): same delivery, same `webhook-id`.
    pub async fn retry_delivery(&self, tenant_id: &str, id: &str) -> Result<Delivery, Error> {
        if !ids::has_prefix(id, ids::DELIVERY) {
            return Err(Error::not_found("delivery", id));
        }
        match deliveries::retry_now(&self.store.writer, tenant_id, id, chrono::Utc::now()).await? {
            None => return Err(Error::not_found("delivery", id)),
            Some(false) => {
                return Err(Error::FailedPrecondition(format!(
                    "delivery {id} is in flight; retry it once its attempt finishes"
                )));
            }
            Some(true) => {}
        }
        self.dispatcher.wake().await;
        Ok(self.get_delivery(tenant_id, id).await?.0)
    }

    /// Puts every `DEAD` delivery of a subscription since `since` back to `PENDING`.
    pub async fn replay_deliveries(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<u32, Error> {
        self.get_subscription(tenant_id, subscription_id).await?;
        let count = deliveries::replay(
            &self.store.writer,
            subscription_id,
            since,
            chrono::Utc::now(),
        )
        .await?;
        self.dispatcher.wake().await;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// Sends a `test` event to one subscription, whatever its filters and `active`.
    pub async fn send_test_event(
        &self,
        tenant_id: &str,
        subscription_id: &str,
        payload: Option<&str>,
    ) -> Result<Published, Error> {
        let subscription = self.get_subscription(tenant_id, subscription_id).await?;
        let payload = match payload {
            Some(payload) => {
                crate::domain::validate::payload(payload, &self.limits)?;
                payload.to_owned()
            }
            None => serde_json::json!({
                "type": TEST_EVENT_TYPE,
                "subscription_id": subscription.id,
                "tenant_id": tenant_id,
                "sent_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            })
            .to_string(),
        };
        let event = NewEvent {
            event_type: TEST_EVENT_TYPE.into(),
            payload,
            idempotency_key: None,
            entity_type: None,
            entity_id: None,
            action: Some(TEST_ACTION.into()),
            traceparent: None,
        };
        let mut replies = self
            .publisher
            .publish(
                tenant_id.to_owned(),
                vec![event],
                Target::Only(Box::new(subscription)),
            )
            .await?;
        replies
            .pop()
            .ok_or_else(|| Error::Unavailable("publish: no reply from the writer".into()))
    }
}
