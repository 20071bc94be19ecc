//! `herald deliveries list|get|retry|replay|watch`: the delivery log and its actions.

use clap::Subcommand;
use herald_client::v1 as pb;

use super::{Context, parse_since};
use crate::error::usage;
use crate::output::{
    Color, Mode, Style, Table, details, ids, more, outcome_cell, print, state_cell, to_json,
};

/// Delivery commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List deliveries, newest first: the state of each and its last attempt at a glance
    List {
        /// Deliveries of this subscription (default: of every subscription of the tenant)
        #[arg(long, value_name = "ID", conflicts_with = "event")]
        subscription: Option<String>,
        /// Deliveries of this event
        #[arg(long, value_name = "ID")]
        event: Option<String>,
        /// Only deliveries in this state: pending, in-flight, succeeded, failed or dead
        #[arg(long, value_parser = parse_state)]
        state: Option<pb::DeliveryState>,
        /// At most this many (default 10)
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Continue a previous listing from the token it printed
        #[arg(long, value_name = "TOKEN")]
        page_token: Option<String>,
    },
    /// Show one delivery and every attempt: status code, duration, agent, response excerpt
    Get {
        /// The delivery's id (dlv_…)
        id: String,
    },
    /// Attempt a delivery once more now, whatever its state (but in flight); also resends a
    /// succeeded one with the same webhook-id
    Retry {
        /// The delivery's id (dlv_…)
        id: String,
    },
    /// Put every DEAD delivery of a subscription back to PENDING (after `subscriptions enable`)
    Replay {
        /// The subscription whose dead deliveries to replay
        #[arg(long, value_name = "ID")]
        subscription: String,
        /// Only deliveries created since then: RFC 3339 or a duration ago such as 2h (default:
        /// all)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// Stream attempts live as agents report them (Ctrl-C to stop), reconnecting when the
    /// control plane restarts; `--json`: one object per line
    Watch {
        /// Only attempts of this subscription (default: every subscription of the tenant)
        #[arg(long, value_name = "ID")]
        subscription: Option<String>,
    },
}

/// Parses a delivery state: `dead`, `in-flight`, `IN_FLIGHT`, `DELIVERY_STATE_DEAD`, …
pub fn parse_state(value: &str) -> Result<pb::DeliveryState, String> {
    let upper = value.trim().to_ascii_uppercase().replace('-', "_");
    let name = if upper.starts_with("DELIVERY_STATE_") {
        upper
    } else {
        format!("DELIVERY_STATE_{upper}")
    };
    pb::DeliveryState::from_str_name(&name)
        .filter(|state| *state != pb::DeliveryState::Unspecified)
        .ok_or_else(|| "expected pending, in-flight, succeeded, failed or dead".to_owned())
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let tenant_id = ctx.tenant.clone();
    match command {
        Command::List {
            subscription,
            event,
            state,
            limit,
            page_token,
        } => {
            let request = pb::ListDeliveriesRequest {
                tenant_id,
                subscription_id: subscription.unwrap_or_default(),
                event_id: event.unwrap_or_default(),
                state: state.map_or(0, |s| s as i32),
                page_size: limit.unwrap_or(0),
                page_token: page_token.clone().unwrap_or_default(),
            };
            let list = if request.subscription_id.is_empty() && request.event_id.is_empty() {
                if page_token.is_some() {
                    return Err(usage(
                        "--page-token: give --subscription or --event with it",
                    ));
                }
                every_subscription(ctx, request).await?
            } else {
                ctx.client
                    .idempotent(|c| {
                        let request = request.clone();
                        async move { c.deliveries().list_deliveries(request).await }
                    })
                    .await?
            };
            ctx.out.reply(
                &list,
                |l| ids(l.deliveries.iter().map(|d| &d.id)),
                |style, l| {
                    if l.deliveries.is_empty() {
                        return "no deliveries".into();
                    }
                    table(style, &l.deliveries) + &more(style, &l.next_page_token)
                },
            )
        }
        Command::Get { id } => {
            let request = pb::GetDeliveryRequest { tenant_id, id };
            let delivery = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.deliveries().get_delivery(request).await }
                })
                .await?;
            ctx.out.reply(&delivery, |d| d.id.clone(), view)
        }
        Command::Retry { id } => {
            let request = pb::RetryDeliveryRequest { tenant_id, id };
            let delivery = ctx
                .client
                .deliveries()
                .retry_delivery(request)
                .await?
                .into_inner();
            ctx.out.reply(
                &delivery,
                |d| d.id.clone(),
                |style, d| {
                    format!(
                        "attempt {} of {} scheduled now ({})\n",
                        d.attempt_count + 1,
                        d.id,
                        style.state(d.state)
                    )
                },
            )
        }
        Command::Replay {
            subscription,
            since,
        } => {
            let since = since
                .map(|since| parse_since("--since", &since, chrono::Utc::now()))
                .transpose()?
                .map(herald_proto::timestamp);
            let request = pb::ReplayDeliveriesRequest {
                tenant_id,
                subscription_id: subscription.clone(),
                since,
            };
            let reply = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.deliveries().replay_deliveries(request).await }
                })
                .await?;
            ctx.out.reply(
                &reply,
                |r| r.count.to_string(),
                |_, r| match r.count {
                    0 => format!("no dead deliveries of {subscription} to replay"),
                    1 => "1 dead delivery is pending again".to_owned(),
                    n => format!("{n} dead deliveries are pending again"),
                },
            )
        }
        Command::Watch { subscription } => watch(ctx, tenant_id, subscription).await,
    }
}

