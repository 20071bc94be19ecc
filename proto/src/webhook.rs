//! Standard Webhooks headers: signing (the control plane signs every attempt) and verification
//! (`herald listen`, tests), in both of the specification's schemes: `v1` (HMAC-SHA256 with a
//! shared `whsec_` secret) and `v1a` (Ed25519: the sender keeps a `whsk_` private key, the receiver
//! holds only the `whpk_` public key, so a leaked receiver key cannot forge a request). Pure
//! functions over bytes; the clock is an argument.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::Signer as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the message id (Herald's event id).
pub const HEADER_ID: &str = "webhook-id";
/// The header carrying the send time in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying one or more space-separated `v1,<base64>` / `v1a,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The prefix of every HMAC signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The prefix of an Ed25519 private key (base64 of its 32-byte seed).
pub const PRIVATE_KEY_PREFIX: &str = "whsk_";
/// The prefix of an Ed25519 public key (base64 of its 32 bytes).
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// How far a timestamp may be from the receiver's clock (Standard Webhooks' recommendation).
pub const DEFAULT_TOLERANCE_S: i64 = 5 * 60;

/// Why a key or a signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("secret: must be whsec_ followed by base64")]
    MalformedSecret,
    #[error("private key: must be whsk_ followed by the base64 of a 32-byte Ed25519 seed")]
    MalformedPrivateKey,
    #[error("public key: must be whpk_ followed by the base64 of a 32-byte Ed25519 public key")]
    MalformedPublicKey,
    #[error("{HEADER_ID}, {HEADER_TIMESTAMP} and {HEADER_SIGNATURE} headers are required")]
    MissingHeader,
    #[error("{HEADER_TIMESTAMP}: not a unix time in seconds")]
    MalformedTimestamp,
    #[error("{HEADER_TIMESTAMP}: outside the tolerance of {DEFAULT_TOLERANCE_S} s")]
    TimestampOutOfTolerance,
    #[error("{HEADER_SIGNATURE}: no signature matches")]
    NoMatchingSignature,
}

/// Which of the specification's signatures a key makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `v1`: HMAC-SHA256 with a shared secret.
    HmacSha256,
    /// `v1a`: Ed25519.
    Ed25519,
}

/// Makes one signature (`v1,…` or `v1a,…`) of a message.
pub trait Sign {
    /// Returns the signature of `id.timestamp.body` with its version prefix.
    fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String;
}

/// Checks the signatures of a `webhook-signature` header.
pub trait Verify {
    /// Whether any of the space-separated `signatures` is this key's signature of the message.
    fn verifies_any(&self, signatures: &str, id: &str, timestamp: i64, body: &[u8]) -> bool;
}

/// A signing secret decoded to its key bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

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
}

impl Sign for Secret {
    /// Returns `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
    }
}

