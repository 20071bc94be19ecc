//! Console sessions: the session cookie's id maps to a tenant, the API token that opened it and a
//! one-shot notice; one-time sign-in links (`AdminService.CreateConsoleSession`) map to a tenant
//! and the admin token that issued them until used or expired. Both live in the database
//! (`storage::console_sessions`), so any replica serves a session and a restart keeps users
//! signed in; ids are random 256-bit values stored only as SHA-256 hashes. The console checks on
//! every request that the session's token is still valid; revoking the token or signing out ends
//! the session everywhere (each request reads the row; open live views hear of it through
//! [`Sessions::ended`], fed by this replica and the change channel).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::dispatch::changes::{Announcer, Change};
use crate::storage::{self, Store, console_sessions as rows};

/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The default lifetime of a console link, in seconds.
pub const DEFAULT_LINK_TTL_S: u32 = 600;
/// The longest lifetime of a console link, in seconds.
pub const MAX_LINK_TTL_S: u32 = 3600;

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub tenant_id: String,
    /// The API token that opened it (a tenant token, or the admin token that issued the link).
    pub token_id: String,
    /// Embedded in every form of this session and checked on every POST; derived from the
    /// session id, so it is never stored.
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
    /// The notice waiting for the next page, as read with the session.
    pub notice: Option<Notice>,
}

/// A one-shot message shown on the next page (after a POST and its redirect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// `ok`, `error` or `info`.
    pub kind: String,
    pub text: String,
    /// An optional link shown after the text: (href, label).
    pub link: Option<(String, String)>,
    /// Where the page shows it: `page` (at the top) or `test` (beside "Send test webhook").
    pub area: String,
}

impl Notice {
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            kind: "ok".into(),
            text: text.into(),
            link: None,
            area: "page".into(),
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Self {
            kind: "error".into(),
            text: text.into(),
            link: None,
            area: "page".into(),
        }
    }

    pub fn info(text: impl Into<String>) -> Self {
        Self {
            kind: "info".into(),
            text: text.into(),
            link: None,
            area: "page".into(),
        }
    }

    /// Shows the notice beside "Send test webhook" instead of at the top of the page.
    pub fn beside_test(mut self) -> Self {
        self.area = "test".into();
        self
    }

    pub fn with_link(mut self, href: impl Into<String>, label: impl Into<String>) -> Self {
        self.link = Some((href.into(), label.into()));
        self
    }
}

struct Inner {
    store: Store,
    changes: Announcer,
    secure_cookies: bool,
    /// `http(s)://host:port` of the running console; `None` while it is off.
    base_url: Mutex<Option<String>>,
    /// Ticks when a session may have ended (sign-out, a revoked token, here or on another
    /// replica): open live views re-check theirs.
    ended: tokio::sync::broadcast::Sender<()>,
}

/// The console's sessions and sign-in links; cheap to clone. The gRPC edge issues links through
/// it (`CreateConsoleSession`), the console redeems them.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

