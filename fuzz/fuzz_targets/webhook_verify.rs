//! Standard Webhooks verification of whatever a receiver (or `herald listen`) is sent: an
//! answer, never a panic (an extreme `webhook-timestamp` overflowed once).
#![no_main]

use herald_proto::webhook::{Secret, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, &str, &[u8], i64, i64)| {
    let (id, timestamp, signatures, body, now, tolerance) = input;
    let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("a valid secret");
    let _ = verify(&secret, Some(id), Some(timestamp), Some(signatures), body, now, tolerance);
    let _ = Secret::parse(id);
});
