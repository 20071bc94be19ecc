//! Secrets at rest: receiver API keys and signing secrets are sealed with ChaCha20-Poly1305 under
//! `HERALD_MASTER_KEY` when one is set. Sealed values carry a prefix, so values written before a
//! key was set still read.

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
}

/// A sealed value that the configured key cannot open.
#[derive(Debug, thiserror::Error)]
#[error("a stored secret cannot be opened with the configured HERALD_MASTER_KEY")]
pub struct WrongKey;

impl Sealer {
    pub fn new(master_key: Option<[u8; 32]>) -> Self {
        Self {
            cipher: master_key.map(|key| ChaCha20Poly1305::new(Key::from_slice(&key))),
        }
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
        let cipher = self.cipher.as_ref().ok_or(WrongKey)?;
        let sealed = BASE64.decode(encoded).map_err(|_| WrongKey)?;
        if sealed.len() < NONCE_LEN {
            return Err(WrongKey);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let plaintext = cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| WrongKey)?;
        String::from_utf8(plaintext).map_err(|_| WrongKey)
    }

    /// Returns whether `stored` is sealed (written under some master key).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }
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
}
