//! Reading events, and the publish calls on top of the group-commit [`super::publish::Publisher`].

use super::publish::{NewEvent, Published, Target};
use super::{Error, Services};
use crate::domain::ids;
use crate::domain::model::{Event, Page, PageRequest};
use crate::storage::events;

/// The most events one `PublishEvents` call takes.
pub const MAX_EVENTS_PER_CALL: usize = 500;

/// Checks the number of events of a `PublishEvents` call; the edge calls it before it parses
/// any event (a refusal costs nothing).
pub fn check_batch_size(count: usize) -> Result<(), Error> {
    if count == 0 {
        return Err(crate::domain::validate::Invalid::new("events", "must not be empty").into());
    }
    if count > MAX_EVENTS_PER_CALL {
        return Err(crate::domain::validate::Invalid::new(
            "events",
            format!("at most {MAX_EVENTS_PER_CALL} events per call; split the batch"),
        )
        .into());
    }
    Ok(())
}

impl Services {
    pub async fn publish_event(
        &self,
        tenant_id: &str,
        event: NewEvent,
    ) -> Result<Published, Error> {
        self.ensure_tenant(tenant_id).await?;
        let mut replies = self
            .publisher
            .publish(tenant_id.to_owned(), vec![event], Target::FanOut)
            .await?;
        replies
            .pop()
            .ok_or_else(|| Error::Unavailable("publish: no reply from the writer".into()))
    }

    /// Publishes up to 500 events, all or nothing.
    pub async fn publish_events(
        &self,
        tenant_id: &str,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Published>, Error> {
        check_batch_size(events.len())?;
        self.ensure_tenant(tenant_id).await?;
        self.publisher
            .publish(tenant_id.to_owned(), events, Target::FanOut)
            .await
    }

    pub async fn get_event(&self, tenant_id: &str, id: &str) -> Result<Event, Error> {
        if !ids::has_prefix(id, ids::EVENT) {
            return Err(Error::not_found("event", id));
        }
        events::get(&self.store.db, tenant_id, id)
            .await?
            .ok_or_else(|| Error::not_found("event", id))
    }

    /// Returns an event and the subscriptions it matched when it was published (`GetEvent`).
    pub async fn get_event_and_matches(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<(Event, Vec<String>), Error> {
        let event = self.get_event(tenant_id, id).await?;
        let matched =
            crate::storage::deliveries::subscriptions_for_event(&self.store.db, &event.id).await?;
        Ok((event, matched))
    }

    /// The filter editor's preview: the tenant's last `limit` events (newest first), each with
    /// whether a subscription with these event-type filters and payload filter would have
    /// received it. The filters are validated as a create would validate them.
    pub async fn preview_filters(
        &self,
        tenant_id: &str,
        event_types: &[String],
        payload_filter: &str,
        limit: u32,
    ) -> Result<Vec<(Event, bool)>, Error> {
        let event_types = crate::domain::validate::filters(event_types)?;
        let payload_filter = crate::domain::validate::payload_filter(payload_filter)?;
        let page = events::list(
            &self.store.db,
            tenant_id,
            None,
            &PageRequest::new(limit, "", limit),
        )
        .await?;
        Ok(page
            .items
            .into_iter()
            .map(|event| {
                let matched = crate::domain::filter::matches_any(&event_types, &event.event_type)
                    && payload_filter
                        .as_ref()
                        .is_none_or(|filter| filter.matches(&event.document()));
                (event, matched)
            })
            .collect())
    }

    pub async fn list_events(
        &self,
        tenant_id: &str,
        event_type: &str,
        page: PageRequest,
    ) -> Result<Page<Event>, Error> {
        let event_type = (!event_type.is_empty()).then_some(event_type);
        Ok(events::list(&self.store.db, tenant_id, event_type, &page).await?)
    }
}
