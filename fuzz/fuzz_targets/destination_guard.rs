//! A subscription URL as a tenant writes it, judged by the agent's destination guard: never a
//! panic, and a literal host in a special range (loopback, private, link-local, …) is refused
//! whatever its spelling.
#![no_main]

use herald_agent::guard::{Guard, literal_host, special_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(url) = url::Url::parse(&format!("http://{text}/")) else {
        return;
    };
    let verdict = Guard::new(Vec::new()).check_literal_host(&url);
    if let Some(ip) = literal_host(&url) {
        assert_eq!(verdict.is_err(), special_range(ip).is_some(), "{url}");
    }
});
