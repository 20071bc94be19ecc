//! Herald's control plane: owns tenants, tokens, subscriptions, events, deliveries and attempts;
//! validates input; fans events out; leases delivery jobs to agents; records every result.

pub mod config;
pub mod domain;
pub mod storage;
