//! Herald's wire contract: the generated `herald.v1` types and services, the file descriptor set
//! that server reflection serves, timestamp helpers, and the Standard Webhooks signature.

pub mod webhook;

/// The generated `herald.v1` package.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("herald.v1");
}

/// The encoded `FileDescriptorSet` of every `herald.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");

/// Converts a UTC time to a protobuf timestamp.
pub fn timestamp(at: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// Converts a protobuf timestamp to a UTC time; `None` when it is out of range.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// Formats a `DeliveryState` for people: `succeeded`, `dead`, …
pub fn delivery_state_name(state: v1::DeliveryState) -> &'static str {
    use v1::DeliveryState as S;
    match state {
        S::Unspecified => "unspecified",
        S::Pending => "pending",
        S::InFlight => "in_flight",
        S::Succeeded => "succeeded",
        S::Failed => "failed",
        S::Dead => "dead",
    }
}
