//! Prefixed, time-ordered ids (`sub_01j…`): a ULID body, lowercase, after a type prefix.

use std::sync::Mutex;

pub const TENANT: &str = "ten";
pub const TOKEN: &str = "tok";
pub const SUBSCRIPTION: &str = "sub";
pub const EVENT: &str = "evt";
pub const DELIVERY: &str = "dlv";
pub const ATTEMPT: &str = "att";
pub const LEASE: &str = "lse";
pub const AGENT_CREDENTIAL: &str = "agc";

static GENERATOR: Mutex<ulid::Generator> = Mutex::new(ulid::Generator::new());

/// Returns a new id with `prefix`, ordered after every id this process made before.
pub fn new(prefix: &str) -> String {
    // A monotonic generator keeps ids made in the same millisecond in creation order, so
    // "newest first" by id is exact within one process.
    let generated = GENERATOR
        .lock()
        .ok()
        .and_then(|mut generator| generator.generate().ok());
    // The generator fails only when the random part overflows within one millisecond.
    let ulid = match generated {
        Some(ulid) => ulid,
        None => ulid::Ulid::new(),
    };
    format!("{prefix}_{}", ulid.to_string().to_ascii_lowercase())
}

/// Returns whether `id` has the shape of an id with `prefix` (it may still not exist).
pub fn has_prefix(id: &str, prefix: &str) -> bool {
    id.len() == prefix.len() + 27
        && id.starts_with(prefix)
        && id.as_bytes()[prefix.len()] == b'_'
        && id[prefix.len() + 1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_ordered() {
        let ids: Vec<String> = (0..1000).map(|_| new(EVENT)).collect();
        assert!(ids.iter().all(|id| has_prefix(id, EVENT)));
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(!has_prefix(&ids[0], SUBSCRIPTION));
        assert!(!has_prefix("evt_short", EVENT));
    }
}
