//! Secrets at rest: receiver API keys and signing secrets are sealed with ChaCha20-Poly1305 under
//! `HERALD_MASTER_KEY` when one is set. Sealed values carry a prefix, so values written before a
//! key was set still read. During a key rotation `HERALD_MASTER_KEY_PREVIOUS` opens what the old
//! key sealed; everything is sealed under the new one.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

const PREFIX: &str = "sealed1:";
const NONCE_LEN: usize = 12;
/// Stored in `meta` to tell, at start, whether the configured key is the one the data was
/// written with.
pub const CHECK_PLAINTEXT: &str = "herald master key check";

/// Seals and opens secrets; without a master key it stores them in clear.
#[derive(Clone)]
pub struct Sealer {
    cipher: Option<ChaCha20Poly1305>,
    /// The key being rotated away from: opens, never seals.
    previous: Option<ChaCha20Poly1305>,
}

/// A sealed value that the configured key cannot open.
#[derive(Debug, thiserror::Error)]
#[error("a stored secret cannot be opened with the configured HERALD_MASTER_KEY")]
pub struct WrongKey;

impl Sealer {
    pub fn new(master_key: Option<[u8; 32]>) -> Self {
        Self {
            cipher: master_key.map(|key| ChaCha20Poly1305::new(Key::from_slice(&key))),
            previous: None,
        }
    }

    /// Also opens what `previous` sealed (a master key rotation in progress).
    pub fn with_previous(mut self, previous: Option<[u8; 32]>) -> Self {
        self.previous = previous.map(|key| ChaCha20Poly1305::new(Key::from_slice(&key)));
        self
    }

    pub fn has_key(&self) -> bool {
        self.cipher.is_some()
    }

    /// Returns the stored form of `plaintext`.
    pub fn seal(&self, plaintext: &str) -> String {
        let Some(cipher) = &self.cipher else {
            return plaintext.to_owned();
        };
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes())
            .expect("ChaCha20-Poly1305 encrypts any input shorter than 256 GiB");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        format!("{PREFIX}{}", BASE64.encode(sealed))
    }

    /// Returns the plaintext of a stored value.
    pub fn open(&self, stored: &str) -> Result<String, WrongKey> {
        let Some(encoded) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        [&self.cipher, &self.previous]
            .into_iter()
            .flatten()
            .find_map(|cipher| open_with(cipher, encoded))
            .ok_or(WrongKey)
    }

    /// Whether a stored value should be sealed again under the current key: it is in clear, or
    /// only the previous key opens it. Never without a current key.
    pub fn needs_reseal(&self, stored: &str) -> bool {
        let Some(cipher) = &self.cipher else {
            return false;
        };
        match stored.strip_prefix(PREFIX) {
            None => true,
            Some(encoded) => open_with(cipher, encoded).is_none(),
        }
    }

    /// Returns whether `stored` is sealed under the current key (not the previous one).
    pub fn sealed_with_current(&self, stored: &str) -> bool {
        Self::is_sealed(stored) && !self.needs_reseal(stored)
    }

    /// Returns whether `stored` is sealed (written under some master key).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }
}

fn open_with(cipher: &ChaCha20Poly1305, encoded: &str) -> Option<String> {
    let sealed = BASE64.decode(encoded).ok()?;
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let plaintext = cipher.decrypt(Nonce::from_slice(nonce), ciphertext).ok()?;
    String::from_utf8(plaintext).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key() {
        let sealer = Sealer::new(Some([7; 32]));
        let sealed = sealer.seal("whsec_secret");
        assert!(!sealed.contains("whsec_secret"));
        assert_eq!(sealer.open(&sealed).unwrap(), "whsec_secret");
        assert!(Sealer::new(Some([8; 32])).open(&sealed).is_err());
        assert!(Sealer::new(None).open(&sealed).is_err());
        assert_eq!(Sealer::new(None).seal("x"), "x");
        assert_eq!(sealer.open("clear").unwrap(), "clear");
    }

    #[test]
    fn a_rotation_opens_both_keys_and_reseals_under_the_new_one() {
        let old = Sealer::new(Some([7; 32]));
        let sealed_old = old.seal("whsec_old");
        let rotating = Sealer::new(Some([8; 32])).with_previous(Some([7; 32]));
        assert_eq!(rotating.open(&sealed_old).unwrap(), "whsec_old");
        assert!(rotating.needs_reseal(&sealed_old));
        assert!(rotating.needs_reseal("in clear"));
        let sealed_new = rotating.seal("whsec_old");
        assert!(!rotating.needs_reseal(&sealed_new));
        assert!(rotating.sealed_with_current(&sealed_new));
        // After the rotation, the new key alone opens what was re-sealed.
        assert_eq!(
            Sealer::new(Some([8; 32])).open(&sealed_new).unwrap(),
            "whsec_old"
        );
        assert!(Sealer::new(Some([8; 32])).open(&sealed_old).is_err());
        assert!(!Sealer::new(None).needs_reseal("in clear"));
    }
}
