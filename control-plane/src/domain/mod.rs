//! Herald's delivery rules as plain code: ids, event-type filters, input validation, the retry
//! schedule, attempt outcomes, leases and endpoint health. No runtime, database, gRPC or clock:
//! time and randomness are arguments, so every rule is unit-tested without IO.

pub mod filter;
pub mod health;
pub mod ids;
pub mod model;
pub mod payload_filter;
pub mod retry;
pub mod throttle;
pub mod validate;
