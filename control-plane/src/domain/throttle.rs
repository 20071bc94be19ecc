//! What failed authentication costs: a token bucket of failures per peer address, and a short
//! memory of token hashes that failed. Only failures take from a bucket, so a peer that floods
//! with bad tokens is refused without database reads while a valid token from the same address
//! (one that verified recently) is still served.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures a peer may make in a burst, and refilled per second.
const BURST: f64 = 20.0;
const PER_SECOND: f64 = 10.0;
/// How long a token hash that failed is refused without reading the database.
pub const FAILED_TTL: Duration = Duration::from_secs(5);
/// How long a token that verified is allowed a database read from a throttled peer.
const VALID_TTL: Duration = Duration::from_secs(600);
/// Most peers and token hashes remembered: beyond, the oldest memories are dropped.
const MAX_ENTRIES: usize = 10_000;

/// The verdict before a token is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Look it up.
    Check,
    /// The same token failed moments ago: refused, no database read.
    KnownBad,
    /// The peer spent its failures: refused, no database read.
    Throttled,
}

#[derive(Debug, Default)]
pub struct FailureThrottle {
    buckets: HashMap<IpAddr, (f64, Instant)>,
    failed: HashMap<String, Instant>,
    valid: HashMap<String, Instant>,
}

impl FailureThrottle {
    /// Decides whether a token (by hash) from `peer` is worth a database read.
    pub fn verdict(&mut self, peer: Option<IpAddr>, token_hash: &str, now: Instant) -> Verdict {
        if self
            .failed
            .get(token_hash)
            .is_some_and(|at| now.saturating_duration_since(*at) < FAILED_TTL)
        {
            return Verdict::KnownBad;
        }
        let recently_valid = self
            .valid
            .get(token_hash)
            .is_some_and(|at| now.saturating_duration_since(*at) < VALID_TTL);
        let spent = peer.is_some_and(|peer| self.tokens(peer, now) < 1.0);
        if spent && !recently_valid {
            return Verdict::Throttled;
        }
        Verdict::Check
    }

    /// A token failed: the peer's bucket pays for it, and the hash is remembered.
    pub fn failed(&mut self, peer: Option<IpAddr>, token_hash: &str, now: Instant) {
        if let Some(peer) = peer {
            let tokens = self.tokens(peer, now);
            bound(&mut self.buckets);
            self.buckets.insert(peer, ((tokens - 1.0).max(0.0), now));
        }
        bound(&mut self.failed);
        self.failed.insert(token_hash.to_owned(), now);
    }

    /// A token verified.
    pub fn valid(&mut self, token_hash: &str, now: Instant) {
        self.failed.remove(token_hash);
        bound(&mut self.valid);
        self.valid.insert(token_hash.to_owned(), now);
    }

    /// Forgets every token verdict (a revocation).
    pub fn forget_tokens(&mut self) {
        self.valid.clear();
        self.failed.clear();
    }

    fn tokens(&self, peer: IpAddr, now: Instant) -> f64 {
        match self.buckets.get(&peer) {
            Some((tokens, at)) => {
                (tokens + now.saturating_duration_since(*at).as_secs_f64() * PER_SECOND).min(BURST)
            }
            None => BURST,
        }
    }
}

/// Keeps a memory under [`MAX_ENTRIES`] (emptied when full: a flood of distinct keys cannot grow
/// it without limit).
fn bound<K, V>(map: &mut HashMap<K, V>) {
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_are_throttled_per_peer() {
        let t0 = Instant::now();
        let mut throttle = FailureThrottle::default();
        let flooder: IpAddr = "127.0.0.2".parse().unwrap();
        let other: IpAddr = "127.0.0.1".parse().unwrap();
        throttle.valid("good", t0);
        for i in 0..20 {
            let bad = format!("bad{i}");
            assert_eq!(throttle.verdict(Some(flooder), &bad, t0), Verdict::Check);
            throttle.failed(Some(flooder), &bad, t0);
        }
        // Spent: unknown tokens from the flooder are refused without a look-up...
        assert_eq!(
            throttle.verdict(Some(flooder), "bad99", t0),
            Verdict::Throttled
        );
        // ...a token that failed is refused for a few seconds, whoever sends it...
        assert_eq!(throttle.verdict(Some(other), "bad0", t0), Verdict::KnownBad);
        // ...a valid token from the same address and any token from another are looked up.
        assert_eq!(throttle.verdict(Some(flooder), "good", t0), Verdict::Check);
        assert_eq!(throttle.verdict(Some(other), "new", t0), Verdict::Check);
        // The bucket refills.
        let later = t0 + Duration::from_millis(200);
        assert_eq!(
            throttle.verdict(Some(flooder), "bad99", later),
            Verdict::Check
        );
        assert_eq!(
            throttle.verdict(Some(other), "bad0", t0 + FAILED_TTL),
            Verdict::Check
        );
    }

    #[test]
    fn memories_stay_bounded() {
        let t0 = Instant::now();
        let mut throttle = FailureThrottle::default();
        for i in 0..(MAX_ENTRIES * 3) {
            let peer = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            throttle.failed(Some(peer), &format!("bad{i}"), t0);
        }
        assert!(throttle.failed.len() <= MAX_ENTRIES);
        assert!(throttle.buckets.len() <= MAX_ENTRIES);
    }
}
