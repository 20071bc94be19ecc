//! `herald subscriptions create|list|get|update|delete|rotate-secret|reveal-secret|enable`.

use clap::{Args, Subcommand, ValueEnum};
use herald_client::v1 as pb;

use super::{Context, Page};
use crate::output::{Color, Style, Table, details, ids, more, outcome_cell, state_cell};

/// Subscription commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a subscription; prints it with its signing secret (`--quiet`: only the id)
    Create(CreateArgs),
    /// List the tenant's subscriptions with their state and last delivery
    List(Page),
    /// Show one subscription (without its signing secret: see reveal-secret)
    Get {
        /// The subscription's id (sub_…)
        id: String,
    },
    /// Change a subscription; flags not given leave their field unchanged
    Update(UpdateArgs),
    /// Delete a subscription
    Delete {
        /// The subscription's id (sub_…)
        id: String,
    },
    /// Issue a new signing key; the previous one keeps signing during the grace period
    /// (`--quiet`: only the new secret, or the new public key for Ed25519)
    RotateSecret {
        /// The subscription's id (sub_…)
        id: String,
        /// Seconds the previous key stays valid beside the new one (default 86400; 0 ends
        /// it now)
        #[arg(long, value_name = "SECONDS")]
        grace_period: Option<u32>,
        /// The new key's scheme (default: the current one); a change of scheme keeps both
        /// signing during the grace period
        #[arg(long, value_enum)]
        signature: Option<Signature>,
    },
    /// Show what receivers verify with: the signing secret, or the public key of an Ed25519
    /// subscription (`--quiet`: only that value)
    RevealSecret {
        /// The subscription's id (sub_…)
        id: String,
    },
    /// Clear a DISABLED status Herald set after failures or a 410; `active` is untouched
    Enable {
        /// The subscription's id (sub_…)
        id: String,
    },
}

/// How requests are signed (Standard Webhooks).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Signature {
    /// `v1`: HMAC-SHA256 with a shared `whsec_` secret
    Hmac,
    /// `v1a`: Ed25519; receivers verify with the `whpk_` public key
    Ed25519,
}

impl Signature {
    fn scheme(self) -> i32 {
        match self {
            Self::Hmac => pb::SignatureScheme::HmacSha256 as i32,
            Self::Ed25519 => pb::SignatureScheme::Ed25519 as i32,
        }
    }
}

/// Reads a `--filter` value: the JSON itself or `@FILE` (checked by the control plane, which
/// names the problem and where).
fn read_filter(value: String) -> anyhow::Result<String> {
    match value.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map(|text| text.trim().to_owned())
            .map_err(|err| super::usage(format!("--filter: cannot read {path}: {err}"))),
        None => Ok(value),
    }
}

/// Flags of `subscriptions create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name for people, e.g. `CRM sync`
    #[arg(long)]
    pub name: String,
    /// The receiver's URL (http or https); events are POSTed to it
    #[arg(long)]
    pub url: String,
    /// Deliver only these event types; a segment may be `*` (`user.*`); repeat for more;
    /// none: every type
    #[arg(long = "event-type", value_name = "TYPE")]
    pub event_types: Vec<String>,
    /// API key sent in the API key header of every request
    #[arg(long)]
    pub api_key: Option<String>,
    /// The header carrying the API key (default X-API-Key)
    #[arg(long, value_name = "HEADER")]
    pub api_key_header: Option<String>,
    /// Deliver only from agents of this region (default: any region)
    #[arg(long)]
    pub region: Option<String>,
    /// Deliver the events of one entity one at a time, in publish order
    #[arg(long)]
    pub ordered: bool,
    /// Deliver only events whose payload matches this JSON filter, e.g.
    /// '{"amount": {"$gte": 100}, "customer.country": "FR"}', or @FILE
    #[arg(
        long = "filter",
        visible_alias = "payload-filter",
        value_name = "JSON|@FILE"
    )]
    pub payload_filter: Option<String>,
    /// How requests are signed (default hmac)
    #[arg(long, value_enum)]
    pub signature: Option<Signature>,
    /// A header sent with every request, NAME=VALUE (repeatable)
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = name_value)]
    pub headers: Vec<(String, String)>,
    /// A header whose value is sealed at rest and shown by hint only, NAME=VALUE (repeatable)
    #[arg(long = "secret-header", value_name = "NAME=VALUE", value_parser = name_value)]
    pub secret_headers: Vec<(String, String)>,
    /// Create it switched off: nothing is delivered until `update --active`
    #[arg(long)]
    pub inactive: bool,
    /// Time-out of each request in milliseconds (1000 to 60000; default 15000)
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,
    /// Attempts before a delivery is DEAD (1 to 50; default 11)
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Requests in flight at once (1 to 1024; default 64)
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<u32>,
    /// Requests per second at most (default: no limit)
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
}