/// Lists the newest deliveries over every subscription of the tenant: the API lists one
/// subscription's (or one event's) at a time.
async fn every_subscription(
    ctx: &Context,
    template: pb::ListDeliveriesRequest,
) -> anyhow::Result<pb::ListDeliveriesResponse> {
    let limit = match template.page_size {
        0 => 10,
        n => n as usize,
    };
    let mut subscriptions = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListSubscriptionsRequest {
            tenant_id: template.tenant_id.clone(),
            page_size: 1000,
            page_token: page_token.clone(),
        };
        let page = ctx
            .client
            .idempotent(|c| {
                let request = request.clone();
                async move { c.subscriptions().list_subscriptions(request).await }
            })
            .await?;
        subscriptions.extend(page.subscriptions.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let mut deliveries = Vec::new();
    for subscription_id in subscriptions {
        let request = pb::ListDeliveriesRequest {
            subscription_id,
            page_size: limit as u32,
            ..template.clone()
        };
        let page = ctx
            .client
            .idempotent(|c| {
                let request = request.clone();
                async move { c.deliveries().list_deliveries(request).await }
            })
            .await?;
        deliveries.extend(page.deliveries);
    }
    // Ids are time-ordered, so the newest sort last.
    deliveries.sort_by(|a, b| b.id.cmp(&a.id));
    deliveries.truncate(limit);
    Ok(pb::ListDeliveriesResponse {
        deliveries,
        next_page_token: String::new(),
    })
}

/// Returns the delivery table: state, attempts and the last outcome at a glance.
fn table(style: &Style, deliveries: &[pb::Delivery]) -> String {
    let mut table = Table::new(&[
        "ID",
        "EVENT TYPE",
        "STATE",
        "ATTEMPTS",
        "LAST",
        "NEXT ATTEMPT",
        "CREATED",
        "SUBSCRIPTION",
    ]);
    for d in deliveries {
        let next = if d.state == pb::DeliveryState::Pending as i32
            || d.state == pb::DeliveryState::Failed as i32
        {
            style.ago(d.next_attempt_at.as_ref())
        } else {
            "-".to_owned()
        };
        table.styled_row(vec![
            (d.id.clone(), None),
            (dash(&d.event_type), None),
            state_cell(d.state),
            (d.attempt_count.to_string(), None),
            outcome_cell(d.last_status_code, d.last_error, ""),
            (next, None),
            (style.ago(d.created_at.as_ref()), None),
            (d.subscription_id.clone(), None),
        ]);
    }
    table.render(style)
}

/// Returns the detail view of a delivery with its attempts, oldest first.
fn view(style: &Style, d: &pb::Delivery) -> String {
    let next = if d.next_attempt_at.is_some()
        && (d.state == pb::DeliveryState::Pending as i32
            || d.state == pb::DeliveryState::Failed as i32)
    {
        style.when(d.next_attempt_at.as_ref())
    } else {
        "-".to_owned()
    };
    let mut text = details(
        style,
        &[
            ("id", d.id.clone()),
            ("state", style.state(d.state)),
            (
                "event",
                if d.event_type.is_empty() {
                    d.event_id.clone()
                } else {
                    format!("{} ({})", d.event_id, d.event_type)
                },
            ),
            ("subscription", d.subscription_id.clone()),
            ("webhook-id", d.webhook_id.clone()),
            ("attempts", d.attempt_count.to_string()),
            ("next attempt", next),
            ("created", style.when(d.created_at.as_ref())),
        ],
    );
    if d.attempts.is_empty() {
        text.push_str("\nno attempt yet\n");
        return text;
    }
    text.push('\n');
    let mut table = Table::new(&[
        "#", "ATTEMPT", "STARTED", "DURATION", "RESULT", "AGENT", "REGION",
    ]);
    for (n, a) in d.attempts.iter().enumerate() {
        table.styled_row(vec![
            ((n + 1).to_string(), None),
            (a.id.clone(), None),
            (style.ago(a.started_at.as_ref()), None),
            (format!("{} ms", a.duration_ms), None),
            outcome_cell(a.status_code, a.error, &a.error_message),
            (a.agent_id.clone(), None),
            (a.region.clone(), None),
        ]);
    }
    text.push_str(&table.render(style));
    if let Some(last) = d.attempts.last()
        && !last.response_excerpt.is_empty()
    {
        text.push_str(&style.paint(Some(Color::Dim), "\nlast response:\n"));
        text.push_str(&pretty_excerpt(&last.response_excerpt));
        text.push('\n');
    }
    text
}

fn pretty_excerpt(excerpt: &str) -> String {
    crate::output::pretty_json(excerpt)
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// The first wait before watching again after the stream ended; doubled up to [`RECONNECT_MAX`].
const RECONNECT_FIRST: std::time::Duration = std::time::Duration::from_millis(200);
const RECONNECT_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Streams attempts until the user interrupts. When the stream ends or the control plane goes
/// away (a restart, a rolling upgrade), it watches again as soon as the control plane answers;
/// an authentication or argument error ends it.
async fn watch(
    ctx: &Context,
    tenant_id: String,
    subscription: Option<String>,
) -> anyhow::Result<()> {
    let request = pb::WatchDeliveriesRequest {
        tenant_id,
        subscription_id: subscription.clone().unwrap_or_default(),
    };
    let scope = subscription.map_or("every subscription".to_owned(), |s| s.to_string());
    // The first call fails as any command does (exit 6 when nothing answers there).
    let mut stream = ctx
        .client
        .deliveries()
        .watch_deliveries(request.clone())
        .await?
        .into_inner();
    // On stderr, so it never mixes with `--json` lines; tests wait for it before publishing.
    let say = |line: &str| {
        if ctx.out.mode != Mode::Quiet {
            eprintln!("{line}");
        }
    };
    say(&format!("watching attempts of {scope} (Ctrl-C to stop)"));
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let ended = match next {
            Ok(Some(record)) => {
                let style = Style {
                    now: chrono::Utc::now(),
                    ..ctx.out.style.clone()
                };
                match ctx.out.mode {
                    Mode::Json => print(&to_json(&record, false)?)?,
                    Mode::Quiet => print(&record.delivery_id)?,
                    Mode::Human => print(&watch_line(&style, &record))?,
                }
                continue;
            }
            Ok(None) => "the control plane closed the watch stream (a restart?)".to_owned(),
            Err(status) if gone(&status) => {
                format!("the watch stream broke ({})", status.message())
            }
            Err(status) => return Err(status.into()),
        };
        say(&format!("{ended}; reconnecting…"));
        stream = match reconnect(ctx, &request).await? {
            Some(stream) => stream,
            None => return Ok(()),
        };
        say(&format!(
            "reconnected: watching attempts of {scope} (attempts recorded while disconnected \
             are not shown; `herald deliveries list` has them)"
        ));
    }
}

/// Whether a watch call failed because the control plane went away or is restarting, rather
/// than because of the call itself.
fn gone(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
    )
}

