//! `Retry-After` as a receiver sends it: a delay of at most 24 h, never a panic.
#![no_main]

use herald_control_plane::domain::retry::{MAX_RETRY_AFTER, parse_retry_after};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, i64)| {
    let (value, now) = input;
    let Some(now) = chrono::DateTime::from_timestamp(now % 10_000_000_000, 0) else {
        return;
    };
    if let Some(delay) = parse_retry_after(value, now) {
        assert!(delay <= MAX_RETRY_AFTER);
    }
});
