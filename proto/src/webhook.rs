//! Standard Webhooks headers: signing (the control plane signs every attempt) and verification
//! (`herald listen`, tests). Pure functions over bytes; the clock is an argument.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the message id (Herald's event id).
pub const HEADER_ID: &str = "webhook-id";
/// The header carrying the send time in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying one or more space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The prefix of every signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// How far a timestamp may be from the receiver's clock (Standard Webhooks' recommendation).
pub const DEFAULT_TOLERANCE_S: i64 = 5 * 60;

/// A signing secret decoded to its key bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

/// Why a secret or a signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("secret: must be whsec_ followed by base64")]
    MalformedSecret,
    #[error("{HEADER_ID}, {HEADER_TIMESTAMP} and {HEADER_SIGNATURE} headers are required")]
    MissingHeader,
    #[error("{HEADER_TIMESTAMP}: not a unix time in seconds")]
    MalformedTimestamp,
    #[error("{HEADER_TIMESTAMP}: outside the tolerance of {DEFAULT_TOLERANCE_S} s")]
    TimestampOutOfTolerance,
    #[error("{HEADER_SIGNATURE}: no signature matches")]
    NoMatchingSignature,
}

impl Secret {
    /// Parses `whsec_<base64>` (a bare base64 string is accepted too, as other libraries do).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = BASE64.decode(encoded).map_err(|_| Error::MalformedSecret)?;
        if key.is_empty() {
            return Err(Error::MalformedSecret);
        }
        Ok(Self(key))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(key: Vec<u8>) -> Self {
        Self(key)
    }

    /// Formats the secret as `whsec_<base64>`.
    pub fn to_text(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.0))
    }

    /// Returns `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Returns the `webhook-signature` value: one signature per secret, space-separated.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a Secret>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a webhook as a receiver does: the timestamp within `tolerance_s` of `now` and at
