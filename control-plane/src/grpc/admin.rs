//! `AdminService`: tenants, tokens, agents.

use herald_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{auth, convert};
use crate::domain::model::PageRequest;
use crate::service::Services;

pub struct AdminApi(pub Services);

const DEFAULT_PAGE: u32 = 50;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let tenant = self.0.create_tenant(&request.get_ref().name).await?;
        Ok(Response::new(convert::tenant(tenant)))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let r = request.into_inner();
        let page = self
            .0
            .list_tenants(PageRequest::new(r.page_size, &r.page_token, DEFAULT_PAGE))
            .await?;
        let (tenants, next_page_token) = convert::page(page, convert::tenant);
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let r = request.into_inner();
        let (token, plaintext) = self.0.create_token(&r.tenant_id, &r.name).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token_id: token.id,
            token: plaintext,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let r = request.into_inner();
        let page = self
            .0
            .list_tokens(
                &r.tenant_id,
                PageRequest::new(r.page_size, &r.page_token, DEFAULT_PAGE),
            )
            .await?;
        let (tokens, next_page_token) = convert::page(page, convert::token);
        Ok(Response::new(pb::ListTokensResponse {
            tokens,
            next_page_token,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        self.0.revoke_token(&request.get_ref().token_id).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let agents = self
            .0
            .list_agents()
            .await?
            .into_iter()
            .map(convert::agent)
            .collect();
        Ok(Response::new(pb::ListAgentsResponse {
            agents,
            next_page_token: String::new(),
        }))
    }

    async fn create_console_session(
        &self,
        request: Request<pb::CreateConsoleSessionRequest>,
    ) -> Result<Response<pb::CreateConsoleSessionResponse>, Status> {
        let caller = auth::caller(&self.0, &request).await?;
        caller.require_admin()?;
        let r = request.into_inner();
        if r.tenant_id.is_empty() {
            return Err(Status::invalid_argument(
                "tenant_id: name the tenant the console session is for",
            ));
        }
        self.0.ensure_tenant(&r.tenant_id).await?;
        // The session the link opens lasts only as long as the admin token that issued it.
        let (url, expires_at) = self
            .0
            .console
            .create_link(&r.tenant_id, r.ttl_s, &caller.token_id)
            .await?;
        Ok(Response::new(pb::CreateConsoleSessionResponse {
            url,
            expires_at: Some(herald_proto::timestamp(expires_at)),
        }))
    }

    async fn create_agent_credential(
        &self,
        request: Request<pb::CreateAgentCredentialRequest>,
    ) -> Result<Response<pb::CreateAgentCredentialResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let r = request.get_ref();
        let (credential, token) = self.0.create_agent_credential(&r.name, &r.region).await?;
        Ok(Response::new(pb::CreateAgentCredentialResponse {
            credential_id: credential.id,
            token,
        }))
    }

    async fn list_agent_credentials(
        &self,
        request: Request<pb::ListAgentCredentialsRequest>,
    ) -> Result<Response<pb::ListAgentCredentialsResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        let r = request.get_ref();
        let page = self
            .0
            .list_agent_credentials(PageRequest::new(r.page_size, &r.page_token, DEFAULT_PAGE))
            .await?;
        let (credentials, next_page_token) = convert::page(page, |c| pb::AgentCredential {
            id: c.id,
            name: c.name,
            region: c.region.unwrap_or_default(),
            created_at: Some(herald_proto::timestamp(c.created_at)),
            last_used_at: c.last_used_at.map(herald_proto::timestamp),
        });
        Ok(Response::new(pb::ListAgentCredentialsResponse {
            credentials,
            next_page_token,
        }))
    }

    async fn revoke_agent_credential(
        &self,
        request: Request<pb::RevokeAgentCredentialRequest>,
    ) -> Result<Response<pb::RevokeAgentCredentialResponse>, Status> {
        auth::caller(&self.0, &request).await?.require_admin()?;
        self.0
            .revoke_agent_credential(&request.get_ref().credential_id)
            .await?;
        Ok(Response::new(pb::RevokeAgentCredentialResponse {}))
    }
}