/// Calls `WatchDeliveries` again until the control plane answers, backing off from
/// [`RECONNECT_FIRST`] to [`RECONNECT_MAX`]; `None` when the user interrupts meanwhile.
async fn reconnect(
    ctx: &Context,
    request: &pb::WatchDeliveriesRequest,
) -> anyhow::Result<Option<tonic::Streaming<pb::AttemptRecorded>>> {
    let mut wait = RECONNECT_FIRST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => return Ok(None),
        }
        match ctx
            .client
            .deliveries()
            .watch_deliveries(request.clone())
            .await
        {
            Ok(response) => return Ok(Some(response.into_inner())),
            Err(status) if gone(&status) => wait = (wait * 2).min(RECONNECT_MAX),
            Err(status) => return Err(status.into()),
        }
    }
}

/// Returns one line per recorded attempt: time, state after it, ids, result, duration.
fn watch_line(style: &Style, r: &pb::AttemptRecorded) -> String {
    let attempt = r.attempt.clone().unwrap_or_default();
    let at = attempt
        .started_at
        .as_ref()
        .and_then(herald_proto::from_timestamp)
        .map_or_else(|| "-".to_owned(), |at| at.format("%H:%M:%S").to_string());
    let (state, state_color) = state_cell(r.state);
    let (outcome, color) = outcome_cell(attempt.status_code, attempt.error, &attempt.error_message);
    format!(
        "{at}  {}{}  {}  {}  {}  {} ms  {}",
        style.paint(state_color, &state),
        " ".repeat(12usize.saturating_sub(state.chars().count())),
        r.delivery_id,
        r.subscription_id,
        r.event_id,
        attempt.duration_ms,
        style.paint(color, &outcome),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_in_every_spelling() {
        use pb::DeliveryState as S;
        assert_eq!(parse_state("dead"), Ok(S::Dead));
        assert_eq!(parse_state("in-flight"), Ok(S::InFlight));
        assert_eq!(parse_state("IN_FLIGHT"), Ok(S::InFlight));
        assert_eq!(parse_state("DELIVERY_STATE_SUCCEEDED"), Ok(S::Succeeded));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("gone").is_err());
    }
}
