//! Event types and the filters that select them: `user.*` matches `user.new` but neither `user`
//! nor `user.profile.updated`; `*` alone, or no filter at all, matches every type.

/// The longest event type or filter, in characters.
pub const MAX_LEN: usize = 128;
/// The most segments in an event type or filter.
pub const MAX_SEGMENTS: usize = 5;

/// Checks an event type against `^[a-z0-9_]+(\.[a-z0-9_]+){0,4}$` and the length limit;
/// returns the problem otherwise.
pub fn check_event_type(event_type: &str) -> Result<(), String> {
    check(event_type, false)
}

/// Checks a filter: an event type in which a segment may be `*`.
pub fn check_filter(filter: &str) -> Result<(), String> {
    check(filter, true)
}

fn check(text: &str, wildcards: bool) -> Result<(), String> {
    if text.is_empty() {
        return Err("must not be empty".into());
    }
    if text.len() > MAX_LEN {
        return Err(format!("must be at most {MAX_LEN} characters"));
    }
    let segments: Vec<&str> = text.split('.').collect();
    if segments.len() > MAX_SEGMENTS {
        return Err(format!(
            "must have at most {MAX_SEGMENTS} dot-separated segments"
        ));
    }
    for segment in segments {
        let valid = (wildcards && segment == "*")
            || (!segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        if !valid {
            let allowed = if wildcards {
                ", _ or a lone *"
            } else {
                " or _"
            };
            return Err(format!(
                "{text:?} is not valid: segments are separated by dots and made of a-z, 0-9{allowed}"
            ));
        }
    }
    Ok(())
}

/// Returns whether one filter selects `event_type`.
pub fn matches(filter: &str, event_type: &str) -> bool {
    if filter == "*" {
        return true;
    }
    let mut filter_segments = filter.split('.');
    let mut type_segments = event_type.split('.');
    loop {
        match (filter_segments.next(), type_segments.next()) {
            (None, None) => return true,
            (Some(f), Some(t)) if f == "*" || f == t => continue,
            _ => return false,
        }
    }
}

/// Returns whether a subscription's filters select `event_type` (an empty list selects all).
pub fn matches_any(filters: &[String], event_type: &str) -> bool {
    filters.is_empty() || filters.iter().any(|filter| matches(filter, event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_match(filter: &str, event_type: &str, expected: bool) {
        assert_eq!(
            matches(filter, event_type),
            expected,
            "{filter} ~ {event_type}"
        );
    }

    #[test]
    fn wildcards_match_exactly_one_segment() {
        check_match("user.*", "user.new", true);
        check_match("user.*", "user", false);
        check_match("user.*", "user.profile.updated", false);
        check_match("*", "user.profile.updated", true);
        check_match("*.new", "company.new", true);
        check_match("user.new", "user.new", true);
        check_match("user.new", "user.newer", false);
        check_match("*.*", "user", false);
    }

    #[test]
    fn empty_filter_list_matches_everything() {
        assert!(matches_any(&[], "attendee_accepted"));
        assert!(!matches_any(&["user.*".into()], "company.new"));
        assert!(matches_any(
            &["user.*".into(), "company.*".into()],
            "company.new"
        ));
    }

    #[test]
    fn event_type_grammar() {
        for good in [
            "user.new",
            "attendee_accepted",
            "billing.invoice.paid",
            "a.b.c.d.e",
            "x1",
        ] {
            assert_eq!(check_event_type(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "User.new",
            "user..new",
            ".user",
            "user.",
            "a.b.c.d.e.f",
            "user.*",
            "user-new",
            "ü",
        ] {
            assert!(check_event_type(bad).is_err(), "{bad}");
        }
        assert!(check_event_type(&"a".repeat(129)).is_err());
        assert!(check_event_type(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn filter_grammar_allows_lone_star_segments() {
        for good in ["*", "user.*", "*.new", "*.*.*"] {
            assert_eq!(check_filter(good), Ok(()), "{good}");
        }
        for bad in ["user*", "**", "user.*x", ""] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn event_type() -> impl Strategy<Value = String> {
            proptest::collection::vec("[a-z0-9_]{1,12}", 1..=MAX_SEGMENTS)
                .prop_map(|segments| segments.join("."))
                .prop_filter("within the length limit", |t| t.len() <= MAX_LEN)
        }

        proptest! {
            /// Any text: an answer, never a panic; what is accepted is a well-formed type.
            #[test]
            fn checks_never_panic(text in ".{0,200}") {
                if check_event_type(&text).is_ok() {
                    prop_assert!(text.len() <= MAX_LEN && !text.contains('*'));
                }
                let _ = check_filter(&text);
                let _ = matches(&text, &text);
            }

            /// A type matches itself, `*`, and itself with any one segment a wildcard; not its
            /// parent nor its child.
            #[test]
            fn filters_match_as_documented(t in event_type(), which in 0usize..MAX_SEGMENTS) {
                prop_assert!(check_event_type(&t).is_ok());
                prop_assert!(matches(&t, &t));
                prop_assert!(matches("*", &t));
                let mut segments: Vec<&str> = t.split('.').collect();
                let n = segments.len();
                segments[which % n] = "*";
                let wildcard = segments.join(".");
                prop_assert!(check_filter(&wildcard).is_ok());
                prop_assert!(matches(&wildcard, &t));
                let child = format!("{t}.x");
                prop_assert!(!matches(&t, &child));
                if n > 1 {
                    prop_assert!(!matches(&t, &t[..t.rfind('.').unwrap()]));
                }
            }
        }
    }
}
