//! Proto <-> domain conversions. Proto types stop here.

use herald_proto::timestamp;
use herald_proto::v1 as pb;

use crate::dispatch::registry::AgentInfo;
use crate::domain::model::{
    Attempt, Delivery, DeliveryState, Event, Page, Scope, SignatureScheme, Subscription,
    SubscriptionStatus, Tenant, Token,
};
use crate::domain::validate::Invalid;
use crate::service::subscriptions::{NewSubscription, SubscriptionPatch};

pub fn tenant(t: Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id,
        name: t.name,
        created_at: Some(timestamp(t.created_at)),
    }
}

pub fn token(t: Token) -> pb::Token {
    let (tenant_id, admin) = match t.scope {
        Scope::Admin => (String::new(), true),
        Scope::Tenant(id) => (id, false),
    };
    pb::Token {
        id: t.id,
        name: t.name,
        tenant_id,
        admin,
        created_at: Some(timestamp(t.created_at)),
        last_used_at: t.last_used_at.map(timestamp),
    }
}

/// Converts a subscription; `with_secret` only for Create, RotateSecret and GetSubscriptionSecret.
pub fn subscription(s: Subscription, with_secret: bool) -> pb::Subscription {
    let scheme = s.signature_scheme();
    pb::Subscription {
        signature_scheme: signature_scheme_of(scheme) as i32,
        signing_public_key: s.signing_public_key().unwrap_or_default(),
        api_key_hint: s.api_key_hint().unwrap_or_default(),
        id: s.id,
        tenant_id: s.tenant_id,
        name: s.name,
        url: s.url,
        event_types: s.event_types,
        active: s.active,
        status: match s.status {
            SubscriptionStatus::Enabled => pb::SubscriptionStatus::Enabled,
            SubscriptionStatus::Disabled => pb::SubscriptionStatus::Disabled,
        } as i32,
        disabled_reason: s.disabled_reason.unwrap_or_default(),
        api_key_header: s.api_key_header,
        region: s.region.unwrap_or_default(),
        timeout_ms: u32::try_from(s.timeout.as_millis()).unwrap_or(u32::MAX),
        max_attempts: s.max_attempts,
        max_concurrency: s.max_concurrency,
        rate_limit_per_s: s.rate_limit_per_s,
        ordered: s.ordered,
        last_delivery: s.last_delivery.map(|last| pb::LastDelivery {
            state: delivery_state(last.state) as i32,
            status_code: last.status_code,
            at: Some(timestamp(last.at)),
        }),
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
        // An Ed25519 private key never leaves: receivers need only the public key.
        signing_secret: if with_secret && scheme == SignatureScheme::HmacSha256 {
            s.signing_secret
        } else {
            String::new()
        },
        payload_filter: s.payload_filter.map(|f| f.text).unwrap_or_default(),
        headers: s
            .headers
            .into_iter()
            .map(|h| pb::CustomHeader {
                value_hint: if h.secret {
                    crate::domain::model::api_key_hint(&h.value)
                } else {
                    String::new()
                },
                value: if h.secret { String::new() } else { h.value },
                name: h.name,
                secret: h.secret,
            })
            .collect(),
    }
}

fn signature_scheme_of(scheme: SignatureScheme) -> pb::SignatureScheme {
    match scheme {
        SignatureScheme::HmacSha256 => pb::SignatureScheme::HmacSha256,
        SignatureScheme::Ed25519 => pb::SignatureScheme::Ed25519,
    }
}

/// Reads a requested scheme: UNSPECIFIED is `None` (the default, or "unchanged").
pub fn signature_scheme(value: i32) -> Result<Option<SignatureScheme>, Invalid> {
    match pb::SignatureScheme::try_from(value) {
        Ok(pb::SignatureScheme::Unspecified) => Ok(None),
        Ok(pb::SignatureScheme::HmacSha256) => Ok(Some(SignatureScheme::HmacSha256)),
        Ok(pb::SignatureScheme::Ed25519) => Ok(Some(SignatureScheme::Ed25519)),
        Err(_) => Err(Invalid::new(
            "signature_scheme",
            format!("unknown value {value}"),
        )),
    }
}

fn custom_header(h: pb::CustomHeader) -> crate::domain::model::CustomHeader {
    crate::domain::model::CustomHeader {
        name: h.name,
        value: h.value,
        secret: h.secret,
    }
}

