//! The write path's connections and what their failures mean: every write goes through a
//! [`Writer`] (autocommit statements) or a [`Transaction`] it began. Both classify a failure once
//! ([`Error::of`]), count it by kind, and keep [`WriteHealth`] (writes succeed or not) for the
//! health service.
//!
//! After an error inside a transaction, the connection's state is unknown: SQLite may have rolled
//! the transaction back by itself (`SQLITE_FULL`, `SQLITE_IOERR`), and sqlx's count of open
//! transactions then no longer matches the connection, so a later `BEGIN` became a `SAVEPOINT`
//! inside a transaction that never ended and every "commit" after it stayed in memory. The rule
//! here: a write transaction that does not end in a successful `COMMIT` discards its connection
//! (SQLite's single writer: the pool closes it on release and opens a fresh one). PostgreSQL
//! reports its transaction state itself, and sqlx closes a connection that fails its release ping.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, ExecResult,
    QueryResult, Statement, TransactionTrait,
};
use tokio::sync::watch;

use super::Error;

/// The label of `herald_storage_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorKind {
    pub kind: &'static str,
}

/// Whether writes succeed, as the last write found; watched by the health service.
#[derive(Clone)]
pub struct WriteHealth(watch::Receiver<bool>);

impl WriteHealth {
    pub fn ok(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until writes start or stop succeeding; returns the new state (`None` once the
    /// store is gone).
    pub async fn changed(&mut self) -> Option<bool> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }
}

/// What the writer's connections share.
pub(crate) struct WriterState {
    /// On SQLite: the connection now in use must be closed when it goes back to the pool.
    pub(super) discard: AtomicBool,
    healthy: watch::Sender<bool>,
    /// The storage is full: only a write that needs room (the probe) proves it has room again;
    /// an update in place may still succeed on a full disk.
    full: AtomicBool,
    errors: Family<ErrorKind, Counter>,
    /// Tests: `PRAGMA max_page_count` for every SQLite write (a disk that fills up).
    page_limit: Option<Arc<AtomicU64>>,
}

impl WriterState {
    pub(crate) fn new(page_limit: Option<Arc<AtomicU64>>) -> Arc<Self> {
        Arc::new(Self {
            discard: AtomicBool::new(false),
            healthy: watch::Sender::new(true),
            full: AtomicBool::new(false),
            errors: Family::default(),
            page_limit,
        })
    }

    /// Tests: the page limit every SQLite write runs under, when one is set.
    pub(super) fn page_limit(&self) -> Option<u64> {
        self.page_limit
            .as_ref()
            .map(|limit| limit.load(Ordering::Acquire))
    }

    /// Whether the connection being released must be closed (see the module comment); read by
    /// the SQLite writer pool's `after_release`.
    pub(crate) fn take_discard(&self) -> bool {
        self.discard.swap(false, Ordering::AcqRel)
    }

    /// Counts a failed write and, for faults of the storage itself, marks writes as failing.
    pub(super) fn failed(&self, err: &Error) {
        self.errors
            .get_or_create(&ErrorKind { kind: err.kind() })
            .inc();
        let fault = matches!(err, Error::Full(_) | Error::Unavailable(_));
        if matches!(err, Error::Full(_)) {
            self.full.store(true, Ordering::Release);
        }
        if fault && *self.healthy.borrow() {
            self.healthy.send_replace(false);
            match err {
                Error::Full(_) => tracing::error!(
                    error = %err,
                    "storage full: writes fail, publishes are refused with RESOURCE_EXHAUSTED; free space on the database volume (publishing and delivery resume by themselves)"
                ),
                _ => tracing::error!(
                    error = %err,
                    "storage unavailable: writes fail, publishes are refused with UNAVAILABLE; check the database (publishing and delivery resume by themselves)"
                ),
            }
        }
    }

    /// A write succeeded. After a full disk, only one that needed room counts (`room`).
    pub(super) fn succeeded(&self, room: bool) {
        if !room && self.full.load(Ordering::Acquire) {
            return;
        }
        self.full.store(false, Ordering::Release);
        if !*self.healthy.borrow() {
            self.healthy.send_replace(true);
            tracing::warn!("storage writes succeed again");
        }
    }
}

/// The writer: one connection on SQLite, the shared pool on PostgreSQL. Autocommit statements on
/// it are observed like transactions.
#[derive(Clone)]
pub struct Writer {
    pub(crate) db: DatabaseConnection,
    pub(crate) state: Arc<WriterState>,
}

impl Writer {
    /// Begins a write transaction whose statements are sent in batches (SQLite only; see
    /// [`super::pipeline`]). On PostgreSQL, `None`: use [`Writer::begin`].
    pub(super) async fn begin_pipelined(
        &self,
    ) -> Result<Option<super::pipeline::Pipelined>, Error> {
        let DbBackend::Sqlite = self.db.get_database_backend() else {
            return Ok(None);
        };
        let pool = self.db.get_sqlite_connection_pool();
        match pool.acquire().await {
            Ok(conn) => Ok(Some(super::pipeline::Pipelined::begin(
                conn,
                self.state.clone(),
            ))),
            Err(err) => {
                let err = Error::of(&DbErr::Conn(sea_orm::RuntimeErr::SqlxError(Arc::new(err))));
                self.state.failed(&err);
                Err(err)
            }
        }
    }

