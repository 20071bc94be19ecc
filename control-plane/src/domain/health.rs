//! Endpoint health: when Herald disables a subscription on its own.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::retry::Outcome;

/// Why a subscription is disabled: the kind (a metric label) and the sentence users see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disable {
    /// `gone` (the endpoint answered 410) or `failing` (no success for `disable_after`).
    pub kind: &'static str,
    pub reason: String,
}

/// Returns why to disable a subscription after an attempt, or `None` to keep it.
/// `failing_since` is the first failure since the last success (including this attempt).
pub fn disable_reason(
    outcome: &Outcome,
    status_code: u32,
    failing_since: Option<DateTime<Utc>>,
    disable_after: Duration,
    now: DateTime<Utc>,
) -> Option<Disable> {
    match outcome {
        Outcome::Gone => Some(Disable {
            kind: "gone",
            reason: format!("the endpoint answered {status_code} Gone"),
        }),
        Outcome::Delivered | Outcome::Refused => None,
        Outcome::Retry { .. } => {
            let since = failing_since?;
            let failing_for = (now - since).to_std().unwrap_or_default();
            (failing_for >= disable_after).then(|| Disable {
                kind: "failing",
                reason: format!(
                    "no successful delivery for {} while attempts kept failing",
                    humantime::format_duration(Duration::from_secs(failing_for.as_secs()))
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn gone_disables_at_once() {
        let disable = disable_reason(&Outcome::Gone, 410, None, Duration::from_secs(10), t(0));
        assert_eq!(disable.map(|d| d.kind), Some("gone"));
    }

    #[test]
    fn failures_disable_only_after_the_window() {
        let retry = Outcome::Retry { retry_after: None };
        let window = Duration::from_secs(60);
        assert_eq!(disable_reason(&retry, 500, Some(t(0)), window, t(59)), None);
        assert_eq!(
            disable_reason(&retry, 500, Some(t(0)), window, t(60)).map(|d| d.kind),
            Some("failing")
        );
        assert_eq!(disable_reason(&retry, 500, None, window, t(600)), None);
        assert_eq!(
            disable_reason(&Outcome::Delivered, 200, Some(t(0)), window, t(600)),
            None
        );
    }
}
