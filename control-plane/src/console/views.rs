//! What the templates show: domain records turned into plain, display-ready values. Pure.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::model::{
    Attempt, AttemptError, Delivery, DeliveryState, Event, LastDelivery, SignatureScheme,
    Subscription, SubscriptionStatus,
};

/// Formats a time for people: `2026-01-05 14:03:12 UTC`.
pub fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// Says how long ago `at` was, relative to `now`: `just now`, `5 min ago`, `3 h ago`, `2 d ago`
/// (or `in 5 min` for the future).
pub fn ago(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - at).num_seconds();
    let (future, secs) = (secs < 0, secs.unsigned_abs());
    let text = match secs {
        0..=9 if !future => return "just now".into(),
        0..=59 => format!("{secs} s"),
        60..=3599 => format!("{} min", secs / 60),
        3600..=86_399 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// The query-string name of a delivery state (`in_flight`), also its CSS class.
pub fn state_key(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Pending => "pending",
        DeliveryState::InFlight => "in_flight",
        DeliveryState::Succeeded => "succeeded",
        DeliveryState::Failed => "failed",
        DeliveryState::Dead => "dead",
    }
}

/// Parses a state filter from the query string; `""` or `all` is no filter.
pub fn parse_state(value: &str) -> Result<Option<DeliveryState>, ()> {
    Ok(Some(match value {
        "" | "all" => return Ok(None),
        "pending" => DeliveryState::Pending,
        "in_flight" => DeliveryState::InFlight,
        "succeeded" => DeliveryState::Succeeded,
        "failed" => DeliveryState::Failed,
        "dead" => DeliveryState::Dead,
        _ => return Err(()),
    }))
}

/// The filters the delivery log offers: (query value, label).
pub const STATE_FILTERS: &[(&str, &str)] = &[
    ("all", "All"),
    ("pending", "Pending"),
    ("in_flight", "In flight"),
    ("succeeded", "Succeeded"),
    ("failed", "Failed"),
    ("dead", "Dead"),
];

pub fn state_label(state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Pending => "Pending",
        DeliveryState::InFlight => "In flight",
        DeliveryState::Succeeded => "Succeeded",
        DeliveryState::Failed => "Failed",
        DeliveryState::Dead => "Dead",
    }
}

/// The name of an attempt error class (`TIMEOUT`), empty when an HTTP status was received.
pub fn error_label(error: AttemptError) -> &'static str {
    match error {
        AttemptError::None => "",
        AttemptError::Timeout => "TIMEOUT",
        AttemptError::Connect => "CONNECT",
        AttemptError::Dns => "DNS",
        AttemptError::Tls => "TLS",
        AttemptError::DestinationRefused => "DESTINATION_REFUSED",
        AttemptError::Response => "RESPONSE",
        AttemptError::LeaseExpired => "LEASE_EXPIRED",
    }
}

/// Says what an attempt's outcome was in a few words: `HTTP 200`, `HTTP 500`, `CONNECT`.
pub fn outcome(status_code: u32, error: AttemptError) -> String {
    match (status_code, error) {
        (0, AttemptError::None) => "no response".into(),
        (0, error) => error_label(error).into(),
        (code, _) => format!("HTTP {code}"),
    }
}

#[derive(Debug, Serialize)]
pub struct LastDeliveryView {
    pub state: &'static str,
    pub state_label: &'static str,
    pub status_code: u32,
    pub at: String,
    pub ago: String,
}

