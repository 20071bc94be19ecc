//! The retry policy: what an attempt's result means, and when the next attempt is due.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

use super::model::{AttemptError, DeliveryState};

/// Jitter applied to every backoff: ±20%.
pub const JITTER: f64 = 0.2;
/// The longest a `Retry-After` can push an attempt back.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What an attempt's result means for its delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the delivery succeeded.
    Delivered,
    /// Worth another attempt; `retry_after` is the receiver's floor (429/503 with Retry-After).
    Retry { retry_after: Option<Duration> },
    /// 410 Gone: the receiver asks never to be called again; the subscription is disabled.
    Gone,
    /// Never retried (the SSRF guard refused the destination).
    Refused,
}

/// Classifies an attempt's HTTP status (0 = none) and error class.
pub fn classify(status_code: u32, error: AttemptError, retry_after: Option<Duration>) -> Outcome {
    match error {
        AttemptError::DestinationRefused => return Outcome::Refused,
        AttemptError::None => {}
        _ => return Outcome::Retry { retry_after: None },
    }
    match status_code {
        200..=299 => Outcome::Delivered,
        410 => Outcome::Gone,
        429 | 503 => Outcome::Retry {
            retry_after: retry_after.map(|d| d.min(MAX_RETRY_AFTER)),
        },
        _ => Outcome::Retry { retry_after: None },
    }
}

/// Returns the delay after the `attempt`-th failed attempt (1-based): the schedule's entry, the
/// last entry repeated past its end.
pub fn backoff(schedule: &[Duration], attempt: u32) -> Duration {
    let index = (attempt.max(1) as usize - 1).min(schedule.len().saturating_sub(1));
    schedule
        .get(index)
        .copied()
        .unwrap_or(Duration::from_secs(5))
}

/// Returns `delay` scaled by a random factor in [1 - JITTER, 1 + JITTER].
pub fn jitter(delay: Duration, rng: &mut impl Rng) -> Duration {
    delay.mul_f64(rng.random_range(1.0 - JITTER..=1.0 + JITTER))
}

/// Decides the delivery's next state after attempt number `attempt` (1-based) with `outcome`:
/// the state, and when the next attempt is due if there is one.
pub fn next_step(
    schedule: &[Duration],
    max_attempts: u32,
    attempt: u32,
    outcome: &Outcome,
    now: DateTime<Utc>,
    rng: &mut impl Rng,
) -> (DeliveryState, Option<DateTime<Utc>>) {
    match outcome {
        Outcome::Delivered => (DeliveryState::Succeeded, None),
        Outcome::Gone | Outcome::Refused => (DeliveryState::Dead, None),
        Outcome::Retry { .. } if attempt >= max_attempts => (DeliveryState::Dead, None),
        Outcome::Retry { retry_after } => {
            let wait = jitter(backoff(schedule, attempt), rng);
            // Retry-After is a floor that jitter never lowers.
            let wait = wait.max(retry_after.unwrap_or_default());
            let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(24));
            (DeliveryState::Failed, Some(now + wait))
        }
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or_default().min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn schedule() -> Vec<Duration> {
        vec![secs(5), secs(30), secs(120)]
    }

    #[test]
    fn classification() {
        assert_eq!(classify(200, AttemptError::None, None), Outcome::Delivered);
        assert_eq!(classify(204, AttemptError::None, None), Outcome::Delivered);
        assert_eq!(classify(410, AttemptError::None, None), Outcome::Gone);
        assert_eq!(
            classify(302, AttemptError::None, None),
            Outcome::Retry { retry_after: None }
        );
        assert_eq!(
            classify(500, AttemptError::None, Some(secs(9))),
            Outcome::Retry { retry_after: None }
        );
        assert_eq!(
            classify(429, AttemptError::None, Some(secs(9))),
            Outcome::Retry {
                retry_after: Some(secs(9))
            }
        );
        assert_eq!(
            classify(0, AttemptError::Timeout, None),
            Outcome::Retry { retry_after: None }
        );
        assert_eq!(
            classify(0, AttemptError::DestinationRefused, None),
            Outcome::Refused
        );
    }

    #[test]
    fn backoff_repeats_the_last_delay() {
        assert_eq!(backoff(&schedule(), 1), secs(5));
        assert_eq!(backoff(&schedule(), 3), secs(120));
        assert_eq!(backoff(&schedule(), 9), secs(120));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let mut rng = rng();
        for _ in 0..1000 {
            let d = jitter(secs(100), &mut rng);
            assert!(d >= secs(80) && d <= secs(120), "{d:?}");
        }
    }

    #[test]
    fn retry_after_on_503_beats_a_shorter_backoff() {
        let outcome = classify(503, AttemptError::None, Some(secs(600)));
        let (state, at) = next_step(&schedule(), 11, 1, &outcome, t0(), &mut rng());
        assert_eq!(state, DeliveryState::Failed);
        assert!(at.unwrap() >= t0() + chrono::Duration::seconds(600));
    }

    #[test]
    fn the_policy_is_spent_after_max_attempts() {
        let outcome = Outcome::Retry { retry_after: None };
        assert_eq!(
            next_step(&schedule(), 3, 3, &outcome, t0(), &mut rng()),
            (DeliveryState::Dead, None)
        );
        assert_eq!(
            next_step(&schedule(), 3, 2, &outcome, t0(), &mut rng()).0,
            DeliveryState::Failed
        );
        assert_eq!(
            next_step(&schedule(), 3, 1, &Outcome::Gone, t0(), &mut rng()).0,
            DeliveryState::Dead
        );
        assert_eq!(
            next_step(&schedule(), 3, 1, &Outcome::Delivered, t0(), &mut rng()).0,
            DeliveryState::Succeeded
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        assert_eq!(parse_retry_after("2", t0()), Some(secs(2)));
        assert_eq!(parse_retry_after("999999999", t0()), Some(MAX_RETRY_AFTER));
        let date = (t0() + chrono::Duration::seconds(90)).to_rfc2822();
        assert_eq!(parse_retry_after(&date, t0()), Some(secs(90)));
        assert_eq!(parse_retry_after("soon", t0()), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any `Retry-After` a receiver sends: an answer within 24 h, never a panic.
            #[test]
            fn retry_after_is_bounded_and_never_panics(value in ".{0,64}") {
                if let Some(delay) = parse_retry_after(&value, t0()) {
                    prop_assert!(delay <= MAX_RETRY_AFTER);
                }
            }

            #[test]
            fn delay_seconds_are_read_and_capped(seconds in any::<u64>()) {
                prop_assert_eq!(
                    parse_retry_after(&seconds.to_string(), t0()),
                    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
                );
            }
        }
    }
}