/// Flags of `subscriptions update`.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The subscription's id (sub_…)
    pub id: String,
    /// New name
    #[arg(long)]
    pub name: Option<String>,
    /// New receiver URL
    #[arg(long)]
    pub url: Option<String>,
    /// Replace the event type filters with these (repeat for more)
    #[arg(
        long = "event-type",
        value_name = "TYPE",
        conflicts_with = "all_event_types"
    )]
    pub event_types: Vec<String>,
    /// Remove the filters: deliver every event type
    #[arg(long)]
    pub all_event_types: bool,
    /// New API key (an empty value removes it)
    #[arg(long)]
    pub api_key: Option<String>,
    /// New API key header name
    #[arg(long, value_name = "HEADER")]
    pub api_key_header: Option<String>,
    /// New region (an empty value: any region)
    #[arg(long)]
    pub region: Option<String>,
    /// Switch deliveries on
    #[arg(long, conflicts_with = "inactive")]
    pub active: bool,
    /// Switch deliveries off (events published meanwhile are not delivered)
    #[arg(long)]
    pub inactive: bool,
    /// Deliver each entity's events in order (`--ordered false` to stop)
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub ordered: Option<bool>,
    /// New payload filter (JSON or @FILE); an empty string removes it
    #[arg(
        long = "filter",
        visible_alias = "payload-filter",
        value_name = "JSON|@FILE"
    )]
    pub payload_filter: Option<String>,
    /// Switch to another signature scheme: a new key signs from now on and the current one
    /// keeps signing beside it for 24 hours
    #[arg(long, value_enum)]
    pub signature: Option<Signature>,
    /// Replace the custom headers with these, NAME=VALUE (repeatable); a secret header given
    /// as NAME= keeps its current value
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = name_value)]
    pub headers: Vec<(String, String)>,
    /// Like --header, sealed at rest and shown by hint only
    #[arg(long = "secret-header", value_name = "NAME=VALUE", value_parser = name_value)]
    pub secret_headers: Vec<(String, String)>,
    /// Remove every custom header
    #[arg(long, conflicts_with_all = ["headers", "secret_headers"])]
    pub clear_headers: bool,
    /// New time-out of each request in milliseconds
    #[arg(long, value_name = "MS")]
    pub timeout_ms: Option<u32>,
    /// New number of attempts before DEAD
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// New limit of requests in flight
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<u32>,
    /// New limit of requests per second (0: none)
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
}