impl LastDeliveryView {
    fn new(last: &LastDelivery, now: DateTime<Utc>) -> Self {
        Self {
            state: state_key(last.state),
            state_label: state_label(last.state),
            status_code: last.status_code,
            at: time(last.at),
            ago: ago(last.at, now),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SubscriptionView {
    pub id: String,
    pub name: String,
    pub url: String,
    pub active: bool,
    pub enabled: bool,
    pub disabled_reason: String,
    pub event_types: Vec<String>,
    pub api_key_hint: Option<String>,
    pub api_key_header: String,
    pub region: String,
    pub timeout_ms: u128,
    pub max_attempts: u32,
    pub max_concurrency: u32,
    pub rate_limit_per_s: u32,
    pub ordered: bool,
    pub last_delivery: Option<LastDeliveryView>,
    /// Until when the previous signing secret still signs, after a rotation.
    pub previous_secret_until: Option<String>,
    /// `HMAC-SHA256` or `Ed25519`.
    pub signature_scheme: &'static str,
    pub ed25519: bool,
    /// `whpk_…` of an Ed25519 webhook.
    pub signing_public_key: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl SubscriptionView {
    pub fn new(s: &Subscription, now: DateTime<Utc>) -> Self {
        Self {
            id: s.id.clone(),
            name: s.name.clone(),
            url: s.url.clone(),
            active: s.active,
            enabled: s.status == SubscriptionStatus::Enabled,
            disabled_reason: s.disabled_reason.clone().unwrap_or_default(),
            event_types: s.event_types.clone(),
            api_key_hint: s.api_key_hint(),
            api_key_header: s.api_key_header.clone(),
            region: s.region.clone().unwrap_or_default(),
            timeout_ms: s.timeout.as_millis(),
            max_attempts: s.max_attempts,
            max_concurrency: s.max_concurrency,
            rate_limit_per_s: s.rate_limit_per_s,
            ordered: s.ordered,
            last_delivery: s
                .last_delivery
                .as_ref()
                .map(|l| LastDeliveryView::new(l, now)),
            previous_secret_until: s
                .previous_secret
                .as_ref()
                .filter(|p| p.expires_at > now)
                .map(|p| time(p.expires_at)),
            signature_scheme: match s.signature_scheme() {
                SignatureScheme::HmacSha256 => "HMAC-SHA256",
                SignatureScheme::Ed25519 => "Ed25519",
            },
            ed25519: s.signature_scheme() == SignatureScheme::Ed25519,
            signing_public_key: s.signing_public_key(),
            created_at: time(s.created_at),
            updated_at: time(s.updated_at),
        }
    }
}

/// The filter editor's preview: which recent events the form's filters would have delivered.
#[derive(Debug, Serialize)]
pub struct FilterPreview {
    pub total: usize,
    pub matched: usize,
    pub rows: Vec<PreviewRow>,
}

#[derive(Debug, Serialize)]
pub struct PreviewRow {
    pub id: String,
    pub event_type: String,
    pub ago: String,
    pub matched: bool,
}

impl FilterPreview {
    pub fn new(events: &[(Event, bool)], now: DateTime<Utc>) -> Self {
        Self {
            total: events.len(),
            matched: events.iter().filter(|(_, matched)| *matched).count(),
            rows: events
                .iter()
                .map(|(event, matched)| PreviewRow {
                    id: event.id.clone(),
                    event_type: event.event_type.clone(),
                    ago: ago(event.occurred_at, now),
                    matched: *matched,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DeliveryView {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub subscription_id: String,
    pub state: &'static str,
    pub state_label: &'static str,
    pub attempt_count: u32,
    /// `HTTP 200`, `CONNECT`, or empty before the first attempt.
    pub last_outcome: String,
    pub next_attempt_at: String,
    pub created_at: String,
    pub created_ago: String,
    pub retryable: bool,
}

impl DeliveryView {
    pub fn new(d: &Delivery, now: DateTime<Utc>) -> Self {
        let last_outcome = match (d.last_status_code, d.last_error) {
            (Some(code), error) => outcome(code, error.unwrap_or(AttemptError::None)),
            (None, Some(error)) => outcome(0, error),
            (None, None) => String::new(),
        };
        let waiting = matches!(d.state, DeliveryState::Pending | DeliveryState::Failed);
        Self {
            id: d.id.clone(),
            event_id: d.event_id.clone(),
            event_type: d.event_type.clone(),
            subscription_id: d.subscription_id.clone(),
            state: state_key(d.state),
            state_label: state_label(d.state),
            attempt_count: d.attempt_count,
            last_outcome,
            next_attempt_at: if waiting {
                format!(
                    "{} ({})",
                    time(d.next_attempt_at),
                    ago(d.next_attempt_at, now)
                )
            } else {
                String::new()
            },
            created_at: time(d.created_at),
            created_ago: ago(d.created_at, now),
            retryable: d.state != DeliveryState::InFlight,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AttemptView {
    pub number: usize,
    pub id: String,
    pub agent_id: String,
    pub region: String,
    pub started_at: String,
    pub duration_ms: u32,
    pub outcome: String,
    pub ok: bool,
    pub status_code: u32,
    pub error: &'static str,
    pub error_message: String,
    pub response_headers: Vec<(String, String)>,
    pub response_excerpt: String,
}

impl AttemptView {
    pub fn new(number: usize, a: &Attempt) -> Self {
        Self {
            number,
            id: a.id.clone(),
            agent_id: a.agent_id.clone(),
            region: a.region.clone(),
            started_at: time(a.started_at),
            duration_ms: a.duration_ms,
            outcome: outcome(a.status_code, a.error),
            ok: (200..300).contains(&a.status_code) && a.error == AttemptError::None,
            status_code: a.status_code,
            error: error_label(a.error),
            error_message: a.error_message.clone(),
            response_headers: a.response_headers.clone(),
            response_excerpt: a.response_excerpt.clone(),
        }
    }
}

/// One attempt as the live view's script receives it (Server-Sent Events, JSON).
#[derive(Debug, Serialize)]
pub struct LiveAttempt {
    pub delivery_id: String,
    pub subscription_id: String,
    pub event_id: String,
    pub state: &'static str,
    pub state_label: &'static str,
    pub outcome: String,
    pub ok: bool,
    pub duration_ms: u32,
    pub error_message: String,
    pub started_at: String,
}

impl LiveAttempt {
    pub fn new(record: &crate::dispatch::scheduler::AttemptRecord) -> Self {
        let a = &record.attempt;
        Self {
            delivery_id: record.delivery_id.clone(),
            subscription_id: record.subscription_id.clone(),
            event_id: record.event_id.clone(),
            state: state_key(record.state),
            state_label: state_label(record.state),
            outcome: outcome(a.status_code, a.error),
            ok: (200..300).contains(&a.status_code) && a.error == AttemptError::None,
            duration_ms: a.duration_ms,
            error_message: a.error_message.clone(),
            started_at: time(a.started_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).expect("valid time")
    }

    #[test]
    fn ago_reads_naturally() {
        let check = |at: i64, expected: &str| assert_eq!(ago(t(at), t(0)), expected);
        check(0, "just now");
        check(-30, "30 s ago");
        check(-120, "2 min ago");
        check(-7200, "2 h ago");
        check(-3 * 86_400, "3 d ago");
        check(5, "in 5 s");
        check(600, "in 10 min");
    }

    #[test]
    fn state_filters_round_trip() {
        for state in [
            DeliveryState::Pending,
            DeliveryState::InFlight,
            DeliveryState::Succeeded,
            DeliveryState::Failed,
            DeliveryState::Dead,
        ] {
            assert_eq!(parse_state(state_key(state)), Ok(Some(state)));
        }
        assert_eq!(parse_state(""), Ok(None));
        assert_eq!(parse_state("all"), Ok(None));
        assert_eq!(parse_state("DEAD"), Err(()));
    }

    #[test]
    fn outcomes_name_the_status_or_the_error() {
        assert_eq!(outcome(200, AttemptError::None), "HTTP 200");
        assert_eq!(outcome(0, AttemptError::Connect), "CONNECT");
        assert_eq!(outcome(0, AttemptError::None), "no response");
        assert_eq!(outcome(503, AttemptError::LeaseExpired), "HTTP 503");
    }
}
