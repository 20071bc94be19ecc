//! API calls.
