//! Jobs: the signed request an agent sends for one leased delivery (signed per attempt, so
//! agents hold no secrets), the events' bodies they carry, and the `Jobs` messages that take
//! them to an agent.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_proto::v1 as pb;
use herald_proto::webhook;

use super::{EventBodies, EventBody};
use crate::domain::model::{Delivery, Subscription};
use crate::storage::{self, Store, events};

/// The version sent in `User-Agent`.
const USER_AGENT: &str = concat!("Herald/", env!("CARGO_PKG_VERSION"));
/// Most jobs in one `Jobs` message.
const MAX_JOBS_PER_MESSAGE: usize = 64;
/// Most bytes of payload in one `Jobs` message: well under the agents' 64 MiB decode limit
/// (a message over it would break the stream, and the same jobs would be sent again forever).
pub const MAX_MESSAGE_PAYLOAD_BYTES: usize = 8 << 20;

/// Builds the job of one attempt: Standard Webhooks headers signed now with every valid key
/// (`v1` HMAC or `v1a` Ed25519), the API key, the trace context.
pub fn build(
    delivery: &Delivery,
    subscription: &Subscription,
    body: &Bytes,
    traceparent: Option<&str>,
    lease_id: &str,
    attempt: u32,
    now: DateTime<Utc>,
) -> pb::Job {
    let timestamp = now.timestamp();
    let keys: Vec<webhook::SigningKey> = subscription
        .signing_secrets(now)
        .into_iter()
        .filter_map(|s| webhook::SigningKey::parse(s).ok())
        .collect();
    let signature = webhook::signature_header(&keys, &delivery.event_id, timestamp, body);
    let header = |name: &str, value: &str| pb::Header {
        name: name.to_owned(),
        value: value.to_owned(),
    };
    let mut headers = vec![
        header("content-type", "application/json"),
        header("user-agent", USER_AGENT),
        header(webhook::HEADER_ID, &delivery.event_id),
        header(webhook::HEADER_TIMESTAMP, &timestamp.to_string()),
        header(webhook::HEADER_SIGNATURE, &signature),
    ];
    if let Some(key) = &subscription.api_key {
        headers.push(header(&subscription.api_key_header, key));
    }
    if let Some(traceparent) = traceparent {
        headers.push(header("traceparent", traceparent));
    }
    // The subscription's own, checked not to collide with any of the above.
    headers.extend(
        subscription
            .headers
            .iter()
            .map(|h| header(&h.name, &h.value)),
    );
    pb::Job {
        delivery_id: delivery.id.clone(),
        lease_id: lease_id.to_owned(),
        url: subscription.url.clone(),
        headers,
        body: body.clone(),
        timeout_ms: u32::try_from(subscription.timeout.as_millis()).unwrap_or(60_000),
        attempt,
        subscription_id: delivery.subscription_id.clone(),
        event_id: delivery.event_id.clone(),
    }
}

/// Splits jobs into `Jobs` messages of at most 64 jobs and 8 MiB of payload (a single larger
/// job goes alone).
pub fn messages(jobs: Vec<pb::Job>) -> Vec<pb::ControlMessage> {
    let mut messages = Vec::new();
    let mut chunk: Vec<pb::Job> = Vec::new();
    let mut bytes = 0;
    for job in jobs {
        let size = job.body.len();
        if !chunk.is_empty()
            && (chunk.len() == MAX_JOBS_PER_MESSAGE || bytes + size > MAX_MESSAGE_PAYLOAD_BYTES)
        {
            messages.push(jobs_message(std::mem::take(&mut chunk)));
            bytes = 0;
        }
        bytes += size;
        chunk.push(job);
    }
    if !chunk.is_empty() {
        messages.push(jobs_message(chunk));
    }
    messages
}

fn jobs_message(jobs: Vec<pb::Job>) -> pb::ControlMessage {
    pb::ControlMessage {
        message: Some(pb::control_message::Message::Jobs(pb::Jobs { jobs })),
    }
}

/// Returns the bodies of these events: carried from the hand-off, or read back (deliveries found
/// by polling, retries). An event that cannot be read is left out.
pub async fn bodies(
    store: &Store,
    carried: &EventBodies,
    event_ids: impl Iterator<Item = &str>,
) -> Result<EventBodies, storage::Error> {
    let mut bodies = EventBodies::new();
    let mut missing = Vec::new();
    for event_id in event_ids {
        if bodies.contains_key(event_id) {
            continue;
        }
        match carried.get(event_id) {
            Some(body) => {
                bodies.insert(event_id.to_owned(), body.clone());
            }
            None => missing.push(event_id.to_owned()),
        }
    }
    if missing.is_empty() {
        return Ok(bodies);
    }
    missing.sort_unstable();
    missing.dedup();
    for event in events::get_many(&store.db, &missing).await? {
        let body = EventBody {
            payload: Bytes::from(event.payload),
            traceparent: event.traceparent,
        };
        bodies.insert(event.id, Arc::new(body));
    }
    Ok(bodies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(bytes: usize) -> pb::Job {
        pb::Job {
            body: Bytes::from(vec![b'x'; bytes]),
            ..Default::default()
        }
    }

    fn sizes(messages: &[pb::ControlMessage]) -> Vec<usize> {
        messages
            .iter()
            .map(|m| match &m.message {
                Some(pb::control_message::Message::Jobs(jobs)) => jobs.jobs.len(),
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn jobs_messages_hold_at_most_64_jobs_and_8_mib() {
        assert_eq!(
            sizes(&messages((0..130).map(|_| job(10)).collect())),
            vec![64, 64, 2]
        );
        // 3 MiB each: two fit in 8 MiB, the third starts a new message.
        let three = (0..5).map(|_| job(3 << 20)).collect();
        assert_eq!(sizes(&messages(three)), vec![2, 2, 1]);
        // A job larger than the limit goes alone.
        assert_eq!(sizes(&messages(vec![job(9 << 20), job(1)])), vec![1, 1]);
        assert!(messages(Vec::new()).is_empty());
    }
}
