//! API tokens: generation, hashing, and who a bearer token speaks for. Tokens are random 256-bit
//! values, so a plain SHA-256 is a sufficient hash; only the hash is stored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::Error;
use crate::domain::ids;
use crate::domain::model::{Scope, Token};
use crate::domain::throttle::{FailureThrottle, Verdict};
use crate::storage::{Store, tokens};

/// Prefix of API tokens, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "hrld_";
/// How long a verified token is trusted without reading the database again. Revocation on this
/// replica clears the cache at once.
const CACHE_TTL: Duration = Duration::from_secs(2);
/// The token id of the admin token given in `HERALD_ADMIN_TOKEN` (not stored).
const CONFIGURED_ADMIN_TOKEN_ID: &str = "tok_configured_admin";
/// How often `last_used_at` is written per token.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub scope: Scope,
}

impl Caller {
    /// Resolves the `tenant_id` of a tenant-scoped request (SPEC 4): a tenant token may leave it
    /// empty or name its own tenant; an admin token must name one.
    pub fn tenant(&self, requested: &str) -> Result<String, Error> {
        match &self.scope {
            Scope::Admin if requested.is_empty() => Err(crate::domain::validate::Invalid::new(
                "tenant_id",
                "an admin token must name the tenant it acts for",
            )
            .into()),
            Scope::Admin => Ok(requested.to_owned()),
            Scope::Tenant(own) if requested.is_empty() || requested == own => Ok(own.clone()),
            Scope::Tenant(_) => Err(Error::PermissionDenied(
                "tenant_id: this token belongs to another tenant".into(),
            )),
        }
    }

    /// Refuses callers that are not admins.
    pub fn require_admin(&self) -> Result<(), Error> {
        match self.scope {
            Scope::Admin => Ok(()),
            Scope::Tenant(_) => Err(Error::PermissionDenied(
                "this call needs an admin token".into(),
            )),
        }
    }
}

struct Cached {
    caller: Caller,
    checked_at: Instant,
    touched_at: Instant,
}

/// Authenticates bearer tokens against the store (and the configured admin token).
#[derive(Clone)]
pub struct Auth {
    store: Store,
    configured_admin_hash: Option<String>,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
    /// Token id → (still valid, checked at): the console's question.
    validity: Arc<Mutex<HashMap<String, (bool, Instant)>>>,
    throttle: Arc<Mutex<FailureThrottle>>,
    /// `herald_auth_failures_total{reason}`.
    failures: Family<AuthFailure, Counter>,
}

/// The label of `herald_auth_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailure {
    /// `unknown` (looked up, not found or revoked), `known_bad` (failed moments ago, not looked
    /// up again), `throttled` (the peer spent its failures).
    pub reason: &'static str,
}

