//! `herald test <subscription>`: the "send test webhook" action.

use std::time::Duration;

use herald_client::v1 as pb;

use super::{Context, read_payload};
use crate::output::{Color, Mode, outcome_cell, print};

/// Flags of `herald test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The subscription to send the test webhook to (sub_…)
    pub subscription: String,
    /// Payload instead of the default {"type":"test",…}: JSON, @FILE or - for stdin
    #[arg(long, value_name = "JSON|@FILE|-", allow_hyphen_values = true)]
    pub data: Option<String>,
    /// Follow the delivery, printing each attempt, until it succeeds (exit 0), is dead or
    /// --timeout passes (exit 1)
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 30s
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    let payload = args
        .data
        .as_deref()
        .map(|data| read_payload("--data", data))
        .transpose()?;
    let request = pb::SendTestEventRequest {
        tenant_id: ctx.tenant.clone(),
        subscription_id: args.subscription.clone(),
        payload,
    };
    let sent = ctx
        .client
        .deliveries()
        .send_test_event(request)
        .await?
        .into_inner();
    ctx.out.reply(
        &sent,
        |s| s.delivery_id.clone(),
        |style, s| {
            format!(
                "test webhook sent to {}: event {}, delivery {}\n{}",
                args.subscription,
                s.event_id,
                style.paint(Some(Color::Bold), &s.delivery_id),
                if args.wait {
                    String::new()
                } else {
                    style.paint(
                        Some(Color::Dim),
                        &format!("follow: herald deliveries get {}\n", s.delivery_id),
                    )
                }
            )
        },
    )?;
    if args.wait {
        wait_for_outcome(ctx, &sent.delivery_id, args.timeout).await?;
    }
    Ok(())
}

/// Polls the delivery, printing each attempt as it is recorded, until it succeeds (ok), is
/// DEAD (an error) or `timeout` passes (an error naming the last result).
async fn wait_for_outcome(
    ctx: &Context,
    delivery_id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use pb::DeliveryState as S;
    let deadline = tokio::time::Instant::now() + timeout;
    let request = pb::GetDeliveryRequest {
        tenant_id: ctx.tenant.clone(),
        id: delivery_id.to_owned(),
    };
    let mut shown = 0;
    loop {
        let delivery = ctx
            .client
            .idempotent(|c| {
                let request = request.clone();
                async move { c.deliveries().get_delivery(request).await }
            })
            .await?;
        for (n, attempt) in delivery.attempts.iter().enumerate().skip(shown) {
            if ctx.out.mode == Mode::Human {
                let (outcome, color) =
                    outcome_cell(attempt.status_code, attempt.error, &attempt.error_message);
                print(&format!(
                    "attempt {}: {} in {} ms",
                    n + 1,
                    ctx.out.style.paint(color, &outcome),
                    attempt.duration_ms,
                ))?;
            }
        }
        shown = delivery.attempts.len();
        let last = || {
            delivery.attempts.last().map_or_else(
                || "no attempt yet: is an agent connected? (herald agents list)".to_owned(),
                |a| {
                    format!(
                        "last attempt: {}",
                        outcome_cell(a.status_code, a.error, &a.error_message).0
                    )
                },
            )
        };
        match S::try_from(delivery.state) {
            Ok(S::Succeeded) => {
                if ctx.out.mode == Mode::Human {
                    print(&format!(
                        "delivered: {}",
                        ctx.out.style.state(delivery.state)
                    ))?;
                }
                return Ok(());
            }
            Ok(S::Dead) => {
                return Err(anyhow::anyhow!(
                    "test webhook to {} is dead: {}",
                    delivery.subscription_id,
                    last()
                ));
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(anyhow::anyhow!(
                    "test webhook {delivery_id} not delivered within {}: {}",
                    humantime::format_duration(timeout),
                    last()
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
