//! Input validation: every field a caller sends is checked once here, and a refusal names the
//! field first (`url: scheme must be http or https`).

use std::time::Duration;

use super::filter;

/// A refused field: displayed as `field: problem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    pub field: &'static str,
    pub problem: String,
}

impl Invalid {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Limits that come from configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub https_only: bool,
}

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_URL_CHARS: usize = 2048;
pub const MAX_FILTERS: usize = 50;
pub const MAX_API_KEY_CHARS: usize = 1024;
pub const MAX_HEADER_NAME_CHARS: usize = 128;
pub const MAX_REGION_CHARS: usize = 64;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 256;
pub const MAX_ENTITY_TYPE_CHARS: usize = 128;
pub const MAX_ENTITY_ID_CHARS: usize = 256;
pub const MAX_ACTION_CHARS: usize = 64;
pub const DEFAULT_API_KEY_HEADER: &str = "X-API-Key";
pub const DEFAULT_TIMEOUT_MS: u32 = 15_000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 11;
pub const DEFAULT_MAX_CONCURRENCY: u32 = 64;
pub const MAX_RATE_LIMIT_PER_S: u32 = 100_000;
/// The action reserved for test events.
pub const TEST_ACTION: &str = "test";
/// The event type of test events.
pub const TEST_EVENT_TYPE: &str = "test";

/// Headers Herald sets itself; an API key may not use their names.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "traceparent",
    "tracestate",
    "transfer-encoding",
    "connection",
];