pub async fn run(ctx: &Context, command: Command) -> anyhow::Result<()> {
    let tenant_id = ctx.tenant.clone();
    let subs = || ctx.client.subscriptions();
    match command {
        Command::Create(a) => {
            let request = pb::CreateSubscriptionRequest {
                tenant_id,
                name: a.name,
                url: a.url,
                event_types: a.event_types,
                api_key: a.api_key.unwrap_or_default(),
                api_key_header: a.api_key_header.unwrap_or_default(),
                region: a.region.unwrap_or_default(),
                active: a.inactive.then_some(false),
                timeout_ms: a.timeout_ms.unwrap_or(0),
                max_attempts: a.max_attempts.unwrap_or(0),
                max_concurrency: a.max_concurrency.unwrap_or(0),
                rate_limit_per_s: a.rate_limit.unwrap_or(0),
                ordered: a.ordered,
                payload_filter: a.payload_filter.map(read_filter).transpose()?,
                headers: custom_headers(a.headers, a.secret_headers),
                signature_scheme: a.signature.map_or(0, Signature::scheme),
            };
            let sub = subs().create_subscription(request).await?.into_inner();
            show(ctx, &sub, |s| s.id.clone())
        }
        Command::List(page) => {
            let request = pb::ListSubscriptionsRequest {
                tenant_id,
                page_size: page.size(),
                page_token: page.token(),
            };
            let list = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.subscriptions().list_subscriptions(request).await }
                })
                .await?;
            ctx.out.reply(
                &list,
                |l| ids(l.subscriptions.iter().map(|s| &s.id)),
                |style, l| {
                    if l.subscriptions.is_empty() {
                        return "no subscriptions yet: herald subscriptions create --name NAME --url URL"
                            .into();
                    }
                    let mut table = Table::new(&[
                        "ID",
                        "NAME",
                        "URL",
                        "EVENT TYPES",
                        "STATUS",
                        "LAST DELIVERY",
                    ]);
                    for s in &l.subscriptions {
                        table.styled_row(vec![
                            (s.id.clone(), None),
                            (s.name.clone(), None),
                            (s.url.clone(), None),
                            (filters(&s.event_types), None),
                            status_cell(s),
                            (last_delivery(style, s, false), last_color(s)),
                        ]);
                    }
                    table.render(style) + &more(style, &l.next_page_token)
                },
            )
        }
        Command::Get { id } => {
            let request = pb::GetSubscriptionRequest { tenant_id, id };
            let sub = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.subscriptions().get_subscription(request).await }
                })
                .await?;
            show(ctx, &sub, |s| s.id.clone())
        }
        Command::Update(a) => {
            let request = pb::UpdateSubscriptionRequest {
                tenant_id,
                id: a.id,
                name: a.name,
                url: a.url,
                event_types: (a.all_event_types || !a.event_types.is_empty()).then_some(
                    pb::EventTypes {
                        values: a.event_types,
                    },
                ),
                active: match (a.active, a.inactive) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                api_key: a.api_key,
                api_key_header: a.api_key_header,
                region: a.region,
                timeout_ms: a.timeout_ms,
                max_attempts: a.max_attempts,
                max_concurrency: a.max_concurrency,
                rate_limit_per_s: a.rate_limit,
                ordered: a.ordered,
                payload_filter: a.payload_filter.map(read_filter).transpose()?,
                signature_scheme: a.signature.map(Signature::scheme),
                headers: if a.clear_headers {
                    Some(pb::CustomHeaders::default())
                } else if a.headers.is_empty() && a.secret_headers.is_empty() {
                    None
                } else {
                    Some(pb::CustomHeaders {
                        values: custom_headers(a.headers, a.secret_headers),
                    })
                },
            };
            let sub = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.subscriptions().update_subscription(request).await }
                })
                .await?;
            show(ctx, &sub, |s| s.id.clone())
        }
        Command::Delete { id } => {
            let request = pb::DeleteSubscriptionRequest {
                tenant_id,
                id: id.clone(),
            };
            let reply = subs().delete_subscription(request).await?.into_inner();
            ctx.out
                .reply(&reply, |_| String::new(), |_, _| format!("deleted {id}"))
        }
        Command::RotateSecret {
            id,
            grace_period,
            signature,
        } => {
            let request = pb::RotateSecretRequest {
                tenant_id,
                id,
                grace_period_s: grace_period,
                signature_scheme: signature.map(Signature::scheme),
            };
            let sub = subs().rotate_secret(request).await?.into_inner();
            let grace = grace_period.unwrap_or(86_400);
            ctx.out.reply(
                &sub,
                |s| verifier_of(s).1,
                |style, s| {
                    let previous = if grace == 0 {
                        "the previous key no longer signs".to_owned()
                    } else {
                        format!(
                            "the previous key keeps signing for {}",
                            humantime::format_duration(std::time::Duration::from_secs(
                                grace.into()
                            ))
                        )
                    };
                    let (label, value) = verifier_of(s);
                    details(
                        style,
                        &[
                            ("id", s.id.clone()),
                            (label, style.paint(Some(Color::Bold), &value)),
                        ],
                    ) + &previous
                        + "\n"
                },
            )
        }
        Command::RevealSecret { id } => {
            let request = pb::GetSubscriptionSecretRequest { tenant_id, id };
            let sub = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.subscriptions().get_subscription_secret(request).await }
                })
                .await?;
            ctx.out.reply(
                &sub,
                |s| verifier_of(s).1,
                |style, s| {
                    let (label, value) = verifier_of(s);
                    details(
                        style,
                        &[
                            ("id", s.id.clone()),
                            ("url", s.url.clone()),
                            (label, style.paint(Some(Color::Bold), &value)),
                        ],
                    )
                },
            )
        }
        Command::Enable { id } => {
            let request = pb::EnableSubscriptionRequest { tenant_id, id };
            let sub = ctx
                .client
                .idempotent(|c| {
                    let request = request.clone();
                    async move { c.subscriptions().enable_subscription(request).await }
                })
                .await?;
            show(ctx, &sub, |s| s.id.clone())
        }
    }
}

/// What a receiver verifies with: the HMAC secret, or the public key of an Ed25519 subscription
/// (whose private key never leaves the control plane).
fn verifier_of(s: &pb::Subscription) -> (&'static str, String) {
    if s.signature_scheme == pb::SignatureScheme::Ed25519 as i32 {
        ("signing public key", s.signing_public_key.clone())
    } else {
        ("signing secret", s.signing_secret.clone())
    }
}

/// Prints one subscription.
fn show(
    ctx: &Context,
    sub: &pb::Subscription,
    quiet: impl FnOnce(&pb::Subscription) -> String,
) -> anyhow::Result<()> {
    ctx.out.reply(sub, quiet, view)
}