impl Verify for Secret {
    fn verifies_any(&self, signatures: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
        let expected = self.sign(id, timestamp, body);
        let expected = expected.as_bytes();
        signatures.split_whitespace().any(|candidate| {
            // Constant-time comparison: a receiver must not leak how much of a forgery matched.
            candidate.len() == expected.len()
                && candidate
                    .bytes()
                    .zip(expected.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An Ed25519 private key: `whsk_` + base64 of its 32-byte seed (RFC 8032).
#[derive(Clone)]
pub struct PrivateKey(ed25519_dalek::SigningKey);

impl PrivateKey {
    /// Parses `whsk_<base64>`: the 32-byte seed, or the 64 bytes of seed and public key that
    /// some libraries write (the public half must then belong to the seed).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let encoded = text
            .strip_prefix(PRIVATE_KEY_PREFIX)
            .ok_or(Error::MalformedPrivateKey)?;
        let bytes = BASE64
            .decode(encoded)
            .map_err(|_| Error::MalformedPrivateKey)?;
        match bytes.len() {
            32 => {
                let seed: [u8; 32] = bytes.try_into().map_err(|_| Error::MalformedPrivateKey)?;
                Ok(Self::from_seed(seed))
            }
            64 => {
                let pair: [u8; 64] = bytes.try_into().map_err(|_| Error::MalformedPrivateKey)?;
                ed25519_dalek::SigningKey::from_keypair_bytes(&pair)
                    .map(Self)
                    .map_err(|_| Error::MalformedPrivateKey)
            }
            _ => Err(Error::MalformedPrivateKey),
        }
    }

    /// The key of a 32-byte seed (the caller draws it from a CSPRNG).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Formats the key as `whsk_<base64 of the seed>`.
    pub fn to_text(&self) -> String {
        format!("{PRIVATE_KEY_PREFIX}{}", BASE64.encode(self.0.to_bytes()))
    }

    /// The public key receivers verify with.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

impl Sign for PrivateKey {
    /// Returns `v1a,<base64 Ed25519 signature of "id.timestamp.body">`.
    fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let signature = self.0.sign(&signed_message(id, timestamp, body));
        format!("v1a,{}", BASE64.encode(signature.to_bytes()))
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

/// An Ed25519 public key: `whpk_` + base64 of its 32 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// Parses `whpk_<base64>`; a point that is not a valid public key is refused.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let encoded = text
            .strip_prefix(PUBLIC_KEY_PREFIX)
            .ok_or(Error::MalformedPublicKey)?;
        let bytes: [u8; 32] = BASE64
            .decode(encoded)
            .map_err(|_| Error::MalformedPublicKey)?
            .try_into()
            .map_err(|_| Error::MalformedPublicKey)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| Error::MalformedPublicKey)
    }

    /// Formats the key as `whpk_<base64>`.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_KEY_PREFIX}{}", BASE64.encode(self.0.as_bytes()))
    }

    /// The raw 32 bytes (for other Ed25519 implementations).
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
}

impl Verify for PublicKey {
    fn verifies_any(&self, signatures: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
        let message = signed_message(id, timestamp, body);
        signatures.split_whitespace().any(|candidate| {
            let Some(encoded) = candidate.strip_prefix("v1a,") else {
                return false;
            };
            let Ok(bytes) = BASE64.decode(encoded) else {
                return false;
            };
            let Ok(bytes) = <[u8; 64]>::try_from(bytes) else {
                return false;
            };
            let signature = ed25519_dalek::Signature::from_bytes(&bytes);
            // Strict: refuses the malleable and small-order forms RFC 8032 leaves open.
            self.0.verify_strict(&message, &signature).is_ok()
        })
    }
}

/// The bytes both schemes sign: `id.timestamp.body`.
fn signed_message(id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let timestamp = timestamp.to_string();
    let mut message = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
    message.extend_from_slice(id.as_bytes());
    message.push(b'.');
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    message
}

/// What signs a subscription's requests: an HMAC secret or an Ed25519 private key, told apart
/// by their prefixes (so a rotation between schemes is a list of two keys like any other).
#[derive(Clone, Debug)]
pub enum SigningKey {
    Hmac(Secret),
    Ed25519(PrivateKey),
}

impl SigningKey {
    /// Parses `whsk_…` as Ed25519 and anything else as an HMAC secret.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.starts_with(PRIVATE_KEY_PREFIX) {
            PrivateKey::parse(text).map(Self::Ed25519)
        } else {
            Secret::parse(text).map(Self::Hmac)
        }
    }

    /// The scheme of a key's text, without decoding it.
    pub fn scheme_of(text: &str) -> Scheme {
        if text.starts_with(PRIVATE_KEY_PREFIX) {
            Scheme::Ed25519
        } else {
            Scheme::HmacSha256
        }
    }

    pub fn scheme(&self) -> Scheme {
        match self {
            Self::Hmac(_) => Scheme::HmacSha256,
            Self::Ed25519(_) => Scheme::Ed25519,
        }
    }

    /// The public key of an Ed25519 key; `None` for a secret.
    pub fn public_key(&self) -> Option<PublicKey> {
        match self {
            Self::Hmac(_) => None,
            Self::Ed25519(key) => Some(key.public_key()),
        }
    }

    pub fn to_text(&self) -> String {
        match self {
            Self::Hmac(secret) => secret.to_text(),
            Self::Ed25519(key) => key.to_text(),
        }
    }
}

impl Sign for SigningKey {
    fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        match self {
            Self::Hmac(secret) => secret.sign(id, timestamp, body),
            Self::Ed25519(key) => key.sign(id, timestamp, body),
        }
    }
}

/// What a receiver verifies with: the shared secret or the sender's public key.
#[derive(Clone, Debug)]
pub enum VerifyingKey {
    Secret(Secret),
    PublicKey(PublicKey),
}

impl VerifyingKey {
    /// Parses `whpk_…` as an Ed25519 public key and anything else as an HMAC secret.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.starts_with(PUBLIC_KEY_PREFIX) {
            PublicKey::parse(text).map(Self::PublicKey)
        } else {
            Secret::parse(text).map(Self::Secret)
        }
    }
}

