//! What a failed command prints and its exit code (SPEC 9): 0 ok, 2 usage, 3 not found, 4
//! authentication or permission, 5 invalid argument or precondition, 6 unavailable, 1 else.

use std::error::Error as _;

use tonic::{Code, Status};

/// Exit code: input the CLI refuses itself (bad flags, malformed `--data`).
pub const USAGE: u8 = 2;
pub const NOT_FOUND: u8 = 3;
pub const AUTH: u8 = 4;
pub const INVALID: u8 = 5;
pub const UNAVAILABLE: u8 = 6;
pub const OTHER: u8 = 1;

/// Input the CLI refuses before calling anything (exit code 2). The message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Returns a usage error naming the flag at fault: `--data: not valid JSON …`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

/// How the process ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: u8,
    /// One line for stderr; `None` to print nothing (stdout closed by the reader).
    pub message: Option<String>,
}

impl Exit {
    /// Classifies a command's error; `addr` is the control plane address that was used.
    pub fn classify(err: &anyhow::Error, addr: &str) -> Self {
        if let Some(Usage(message)) = err.downcast_ref::<Usage>() {
            return Self::new(USAGE, message.clone());
        }
        if let Some(status) = err.downcast_ref::<Status>() {
            return Self::from_status(status, addr);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::BrokenPipe
        {
            return Self {
                code: 0,
                message: None,
            };
        }
        Self::new(OTHER, format!("{err:#}"))
    }

    /// Maps a gRPC status: the message says what was wrong and names the field; a hint says
    /// what to do when the server's message cannot know it (which flag to pass).
    pub fn from_status(status: &Status, addr: &str) -> Self {
        let message = status.message().trim();
        match status.code() {
            Code::NotFound => Self::new(NOT_FOUND, message),
            Code::Unauthenticated => Self::new(
                AUTH,
                format!(
                    "{message} (pass --token or set HERALD_TOKEN; the control plane prints an admin token at its first start)"
                ),
            ),
            Code::PermissionDenied => Self::new(AUTH, message),
            Code::InvalidArgument if message.starts_with("tenant_id:") => {
                Self::new(INVALID, format!("{message} (pass --tenant TENANT_ID)"))
            }
            Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange => Self::new(INVALID, message),
            Code::Unavailable if is_connect_error(status) => Self::new(
                UNAVAILABLE,
                format!(
                    "cannot reach the control plane at {addr} ({}); start one with \
                     `scripts/start` in Herald's repository (or `herald-control-plane`), or \
                     point --addr (HERALD_ADDR) at yours",
                    connect_reason(status)
                ),
            ),
            Code::Unavailable => {
                Self::new(UNAVAILABLE, format!("control plane unavailable: {message}"))
            }
            Code::DeadlineExceeded => {
                Self::new(OTHER, format!("no reply from {addr} in time: {message}"))
            }
            code => Self::new(OTHER, format!("{message} ({})", code.description())),
        }
    }

    fn new(code: u8, message: impl Into<String>) -> Self {
        let message: String = message.into();
        // One line, whatever the server put in its message.
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        Self {
            code,
            message: Some(message),
        }
    }
}

/// Returns whether an `UNAVAILABLE` status comes from the transport (no connection) rather than
/// from the control plane (e.g. its storage is down).
fn is_connect_error(status: &Status) -> bool {
    status.source().is_some()
        || ["connect", "connection", "transport", "dns"]
            .iter()
            .any(|word| status.message().to_ascii_lowercase().contains(word))
}

/// Returns the innermost cause of a transport failure: `Connection refused (os error 111)`.
fn connect_reason(status: &Status) -> String {
    let mut reason = status.message().to_owned();
    let mut source = status.source();
    while let Some(err) = source {
        reason = err.to_string();
        source = err.source();
    }
    let reason = reason.trim();
    if reason.is_empty() {
        "connection failed".to_owned()
    } else {
        reason.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(status: Status) -> u8 {
        Exit::from_status(&status, "http://127.0.0.1:1").code
    }

    #[test]
    fn status_codes_map_to_spec_exit_codes() {
        assert_eq!(code(Status::not_found("subscription sub_1 not found")), 3);
        assert_eq!(code(Status::unauthenticated("authorization: unknown")), 4);
        assert_eq!(code(Status::permission_denied("needs an admin token")), 4);
        assert_eq!(code(Status::invalid_argument("url: scheme")), 5);
        assert_eq!(code(Status::failed_precondition("in flight")), 5);
        assert_eq!(code(Status::already_exists("idempotency_key: reused")), 5);
        assert_eq!(
            code(Status::unavailable("storage unavailable; retry later")),
            6
        );
        assert_eq!(code(Status::internal("internal error (id 1)")), 1);
        assert_eq!(code(Status::resource_exhausted("payload: too large")), 1);
    }

    #[test]
    fn usage_errors_exit_2_and_others_1() {
        let exit = Exit::classify(&usage("--data: not valid JSON"), "a");
        assert_eq!(exit.code, 2);
        assert_eq!(exit.message.as_deref(), Some("--data: not valid JSON"));
        assert_eq!(Exit::classify(&anyhow::anyhow!("boom"), "a").code, 1);
    }

    #[test]
    fn messages_are_one_line_and_hint_at_the_flag() {
        let exit = Exit::from_status(
            &Status::invalid_argument("tenant_id: an admin token must name\nthe tenant"),
            "a",
        );
        assert_eq!(
            exit.message.as_deref(),
            Some("tenant_id: an admin token must name the tenant (pass --tenant TENANT_ID)")
        );
    }
}
