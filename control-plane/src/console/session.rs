//! Console sessions in memory: the session cookie's id maps to a tenant, a CSRF token and a
//! one-shot notice; one-time sign-in links (`AdminService.CreateConsoleSession`) map to a tenant
//! until used or expired. Ids and tokens are random 256-bit values kept only as SHA-256 hashes,
//! so a memory dump does not hand out live sessions. Each session (and link) names the API token
//! that opened it: the console checks on every request that the token is still valid, so
//! revoking it ends its sessions. Sessions end at a restart (sign in again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The default lifetime of a console link, in seconds.
pub const DEFAULT_LINK_TTL_S: u32 = 600;
/// The longest lifetime of a console link, in seconds.
pub const MAX_LINK_TTL_S: u32 = 3600;
/// The most sessions and links kept at once; past it the oldest are dropped.
const MAX_ENTRIES: usize = 10_000;

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub tenant_id: String,
    /// The API token that opened it (a tenant token, or the admin token that issued the link).
    pub token_id: String,
    /// Embedded in every form of this session and checked on every POST.
    pub csrf: String,
    pub expires_at: Instant,
}

/// A one-shot message shown on the next page (after a POST and its redirect).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notice {
    /// `ok`, `error` or `info`.
    pub kind: &'static str,
    pub text: String,
    /// An optional link shown after the text: (href, label).
    pub link: Option<(String, String)>,
    /// Where the page shows it: `page` (at the top) or `test` (beside "Send test webhook").
    pub area: &'static str,
}

impl Notice {
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            kind: "ok",
            text: text.into(),
            link: None,
            area: "page",
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        Self {
            kind: "error",
            text: text.into(),
            link: None,
            area: "page",
        }
    }

    pub fn info(text: impl Into<String>) -> Self {
        Self {
            kind: "info",
            text: text.into(),
            link: None,
            area: "page",
        }
    }

    /// Shows the notice beside "Send test webhook" instead of at the top of the page.
    pub fn beside_test(mut self) -> Self {
        self.area = "test";
        self
    }

    pub fn with_link(mut self, href: impl Into<String>, label: impl Into<String>) -> Self {
        self.link = Some((href.into(), label.into()));
        self
    }
}

struct Entry {
    session: Session,
    notice: Option<Notice>,
}

struct Link {
    tenant_id: String,
    token_id: String,
    expires_at: Instant,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Entry>,
    links: HashMap<String, Link>,
}

