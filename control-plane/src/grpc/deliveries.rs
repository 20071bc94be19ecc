//! `DeliveryService`: the delivery log and its actions.

use std::pin::Pin;

use futures::Stream;
use herald_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{auth, convert};
use crate::domain::model::PageRequest;
use crate::service::Services;
use crate::service::deliveries::DEFAULT_PAGE_SIZE;

pub struct DeliveryApi(pub Services);

type AttemptStream = Pin<Box<dyn Stream<Item = Result<pb::AttemptRecorded, Status>> + Send>>;

#[tonic::async_trait]
impl pb::delivery_service_server::DeliveryService for DeliveryApi {
    async fn list_deliveries(
        &self,
        request: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let page = self
            .0
            .list_deliveries(
                &caller.tenant(&r.tenant_id)?,
                &r.subscription_id,
                &r.event_id,
                convert::state_filter(r.state),
                PageRequest::new(r.page_size, &r.page_token, DEFAULT_PAGE_SIZE),
            )
            .await?;
        let (deliveries, next_page_token) =
            convert::page(page, |d| convert::delivery(d, Vec::new()));
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries,
            next_page_token,
        }))
    }

    async fn get_delivery(
        &self,
        request: Request<pb::GetDeliveryRequest>,
    ) -> Result<Response<pb::Delivery>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let (delivery, attempts) = self
            .0
            .get_delivery(&caller.tenant(&r.tenant_id)?, &r.id)
            .await?;
        Ok(Response::new(convert::delivery(delivery, attempts)))
    }

    async fn retry_delivery(
        &self,
        request: Request<pb::RetryDeliveryRequest>,
    ) -> Result<Response<pb::Delivery>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let tenant = caller.tenant(&r.tenant_id)?;
        let delivery = self.0.retry_delivery(&tenant, &r.id).await?;
        Ok(Response::new(convert::delivery(delivery, Vec::new())))
    }

    async fn replay_deliveries(
        &self,
        request: Request<pb::ReplayDeliveriesRequest>,
    ) -> Result<Response<pb::ReplayDeliveriesResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let tenant = caller.tenant(&r.tenant_id)?;
        let since = r
            .since
            .as_ref()
            .map(|ts| {
                herald_proto::from_timestamp(ts)
                    .ok_or_else(|| Status::invalid_argument("since: not a valid time"))
            })
            .transpose()?
            .unwrap_or_default();
        let count = self
            .0
            .replay_deliveries(&tenant, &r.subscription_id, since)
            .await?;
        Ok(Response::new(pb::ReplayDeliveriesResponse { count }))
    }

    async fn send_test_event(
        &self,
        request: Request<pb::SendTestEventRequest>,
    ) -> Result<Response<pb::SendTestEventResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let tenant = caller.tenant(&r.tenant_id)?;
        let published = self
            .0
            .send_test_event(&tenant, &r.subscription_id, r.payload.as_deref())
            .await?;
        Ok(Response::new(pb::SendTestEventResponse {
            delivery_id: published
                .delivery_ids
                .into_iter()
                .next()
                .unwrap_or_default(),
            event_id: published.event_id,
        }))
    }

    type WatchDeliveriesStream = AttemptStream;

    async fn watch_deliveries(
        &self,
        request: Request<pb::WatchDeliveriesRequest>,
    ) -> Result<Response<Self::WatchDeliveriesStream>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let tenant = caller.tenant(&r.tenant_id)?;
        if !r.subscription_id.is_empty() {
            self.0.get_subscription(&tenant, &r.subscription_id).await?;
        }
        let subscription = (!r.subscription_id.is_empty()).then(|| r.subscription_id.clone());
        let mut records = self.0.watch();
        let stopping = self.0.stopping.clone();
        let stream = async_stream::stream! {
            loop {
                let received = tokio::select! {
                    // Shutdown ends the stream, so the server does not wait on watchers.
                    _ = stopping.cancelled() => break,
                    received = records.recv() => received,
                };
                match received {
                    Ok(record) => {
                        if record.tenant_id != tenant
                            || subscription.as_ref().is_some_and(|s| *s != record.subscription_id)
                        {
                            continue;
                        }
                        yield Ok(pb::AttemptRecorded {
                            delivery_id: record.delivery_id,
                            subscription_id: record.subscription_id,
                            event_id: record.event_id,
                            attempt: Some(convert::attempt(record.attempt)),
                            state: convert::delivery_state(record.state) as i32,
                        });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "a delivery watcher fell behind");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
