//! `herald events publish|get|list|types`.

use clap::{Args, Subcommand};
use herald_client::v1 as pb;

use super::{Context, Page, read_payload};
use crate::error::usage;
use crate::output::{Color, Table, details, ids, more, pretty_json};

/// Event commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish an event: it is stored, then delivered to every matching subscription; prints
    /// the event id and its deliveries (`--quiet`: only the event id)
    Publish(PublishArgs),
    /// Show one event with its payload
    Get {
        /// The event's id (evt_…)
        id: String,
    },
    /// List the tenant's events, newest first
    List {
        /// Only events of this type
        #[arg(long = "type", value_name = "TYPE")]
        event_type: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// List the event types the tenant has published, with counts
    Types(Page),
}

/// Flags of `events publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The event type: lowercase dot-separated segments, e.g. `user.new`
    #[arg(long = "type", value_name = "TYPE")]
    pub event_type: String,
    /// The payload, a JSON object: the JSON text itself, @FILE to read a file, or - for stdin;
    /// its bytes are delivered exactly as given
    #[arg(long, value_name = "JSON|@FILE|-", allow_hyphen_values = true)]
    pub data: String,
    /// Publishing twice with the same key creates one event (default: a key the CLI makes, so
    /// its own retries never publish twice)
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// The entity the event is about, e.g. `user:42` (ordered subscriptions order by it)
    #[arg(long, value_name = "TYPE:ID")]
    pub entity: Option<String>,
    /// What happened to the entity, e.g. `new`, `update`, `delete`
    #[arg(long)]
    pub action: Option<String>,
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let tenant_id = ctx.tenant.clone();
    match command {
        Command::Publish(a) => {
            let (entity_type, entity_id) = match &a.entity {
                Some(entity) => parse_entity(entity)?,
                None => (String::new(), String::new()),
            };
            let payload = read_payload("--data", &a.data)?;
            let request = pb::PublishEventRequest {
                tenant_id,
                event_type: a.event_type,
                payload,
                idempotency_key: a
                    .idempotency_key
                    .unwrap_or_else(herald_client::new_idempotency_key),
                entity_type,
                entity_id,
                action: a.action.unwrap_or_default(),
            };
            let published = ctx.client.publish(request).await?;
            ctx.out.reply(
                &published,
                |p| p.event_id.clone(),
                |style, p| {
                    let deliveries = match p.delivery_ids.len() {
                        0 => "no matching subscription: nothing to deliver".to_owned(),
                        1 => "1 delivery".to_owned(),
                        n => format!("{n} deliveries"),
                    };
                    let mut text = format!(
                        "published {} → {deliveries}\n",
                        style.paint(Some(Color::Bold), &p.event_id)
                    );
                    for id in &p.delivery_ids {
                        text.push_str(&format!("  {id}\n"));
                    }
                    if !p.delivery_ids.is_empty() {
                        text.push_str(&style.paint(
                            Some(Color::Dim),
                            &format!("follow: herald deliveries list --event {}\n", p.event_id),
                        ));
                    }
                    text
                },
            )
        }
        Command::Get { id } => {
            let request = pb::GetEventRequest { tenant_id, id };
            let event = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.events().get_event(request).await }
                })
                .await?;
            ctx.out.reply(
                &event,
                |e| e.id.clone(),
                |style, e| {
                    let mut fields = vec![
                        ("id", e.id.clone()),
                        ("tenant", e.tenant_id.clone()),
                        ("type", e.event_type.clone()),
                        ("entity", entity(e)),
                        ("action", dash(&e.action)),
                        ("idempotency key", dash(&e.idempotency_key)),
                        ("occurred", style.when(e.occurred_at.as_ref())),
                    ];
                    if !e.traceparent.is_empty() {
                        fields.push(("traceparent", e.traceparent.clone()));
                    }
                    details(style, &fields) + "\n" + &pretty_json(&e.payload) + "\n"
                },
            )
        }
        Command::List { event_type, page } => {
            let request = pb::ListEventsRequest {
                tenant_id,
                event_type: event_type.unwrap_or_default(),
                page_size: page.size(),
                page_token: page.token(),
            };
            let list = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.events().list_events(request).await }
                })
                .await?;
            ctx.out.reply(
                &list,
                |l| ids(l.events.iter().map(|e| &e.id)),
                |style, l| {
                    if l.events.is_empty() {
                        return "no events".into();
                    }
                    let mut table = Table::new(&["ID", "TYPE", "ENTITY", "ACTION", "OCCURRED"]);
                    for e in &l.events {
                        table.row([
                            e.id.clone(),
                            e.event_type.clone(),
                            entity(e),
                            dash(&e.action),
                            style.ago(e.occurred_at.as_ref()),
                        ]);
                    }
                    table.render(style) + &more(style, &l.next_page_token)
                },
            )
        }
        Command::Types(page) => {
            let request = pb::ListEventTypesRequest {
                tenant_id,
                page_size: page.size(),
                page_token: page.token(),
            };
            let list = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.subscriptions().list_event_types(request).await }
                })
                .await?;
            ctx.out.reply(
                &list,
                |l| ids(l.event_types.iter().map(|t| &t.event_type)),
                |style, l| {
                    if l.event_types.is_empty() {
                        return "no events published yet".into();
                    }
                    let mut table = Table::new(&["TYPE", "EVENTS"]);
                    for t in &l.event_types {
                        table.row([t.event_type.clone(), t.count.to_string()]);
                    }
                    table.render(style) + &more(style, &l.next_page_token)
                },
            )
        }
    }
}

/// Parses `--entity TYPE:ID`.
fn parse_entity(value: &str) -> anyhow::Result<(String, String)> {
    match value.split_once(':') {
        Some((kind, id)) if !kind.is_empty() && !id.is_empty() => {
            Ok((kind.to_owned(), id.to_owned()))
        }
        _ => Err(usage(format!(
            "--entity: expected TYPE:ID such as user:42, got {value:?}"
        ))),
    }
}

fn entity(e: &pb::Event) -> String {
    if e.entity_type.is_empty() && e.entity_id.is_empty() {
        "-".to_owned()
    } else {
        format!("{}:{}", e.entity_type, e.entity_id)
    }
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_are_type_colon_id() {
        assert_eq!(
            parse_entity("user:42").unwrap(),
            ("user".to_owned(), "42".to_owned())
        );
        assert_eq!(
            parse_entity("company:a:b").unwrap(),
            ("company".to_owned(), "a:b".to_owned())
        );
        for bad in ["user", ":42", "user:"] {
            assert!(parse_entity(bad).is_err(), "{bad}");
        }
    }
}