/// Checks a display name (tenant, token, subscription): 1 to 200 characters, no control characters.
pub fn name(field: &'static str, value: &str) -> Result<String, Invalid> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if trimmed.chars().count() > MAX_NAME_CHARS {
        return Err(Invalid::new(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(trimmed.to_owned())
}

/// Checks a receiver URL: absolute http(s) with a host, at most 2048 characters.
pub fn url(value: &str, limits: &Limits) -> Result<String, Invalid> {
    const FIELD: &str = "url";
    if value.is_empty() {
        return Err(Invalid::new(FIELD, "must not be empty"));
    }
    if value.chars().count() > MAX_URL_CHARS {
        return Err(Invalid::new(
            FIELD,
            format!("must be at most {MAX_URL_CHARS} characters"),
        ));
    }
    let parsed = url::Url::parse(value)
        .map_err(|err| Invalid::new(FIELD, format!("not a valid absolute URL ({err})")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if limits.https_only => {
            return Err(Invalid::new(
                FIELD,
                "scheme must be https (HERALD_HTTPS_ONLY is set)",
            ));
        }
        "http" => {}
        _ => return Err(Invalid::new(FIELD, "scheme must be http or https")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Invalid::new(FIELD, "must have a host"));
    }
    if parsed.fragment().is_some() {
        return Err(Invalid::new(FIELD, "must not have a fragment"));
    }
    Ok(value.to_owned())
}

/// Checks a subscription's filters: at most 50, each valid; duplicates are removed.
pub fn filters(values: &[String]) -> Result<Vec<String>, Invalid> {
    const FIELD: &str = "event_types";
    if values.len() > MAX_FILTERS {
        return Err(Invalid::new(
            FIELD,
            format!("must have at most {MAX_FILTERS} entries"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for value in values {
        filter::check_filter(value).map_err(|problem| Invalid::new(FIELD, problem))?;
        if !out.contains(value) {
            out.push(value.clone());
        }
    }
    Ok(out)
}

/// Checks a receiver API key (empty = none): a valid header value, at most 1024 characters.
pub fn api_key(value: &str) -> Result<Option<String>, Invalid> {
    const FIELD: &str = "api_key";
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_API_KEY_CHARS {
        return Err(Invalid::new(
            FIELD,
            format!("must be at most {MAX_API_KEY_CHARS} characters"),
        ));
    }
    // RFC 9110 field-value: visible ASCII and spaces/tabs inside, no leading or trailing blank.
    let valid = value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b))
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t']);
    if !valid {
        return Err(Invalid::new(
            FIELD,
            "must be printable ASCII without leading or trailing blanks",
        ));
    }
    Ok(Some(value.to_owned()))
}

/// Checks the API key's header name (empty = `X-API-Key`): an RFC 9110 token Herald does not set.
pub fn api_key_header(value: &str) -> Result<String, Invalid> {
    const FIELD: &str = "api_key_header";
    if value.is_empty() {
        return Ok(DEFAULT_API_KEY_HEADER.to_owned());
    }
    if value.len() > MAX_HEADER_NAME_CHARS {
        return Err(Invalid::new(
            FIELD,
            format!("must be at most {MAX_HEADER_NAME_CHARS} characters"),
        ));
    }
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !value.bytes().all(is_tchar) {
        return Err(Invalid::new(
            FIELD,
            format!("{value:?} is not a valid header name (RFC 9110 token characters only)"),
        ));
    }
    if RESERVED_HEADERS.contains(&value.to_ascii_lowercase().as_str()) {
        return Err(Invalid::new(
            FIELD,
            format!("{value} is set by Herald itself; choose another header"),
        ));
    }
    Ok(value.to_owned())
}

/// Checks a region name (empty = any region): lowercase letters, digits and dashes.
pub fn region(value: &str) -> Result<Option<String>, Invalid> {
    const FIELD: &str = "region";
    if value.is_empty() {
        return Ok(None);
    }
    let valid = value.len() <= MAX_REGION_CHARS
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return Err(Invalid::new(
            FIELD,
            format!("must be at most {MAX_REGION_CHARS} characters of a-z, 0-9, - and _"),
        ));
    }
    Ok(Some(value.to_owned()))
}

/// Applies a default of `default` for 0 and checks `min..=max`.
pub fn ranged(
    field: &'static str,
    value: u32,
    default: u32,
    min: u32,
    max: u32,
) -> Result<u32, Invalid> {
    if value == 0 {
        return Ok(default);
    }
    if !(min..=max).contains(&value) {
        return Err(Invalid::new(
            field,
            format!("must be between {min} and {max} (0 for the default of {default})"),
        ));
    }
    Ok(value)
}

pub fn timeout(value: u32) -> Result<Duration, Invalid> {
    ranged("timeout_ms", value, DEFAULT_TIMEOUT_MS, 1_000, 60_000)
        .map(|ms| Duration::from_millis(u64::from(ms)))
}

pub fn max_attempts(value: u32) -> Result<u32, Invalid> {
    ranged("max_attempts", value, DEFAULT_MAX_ATTEMPTS, 1, 50)
}

pub fn max_concurrency(value: u32) -> Result<u32, Invalid> {
    ranged("max_concurrency", value, DEFAULT_MAX_CONCURRENCY, 1, 1024)
}

/// The most custom headers of a subscription.
pub const MAX_CUSTOM_HEADERS: usize = 20;
/// The longest custom header value, in bytes.
pub const MAX_CUSTOM_HEADER_VALUE: usize = 1024;
/// Hop-by-hop headers (RFC 9110 7.6.1), which a sender must not forward as its own.
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Checks a subscription's custom headers against its API-key header: at most 20, names valid
/// and not Herald's own (nor hop-by-hop, `webhook-*`, or the API-key header), no name twice,
/// values valid header values.
pub fn custom_headers(
    headers: &[crate::domain::model::CustomHeader],
    api_key_header: &str,
) -> Result<(), Invalid> {
    const FIELD: &str = "headers";
    if headers.len() > MAX_CUSTOM_HEADERS {
        return Err(Invalid::new(
            FIELD,
            format!("at most {MAX_CUSTOM_HEADERS} headers"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for header in headers {
        let name = header.name.as_str();
        let lower = name.to_ascii_lowercase();
        if name.is_empty() || name.len() > MAX_HEADER_NAME_CHARS {
            return Err(Invalid::new(
                FIELD,
                format!("a header name must be 1 to {MAX_HEADER_NAME_CHARS} characters"),
            ));
        }
        let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if !name.bytes().all(is_tchar) {
            return Err(Invalid::new(
                FIELD,
                format!("{name:?} is not a valid header name (RFC 9110 token characters only)"),
            ));
        }
        if RESERVED_HEADERS.contains(&lower.as_str())
            || HOP_BY_HOP.contains(&lower.as_str())
            || lower.starts_with("webhook-")
        {
            return Err(Invalid::new(
                FIELD,
                format!("{name} is set by Herald or by HTTP itself; choose another header"),
            ));
        }
        if lower == api_key_header.to_ascii_lowercase() {
            return Err(Invalid::new(
                FIELD,
                format!("{name} carries the API key; set it with api_key"),
            ));
        }
        if !seen.insert(lower) {
            return Err(Invalid::new(FIELD, format!("{name} is given twice")));
        }
        let value = header.value.as_str();
        let valid = value.len() <= MAX_CUSTOM_HEADER_VALUE
            && value
                .bytes()
                .all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b));
        if !valid {
            return Err(Invalid::new(
                FIELD,
                format!(
                    "the value of {name} must be printable ASCII of at most \
                     {MAX_CUSTOM_HEADER_VALUE} bytes"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks a payload filter (see `domain::payload_filter`); empty: none.
pub fn payload_filter(
    text: &str,
) -> Result<Option<crate::domain::payload_filter::PayloadFilter>, Invalid> {
    crate::domain::payload_filter::PayloadFilter::parse(text)
        .map_err(|problem| Invalid::new("payload_filter", problem))
}

pub fn rate_limit(value: u32) -> Result<u32, Invalid> {
    if value > MAX_RATE_LIMIT_PER_S {
        return Err(Invalid::new(
            "rate_limit_per_s",
            format!("must be at most {MAX_RATE_LIMIT_PER_S} (0 for no limit)"),
        ));
    }
    Ok(value)
}

/// Checks a payload: a JSON object no larger than the limit. The bytes are kept as given.
pub fn payload(value: &str, limits: &Limits) -> Result<(), PayloadError> {
    if value.len() > limits.max_payload_bytes {
        return Err(PayloadError::TooLarge {
            size: value.len(),
            limit: limits.max_payload_bytes,
        });
    }
    if !value.trim_start().starts_with('{') {
        return Err(PayloadError::Invalid(Invalid::new(
            "payload",
            "must be a JSON object",
        )));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(value).map_err(|err| {
        PayloadError::Invalid(Invalid::new("payload", format!("not valid JSON ({err})")))
    })?;
    Ok(())
}

/// Why a payload was refused: too large (RESOURCE_EXHAUSTED) or malformed (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload: {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error(transparent)]
    Invalid(Invalid),
}

/// Checks an optional short text field (printable, bounded).
pub fn short_text(field: &'static str, value: &str, max: usize) -> Result<Option<String>, Invalid> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > max {
        return Err(Invalid::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(Some(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 1024,
            https_only: false,
        }
    }

    fn field_of<T: std::fmt::Debug>(result: Result<T, Invalid>) -> &'static str {
        result.unwrap_err().field
    }

    #[test]
    fn urls() {
        assert!(url("https://example.com/hook", &limits()).is_ok());
        assert!(url("http://127.0.0.1:8080/x?y=1", &limits()).is_ok());
        assert_eq!(
            url("ftp://example.com", &limits()).unwrap_err().to_string(),
            "url: scheme must be http or https"
        );
        assert_eq!(field_of(url("not a url", &limits())), "url");
        assert_eq!(field_of(url("", &limits())), "url");
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert_eq!(field_of(url(&long, &limits())), "url");
        let https_only = Limits {
            https_only: true,
            ..limits()
        };
        assert!(url("http://example.com", &https_only).is_err());
        assert!(url("https://example.com", &https_only).is_ok());
    }

    #[test]
    fn header_names_and_values() {
        assert_eq!(api_key_header("").unwrap(), "X-API-Key");
        assert_eq!(api_key_header("Authorization").unwrap(), "Authorization");
        assert!(api_key_header("Bad Header").is_err());
        assert!(api_key_header("webhook-signature").is_err());
        assert!(api_key_header("Content-Type").is_err());
        assert_eq!(api_key("").unwrap(), None);
        assert!(api_key("key\r\nInjected: yes").is_err());
        assert!(api_key(" padded").is_err());
        assert_eq!(
            api_key("sk_live_123").unwrap().as_deref(),
            Some("sk_live_123")
        );
    }

    #[test]
    fn ranges_default_on_zero() {
        assert_eq!(timeout(0).unwrap(), Duration::from_millis(15_000));
        assert!(timeout(999).is_err());
        assert!(timeout(60_001).is_err());
        assert_eq!(max_attempts(0).unwrap(), 11);
        assert!(max_attempts(51).is_err());
        assert_eq!(max_concurrency(0).unwrap(), 64);
        assert!(max_concurrency(1025).is_err());
        assert!(rate_limit(100_001).is_err());
    }

    #[test]
    fn payloads() {
        assert!(payload(r#"{"a":1}"#, &limits()).is_ok());
        assert!(matches!(
            payload("[1]", &limits()),
            Err(PayloadError::Invalid(_))
        ));
        assert!(matches!(
            payload("{", &limits()),
            Err(PayloadError::Invalid(_))
        ));
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(2000));
        assert!(matches!(
            payload(&big, &limits()),
            Err(PayloadError::TooLarge { .. })
        ));
    }

    #[test]
    fn names_filters_regions() {
        assert!(name("name", "  ").is_err());
        assert_eq!(name("name", " Acme ").unwrap(), "Acme");
        assert!(name("name", &"x".repeat(201)).is_err());
        assert_eq!(
            filters(&["user.*".into(), "user.*".into()]).unwrap(),
            vec!["user.*"]
        );
        assert!(filters(&["User".into()]).is_err());
        assert!(filters(&vec!["a".to_string(); 51]).is_err());
        assert_eq!(region("").unwrap(), None);
        assert!(region("EU West").is_err());
    }

    /// A fuzzing finding, kept: a number beyond f64 is JSON by the grammar (RFC 8259 leaves
    /// the range to implementations); Herald accepts it and delivers the bytes as published.
    #[test]
    fn numbers_of_any_size_are_json() {
        let limits = Limits {
            max_payload_bytes: 4096,
            https_only: false,
        };
        assert!(payload("\r\r{\"+\":443.444e444}", &limits).is_ok());
        assert!(payload("{\"n\": 1e999}", &limits).is_ok());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any payload text: an answer, never a panic; what is accepted is a JSON object
            /// within the limit.
            #[test]
            fn payloads_are_judged_without_a_panic(text in ".{0,300}", limit in 1usize..400) {
                let limits = Limits { max_payload_bytes: limit, https_only: false };
                if payload(&text, &limits).is_ok() {
                    prop_assert!(text.len() <= limit);
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                    prop_assert!(value.is_object());
                }
            }

            /// JSON objects within the limit are accepted.
            #[test]
            fn json_objects_are_accepted(keys in proptest::collection::vec("[a-z]{1,8}", 0..8)) {
                let object: serde_json::Map<String, serde_json::Value> = keys
                    .into_iter()
                    .map(|k| (k, serde_json::Value::from(1)))
                    .collect();
                let text = serde_json::Value::Object(object).to_string();
                let limits = Limits { max_payload_bytes: 4096, https_only: false };
                prop_assert!(payload(&text, &limits).is_ok());
            }
        }
    }
}