    /// Begins a write transaction.
    pub async fn begin(&self) -> Result<Transaction, Error> {
        let txn = match self.db.begin().await {
            Ok(txn) => txn,
            Err(err) => {
                let err = Error::from(err);
                self.state.discard.store(true, Ordering::Release);
                self.state.failed(&err);
                return Err(err);
            }
        };
        let txn = Transaction {
            txn: Some(txn),
            backend: self.db.get_database_backend(),
            state: self.state.clone(),
        };
        if let Some(limit) = &self.state.page_limit {
            let pages = limit.load(Ordering::Acquire);
            txn.execute_unprepared(&format!("PRAGMA max_page_count = {pages}"))
                .await?;
        }
        Ok(txn)
    }

    pub fn health(&self) -> WriteHealth {
        WriteHealth(self.state.healthy.subscribe())
    }

    pub fn errors(&self) -> Family<ErrorKind, Counter> {
        self.state.errors.clone()
    }

    /// Tries a write of about one publish batch's size and rolls it back: whether the database
    /// has room and answers. Marks the health accordingly.
    pub async fn probe(&self) -> Result<(), Error> {
        let txn = self.begin().await?;
        let filler = "x".repeat(256 << 10);
        txn.execute_raw(Statement::from_sql_and_values(
            self.db.get_database_backend(),
            match self.db.get_database_backend() {
                DbBackend::Postgres => "INSERT INTO meta (key, value) VALUES ('write_probe', $1)",
                _ => "INSERT INTO meta (key, value) VALUES ('write_probe', ?)",
            },
            [filler.into()],
        ))
        .await?;
        txn.rollback().await?;
        self.state.succeeded(true);
        Ok(())
    }

    fn observe<T>(&self, result: Result<T, DbErr>, write: bool) -> Result<T, DbErr> {
        match &result {
            Ok(_) if write => self.state.succeeded(false),
            Ok(_) => {}
            Err(err) => self.state.failed(&Error::of(err)),
        }
        result
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Writer {
    fn get_database_backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        if let Some(limit) = &self.state.page_limit {
            let pages = limit.load(Ordering::Acquire);
            self.db
                .execute_unprepared(&format!("PRAGMA max_page_count = {pages}"))
                .await?;
        }
        self.observe(self.db.execute_raw(stmt).await, true)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.observe(self.db.execute_unprepared(sql).await, true)
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.observe(self.db.query_one_raw(stmt).await, false)
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.observe(self.db.query_all_raw(stmt).await, false)
    }

    fn support_returning(&self) -> bool {
        self.db.support_returning()
    }
}

/// A write transaction; storage functions take it as `&impl ConnectionTrait`. Dropped without a
/// successful [`commit`](Self::commit) or [`rollback`](Self::rollback), its connection is
/// discarded (see the module comment).
pub struct Transaction {
    txn: Option<DatabaseTransaction>,
    backend: DbBackend,
    state: Arc<WriterState>,
}

impl Transaction {
    fn inner(&self) -> Result<&DatabaseTransaction, DbErr> {
        self.txn
            .as_ref()
            .ok_or_else(|| DbErr::Custom("transaction already ended".into()))
    }

    fn observe<T>(&self, result: Result<T, DbErr>) -> Result<T, DbErr> {
        if let Err(err) = &result {
            self.state.discard.store(true, Ordering::Release);
            self.state.failed(&Error::of(err));
        }
        result
    }

    /// Commits. An error means the outcome is unknown: the transaction may or may not be in the
    /// database (the connection was lost during `COMMIT`); the connection is discarded.
    pub async fn commit(mut self) -> Result<(), Error> {
        let Some(txn) = self.txn.take() else {
            return Err(Error::Internal("transaction already ended".into()));
        };
        match txn.commit().await {
            Ok(()) => {
                self.state.succeeded(false);
                Ok(())
            }
            Err(err) => {
                let err = Error::of(&err);
                self.state.discard.store(true, Ordering::Release);
                self.state.failed(&err);
                Err(err)
            }
        }
    }

    /// Rolls back on purpose (nothing went wrong).
    pub async fn rollback(mut self) -> Result<(), Error> {
        let Some(txn) = self.txn.take() else {
            return Ok(());
        };
        match txn.rollback().await {
            Ok(()) => Ok(()),
            Err(err) => {
                let err = Error::of(&err);
                self.state.discard.store(true, Ordering::Release);
                self.state.failed(&err);
                Err(err)
            }
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if self.txn.is_some() {
            // An error, or a cancelled task: nothing proves what the connection holds now. The
            // flag is set before the inner transaction (and its connection) is released.
            self.state.discard.store(true, Ordering::Release);
        }
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for Transaction {
    fn get_database_backend(&self) -> DbBackend {
        self.backend
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let result = self.inner()?.execute_raw(stmt).await;
        self.observe(result)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let result = self.inner()?.execute_unprepared(sql).await;
        self.observe(result)
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        let result = self.inner()?.query_one_raw(stmt).await;
        self.observe(result)
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let result = self.inner()?.query_all_raw(stmt).await;
        self.observe(result)
    }

    fn support_returning(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| t.support_returning())
    }
}