/// least one `v1` signature of the header made with `secret`.
pub fn verify(
    secret: &Secret,
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    now: i64,
    tolerance_s: i64,
) -> Result<(), Error> {
    let (Some(id), Some(timestamp), Some(signatures)) = (id, timestamp, signatures) else {
        return Err(Error::MissingHeader);
    };
    let timestamp: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| Error::MalformedTimestamp)?;
    // `abs_diff`: an extreme timestamp (i64::MIN) must not overflow.
    if now.abs_diff(timestamp) > tolerance_s.unsigned_abs() {
        return Err(Error::TimestampOutOfTolerance);
    }
    let expected = secret.sign(id, timestamp, body);
    let expected = expected.as_bytes();
    let matches = signatures.split_whitespace().any(|candidate| {
        // Constant-time comparison: a receiver must not leak how much of a forgery matched.
        candidate.len() == expected.len()
            && candidate
                .bytes()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err(Error::NoMatchingSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of the Standard Webhooks specification.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        assert_eq!(
            secret.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY),
            SPEC_SIGNATURE
        );
    }

    #[test]
    fn verifies_with_the_standardwebhooks_crate() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let now = chrono::Utc::now().timestamp();
        let body = br#"{"type":"user.new"}"#;
        let mut headers = http::HeaderMap::new();
        headers.insert(HEADER_ID, "evt_1".parse().unwrap());
        headers.insert(HEADER_TIMESTAMP, now.to_string().parse().unwrap());
        let other = Secret::parse("whsec_c2Vjb25kLXNlY3JldC1ieXRlcy0xMjM0NTY=").unwrap();
        let value = signature_header([&other, &secret], "evt_1", now, body);
        headers.insert(HEADER_SIGNATURE, value.parse().unwrap());
        standardwebhooks::Webhook::new(SPEC_SECRET)
            .unwrap()
            .verify(body, &headers)
            .unwrap();
    }

    #[test]
    fn verify_accepts_any_listed_secret_and_refuses_others() {
        let old = Secret::from_bytes(b"old-key-bytes".to_vec());
        let new = Secret::from_bytes(b"new-key-bytes".to_vec());
        let stranger = Secret::from_bytes(b"stranger".to_vec());
        let header = signature_header([&new, &old], "evt_1", 1000, b"{}");
        let check = |secret: &Secret| {
            verify(
                secret,
                Some("evt_1"),
                Some("1000"),
                Some(&header),
                b"{}",
                1010,
                300,
            )
        };
        assert_eq!(check(&old), Ok(()));
        assert_eq!(check(&new), Ok(()));
        assert_eq!(check(&stranger), Err(Error::NoMatchingSignature));
    }

    #[test]
    fn verify_refuses_stale_timestamps_and_missing_headers() {
        let key = Secret::from_bytes(b"k".to_vec());
        let sig = key.sign("evt_1", 1000, b"{}");
        assert_eq!(
            verify(
                &key,
                Some("evt_1"),
                Some("1000"),
                Some(&sig),
                b"{}",
                2000,
                300
            ),
            Err(Error::TimestampOutOfTolerance)
        );
        assert_eq!(
            verify(&key, None, Some("1000"), Some(&sig), b"{}", 1000, 300),
            Err(Error::MissingHeader)
        );
        assert_eq!(
            verify(&key, Some("evt_1"), Some("x"), Some(&sig), b"{}", 1000, 300),
            Err(Error::MalformedTimestamp)
        );
    }

    #[test]
    fn secrets_round_trip_and_malformed_ones_are_refused() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        assert_eq!(secret.to_text(), SPEC_SECRET);
        assert_eq!(Secret::parse("whsec_!!!"), Err(Error::MalformedSecret));
        assert_eq!(Secret::parse("whsec_"), Err(Error::MalformedSecret));
    }

    /// A regression: `(now - timestamp).abs()` overflowed (a panic in debug builds).
    #[test]
    fn an_extreme_timestamp_is_refused_not_a_panic() {
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        for (timestamp, now) in [
            (i64::MIN, 1_700_000_000),
            (i64::MAX, -1),
            (i64::MIN, i64::MAX),
        ] {
            let result = verify(
                &secret,
                Some("msg_1"),
                Some(&timestamp.to_string()),
                Some("v1,AAAA"),
                b"{}",
                now,
                300,
            );
            assert_eq!(result, Err(Error::TimestampOutOfTolerance));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever a receiver is sent, `verify` answers and never panics: extreme timestamps,
            /// garbage signatures, any id.
            #[test]
            fn verify_never_panics_on_any_header(
                id in proptest::option::of(".{0,40}"),
                timestamp in proptest::option::of(prop_oneof![
                    any::<i64>().prop_map(|t| t.to_string()),
                    ".{0,30}",
                ]),
                signatures in proptest::option::of(".{0,200}"),
                body in proptest::collection::vec(any::<u8>(), 0..256),
                now in any::<i64>(),
                tolerance in any::<i64>(),
            ) {
                let secret = Secret::parse(SPEC_SECRET).unwrap();
                let _ = verify(&secret, id.as_deref(), timestamp.as_deref(), signatures.as_deref(), &body, now, tolerance);
            }

            /// What is signed verifies, with the same secret only, within the tolerance only.
            #[test]
            fn sign_then_verify_round_trips(
                id in "[a-z_0-9]{1,40}",
                timestamp in 0i64..4_000_000_000,
                skew in -600i64..600,
                body in proptest::collection::vec(any::<u8>(), 0..512),
            ) {
                let secret = Secret::parse(SPEC_SECRET).unwrap();
                let other = Secret::parse("whsec_dGhlIG90aGVyIHNlY3JldCBvZiB0aGlzIHRlc3Q=").unwrap();
                let header = signature_header(std::slice::from_ref(&secret), &id, timestamp, &body);
                let ts = timestamp.to_string();
                let check = |secret: &Secret| verify(secret, Some(&id), Some(&ts), Some(&header), &body, timestamp + skew, 300);
                prop_assert_eq!(check(&secret).is_ok(), skew.abs() <= 300);
                prop_assert!(check(&other).is_err());
            }
        }
    }
}
