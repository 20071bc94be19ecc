//! `herald agents list` and `herald agents credentials create|list|revoke` (admin token).

use clap::Subcommand;
use herald_client::v1 as pb;

use super::{Context, Page};
use crate::output::{Table, ids, more};

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List connected agents: region, jobs in flight of their capacity, version, last heartbeat
    List(Page),
    /// Manage per-agent credentials (tokens for herald-agent's HERALD_AGENT_TOKEN)
    #[command(subcommand)]
    Credentials(Credentials),
}

/// Per-agent credential commands.
#[derive(Debug, Subcommand)]
pub enum Credentials {
    /// Create a credential; its token is printed once (`--quiet` prints only the token)
    Create {
        /// A name for people, such as the agent's host
        #[arg(long)]
        name: String,
        /// Pin the credential to this region: a hello announcing another is refused
        #[arg(long, default_value = "")]
        region: String,
    },
    /// List credentials (never their tokens)
    List(Page),
    /// Revoke a credential: its agents are disconnected at once and their jobs re-queued
    Revoke {
        /// The credential id (`agc_…`)
        credential_id: String,
    },
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let page = match command {
        Command::List(page) => page,
        Command::Credentials(command) => return credentials(ctx, command).await,
    };
    let request = pb::ListAgentsRequest {
        page_size: page.size(),
        page_token: page.token(),
    };
    let list = ctx
        .client
        .idempotent(|c| {
            let request = request.clone();
            async move { c.admin().list_agents(request).await }
        })
        .await?;
    ctx.out.reply(
        &list,
        |l| ids(l.agents.iter().map(|a| &a.agent_id)),
        |style, l| {
            if l.agents.is_empty() {
                return "no agent connected: deliveries wait until one connects".into();
            }
            let mut table = Table::new(&[
                "AGENT",
                "REGION",
                "IN FLIGHT",
                "VERSION",
                "CONNECTED",
                "LAST SEEN",
            ]);
            for a in &l.agents {
                table.row([
                    a.agent_id.clone(),
                    a.region.clone(),
                    format!("{}/{}", a.in_flight, a.capacity),
                    a.version.clone(),
                    style.ago(a.connected_at.as_ref()),
                    style.ago(a.last_seen_at.as_ref()),
                ]);
            }
            table.render(style) + &more(style, &l.next_page_token)
        },
    )
}

async fn credentials(ctx: &Context, command: Credentials) -> anyhow::Result<()> {
    match command {
        Credentials::Create { name, region } => {
            let request = pb::CreateAgentCredentialRequest { name, region };
            let created = ctx
                .client
                .admin()
                .create_agent_credential(request)
                .await?
                .into_inner();
            ctx.out.reply(
                &created,
                |c| c.token.clone(),
                |_, c| {
                    format!(
                        "agent credential {} created; its token (shown once):\n{}\nset it as HERALD_AGENT_TOKEN of the agent",
                        c.credential_id, c.token
                    )
                },
            )
        }
        Credentials::List(page) => {
            let request = pb::ListAgentCredentialsRequest {
                page_size: page.size(),
                page_token: page.token(),
            };
            let list = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.admin().list_agent_credentials(request).await }
                })
                .await?;
            ctx.out.reply(
                &list,
                |l| ids(l.credentials.iter().map(|c| &c.id)),
                |style, l| {
                    if l.credentials.is_empty() {
                        return "no agent credential: agents use the shared HERALD_AGENT_TOKEN"
                            .into();
                    }
                    let mut table = Table::new(&["ID", "NAME", "REGION", "CREATED", "LAST USED"]);
                    for c in &l.credentials {
                        table.row([
                            c.id.clone(),
                            c.name.clone(),
                            if c.region.is_empty() {
                                "any".into()
                            } else {
                                c.region.clone()
                            },
                            style.ago(c.created_at.as_ref()),
                            style.ago(c.last_used_at.as_ref()),
                        ]);
                    }
                    table.render(style) + &more(style, &l.next_page_token)
                },
            )
        }
        Credentials::Revoke { credential_id } => {
            let request = pb::RevokeAgentCredentialRequest {
                credential_id: credential_id.clone(),
            };
            let revoked = ctx
                .client
                .admin()
                .revoke_agent_credential(request)
                .await?
                .into_inner();
            ctx.out.reply(
                &revoked,
                |_| String::new(),
                |_, _| {
                    format!("agent credential {credential_id} revoked; its agents are disconnected")
                },
            )
        }
    }
}
