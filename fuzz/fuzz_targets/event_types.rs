//! Event types and filters as a publisher or a tenant writes them: checked and matched, never a
//! panic; an accepted type matches itself and `*`.
#![no_main]

use herald_control_plane::domain::filter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (left, right) = text.split_at(text.len() / 2);
    let _ = filter::check_filter(left);
    if filter::check_event_type(right).is_ok() {
        assert!(filter::matches(right, right));
        assert!(filter::matches("*", right));
    }
    let _ = filter::matches(left, right);
});
