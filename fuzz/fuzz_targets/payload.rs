//! Event payloads as a publisher sends them: validated within the limits, never a panic; what
//! is accepted is a JSON object by the grammar (numbers of any size: `1e999` is JSON, and the
//! payload is delivered byte for byte).
#![no_main]

use herald_control_plane::domain::validate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let limits = validate::Limits {
        max_payload_bytes: 4096,
        https_only: false,
    };
    if validate::payload(text, &limits).is_ok() {
        assert!(text.len() <= 4096);
        assert!(text.trim_start().starts_with('{'));
        assert!(serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
    }
});
