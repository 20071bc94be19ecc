//! `herald tenants create|list` (admin token).

use clap::Subcommand;
use herald_client::v1 as pb;

use super::{Context, Page};
use crate::output::{Table, details, ids, more};

/// Tenant commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a tenant; prints its id (`--quiet`: only the id)
    Create {
        /// The tenant's name, e.g. your customer's
        #[arg(long)]
        name: String,
    },
    /// List tenants, oldest first
    List(Page),
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create { name } => {
            let tenant = ctx
                .client
                .admin()
                .create_tenant(pb::CreateTenantRequest { name })
                .await?
                .into_inner();
            ctx.out.reply(
                &tenant,
                |t| t.id.clone(),
                |style, t| {
                    details(
                        style,
                        &[
                            ("id", t.id.clone()),
                            ("name", t.name.clone()),
                            ("created", style.when(t.created_at.as_ref())),
                        ],
                    ) + &format!(
                        "\nnext: herald tokens create --tenant {} --name backend\n",
                        t.id
                    )
                },
            )
        }
        Command::List(page) => {
            let request = pb::ListTenantsRequest {
                page_size: page.size(),
                page_token: page.token(),
            };
            let list = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.admin().list_tenants(request).await }
                })
                .await?;
            ctx.out.reply(
                &list,
                |l| ids(l.tenants.iter().map(|t| &t.id)),
                |style, l| {
                    if l.tenants.is_empty() {
                        return "no tenants yet: herald tenants create --name NAME".into();
                    }
                    let mut table = Table::new(&["ID", "NAME", "CREATED"]);
                    for t in &l.tenants {
                        table.row([
                            t.id.clone(),
                            t.name.clone(),
                            style.ago(t.created_at.as_ref()),
                        ]);
                    }
                    table.render(style) + &more(style, &l.next_page_token)
                },
            )
        }
    }
}
