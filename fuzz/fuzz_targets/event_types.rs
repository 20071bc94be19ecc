//! Event types and filters as a publisher or a tenant writes them: checked and matched, never a
//! panic; an accepted type matches itself and `*`.
#![no_main]

use herald_control_plane::domain::filter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Two texts from one input (split on bytes: a char boundary is not guaranteed).
    let (left, right) = data.split_at(data.len() / 2);
    let (left, right) = (String::from_utf8_lossy(left), String::from_utf8_lossy(right));
    let _ = filter::check_filter(&left);
    if filter::check_event_type(&right).is_ok() {
        assert!(filter::matches(&right, &right));
        assert!(filter::matches("*", &right));
    }
    let _ = filter::matches(&left, &right);
});
