//! `herald tokens create|list|revoke` (admin token).

use clap::Subcommand;
use herald_client::v1 as pb;

use super::{Context, Page};
use crate::error::usage;
use crate::output::{Color, Table, details, ids, more};

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a token for the tenant of --tenant, or an admin token with --admin; prints the
    /// plaintext once (`--quiet`: only the token)
    Create {
        /// A name saying who uses the token, e.g. `backend`
        #[arg(long)]
        name: String,
        /// Create an admin token (manages tenants, tokens and every tenant's data) instead of
        /// one for --tenant
        #[arg(long)]
        admin: bool,
    },
    /// List tokens (of --tenant when given); plaintexts are never shown again
    List(Page),
    /// Revoke a token at once
    Revoke {
        /// The token's id (tok_…), as `herald tokens list` shows it
        id: String,
    },
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create { name, admin } => {
            let tenant_id = match (admin, ctx.tenant.is_empty()) {
                (true, true) => String::new(),
                (false, false) => ctx.tenant.clone(),
                (true, false) => {
                    return Err(usage(
                        "tokens create: give either --tenant TENANT_ID or --admin, not both",
                    ));
                }
                (false, true) => {
                    return Err(usage(
                        "tokens create: give --tenant TENANT_ID (a tenant's token) or --admin \
                         (an admin token)",
                    ));
                }
            };
            let created = ctx
                .client
                .admin()
                .create_token(pb::CreateTokenRequest {
                    tenant_id: tenant_id.clone(),
                    name,
                })
                .await?
                .into_inner();
            ctx.out.reply(
                &created,
                |c| c.token.clone(),
                |style, c| {
                    let scope = if tenant_id.is_empty() {
                        "admin".to_owned()
                    } else {
                        format!("tenant {tenant_id}")
                    };
                    details(
                        style,
                        &[
                            ("id", c.token_id.clone()),
                            ("scope", scope),
                            ("token", style.paint(Some(Color::Bold), &c.token)),
                        ],
                    ) + "\nthe token is shown only now: keep it (export HERALD_TOKEN=…)\n"
                },
            )
        }
        Command::List(page) => {
            let request = pb::ListTokensRequest {
                tenant_id: ctx.tenant.clone(),
                page_size: page.size(),
                page_token: page.token(),
            };
            let list = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.admin().list_tokens(request).await }
                })
                .await?;
            ctx.out.reply(
                &list,
                |l| ids(l.tokens.iter().map(|t| &t.id)),
                |style, l| {
                    if l.tokens.is_empty() {
                        return "no tokens".into();
                    }
                    let mut table = Table::new(&["ID", "NAME", "SCOPE", "CREATED", "LAST USED"]);
                    for t in &l.tokens {
                        let scope = if t.admin {
                            "admin".to_owned()
                        } else {
                            t.tenant_id.clone()
                        };
                        table.row([
                            t.id.clone(),
                            t.name.clone(),
                            scope,
                            style.ago(t.created_at.as_ref()),
                            style.ago(t.last_used_at.as_ref()),
                        ]);
                    }
                    table.render(style) + &more(style, &l.next_page_token)
                },
            )
        }
        Command::Revoke { id } => {
            let request = pb::RevokeTokenRequest {
                token_id: id.clone(),
            };
            let reply = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.admin().revoke_token(request).await }
                })
                .await?;
            ctx.out
                .reply(&reply, |_| String::new(), |_, _| format!("revoked {id}"))
        }
    }
}