pub fn new_subscription(r: pb::CreateSubscriptionRequest) -> Result<NewSubscription, Invalid> {
    Ok(NewSubscription {
        signature_scheme: signature_scheme(r.signature_scheme)?,
        name: r.name,
        url: r.url,
        event_types: r.event_types,
        api_key: r.api_key,
        api_key_header: r.api_key_header,
        region: r.region,
        active: r.active,
        timeout_ms: r.timeout_ms,
        max_attempts: r.max_attempts,
        max_concurrency: r.max_concurrency,
        rate_limit_per_s: r.rate_limit_per_s,
        ordered: r.ordered,
        payload_filter: r.payload_filter.unwrap_or_default(),
        headers: r.headers.into_iter().map(custom_header).collect(),
    })
}

pub fn subscription_patch(r: pb::UpdateSubscriptionRequest) -> Result<SubscriptionPatch, Invalid> {
    Ok(SubscriptionPatch {
        signature_scheme: r
            .signature_scheme
            .map(signature_scheme)
            .transpose()?
            .flatten(),
        name: r.name,
        url: r.url,
        event_types: r.event_types.map(|wrapper| wrapper.values),
        active: r.active,
        api_key: r.api_key,
        api_key_header: r.api_key_header,
        region: r.region,
        timeout_ms: r.timeout_ms,
        max_attempts: r.max_attempts,
        max_concurrency: r.max_concurrency,
        rate_limit_per_s: r.rate_limit_per_s,
        ordered: r.ordered,
        payload_filter: r.payload_filter,
        headers: r
            .headers
            .map(|wrapper| wrapper.values.into_iter().map(custom_header).collect()),
    })
}

pub fn event(e: Event) -> pb::Event {
    pb::Event {
        id: e.id,
        tenant_id: e.tenant_id,
        event_type: e.event_type,
        entity_type: e.entity_type.unwrap_or_default(),
        entity_id: e.entity_id.unwrap_or_default(),
        action: e.action.unwrap_or_default(),
        payload: e.payload,
        idempotency_key: e.idempotency_key.unwrap_or_default(),
        occurred_at: Some(timestamp(e.occurred_at)),
        traceparent: e.traceparent.unwrap_or_default(),
        subscription_ids: Vec::new(),
    }
}

pub fn delivery_state(state: DeliveryState) -> pb::DeliveryState {
    match state {
        DeliveryState::Pending => pb::DeliveryState::Pending,
        DeliveryState::InFlight => pb::DeliveryState::InFlight,
        DeliveryState::Succeeded => pb::DeliveryState::Succeeded,
        DeliveryState::Failed => pb::DeliveryState::Failed,
        DeliveryState::Dead => pb::DeliveryState::Dead,
    }
}

/// Converts a state filter: UNSPECIFIED means none.
pub fn state_filter(value: i32) -> Option<DeliveryState> {
    DeliveryState::from_i32(value)
}

pub fn delivery(d: Delivery, attempts: Vec<Attempt>) -> pb::Delivery {
    pb::Delivery {
        webhook_id: d.event_id.clone(),
        id: d.id,
        event_id: d.event_id,
        subscription_id: d.subscription_id,
        state: delivery_state(d.state) as i32,
        attempt_count: d.attempt_count,
        next_attempt_at: matches!(d.state, DeliveryState::Pending | DeliveryState::Failed)
            .then(|| timestamp(d.next_attempt_at)),
        attempts: attempts.into_iter().map(attempt).collect(),
        event_type: d.event_type,
        created_at: Some(timestamp(d.created_at)),
        last_status_code: d.last_status_code.unwrap_or(0),
        last_error: d.last_error.map_or(0, |e| e as i32),
        tenant_id: d.tenant_id,
    }
}

pub fn attempt(a: Attempt) -> pb::Attempt {
    pb::Attempt {
        id: a.id,
        agent_id: a.agent_id,
        region: a.region,
        started_at: Some(timestamp(a.started_at)),
        duration_ms: a.duration_ms,
        status_code: a.status_code,
        response_headers: a
            .response_headers
            .into_iter()
            .map(|(name, value)| pb::Header { name, value })
            .collect(),
        response_excerpt: a.response_excerpt,
        error: a.error as i32,
        error_message: a.error_message,
    }
}

pub fn agent(a: AgentInfo) -> pb::AgentInfo {
    pb::AgentInfo {
        agent_id: a.agent_id,
        region: a.region,
        capacity: a.capacity,
        in_flight: a.in_flight,
        version: a.version,
        connected_at: Some(timestamp(a.connected_at)),
        last_seen_at: Some(timestamp(a.last_seen_at)),
        identity: a.identity,
        replica_id: a.replica_id,
    }
}

/// Splits a page into its items (converted) and the next page token.
pub fn page<T, U>(page: Page<T>, f: impl FnMut(T) -> U) -> (Vec<U>, String) {
    (
        page.items.into_iter().map(f).collect(),
        page.next_page_token.unwrap_or_default(),
    )
}
