//! `herald console-link` (admin token): a one-time sign-in link to a tenant's web console.

use herald_client::v1 as pb;

use super::Context;
use crate::output::details;

/// Arguments of `herald console-link`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tenant whose console the link opens
    #[arg(long)]
    pub tenant: String,
    /// How long the link can be used to sign in, in seconds (at most 3600; default 600)
    #[arg(long, default_value_t = 0)]
    pub ttl: u32,
}

pub async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let link = ctx
        .client
        .admin()
        .create_console_session(pb::CreateConsoleSessionRequest {
            tenant_id: args.tenant,
            ttl_s: args.ttl,
        })
        .await?
        .into_inner();
    ctx.out.reply(
        &link,
        |l| l.url.clone(),
        |style, l| {
            details(
                style,
                &[
                    ("link", l.url.clone()),
                    ("expires", style.when(l.expires_at.as_ref())),
                ],
            ) + "\nopen it once in a browser; the session lasts as long as your admin token\n"
        },
    )
}
