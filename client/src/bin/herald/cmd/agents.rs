//! `herald agents list` (admin token).

use clap::Subcommand;
use herald_client::v1 as pb;

use super::{Context, Page};
use crate::output::{Table, ids, more};

/// Agent commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List connected agents: region, jobs in flight of their capacity, version, last heartbeat
    List(Page),
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let Command::List(page) = command;
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