struct Inner {
    secure_cookies: bool,
    /// `http(s)://host:port` of the running console; `None` while it is off.
    base_url: Mutex<Option<String>>,
    state: Mutex<State>,
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

fn key(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    pub fn new(secure_cookies: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                secure_cookies,
                base_url: Mutex::new(None),
                state: Mutex::default(),
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

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a session for `tenant_id`; returns the cookie value and the session.
    pub fn start(&self, tenant_id: &str, token_id: &str) -> (String, Session) {
        self.start_at(tenant_id, token_id, Instant::now())
    }

    pub(crate) fn start_at(
        &self,
        tenant_id: &str,
        token_id: &str,
        now: Instant,
    ) -> (String, Session) {
        let id = random_token();
        let session = Session {
            tenant_id: tenant_id.to_owned(),
            token_id: token_id.to_owned(),
            csrf: random_token(),
            expires_at: now + SESSION_TTL,
        };
        let mut state = self.state();
        state.sessions.retain(|_, e| e.session.expires_at > now);
        if state.sessions.len() >= MAX_ENTRIES
            && let Some(oldest) = state
                .sessions
                .iter()
                .min_by_key(|(_, e)| e.session.expires_at)
                .map(|(k, _)| k.clone())
        {
            state.sessions.remove(&oldest);
        }
        state.sessions.insert(
            key(&id),
            Entry {
                session: session.clone(),
                notice: None,
            },
        );
        (id, session)
    }

    /// Returns the live session of a cookie value.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.get_at(id, Instant::now())
    }

    pub(crate) fn get_at(&self, id: &str, now: Instant) -> Option<Session> {
        let k = key(id);
        let mut state = self.state();
        match state.sessions.get(&k) {
            Some(entry) if entry.session.expires_at > now => Some(entry.session.clone()),
            Some(_) => {
                state.sessions.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends a session (sign-out).
    pub fn end(&self, id: &str) {
        self.state().sessions.remove(&key(id));
    }

    /// Leaves a notice for the session's next page.
    pub fn notify(&self, id: &str, notice: Notice) {
        if let Some(entry) = self.state().sessions.get_mut(&key(id)) {
            entry.notice = Some(notice);
        }
    }

    /// Takes the session's pending notice.
    pub fn take_notice(&self, id: &str) -> Option<Notice> {
        self.state()
            .sessions
            .get_mut(&key(id))
            .and_then(|entry| entry.notice.take())
    }

    /// Issues a one-time sign-in link for `tenant_id` (`AdminService.CreateConsoleSession`; the
    /// caller checked the admin token and that the tenant exists): `ttl_s` 0 means 600 s, at
    /// most 3600. Returns the link and when it expires.
    pub fn create_link(
        &self,
        tenant_id: &str,
        ttl_s: u32,
        token_id: &str,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>), crate::service::Error> {
        let ttl_s =
            crate::domain::validate::ranged("ttl_s", ttl_s, DEFAULT_LINK_TTL_S, 1, MAX_LINK_TTL_S)?;
        let base = self.base_url().ok_or_else(|| {
            crate::service::Error::FailedPrecondition(
                "console: the web console is off on this control plane; set HERALD_CONSOLE_LISTEN"
                    .into(),
            )
        })?;
        let token = self.issue_link(tenant_id, token_id, Duration::from_secs(u64::from(ttl_s)));
        let expires_at = chrono::Utc::now() + chrono::Duration::seconds(i64::from(ttl_s));
        Ok((format!("{base}/login/link?token={token}"), expires_at))
    }

    /// Issues a one-time sign-in link token for `tenant_id`, valid for `ttl`.
    pub fn issue_link(&self, tenant_id: &str, token_id: &str, ttl: Duration) -> String {
        self.issue_link_at(tenant_id, token_id, ttl, Instant::now())
    }

    pub(crate) fn issue_link_at(
        &self,
        tenant_id: &str,
        token_id: &str,
        ttl: Duration,
        now: Instant,
    ) -> String {
        let token = random_token();
        let mut state = self.state();
        state.links.retain(|_, link| link.expires_at > now);
        if state.links.len() >= MAX_ENTRIES
            && let Some(oldest) = state
                .links
                .iter()
                .min_by_key(|(_, link)| link.expires_at)
                .map(|(k, _)| k.clone())
        {
            state.links.remove(&oldest);
        }
        state.links.insert(
            key(&token),
            Link {
                tenant_id: tenant_id.to_owned(),
                token_id: token_id.to_owned(),
                expires_at: now + ttl,
            },
        );
        token
    }

    /// Uses up a link token; returns its tenant and the token that issued it when it was valid
    /// (once only).
    pub fn redeem_link(&self, token: &str) -> Option<(String, String)> {
        self.redeem_link_at(token, Instant::now())
    }

    pub(crate) fn redeem_link_at(&self, token: &str, now: Instant) -> Option<(String, String)> {
        self.state()
            .links
            .remove(&key(token))
            .filter(|link| link.expires_at > now)
            .map(|link| (link.tenant_id, link.token_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        let check = |a: &str, b: &str, expected: bool| assert_eq!(constant_time_eq(a, b), expected);
        check("abc", "abc", true);
        check("abc", "abd", false);
        check("abc", "ab", false);
        check("", "", true);
        check("abc", "ABC", false);
    }

    #[test]
    fn csrf_token_must_be_present_and_equal() {
        let sessions = Sessions::new(false);
        let (_, session) = sessions.start("ten_a", "tok_a");
        let (_, other) = sessions.start("ten_a", "tok_a");
        assert!(csrf_matches(&session, Some(&session.csrf)));
        assert!(!csrf_matches(&session, None));
        assert!(!csrf_matches(&session, Some("")));
        assert!(!csrf_matches(&session, Some(&other.csrf)));
        assert!(!csrf_matches(&session, Some(&session.csrf[1..])));
        assert_ne!(session.csrf, other.csrf);
    }

    #[test]
    fn sessions_expire_after_their_ttl() {
        let sessions = Sessions::new(false);
        let t0 = Instant::now();
        let (id, session) = sessions.start_at("ten_a", "tok_a", t0);
        assert_eq!(sessions.get_at(&id, t0), Some(session.clone()));
        let almost = t0 + SESSION_TTL - Duration::from_secs(1);
        assert_eq!(sessions.get_at(&id, almost), Some(session));
        assert_eq!(sessions.get_at(&id, t0 + SESSION_TTL), None);
        // Expired sessions are forgotten, not revived.
        assert_eq!(sessions.get_at(&id, t0), None);
    }

    #[test]
    fn unknown_and_ended_sessions_are_refused() {
        let sessions = Sessions::new(false);
        let (id, _) = sessions.start("ten_a", "tok_a");
        assert!(sessions.get("nonsense").is_none());
        sessions.end(&id);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn notices_are_shown_once() {
        let sessions = Sessions::new(false);
        let (id, _) = sessions.start("ten_a", "tok_a");
        sessions.notify(&id, Notice::ok("saved"));
        assert_eq!(sessions.take_notice(&id), Some(Notice::ok("saved")));
        assert_eq!(sessions.take_notice(&id), None);
    }

    #[test]
    fn links_work_once_and_expire() {
        let sessions = Sessions::new(false);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(600);
        let token = sessions.issue_link_at("ten_a", "tok_admin", ttl, t0);
        assert_eq!(
            sessions.redeem_link_at(&token, t0),
            Some(("ten_a".into(), "tok_admin".into()))
        );
        assert_eq!(sessions.redeem_link_at(&token, t0), None);
        let late = sessions.issue_link_at("ten_a", "tok_admin", ttl, t0);
        assert_eq!(sessions.redeem_link_at(&late, t0 + ttl), None);
        assert_eq!(sessions.redeem_link_at("nonsense", t0), None);
    }
}
