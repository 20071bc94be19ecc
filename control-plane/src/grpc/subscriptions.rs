//! `SubscriptionService`.

use herald_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{auth, convert};
use crate::domain::model::PageRequest;
use crate::service::{Error, Services};

pub struct SubscriptionApi(pub Services);

const DEFAULT_PAGE: u32 = 50;

#[tonic::async_trait]
impl pb::subscription_service_server::SubscriptionService for SubscriptionApi {
    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let tenant = caller.tenant(&request.get_ref().tenant_id)?;
        let new = convert::new_subscription(request.into_inner()).map_err(Error::from)?;
        let created = self.0.create_subscription(&tenant, new).await?;
        Ok(Response::new(convert::subscription(created, true)))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let s = self
            .0
            .get_subscription(&caller.tenant(&r.tenant_id)?, &r.id)
            .await?;
        Ok(Response::new(convert::subscription(s, false)))
    }

    async fn update_subscription(
        &self,
        request: Request<pb::UpdateSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let tenant = caller.tenant(&request.get_ref().tenant_id)?;
        let r = request.into_inner();
        let id = r.id.clone();
        let s = self
            .0
            .update_subscription(
                &tenant,
                &id,
                convert::subscription_patch(r).map_err(Error::from)?,
            )
            .await?;
        Ok(Response::new(convert::subscription(s, false)))
    }

    async fn delete_subscription(
        &self,
        request: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        self.0
            .delete_subscription(&caller.tenant(&r.tenant_id)?, &r.id)
            .await?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let page = self
            .0
            .list_subscriptions(
                &caller.tenant(&r.tenant_id)?,
                PageRequest::new(r.page_size, &r.page_token, DEFAULT_PAGE),
            )
            .await?;
        let (subscriptions, next_page_token) =
            convert::page(page, |s| convert::subscription(s, false));
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions,
            next_page_token,
        }))
    }

    async fn rotate_secret(
        &self,
        request: Request<pb::RotateSecretRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let s = self
            .0
            .rotate_secret(
                &caller.tenant(&r.tenant_id)?,
                &r.id,
                r.grace_period_s,
                r.signature_scheme
                    .map(convert::signature_scheme)
                    .transpose()
                    .map_err(Error::from)?
                    .flatten(),
            )
            .await?;
        Ok(Response::new(convert::subscription(s, true)))
    }

    async fn get_subscription_secret(
        &self,
        request: Request<pb::GetSubscriptionSecretRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let s = self
            .0
            .get_subscription(&caller.tenant(&r.tenant_id)?, &r.id)
            .await?;
        Ok(Response::new(convert::subscription(s, true)))
    }

    async fn enable_subscription(
        &self,
        request: Request<pb::EnableSubscriptionRequest>,
    ) -> Result<Response<pb::Subscription>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let r = request.get_ref();
        let s = self
            .0
            .enable_subscription(&caller.tenant(&r.tenant_id)?, &r.id)
            .await?;
        Ok(Response::new(convert::subscription(s, false)))
    }

    async fn list_event_types(
        &self,
        request: Request<pb::ListEventTypesRequest>,
    ) -> Result<Response<pb::ListEventTypesResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        let tenant = caller.tenant(&request.get_ref().tenant_id)?;
        let event_types = self
            .0
            .list_event_types(&tenant)
            .await?
            .into_iter()
            .map(|(event_type, count)| pb::EventTypeCount { event_type, count })
            .collect();
        Ok(Response::new(pb::ListEventTypesResponse {
            event_types,
            next_page_token: String::new(),
        }))
    }
}
