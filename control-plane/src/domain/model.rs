//! The records Herald keeps, as plain data: tenants, tokens, subscriptions, events, deliveries
//! and attempts. Storage reads and writes these; the gRPC edge converts them to proto.

use std::time::Duration;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// Who a token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Tenant(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Herald's own switch on a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStatus {
    Enabled = 1,
    Disabled = 2,
}

impl SubscriptionStatus {
    pub fn from_i32(value: i32) -> Self {
        if value == Self::Disabled as i32 {
            Self::Disabled
        } else {
            Self::Enabled
        }
    }
}

/// The state of a delivery; the integer values are the proto enum's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    Pending = 1,
    InFlight = 2,
    Succeeded = 3,
    Failed = 4,
    Dead = 5,
}

impl DeliveryState {
    pub fn from_i32(value: i32) -> Option<Self> {
        Some(match value {
            1 => Self::Pending,
            2 => Self::InFlight,
            3 => Self::Succeeded,
            4 => Self::Failed,
            5 => Self::Dead,
            _ => return None,
        })
    }
}

/// Why an attempt got no HTTP status; the integer values are the proto enum's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    None = 1,
    Timeout = 2,
    Connect = 3,
    Dns = 4,
    Tls = 5,
    DestinationRefused = 6,
    Response = 7,
    LeaseExpired = 8,
}

impl AttemptError {
    pub fn from_i32(value: i32) -> Self {
        match value {
            2 => Self::Timeout,
            3 => Self::Connect,
            4 => Self::Dns,
            5 => Self::Tls,
            6 => Self::DestinationRefused,
            7 => Self::Response,
            8 => Self::LeaseExpired,
            _ => Self::None,
        }
    }
}

/// The result of the most recent attempt of any delivery of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastDelivery {
    pub state: DeliveryState,
    pub status_code: u32,
    pub at: DateTime<Utc>,
}

/// How a subscription's requests are signed: told by its key's prefix (`whsec_` HMAC, `whsk_`
/// Ed25519), so a change of scheme is a rotation like any other.
pub use herald_proto::webhook::Scheme as SignatureScheme;

/// A signing secret that still signs until `expires_at` (a rotation's grace period).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousSecret {
    pub secret: String,
    pub expires_at: DateTime<Utc>,
}

/// A header of a subscription's requests; a secret one is sealed at rest and read by hint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CustomHeader {
    pub name: String,
    pub value: String,
    pub secret: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub url: String,
    pub event_types: Vec<String>,
    pub active: bool,
    pub status: SubscriptionStatus,
    pub disabled_reason: Option<String>,
    pub api_key: Option<String>,
    pub api_key_header: String,
    /// The current signing key: an HMAC secret (`whsec_…`) or an Ed25519 private key
    /// (`whsk_…`); sealed at rest either way.
    pub signing_secret: String,
    pub previous_secret: Option<PreviousSecret>,
    pub region: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub max_concurrency: u32,
    pub rate_limit_per_s: u32,
    pub ordered: bool,
    /// Which events, by their payload, get a delivery here (on top of `event_types`).
    pub payload_filter: Option<crate::domain::payload_filter::PayloadFilter>,
    /// Sent with every request, after Herald's own headers.
    pub headers: Vec<CustomHeader>,
    pub last_delivery: Option<LastDelivery>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Subscription {
    /// Returns whether a published event of `event_type` gets a delivery here (SPEC 5, fan-out).
    pub fn receives(&self, event_type: &str) -> bool {
        self.active
            && self.status == SubscriptionStatus::Enabled
            && super::filter::matches_any(&self.event_types, event_type)
    }

    /// Returns whether a published event gets a delivery here: its type is subscribed to and
    /// its payload passes the payload filter, if any (SPEC 5, fan-out).
    /// `document` is the event as filters see it ([`Event::document`]), shared by every
    /// subscription the event is matched against.
    pub fn receives_event(
        &self,
        event_type: &str,
        document: &crate::domain::payload_filter::Document<'_>,
    ) -> bool {
        self.receives(event_type)
            && self
                .payload_filter
                .as_ref()
                .is_none_or(|filter| filter.matches(document))
    }

    /// Returns the secrets that sign at `now`: the current one, then the previous one while its
    /// grace period lasts.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        let mut secrets = vec![self.signing_secret.as_str()];
        if let Some(previous) = &self.previous_secret
            && previous.expires_at > now
        {
            secrets.push(previous.secret.as_str());
        }
        secrets
    }

    /// The scheme of the current signing key.
    pub fn signature_scheme(&self) -> SignatureScheme {
        herald_proto::webhook::SigningKey::scheme_of(&self.signing_secret)
    }

    /// `whpk_…` for an Ed25519 subscription: what receivers verify with.
    pub fn signing_public_key(&self) -> Option<String> {
        herald_proto::webhook::SigningKey::parse(&self.signing_secret)
            .ok()?
            .public_key()
            .map(|key| key.to_text())
    }

    /// Makes `new_key` the signing key; the current one keeps signing beside it until
    /// `now + grace` (none when `grace` is zero).
    pub fn rotate_signing_key(
        &mut self,
        new_key: String,
        grace: chrono::Duration,
        now: DateTime<Utc>,
    ) {
        let current = std::mem::replace(&mut self.signing_secret, new_key);
        self.previous_secret = (grace > chrono::Duration::zero()).then(|| PreviousSecret {
            secret: current,
            expires_at: now + grace,
        });
        self.updated_at = now;
    }

    /// Returns the last 4 characters of the API key, for display.
    pub fn api_key_hint(&self) -> Option<String> {
        self.api_key.as_deref().map(api_key_hint)
    }
}

