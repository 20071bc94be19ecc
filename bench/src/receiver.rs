//! The benchmark's receiver: a lean HTTP/1.1 server on 127.0.0.1 (hyper, keep-alive) that keeps
//! only (target, `webhook-id`, arrival instant, answered 2xx) per request.
//!
//! Targets are paths `/s/<n>` (subscription `n`); any other path is [`OTHER_TARGET`]. With
//! failures on, it answers 500 to the first request of each (target, id) whose id hashes into a
//! fixed fifth of the id space, and 200 to everything else. A target can be made slow (it
//! answers after a delay) or hanging (it never answers; its requests are recorded as not 2xx).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The target of a request whose path is not `/s/<n>`.
pub const OTHER_TARGET: u32 = u32::MAX;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Record {
    /// `n` of the path `/s/<n>`, else [`OTHER_TARGET`].
    pub target: u32,
    /// The `webhook-id` header (empty when missing).
    pub id: Box<str>,
    /// When the request head had arrived.
    pub at: Instant,
    /// Whether it was answered with 200 (else 500, or never for a hanging target).
    pub ok: bool,
}

/// How a target answers besides the default (at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 (or the failure rule's 500) after this delay.
    After(Duration),
    /// Never: the request waits until the peer gives up (recorded as not 2xx).
    Never,
}

#[derive(Default)]
struct State {
    records: Mutex<Vec<Record>>,
    /// Requests answered 200 so far (duplicates included): a cheap progress counter.
    ok: AtomicU64,
    fail_first: AtomicBool,
    /// The (target, id) pairs already answered 500 once.
    failed: Mutex<HashSet<(u32, Box<str>)>>,
    /// Targets that do not answer at once.
    answers: RwLock<HashMap<u32, Answer>>,
}

/// A running receiver; dropped, it stops accepting and closes its connections.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 with room for `capacity` records before it reallocates.
    pub async fn start(capacity: usize) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("receiver: cannot bind 127.0.0.1:0")?;
        let addr = listener.local_addr().context("receiver: local address")?;
        let state = Arc::new(State {
            records: Mutex::new(Vec::with_capacity(capacity)),
            ..State::default()
        });
        let server = tokio::spawn(serve(listener, state.clone()));
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    /// Returns the URL of subscription `n`'s path.
    pub fn url(&self, n: usize) -> String {
        format!("http://{}/s/{n}", self.addr)
    }

    /// Turns the 500-to-first-attempts rule on or off.
    pub fn fail_first(&self, on: bool) {
        self.state.fail_first.store(on, Ordering::Relaxed);
    }

    /// Makes target `n` answer as `answer` from now on.
    pub fn answer(&self, n: usize, answer: Answer) {
        let mut answers = self
            .state
            .answers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        answers.insert(n as u32, answer);
    }

    /// Returns how many requests were answered 200 so far, duplicates included.
    pub fn ok_count(&self) -> u64 {
        self.state.ok.load(Ordering::Relaxed)
    }

    /// Takes every record so far and starts counting from zero.
    pub fn take(&self) -> Vec<Record> {
        let records = std::mem::take(&mut *lock(&self.state.records));
        self.state.ok.store(0, Ordering::Relaxed);
        lock(&self.state.failed).clear();
        records
    }

    /// Counts into `count` the records that arrived since its last call: the (target, id)
    /// pairs of targets below its limit answered 200 so far. Reading only the new records keeps
    /// a check once a second short; a full scan of a million records held the lock long
    /// enough to stall the receiver, and with it the drain being measured.
    pub fn count_ok_below(&self, count: &mut OkBelow) -> usize {
        let records = lock(&self.state.records);
        let new = records.get(count.read..).unwrap_or_default();
        count.unique.extend(
            new.iter()
                .filter(|r| r.ok && r.target < count.limit)
                .map(|r| (r.target, r.id.clone())),
        );
        count.read = records.len();
        count.unique.len()
    }

    /// Returns the latest arrival answered 200 among targets below `limit`.
    pub fn last_ok_below(&self, limit: u32) -> Option<Instant> {
        let records = lock(&self.state.records);
        records
            .iter()
            .filter(|r| r.ok && r.target < limit)
            .map(|r| r.at)
            .max()
    }

    /// Returns the (target, id) pairs answered 200 so far; for progress checks only.
    pub fn unique_ok(&self) -> usize {
        let records = lock(&self.state.records);
        records
            .iter()
            .filter(|r| r.ok)
            .map(|r| (r.target, &r.id))
            .collect::<HashSet<_>>()
            .len()
    }
}

/// A running count of unique deliveries answered 200 to targets below a limit (see
/// [`Receiver::count_ok_below`]).
#[derive(Debug, Default)]
pub struct OkBelow {
    limit: u32,
    read: usize,
    unique: HashSet<(u32, Box<str>)>,
}

impl OkBelow {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (pushes and inserts only).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections and serves each on its own task; aborting this task drops the set and
/// with it every connection.
async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| handle(state.clone(), request));
                        let _ = http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of file descriptors and the like: give the peers a moment to close some.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn handle(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let at = Instant::now();
    let target = target_of(request.uri().path());
    let id: Box<str> = request
        .headers()
        .get("webhook-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .into();
    // Read the body so that the connection can carry the next request.
    let _ = request.into_body().collect().await;
    let answer = state
        .answers
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&target)
        .copied();
    let fail = state.fail_first.load(Ordering::Relaxed)
        && fails_first(&id)
        && lock(&state.failed).insert((target, id.clone()));
    let hang = answer == Some(Answer::Never);
    lock(&state.records).push(Record {
        target,
        id,
        at,
        ok: !fail && !hang,
    });
    match answer {
        // Dropped with the connection when the peer gives up.
        Some(Answer::Never) => std::future::pending::<()>().await,
        Some(Answer::After(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        state.ok.fetch_add(1, Ordering::Relaxed);
        StatusCode::OK
    };
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = status;
    Ok(response)
}

/// Returns `n` of `/s/<n>`, else [`OTHER_TARGET`].
fn target_of(path: &str) -> u32 {
    path.strip_prefix("/s/")
        .and_then(|n| n.parse().ok())
        .unwrap_or(OTHER_TARGET)
}

/// Returns whether the first attempt of `id` is answered 500: a fixed fifth of ids (FNV-1a hash
/// modulo 5), so the choice does not depend on arrival order.
pub fn fails_first(id: &str) -> bool {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    hash % 5 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_subscription_paths() {
        assert_eq!(target_of("/s/0"), 0);
        assert_eq!(target_of("/s/9"), 9);
        assert_eq!(target_of("/c"), OTHER_TARGET);
        assert_eq!(target_of("/s/x"), OTHER_TARGET);
    }

    #[test]
    fn about_a_fifth_of_ids_fail_first() {
        let failing = (0..10_000)
            .filter(|n| fails_first(&format!("evt_{n:026}")))
            .count();
        assert!((1_800..2_200).contains(&failing), "{failing}");
    }
}
