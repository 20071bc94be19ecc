//! `EventService`.

use herald_agent::telemetry;
use herald_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, Span};

use super::{auth, convert};
use crate::domain::model::PageRequest;
use crate::service::Services;
use crate::service::publish::{NewEvent, Published, validate_event};

pub struct EventApi(pub Services);

const DEFAULT_PAGE: u32 = 50;

fn new_event(
    services: &Services,
    r: &pb::PublishEventRequest,
    traceparent: Option<&str>,
) -> Result<NewEvent, Status> {
    let mut event = validate_event(
        &services.limits,
        &r.event_type,
        &r.payload,
        &r.idempotency_key,
        &r.entity_type,
        &r.entity_id,
        &r.action,
    )?;
    event.traceparent = traceparent.map(str::to_owned);
    Ok(event)
}

/// Opens the publish span as a child of the publisher's `traceparent`; returns it with the
/// context to store with the event (the span's own when tracing export is on, else the
/// publisher's), so every later attempt joins the same trace.
fn publish_span<T>(request: &Request<T>) -> (Span, Option<String>) {
    let span = tracing::info_span!(
        "publish",
        tenant_id = tracing::field::Empty,
        event_id = tracing::field::Empty
    );
    let sent = traceparent(request);
    if let Some(parent) = sent {
        telemetry::set_parent(&span, parent);
    }
    let context = telemetry::traceparent(&span).or_else(|| sent.map(str::to_owned));
    (span, context)
}

/// Returns the W3C `traceparent` the publisher sent in metadata, if it is well formed.
fn traceparent<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 55 && v.split('-').count() == 4)
}

fn reply(p: Published) -> pb::PublishEventResponse {
    pb::PublishEventResponse {
        event_id: p.event_id,
        delivery_ids: p.delivery_ids,
    }
}

#[tonic::async_trait]
impl pb::event_service_server::EventService for EventApi {
    async fn publish_event(
        &self,
        request: Request<pb::PublishEventRequest>,
    ) -> Result<Response<pb::PublishEventResponse>, Status> {
        let (span, context) = publish_span(&request);
        async move {
            let caller = auth::caller(&self.0, &request).await?;
            let tenant = caller.tenant(&request.get_ref().tenant_id)?;
            Span::current().record("tenant_id", tenant.as_str());
            let event = new_event(&self.0, request.get_ref(), context.as_deref())?;
            let published = self.0.publish_event(&tenant, event).await?;
            Span::current().record("event_id", published.event_id.as_str());
            Ok(Response::new(reply(published)))
        }
        .instrument(span)
        .await
    }

    async fn publish_events(
        &self,
        request: Request<pb::PublishEventsRequest>,
    ) -> Result<Response<pb::PublishEventsResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        // Counted before anything of it is parsed.
        crate::service::events::check_batch_size(r.events.len())?;
        let requested_tenant = r.events.first().map(|e| e.tenant_id.as_str()).unwrap_or("");
        if let Some(other) = r.events.iter().find(|e| e.tenant_id != requested_tenant) {
            return Err(Status::invalid_argument(format!(
                "events: every event of one call must name the same tenant_id ({} differs)",
                other.tenant_id
            )));
        }
        let tenant = caller.tenant(requested_tenant)?;
        let (span, context) = publish_span(&request);
        span.record("tenant_id", tenant.as_str());
        let parent = context.as_deref();
        let events = r
            .events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                new_event(&self.0, e, parent).map_err(|status| {
                    Status::new(status.code(), format!("events[{i}].{}", status.message()))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let results = self
            .0
            .publish_events(&tenant, events)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::PublishEventsResponse {
            results: results.into_iter().map(reply).collect(),
        }))
    }

    async fn get_event(
        &self,
        request: Request<pb::GetEventRequest>,
    ) -> Result<Response<pb::Event>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let (event, matched) = self
            .0
            .get_event_and_matches(&caller.tenant(&r.tenant_id)?, &r.id)
            .await?;
        Ok(Response::new(pb::Event {
            subscription_ids: matched,
            ..convert::event(event)
        }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let page = self
            .0
            .list_events(
                &caller.tenant(&r.tenant_id)?,
                &r.event_type,
                PageRequest::new(r.page_size, &r.page_token, DEFAULT_PAGE),
            )
            .await?;
        let (events, next_page_token) = convert::page(page, convert::event);
        Ok(Response::new(pb::ListEventsResponse {
            events,
            next_page_token,
        }))
    }
}