impl Verify for VerifyingKey {
    fn verifies_any(&self, signatures: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
        match self {
            Self::Secret(secret) => secret.verifies_any(signatures, id, timestamp, body),
            Self::PublicKey(key) => key.verifies_any(signatures, id, timestamp, body),
        }
    }
}

/// Returns the `webhook-signature` value: one signature per key, space-separated.
pub fn signature_header<'a, K: Sign + 'a>(
    keys: impl IntoIterator<Item = &'a K>,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    keys.into_iter()
        .map(|key| key.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a webhook as a receiver does: the timestamp within `tolerance_s` of `now` and at
/// least one signature of the header made with `key` (a `v1` one for a secret, a `v1a` one for
/// a public key).
pub fn verify(
    key: &(impl Verify + ?Sized),
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
    if key.verifies_any(signatures, id, timestamp, body) {
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

    /// RFC 8032 section 7.1, TEST 1: the public key derived from a seed.
    const RFC8032_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn rfc8032_key() -> PrivateKey {
        PrivateKey::from_seed(hex(RFC8032_SEED).try_into().unwrap())
    }

    #[test]
    fn ed25519_keys_match_rfc_8032_and_round_trip_as_text() {
        let key = rfc8032_key();
        assert_eq!(key.public_key().as_bytes().to_vec(), hex(RFC8032_PUBLIC));
        let text = key.to_text();
        assert!(text.starts_with("whsk_"));
        assert_eq!(
            PrivateKey::parse(&text).unwrap().public_key(),
            key.public_key()
        );
        let public = key.public_key().to_text();
        assert_eq!(PublicKey::parse(&public).unwrap(), key.public_key());
        // The 64-byte form (seed then public key) some libraries write.
        let mut pair = hex(RFC8032_SEED);
        pair.extend(hex(RFC8032_PUBLIC));
        let long = format!("whsk_{}", BASE64.encode(&pair));
        assert_eq!(
            PrivateKey::parse(&long).unwrap().public_key(),
            key.public_key()
        );
        // A 64-byte form whose halves do not belong together is refused.
        pair[40] ^= 1;
        let mismatched = format!("whsk_{}", BASE64.encode(&pair));
        assert_eq!(
            PrivateKey::parse(&mismatched).unwrap_err(),
            Error::MalformedPrivateKey
        );
        for bad in ["whsk_", "whsk_!!", "whsec_AAAA", "whsk_AAAA"] {
            assert_eq!(
                PrivateKey::parse(bad).unwrap_err(),
                Error::MalformedPrivateKey
            );
        }
        for bad in ["whpk_", "whpk_AAAA", "whsk_AAAA", &key.to_text()] {
            assert_eq!(
                PublicKey::parse(bad).unwrap_err(),
                Error::MalformedPublicKey
            );
        }
    }

    /// `ring`'s Ed25519 is an implementation independent of ed25519-dalek: it makes the same
    /// (deterministic) signature of the same bytes and verifies ours.
    #[test]
    fn v1a_signatures_agree_with_an_independent_ed25519_implementation() {
        use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
        let key = rfc8032_key();
        let ring_key = Ed25519KeyPair::from_seed_unchecked(&hex(RFC8032_SEED)).unwrap();
        assert_eq!(
            ring_key.public_key().as_ref(),
            key.public_key().as_bytes().as_slice()
        );
        let header = key.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        let ours = BASE64.decode(header.strip_prefix("v1a,").unwrap()).unwrap();
        let message = [
            SPEC_ID.as_bytes(),
            b".",
            SPEC_TIMESTAMP.to_string().as_bytes(),
            b".",
            SPEC_BODY,
        ]
        .concat();
        assert_eq!(ring_key.sign(&message).as_ref(), ours.as_slice());
        UnparsedPublicKey::new(&ED25519, key.public_key().as_bytes())
            .verify(&message, &ours)
            .unwrap();
        // And ours verifies what ring signed.
        let theirs = format!("v1a,{}", BASE64.encode(ring_key.sign(&message)));
        let ts = SPEC_TIMESTAMP.to_string();
        let check = |sig: &str| {
            verify(
                &key.public_key(),
                Some(SPEC_ID),
                Some(&ts),
                Some(sig),
                SPEC_BODY,
                SPEC_TIMESTAMP,
                300,
            )
        };
        assert_eq!(check(&theirs), Ok(()));
    }

    #[test]
    fn a_public_key_verifies_only_untampered_v1a_signatures() {
        let key = rfc8032_key();
        let public = key.public_key();
        let secret = Secret::parse(SPEC_SECRET).unwrap();
        let signing = [
            SigningKey::Hmac(secret.clone()),
            SigningKey::Ed25519(key.clone()),
        ];
        let header = signature_header(&signing, "evt_1", 1000, b"{\"a\":1}");
        assert!(header.starts_with("v1,") && header.contains(" v1a,"));
        let check = |verifier: &dyn Verify, body: &[u8], sigs: &str| {
            verify(
                verifier,
                Some("evt_1"),
                Some("1000"),
                Some(sigs),
                body,
                1000,
                300,
            )
        };
        // During a change of scheme both verify.
        assert_eq!(check(&public, b"{\"a\":1}", &header), Ok(()));
        assert_eq!(check(&secret, b"{\"a\":1}", &header), Ok(()));
        // A tampered body, id or signature fails.
        assert_eq!(
            check(&public, b"{\"a\":2}", &header),
            Err(Error::NoMatchingSignature)
        );
        assert_eq!(
            verify(
                &public,
                Some("evt_2"),
                Some("1000"),
                Some(&header),
                b"{\"a\":1}",
                1000,
                300
            ),
            Err(Error::NoMatchingSignature)
        );
        let v1a = key.sign("evt_1", 1000, b"{\"a\":1}");
        let mut raw = BASE64.decode(v1a.strip_prefix("v1a,").unwrap()).unwrap();
        raw[10] ^= 0x40;
        let forged = format!("v1a,{}", BASE64.encode(&raw));
        assert_eq!(
            check(&public, b"{\"a\":1}", &forged),
            Err(Error::NoMatchingSignature)
        );
        // A v1 signature is no use to a public key, nor a v1a one to a secret.
        assert_eq!(
            check(
                &public,
                b"{\"a\":1}",
                &secret.sign("evt_1", 1000, b"{\"a\":1}")
            ),
            Err(Error::NoMatchingSignature)
        );
        assert_eq!(
            check(&secret, b"{\"a\":1}", &v1a),
            Err(Error::NoMatchingSignature)
        );
        // Another key pair's public key does not verify.
        let stranger = PrivateKey::from_seed([7; 32]).public_key();
        assert_eq!(
            check(&stranger, b"{\"a\":1}", &header),
            Err(Error::NoMatchingSignature)
        );
    }

    #[test]
    fn keys_are_told_apart_by_their_prefix() {
        let key = rfc8032_key();
        assert_eq!(
            SigningKey::parse(&key.to_text()).unwrap().scheme(),
            Scheme::Ed25519
        );
        assert_eq!(SigningKey::scheme_of(&key.to_text()), Scheme::Ed25519);
        assert_eq!(
            SigningKey::parse(SPEC_SECRET).unwrap().scheme(),
            Scheme::HmacSha256
        );
        assert_eq!(SigningKey::scheme_of(SPEC_SECRET), Scheme::HmacSha256);
        assert!(matches!(
            VerifyingKey::parse(&key.public_key().to_text()).unwrap(),
            VerifyingKey::PublicKey(_)
        ));
        assert!(matches!(
            VerifyingKey::parse(SPEC_SECRET).unwrap(),
            VerifyingKey::Secret(_)
        ));
        assert_eq!(
            SigningKey::parse(&key.to_text()).unwrap().public_key(),
            Some(key.public_key())
        );
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

            /// The same for Ed25519: what a private key signs, its public key verifies, and no
            /// other key does; a garbage v1a signature never panics.
            #[test]
            fn v1a_sign_then_verify_round_trips(
                seed in any::<[u8; 32]>(),
                id in "[a-z_0-9]{1,40}",
                timestamp in 0i64..4_000_000_000,
                body in proptest::collection::vec(any::<u8>(), 0..512),
                garbage in "v1a,[A-Za-z0-9+/=]{0,100}",
            ) {
                let key = PrivateKey::from_seed(seed);
                let header = key.sign(&id, timestamp, &body);
                let ts = timestamp.to_string();
                let check = |public: &PublicKey, sigs: &str| verify(public, Some(&id), Some(&ts), Some(sigs), &body, timestamp, 300);
                prop_assert_eq!(check(&key.public_key(), &header), Ok(()));
                let mut other_seed = seed;
                other_seed[0] ^= 1;
                prop_assert!(check(&PrivateKey::from_seed(other_seed).public_key(), &header).is_err());
                prop_assert!(check(&key.public_key(), &garbage).is_err());
            }
        }
    }
}