/// Returns a new random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Returns the stored form of a token.
pub fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Auth {
    pub fn new(store: Store, configured_admin_token: Option<&str>) -> Self {
        Self {
            store,
            configured_admin_hash: configured_admin_token.map(hash),
            cache: Arc::default(),
            validity: Arc::default(),
            throttle: Arc::default(),
            failures: Family::default(),
        }
    }

    /// Failed authentications by reason, for the metrics registry.
    pub fn failures(&self) -> Family<AuthFailure, Counter> {
        self.failures.clone()
    }

    /// Decides whether a token from `peer` is worth a database read: a token that failed
    /// moments ago, or any unknown token from a peer that spent its failures, is refused at once.
    pub fn screen(&self, peer: Option<IpAddr>, token_hash: &str) -> Result<(), Error> {
        let verdict = self
            .throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .verdict(peer, token_hash, Instant::now());
        match verdict {
            Verdict::Check => Ok(()),
            Verdict::KnownBad => {
                self.failed_because("known_bad");
                Err(Error::Unauthenticated(
                    "authorization: unknown or revoked token".into(),
                ))
            }
            Verdict::Throttled => {
                self.failed_because("throttled");
                Err(Error::RateLimited(
                    "authorization: too many failed attempts from this address; retry in a few seconds".into(),
                ))
            }
        }
    }

    /// Records the outcome of a look-up that [`Auth::screen`] allowed.
    pub fn settle(&self, peer: Option<IpAddr>, token_hash: &str, valid: bool) {
        let mut throttle = self.throttle.lock().unwrap_or_else(|e| e.into_inner());
        if valid {
            throttle.valid(token_hash, Instant::now());
        } else {
            throttle.failed(peer, token_hash, Instant::now());
            drop(throttle);
            self.failed_because("unknown");
        }
    }

    fn failed_because(&self, reason: &'static str) {
        self.failures.get_or_create(&AuthFailure { reason }).inc();
    }

    /// Returns the caller a bearer token from `peer` speaks for.
    pub async fn authenticate(&self, token: &str, peer: Option<IpAddr>) -> Result<Caller, Error> {
        let token_hash = hash(token);
        if self.configured_admin_hash.as_deref() == Some(token_hash.as_str()) {
            return Ok(Caller {
                token_id: CONFIGURED_ADMIN_TOKEN_ID.into(),
                scope: Scope::Admin,
            });
        }
        let now = Instant::now();
        if let Some(caller) = self.cached(&token_hash, now) {
            return Ok(caller);
        }
        self.screen(peer, &token_hash)?;
        let stored = tokens::find_by_hash(&self.store.db, &token_hash)
            .await?
            .filter(|stored| !stored.revoked);
        self.settle(peer, &token_hash, stored.is_some());
        let stored = stored.ok_or_else(|| {
            Error::Unauthenticated("authorization: unknown or revoked token".into())
        })?;
        let caller = Caller {
            token_id: stored.token.id.clone(),
            scope: stored.token.scope.clone(),
        };
        let touch = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let entry = cache.entry(token_hash).or_insert(Cached {
                caller: caller.clone(),
                checked_at: now,
                touched_at: now - TOUCH_EVERY - Duration::from_secs(1),
            });
            entry.checked_at = now;
            let due = now.duration_since(entry.touched_at) >= TOUCH_EVERY;
            if due {
                entry.touched_at = now;
            }
            due
        };
        if touch {
            let store = self.store.clone();
            let id = caller.token_id.clone();
            // `last_used_at` is informational: written off the request path, at most once a
            // minute per token, and a failure only delays it.
            tokio::spawn(async move {
                if let Err(err) = tokens::touch(&store.writer, &id, Utc::now()).await {
                    tracing::debug!(error = %err, "could not record token use");
                }
            });
        }
        Ok(caller)
    }

    fn cached(&self, token_hash: &str, now: Instant) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(token_hash)
            .filter(|entry| now.duration_since(entry.checked_at) < CACHE_TTL)
            .map(|entry| entry.caller.clone())
    }

    /// Whether the token `token_id` is still valid (exists, not revoked): the console asks on
    /// every request of a session it opened. Cached like verifications, and cleared with them
    /// on a revocation; a storage error counts as valid (the console then fails on its own).
    pub async fn token_still_valid(&self, token_id: &str) -> bool {
        if token_id == CONFIGURED_ADMIN_TOKEN_ID {
            return true;
        }
        let now = Instant::now();
        let cached = self
            .validity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token_id)
            .filter(|(_, at)| now.duration_since(*at) < CACHE_TTL)
            .map(|(valid, _)| *valid);
        if let Some(valid) = cached {
            return valid;
        }
        let valid = match tokens::get(&self.store.db, token_id).await {
            Ok(found) => found.is_some_and(|t| !t.revoked),
            Err(_) => return true,
        };
        let mut validity = self.validity.lock().unwrap_or_else(|e| e.into_inner());
        if validity.len() >= 10_000 {
            validity.clear();
        }
        validity.insert(token_id.to_owned(), (valid, now));
        valid
    }

    /// Forgets every cached verification, so a revocation takes effect at once.
    pub fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.validity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.throttle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_tokens();
    }

    /// Creates and stores a token; returns it with its plaintext (shown once).
    pub async fn create_token(
        &self,
        scope: Scope,
        name: String,
        bootstrap: bool,
    ) -> Result<(Token, String), Error> {
        let plaintext = new_token();
        let token = Token {
            id: ids::new(ids::TOKEN),
            name,
            scope,
            created_at: Utc::now(),
            last_used_at: None,
        };
        tokens::insert(&self.store.writer, &token, &hash(&plaintext), bootstrap).await?;
        Ok((token, plaintext))
    }

    /// On first start without `HERALD_ADMIN_TOKEN`: creates an admin token and returns its
    /// plaintext, or `None` when an admin token already exists.
    pub async fn bootstrap_admin(&self) -> Result<Option<String>, Error> {
        if self.configured_admin_hash.is_some() || tokens::any_admin(&self.store.db).await? {
            return Ok(None);
        }
        let (_, plaintext) = self
            .create_token(Scope::Admin, "generated admin token".into(), true)
            .await?;
        Ok(Some(plaintext))
    }

    /// Revokes every generated admin token and makes a new one (`reset-admin-token`).
    pub async fn reset_admin(&self) -> Result<String, Error> {
        tokens::revoke_bootstrap(&self.store.writer, Utc::now()).await?;
        self.forget_all();
        let (_, plaintext) = self
            .create_token(Scope::Admin, "generated admin token".into(), true)
            .await?;
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> Caller {
        Caller {
            token_id: "t".into(),
            scope: Scope::Admin,
        }
    }

    fn tenant(id: &str) -> Caller {
        Caller {
            token_id: "t".into(),
            scope: Scope::Tenant(id.into()),
        }
    }

    #[test]
    fn tenant_scoping_follows_the_conventions() {
        assert_eq!(tenant("ten_a").tenant("").unwrap(), "ten_a");
        assert_eq!(tenant("ten_a").tenant("ten_a").unwrap(), "ten_a");
        assert!(matches!(
            tenant("ten_a").tenant("ten_b"),
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(admin().tenant(""), Err(Error::Invalid(_))));
        assert_eq!(admin().tenant("ten_b").unwrap(), "ten_b");
        assert!(tenant("ten_a").require_admin().is_err());
    }

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(hash(&a), hash(&a));
        assert_eq!(hash(&a).len(), 64);
    }
}