/// Returns the detail view of a subscription.
pub fn view(style: &Style, s: &pb::Subscription) -> String {
    let (status, color) = status_cell(s);
    let mut status = style.paint(color, &status);
    if !s.disabled_reason.is_empty() {
        status.push_str(&format!(": {}", s.disabled_reason));
    }
    let api_key = if s.api_key_hint.is_empty() {
        "none".to_owned()
    } else {
        format!("{}: …{}", s.api_key_header, s.api_key_hint)
    };
    let limits = format!(
        "time-out {} ms, {} attempts, {} in flight, {}",
        s.timeout_ms,
        s.max_attempts,
        s.max_concurrency,
        if s.rate_limit_per_s == 0 {
            "no rate limit".to_owned()
        } else {
            format!("{}/s", s.rate_limit_per_s)
        }
    );
    let mut fields = vec![
        ("id", s.id.clone()),
        ("tenant", s.tenant_id.clone()),
        ("name", s.name.clone()),
        ("url", s.url.clone()),
        ("event types", filters(&s.event_types)),
        ("status", status),
        ("api key", api_key),
        (
            "region",
            if s.region.is_empty() {
                "any".to_owned()
            } else {
                s.region.clone()
            },
        ),
        ("limits", limits),
        ("ordered", if s.ordered { "yes" } else { "no" }.to_owned()),
        (
            "payload filter",
            if s.payload_filter.is_empty() {
                "none".to_owned()
            } else {
                s.payload_filter.clone()
            },
        ),
        (
            "headers",
            if s.headers.is_empty() {
                "none".to_owned()
            } else {
                s.headers
                    .iter()
                    .map(|h| {
                        if h.secret {
                            format!("{}: …{} (secret)", h.name, h.value_hint)
                        } else {
                            format!("{}: {}", h.name, h.value)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "signature",
            if s.signature_scheme == pb::SignatureScheme::Ed25519 as i32 {
                format!("Ed25519 (v1a), public key {}", s.signing_public_key)
            } else {
                "HMAC-SHA256 (v1)".to_owned()
            },
        ),
        (
            "last delivery",
            style.paint(last_color(s), &last_delivery(style, s, true)),
        ),
        ("created", style.when(s.created_at.as_ref())),
        ("updated", style.when(s.updated_at.as_ref())),
    ];
    if !s.signing_secret.is_empty() {
        fields.push((
            "signing secret",
            style.paint(Some(Color::Bold), &s.signing_secret),
        ));
    }
    details(style, &fields)
}

fn filters(event_types: &[String]) -> String {
    if event_types.is_empty() {
        "* (all)".to_owned()
    } else {
        event_types.join(", ")
    }
}

/// Returns `active`, `inactive` or `disabled` (by Herald) with its colour.
fn status_cell(s: &pb::Subscription) -> (String, Option<Color>) {
    if s.status == pb::SubscriptionStatus::Disabled as i32 {
        ("✗ disabled".to_owned(), Some(Color::Red))
    } else if !s.active {
        ("○ inactive".to_owned(), Some(Color::Dim))
    } else {
        ("● active".to_owned(), Some(Color::Green))
    }
}

fn last_delivery(style: &Style, s: &pb::Subscription, exact: bool) -> String {
    match &s.last_delivery {
        Some(last) if last.state != pb::DeliveryState::Unspecified as i32 => {
            let (state, _) = state_cell(last.state);
            let (code, _) = outcome_cell(last.status_code, 0, "");
            let at = if exact {
                style.when(last.at.as_ref())
            } else {
                style.ago(last.at.as_ref())
            };
            if last.status_code > 0 {
                format!("{state} {code}, {at}")
            } else {
                format!("{state}, {at}")
            }
        }
        _ => "never".to_owned(),
    }
}

fn last_color(s: &pb::Subscription) -> Option<Color> {
    s.last_delivery
        .as_ref()
        .filter(|last| last.state != pb::DeliveryState::Unspecified as i32)
        .and_then(|last| state_cell(last.state).1)
}

/// Parses `NAME=VALUE`.
fn name_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("{text:?}: expected NAME=VALUE")),
    }
}

fn custom_headers(
    plain: Vec<(String, String)>,
    secret: Vec<(String, String)>,
) -> Vec<pb::CustomHeader> {
    let header = |(name, value): (String, String), secret: bool| pb::CustomHeader {
        name,
        value,
        secret,
        value_hint: String::new(),
    };
    plain
        .into_iter()
        .map(|nv| header(nv, false))
        .chain(secret.into_iter().map(|nv| header(nv, true)))
        .collect()
}