/// Returns a random 256-bit value as URL-safe base64.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The database key of a session id or link token.
fn key(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The CSRF token of a session: a second one-way function of its id, so neither the database
/// key nor the token reveals the other or the id.
fn csrf_of(id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"herald console csrf\0");
    hasher.update(id.as_bytes());
    URL_SAFE_NO_PAD.encode(hasher.finalize())
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Returns whether a submitted CSRF token matches the session's (an empty one never does).
pub fn csrf_matches(session: &Session, submitted: Option<&str>) -> bool {
    match submitted {
        Some(submitted) if !submitted.is_empty() => constant_time_eq(&session.csrf, submitted),
        _ => false,
    }
}

impl Sessions {
    /// `secure_cookies`: mark cookies `Secure` (whenever TLS is on).
    pub fn new(store: Store, changes: Announcer, secure_cookies: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                changes,
                secure_cookies,
                base_url: Mutex::new(None),
                ended: tokio::sync::broadcast::channel(16).0,
            }),
        }
    }

    pub fn secure_cookies(&self) -> bool {
        self.inner.secure_cookies
    }

    /// Records where the console is reachable (`http://127.0.0.1:50052`), or that it is off.
    pub fn set_base_url(&self, url: Option<String>) {
        *self
            .inner
            .base_url
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = url;
    }

    /// Returns where the console is reachable, while it runs.
    pub fn base_url(&self) -> Option<String> {
        self.inner
            .base_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ticks whenever a session may have ended, on any replica.
    pub fn ended(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.inner.ended.subscribe()
    }

    /// Hears that a session ended (here, or on another replica through the change channel).
    pub fn session_ended(&self) {
        let _ = self.inner.ended.send(());
    }

    /// Starts a session for `tenant_id`; returns the cookie value and the session.
    pub async fn start(
        &self,
        tenant_id: &str,
        token_id: &str,
    ) -> Result<(String, Session), storage::Error> {
        self.start_at(tenant_id, token_id, Utc::now()).await
    }

    pub(crate) async fn start_at(
        &self,
        tenant_id: &str,
        token_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(String, Session), storage::Error> {
        let id = random_token();
        let expires_at = now + SESSION_TTL;
        let writer = &self.inner.store.writer;
        // Sign-ins are rare: they sweep what expired, so the tables stay small without a timer.
        rows::delete_expired(writer, now).await?;
        rows::insert_session(
            writer,
            &key(&id),
            &rows::StoredSession {
                tenant_id: tenant_id.to_owned(),
                token_id: token_id.to_owned(),
                notice: None,
                expires_at,
            },
            now,
        )
        .await?;
        let session = Session {
            tenant_id: tenant_id.to_owned(),
            token_id: token_id.to_owned(),
            csrf: csrf_of(&id),
            expires_at,
            notice: None,
        };
        Ok((id, session))
    }

    /// Returns the live session of a cookie value.
    pub async fn get(&self, id: &str) -> Result<Option<Session>, storage::Error> {
        self.get_at(id, Utc::now()).await
    }

    pub(crate) async fn get_at(
        &self,
        id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Session>, storage::Error> {
        let stored = rows::find_session(&self.inner.store.db, &key(id), now).await?;
        Ok(stored.map(|row| Session {
            tenant_id: row.tenant_id,
            token_id: row.token_id,
            csrf: csrf_of(id),
            expires_at: row.expires_at,
            notice: row.notice.and_then(|json| serde_json::from_str(&json).ok()),
        }))
    }

    /// Ends a session (sign-out, or its token is no longer valid) on every replica.
    pub async fn end(&self, id: &str) -> Result<(), storage::Error> {
        rows::delete_session(&self.inner.store.writer, &key(id)).await?;
        self.session_ended();
        self.inner
            .changes
            .announce(Change::ConsoleSessionEnded)
            .await;
        Ok(())
    }

    /// Leaves a notice for the session's next page. A notice that cannot be stored is logged and
    /// dropped: the action it reports on is done either way.
    pub async fn notify(&self, id: &str, notice: Notice) {
        let Ok(json) = serde_json::to_string(&notice) else {
            return;
        };
        if let Err(err) = rows::set_notice(&self.inner.store.writer, &key(id), Some(&json)).await {
            tracing::warn!(error = %err, "console notice not stored");
        }
    }

    /// Takes the session's pending notice (read with the session): clears it so it shows once.
    pub async fn take_notice(&self, id: &str, session: &Session) -> Option<Notice> {
        let notice = session.notice.clone()?;
        if let Err(err) = rows::set_notice(&self.inner.store.writer, &key(id), None).await {
            tracing::warn!(error = %err, "console notice not cleared");
        }
        Some(notice)
    }

    /// Issues a one-time sign-in link for `tenant_id` (`AdminService.CreateConsoleSession`; the
    /// caller checked the admin token and that the tenant exists): `ttl_s` 0 means 600 s, at
    /// most 3600. Returns the link and when it expires.
    pub async fn create_link(
        &self,
        tenant_id: &str,
        ttl_s: u32,
        token_id: &str,
    ) -> Result<(String, DateTime<Utc>), crate::service::Error> {
        let ttl_s =
            crate::domain::validate::ranged("ttl_s", ttl_s, DEFAULT_LINK_TTL_S, 1, MAX_LINK_TTL_S)?;
        let base = self.base_url().ok_or_else(|| {
            crate::service::Error::FailedPrecondition(
                "console: the web console is off on this control plane; set HERALD_CONSOLE_LISTEN"
                    .into(),
            )
        })?;
        let now = Utc::now();
        let expires_at = now + chrono::Duration::seconds(i64::from(ttl_s));
        let token = self
            .issue_link_at(tenant_id, token_id, expires_at, now)
            .await?;
        Ok((format!("{base}/login/link?token={token}"), expires_at))
    }

    pub(crate) async fn issue_link_at(
        &self,
        tenant_id: &str,
        token_id: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<String, storage::Error> {
        let token = random_token();
        let writer = &self.inner.store.writer;
        rows::delete_expired(writer, now).await?;
        rows::insert_link(
            writer,
            &key(&token),
            &rows::StoredLink {
                tenant_id: tenant_id.to_owned(),
                token_id: token_id.to_owned(),
                expires_at,
            },
            now,
        )
        .await?;
        Ok(token)
    }

    /// Uses up a link token; returns its tenant and the token that issued it when it was valid
    /// (once only, across replicas).
    pub async fn redeem_link(
        &self,
        token: &str,
    ) -> Result<Option<(String, String)>, storage::Error> {
        self.redeem_link_at(token, Utc::now()).await
    }

    pub(crate) async fn redeem_link_at(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<(String, String)>, storage::Error> {
        Ok(
            rows::redeem_link(&self.inner.store.writer, &key(token), now)
                .await?
                .map(|link| (link.tenant_id, link.token_id)),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Sessions on a fresh SQLite file (kept alive by the returned directory).
    pub(crate) async fn sessions() -> (Sessions, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(storage::StoreOptions {
            url: format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("console.db").display()
            ),
            max_connections: 2,
            master_key: None,
            previous_master_key: None,
            sqlite_page_limit: None,
        })
        .await
        .unwrap();
        let changes = Announcer::new(store.clone(), "test".into());
        (Sessions::new(store, changes, false), dir)
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        let check = |a: &str, b: &str, expected: bool| assert_eq!(constant_time_eq(a, b), expected);
        check("abc", "abc", true);
        check("abc", "abd", false);
        check("abc", "ab", false);
        check("", "", true);
        check("abc", "ABC", false);
    }

    #[tokio::test]
    async fn csrf_token_must_be_present_and_equal() {
        let (sessions, _dir) = sessions().await;
        let (id, session) = sessions.start("ten_a", "tok_a").await.unwrap();
        let (_, other) = sessions.start("ten_a", "tok_a").await.unwrap();
        assert!(csrf_matches(&session, Some(&session.csrf)));
        assert!(!csrf_matches(&session, None));
        assert!(!csrf_matches(&session, Some("")));
        assert!(!csrf_matches(&session, Some(&other.csrf)));
        assert!(!csrf_matches(&session, Some(&session.csrf[1..])));
        assert_ne!(session.csrf, other.csrf);
        // The token read back with the session is the one its forms carry.
        let read = sessions.get(&id).await.unwrap().unwrap();
        assert_eq!(read.csrf, session.csrf);
        // Neither the database key nor the CSRF token is the id or gives the other.
        assert_ne!(session.csrf, id);
        assert_ne!(key(&id), session.csrf);
    }

    #[tokio::test]
    async fn sessions_expire_after_their_ttl() {
        let (sessions, _dir) = sessions().await;
        let t0 = Utc::now();
        let (id, session) = sessions.start_at("ten_a", "tok_a", t0).await.unwrap();
        let read = sessions.get_at(&id, t0).await.unwrap().unwrap();
        assert_eq!(read.tenant_id, session.tenant_id);
        assert_eq!(read.token_id, "tok_a");
        let almost = t0 + SESSION_TTL - Duration::from_secs(1);
        assert!(sessions.get_at(&id, almost).await.unwrap().is_some());
        let ttl_end = t0 + SESSION_TTL;
        assert_eq!(sessions.get_at(&id, ttl_end).await.unwrap(), None);
        // A later sign-in sweeps it: expired sessions are forgotten, not revived.
        sessions.start_at("ten_b", "tok_b", ttl_end).await.unwrap();
        assert_eq!(sessions.get_at(&id, t0).await.unwrap(), None);
    }

    #[tokio::test]
    async fn unknown_and_ended_sessions_are_refused() {
        let (sessions, _dir) = sessions().await;
        let (id, _) = sessions.start("ten_a", "tok_a").await.unwrap();
        let mut ended = sessions.ended();
        assert!(sessions.get("nonsense").await.unwrap().is_none());
        sessions.end(&id).await.unwrap();
        assert!(sessions.get(&id).await.unwrap().is_none());
        assert!(ended.try_recv().is_ok(), "open live views hear of the end");
    }

    #[tokio::test]
    async fn notices_are_shown_once() {
        let (sessions, _dir) = sessions().await;
        let (id, _) = sessions.start("ten_a", "tok_a").await.unwrap();
        let notice = Notice::ok("saved").with_link("/webhooks/sub_1", "open");
        sessions.notify(&id, notice.clone()).await;
        let session = sessions.get(&id).await.unwrap().unwrap();
        assert_eq!(sessions.take_notice(&id, &session).await, Some(notice));
        let session = sessions.get(&id).await.unwrap().unwrap();
        assert_eq!(sessions.take_notice(&id, &session).await, None);
    }

    #[tokio::test]
    async fn links_work_once_and_expire() {
        let (sessions, _dir) = sessions().await;
        let t0 = Utc::now();
        let expiry = t0 + Duration::from_secs(600);
        let token = sessions
            .issue_link_at("ten_a", "tok_admin", expiry, t0)
            .await
            .unwrap();
        assert_eq!(
            sessions.redeem_link_at(&token, t0).await.unwrap(),
            Some(("ten_a".into(), "tok_admin".into()))
        );
        assert_eq!(sessions.redeem_link_at(&token, t0).await.unwrap(), None);
        let late = sessions
            .issue_link_at("ten_a", "tok_admin", expiry, t0)
            .await
            .unwrap();
        assert_eq!(sessions.redeem_link_at(&late, expiry).await.unwrap(), None);
        assert_eq!(sessions.redeem_link_at("nonsense", t0).await.unwrap(), None);
    }
}