/// Returns the last 4 characters of an API key.
pub fn api_key_hint(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub tenant_id: String,
    pub event_type: String,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub action: Option<String>,
    pub payload: String,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

#[cfg(test)]
impl Subscription {
    /// A plain enabled subscription with defaults, for tests.
    pub(crate) fn example(id: &str, tenant: &str) -> Self {
        Self {
            id: id.into(),
            tenant_id: tenant.into(),
            name: id.into(),
            url: "http://127.0.0.1/".into(),
            event_types: vec![],
            active: true,
            status: SubscriptionStatus::Enabled,
            disabled_reason: None,
            api_key: None,
            api_key_header: "x-api-key".into(),
            signing_secret: "whsec_x".into(),
            previous_secret: None,
            region: None,
            timeout: Duration::from_secs(2),
            max_attempts: 5,
            max_concurrency: 64,
            rate_limit_per_s: 0,
            ordered: false,
            payload_filter: None,
            headers: Vec::new(),
            last_delivery: None,
            created_at: DateTime::<Utc>::default(),
            updated_at: DateTime::<Utc>::default(),
        }
    }
}

impl Event {
    /// The event as payload filters see it.
    pub fn document(&self) -> crate::domain::payload_filter::Document<'_> {
        crate::domain::payload_filter::Document::new(
            &self.payload,
            crate::domain::payload_filter::EventFields {
                event_type: &self.event_type,
                entity_type: self.entity_type.as_deref(),
                entity_id: self.entity_id.as_deref(),
                action: self.action.as_deref(),
            },
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: String,
    pub tenant_id: String,
    pub event_id: String,
    pub subscription_id: String,
    pub state: DeliveryState,
    pub attempt_count: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub ordering_key: Option<String>,
    /// The event's type, copied at fan-out for the delivery log (empty on rows written before
    /// it was kept).
    pub event_type: String,
    pub last_status_code: Option<u32>,
    pub last_error: Option<AttemptError>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub id: String,
    pub delivery_id: String,
    pub agent_id: String,
    pub region: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u32,
    pub status_code: u32,
    pub response_headers: Vec<(String, String)>,
    pub response_excerpt: String,
    pub error: AttemptError,
    pub error_message: String,
}

/// A connected agent as `ListAgents` shows it: one stream to one control-plane replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub agent_id: String,
    pub region: String,
    pub capacity: u32,
    pub in_flight: u32,
    pub version: String,
    pub identity: String,
    /// The replica the agent is connected to.
    pub replica_id: String,
    pub connected_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// A page of a list, with the token of the next page when there is one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

/// What a list call asks for: `size` items after the cursor `after`.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub size: u64,
    pub after: Option<String>,
}

impl PageRequest {
    /// Applies the default page size for 0 and the maximum of 1000.
    pub fn new(size: u32, token: &str, default: u32) -> Self {
        let size = if size == 0 { default } else { size.min(1000) };
        Self {
            size: u64::from(size),
            after: (!token.is_empty()).then(|| token.to_owned()),
        }
    }
}
