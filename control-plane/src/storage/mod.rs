//! Persistence on sea-orm: SQLite (embedded default) or PostgreSQL. One file per aggregate; every
//! function takes `&impl ConnectionTrait` so callers compose them in one transaction. Nothing
//! outside this module sees sea-orm or an entity model.

pub mod agent_credentials;
pub mod agents;
pub mod backup;
pub mod console_sessions;
pub mod deliveries;
mod entity;
pub mod events;
mod migration;
pub mod pipeline;
pub mod retention;
pub mod seal;
pub mod secrets;
pub mod subscriptions;
pub mod tenants;
pub mod tokens;
mod writer;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    Statement, TransactionTrait,
};

pub use seal::Sealer;
pub use writer::{ErrorKind, Transaction, WriteHealth, Writer};

/// A storage failure, classified once for the layers above.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A unique constraint refused the write (a racing insert won).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database volume (or PostgreSQL's disk) is full: nothing can be written until space is
    /// freed. Reads still work.
    #[error("storage full: free space on the database volume ({0})")]
    Full(String),
    /// The database is unreachable, busy or overloaded; the call is safe to retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data Herald cannot read back, or a statement Herald got wrong: a bug or a tampered
    /// database.
    #[error("storage: {0}")]
    Internal(String),
}

impl Error {
    /// Classifies a database error: by SQLite result code or PostgreSQL SQLSTATE where the
    /// database gave one, by the kind of failure otherwise.
    pub fn of(err: &DbErr) -> Self {
        use sea_orm::{RuntimeErr, sqlx};
        if let Some(sea_orm::SqlErr::UniqueConstraintViolation(what)) = err.sql_err() {
            return Self::Conflict(what);
        }
        let text = err.to_string();
        let sqlx_err = match err {
            DbErr::ConnectionAcquire(_) => return Self::Unavailable(text),
            DbErr::Conn(RuntimeErr::SqlxError(e))
            | DbErr::Exec(RuntimeErr::SqlxError(e))
            | DbErr::Query(RuntimeErr::SqlxError(e)) => e.as_ref(),
            DbErr::Conn(_) => return Self::Unavailable(text),
            _ => return Self::Internal(text),
        };
        match sqlx_err {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                match classify_code(
                    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                        .is_some(),
                    &code,
                ) {
                    Some(Kind::Full) => Self::Full(text),
                    Some(Kind::Unavailable) => Self::Unavailable(text),
                    None => Self::Internal(text),
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(text),
            _ => Self::Internal(text),
        }
    }

    /// The kind, as `herald_storage_errors_total` labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Conflict(_) => "conflict",
            Self::Full(_) => "full",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// What a database's own error code says about the storage.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Full,
    Unavailable,
}

/// Classifies a PostgreSQL SQLSTATE or a SQLite (extended) result code; `None`: Herald's own
/// fault (a statement it got wrong, a constraint).
fn classify_code(postgres: bool, code: &str) -> Option<Kind> {
    if postgres {
        return match code {
            // disk_full
            "53100" => Some(Kind::Full),
            // insufficient resources (out of memory, too many connections), connection
            // exceptions, the server shutting down or starting, serialization failures and
            // deadlocks (the transaction was rolled back; retrying is safe), read-only standby.
            c if c.starts_with("53") || c.starts_with("08") || c.starts_with("57P") => {
                Some(Kind::Unavailable)
            }
            "40001" | "40P01" | "25006" => Some(Kind::Unavailable),
            _ => None,
        };
    }
    // SQLite reports extended codes; the primary code is the low byte.
    let primary = code.parse::<i32>().ok()? & 0xff;
    match primary {
        // SQLITE_FULL
        13 => Some(Kind::Full),
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN,
        // SQLITE_PROTOCOL, SQLITE_NOLFS
        5 | 6 | 8 | 10 | 14 | 15 | 22 => Some(Kind::Unavailable),
        _ => None,
    }
}

impl From<DbErr> for Error {
    fn from(err: DbErr) -> Self {
        Self::of(&err)
    }
}

impl From<seal::WrongKey> for Error {
    fn from(err: seal::WrongKey) -> Self {
        Self::Internal(err.to_string())
    }
}

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database refused or could not be reached; printed as one line with what to do.
    #[error("HERALD_DATABASE_URL: cannot open {url}: {problem}")]
    Connect {
        url: String,
        problem: ConnectProblem,
    },
    #[error("migrations failed: {0}")]
    Migrate(DbErr),
    #[error(
        "HERALD_DATABASE_URL: {} is in use by another control plane (SQLite allows one replica; use PostgreSQL for several)",
        path.display()
    )]
    InUse { path: std::path::PathBuf },
    #[error("HERALD_DATABASE_URL: cannot lock {}: {source}", path.display())]
    Lock {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "HERALD_MASTER_KEY: the stored secrets were written with a different master key (or with one, and none is set now); start with the key the data was written with"
    )]
    WrongMasterKey,
    #[error(transparent)]
    Storage(#[from] Error),
}

impl OpenError {
    /// Whether the configuration is at fault (a database or role that does not exist, a wrong
    /// password): the start ends with exit code 64 like any bad setting.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Self::Connect { problem, .. } if problem.configuration)
    }
}

/// Why a connection failed, in one line: the database's own words and, where Herald knows,
/// what to do about it.
#[derive(Debug)]
pub struct ConnectProblem {
    pub reason: String,
    pub hint: Option<String>,
    pub configuration: bool,
}

impl std::fmt::Display for ConnectProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

impl ConnectProblem {
    /// Describes a failed connection to `url` (only the innermost error is kept: sqlx and
    /// sea-orm repeat it in every layer).
    fn of(url: &str, err: &DbErr) -> Self {
        use sea_orm::{RuntimeErr, sqlx};
        let sqlx_err = match err {
            DbErr::Conn(RuntimeErr::SqlxError(e))
            | DbErr::Exec(RuntimeErr::SqlxError(e))
            | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e.as_ref()),
            _ => None,
        };
        let parsed = url::Url::parse(url).ok();
        let user = parsed
            .as_ref()
            .map(|u| u.username().to_owned())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "herald".into());
        let database = parsed
            .as_ref()
            .map(|u| u.path().trim_start_matches('/').to_owned())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        let host = parsed
            .as_ref()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_else(|| "localhost".into());
        let port = parsed.as_ref().and_then(|u| u.port()).unwrap_or(5432);
        let unreachable = url
            .starts_with("postgres")
            .then(|| format!("is PostgreSQL running and listening on {host}:{port}?"));
        let create = format!(
            "as a PostgreSQL superuser: createuser -h {host} -U postgres --pwprompt {user} \
             (if the role is missing), then createdb -h {host} -U postgres -O {user} {database}; \
             the role must own the database (Herald creates its tables at start), and each \
             replica opens up to 17 connections"
        );
        match sqlx_err {
            Some(sqlx::Error::Database(db)) => {
                let reason = db.message().to_owned();
                let (hint, configuration) = match db.code().as_deref() {
                    // invalid_catalog_name: the database does not exist.
                    Some("3D000") => (Some(format!("create it {create}")), true),
                    // invalid_authorization_specification: no such role, or pg_hba.conf
                    // refuses it.
                    Some("28000") => (
                        Some(format!(
                            "create the role and database {create}, and allow the role in \
                             pg_hba.conf"
                        )),
                        true,
                    ),
                    Some("28P01") => (
                        Some("check the password in HERALD_DATABASE_URL".to_owned()),
                        true,
                    ),
                    // insufficient_privilege: no CONNECT on the database.
                    Some("42501") => (
                        Some(format!(
                            "as a PostgreSQL superuser: GRANT CONNECT ON DATABASE {database} TO \
                             {user} (better: make {user} the database's owner)"
                        )),
                        true,
                    ),
                    _ => (None, false),
                };
                Self {
                    reason,
                    hint,
                    configuration,
                }
            }
            // Unreachable (refused, timed out): perhaps only for now, so not exit 64.
            Some(other) => Self {
                reason: other.to_string(),
                hint: unreachable,
                configuration: false,
            },
            None => Self {
                reason: err.to_string(),
                hint: None,
                configuration: false,
            },
        }
    }
}

/// The database, with a single writer on SQLite.
#[derive(Clone)]
pub struct Store {
    /// Reads everywhere; writes too on PostgreSQL.
    pub(crate) db: DatabaseConnection,
    /// On SQLite, a pool of one connection: every write goes through it, so writers queue in
    /// the pool instead of failing with "database is locked". On PostgreSQL, the same pool as `db`.
    pub(crate) writer: Writer,
    pub(crate) sealer: Sealer,
    /// Transactions committed by the publish path (observable by tests and benchmarks).
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// On SQLite, the exclusive lock on the database file's `.lock` companion: one control plane
    /// per file. Released by [`Store::close`], and by the kernel when the process dies.
    file_lock: FileLock,
}

/// An exclusive `flock` held while the store is open.
#[derive(Clone, Default)]
struct FileLock(std::sync::Arc<std::sync::Mutex<Option<nix::fcntl::Flock<std::fs::File>>>>);

impl FileLock {
    /// Takes the lock on `<database file>.lock` without waiting; `InUse` when another process
    /// holds it. An in-memory database needs none.
    fn acquire(url: &str) -> Result<Self, OpenError> {
        let Some(path) = parse_sqlite_path(url) else {
            return Ok(Self::default());
        };
        if path.as_os_str() == ":memory:" || url.contains("mode=memory") {
            return Ok(Self::default());
        }
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| OpenError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self(std::sync::Arc::new(std::sync::Mutex::new(Some(lock))))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(OpenError::InUse { path }),
            Err((_, errno)) => Err(OpenError::Lock {
                path: lock_path,
                source: errno.into(),
            }),
        }
    }

    fn release(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Options for [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    pub max_connections: u32,
    pub master_key: Option<[u8; 32]>,
    /// `HERALD_MASTER_KEY_PREVIOUS`: during a rotation, opens what the old key sealed.
    pub previous_master_key: Option<[u8; 32]>,
    /// Tests: the most pages an SQLite database may have, read at every write (a disk that
    /// fills up and is freed again).
    pub sqlite_page_limit: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Store {
    /// Connects, runs the migrations, and checks the master key against the stored data.
    pub async fn open(options: StoreOptions) -> Result<Self, OpenError> {
        let connect_err = |err: DbErr| OpenError::Connect {
            url: redact(&options.url),
            problem: ConnectProblem::of(&options.url, &err),
        };
        let mut file_lock = FileLock::default();
        let writer_state = writer::WriterState::new(options.sqlite_page_limit.clone());
        let (db, writer) = if options.url.starts_with("sqlite:") {
            // Before anything touches the file: a second control plane must not migrate it or
            // release the first one's leases.
            file_lock = FileLock::acquire(&options.url)?;
            let reader = Database::connect(sqlite_options(&options.url, options.max_connections))
                .await
                .map_err(connect_err)?;
            let mut writer_options = sqlite_options(&options.url, 1);
            let state = writer_state.clone();
            writer_options.map_sqlx_sqlite_pool_opts(move |pool| {
                // A connection whose transaction failed is closed, not reused (see `writer`).
                let state = state.clone();
                pool.after_release(move |_, _| {
                    let keep = !state.take_discard();
                    Box::pin(async move { Ok(keep) })
                })
            });
            let writer = Database::connect(writer_options)
                .await
                .map_err(connect_err)?;
            (reader, writer)
        } else {
            let mut opts = ConnectOptions::new(options.url.clone());
            opts.max_connections(options.max_connections)
                .min_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_timeout(Duration::from_secs(5))
                // Only a connection idle for a while may have been dropped by the server or
                // the network; a ping per checkout would be one more round trip per
                // transaction.
                .test_before_acquire_if_idle_for(Duration::from_secs(30))
                .sqlx_logging(false)
                // Prepared statements are cached per connection; a generic plan made while the
                // tables were tiny (a fresh database) would outlive its fit, e.g. scanning a
                // tenant's events for an idempotency key instead of using the unique index.
                .map_sqlx_postgres_opts(|opts| {
                    opts.options([("plan_cache_mode", "force_custom_plan")])
                });
            let db = Database::connect(opts).await.map_err(connect_err)?;
            (db.clone(), db)
        };
        migrate(&writer).await.map_err(OpenError::Migrate)?;
        let store = Self {
            db,
            writer: Writer {
                db: writer,
                state: writer_state,
            },
            sealer: Sealer::new(options.master_key).with_previous(options.previous_master_key),
            commits: Default::default(),
            file_lock,
        };
        store.check_master_key().await?;
        Ok(store)
    }

    /// Begins a transaction on the writer.
    pub async fn begin_write(&self) -> Result<Transaction, Error> {
        self.writer.begin().await
    }

    /// Begins a transaction of the scheduler's leases and results. On PostgreSQL it commits
    /// without waiting for the WAL flush (`synchronous_commit = off` for this transaction only):
    /// a database crash may lose its last fraction of a second, which sends those deliveries
    /// again (at least once) and never loses an acknowledged event; publishing stays synchronous.
    /// SQLite cannot relax one transaction on the shared writer, so it is `begin_write` there.
    pub async fn begin_scheduler_write(&self) -> Result<Transaction, Error> {
        let txn = self.writer.begin().await?;
        if self.shared() {
            txn.execute_unprepared("SET LOCAL synchronous_commit = off")
                .await?;
        }
        Ok(txn)
    }

    /// Begins a write transaction whose writes go in batches on SQLite (see `pipeline`); a
    /// [`Store::begin_write`] (or, `scheduler`, a [`Store::begin_scheduler_write`]) on
    /// PostgreSQL.
    pub async fn begin_batched_write(
        &self,
        scheduler: bool,
    ) -> Result<pipeline::BatchedWrite, Error> {
        if let Some(txn) = self.writer.begin_pipelined().await? {
            return Ok(pipeline::BatchedWrite::Pipelined(txn));
        }
        let txn = if scheduler {
            self.begin_scheduler_write().await?
        } else {
            self.begin_write().await?
        };
        Ok(pipeline::BatchedWrite::Plain(txn))
    }

    /// Whether writes succeed, for the health service.
    pub fn write_health(&self) -> WriteHealth {
        self.writer.health()
    }

    /// Storage errors by kind, for `herald_storage_errors_total`.
    pub fn error_counts(
        &self,
    ) -> prometheus_client::metrics::family::Family<
        ErrorKind,
        prometheus_client::metrics::counter::Counter,
    > {
        self.writer.errors()
    }

    /// Tries a small write and rolls it back; marks the write health with the outcome.
    pub async fn probe_writes(&self) -> Result<(), Error> {
        self.writer.probe().await
    }

    /// Counts one committed publish transaction.
    pub fn count_commit(&self) {
        self.commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns how many publish transactions were committed since start.
    pub fn commits(&self) -> u64 {
        self.commits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns how many events and deliveries are stored (tests and benchmarks).
    pub async fn row_counts(&self) -> Result<(u64, u64), Error> {
        Ok((
            events::count(&self.db).await?,
            deliveries::count(&self.db).await?,
        ))
    }

    /// Returns how many events, deliveries and attempts are stored.
    pub async fn all_counts(&self) -> Result<(u64, u64, u64), Error> {
        retention::counts(&self.db).await
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// Reads one setting of the live connections (`PRAGMA journal_mode`, `SHOW synchronous_commit`).
    pub async fn read_setting(&self, name: &str) -> Result<String, Error> {
        let sql = match self.backend() {
            DbBackend::Sqlite => format!("PRAGMA {name}"),
            _ => format!("SHOW {name}"),
        };
        let mut values = Vec::new();
        for conn in [&self.db, &self.writer.db] {
            let row = conn
                .query_one_raw(Statement::from_string(self.backend(), sql.clone()))
                .await?
                .ok_or_else(|| Error::Internal(format!("{name}: no value")))?;
            let value = row
                .try_get_by_index::<String>(0)
                .or_else(|_| row.try_get_by_index::<i64>(0).map(|v| v.to_string()))
                .map_err(|err| Error::Internal(err.to_string()))?;
            values.push(value);
        }
        values.dedup();
        Ok(values.join(","))
    }

    async fn check_master_key(&self) -> Result<(), OpenError> {
        // Replicas starting together on an empty database race to write the check: the losers
        // hit the unique key, and then read what the winner wrote.
        let mut tries = 0;
        loop {
            match self.check_master_key_once().await {
                Err(OpenError::Storage(Error::Conflict(_))) if tries < 3 => tries += 1,
                result => return result,
            }
        }
    }

    async fn check_master_key_once(&self) -> Result<(), OpenError> {
        const KEY: &str = "master_key_check";
        let stored = entity::meta::Entity::find_by_id(KEY.to_owned())
            .one(&self.writer)
            .await
            .map_err(Error::from)?;
        match stored {
            // Opened by the current key, or by the previous one while a rotation goes on
            // (`rotate-master-key` records the new key when it is done).
            Some(row) if Sealer::is_sealed(&row.value) => match self.sealer.open(&row.value) {
                Ok(text) if text == seal::CHECK_PLAINTEXT && self.sealer.has_key() => Ok(()),
                _ => Err(OpenError::WrongMasterKey),
            },
            // Nothing to record: no key then, none now.
            Some(row) if row.value == "none" && !self.sealer.has_key() => Ok(()),
            // Data written without a key: with a key now, new secrets are sealed and old ones
            // still read; record the key so a later start with another key is refused.
            Some(_) | None => self.record_master_key().await,
        }
    }

    /// Records which master key the data is sealed with (checked at every start).
    pub async fn record_master_key(&self) -> Result<(), OpenError> {
        const KEY: &str = "master_key_check";
        let value = if self.sealer.has_key() {
            self.sealer.seal(seal::CHECK_PLAINTEXT)
        } else {
            "none".to_owned()
        };
        let txn = self.writer.begin().await?;
        entity::meta::Entity::delete_by_id(KEY.to_owned())
            .exec(&txn)
            .await
            .map_err(Error::from)?;
        entity::meta::Entity::insert(entity::meta::ActiveModel {
            key: sea_orm::Set(KEY.to_owned()),
            value: sea_orm::Set(value),
        })
        .exec(&txn)
        .await
        .map_err(Error::from)?;
        txn.commit().await?;
        Ok(())
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
        let _ = self.writer.db.close().await;
        // Clones may outlive this one (a task not yet dropped); the file is free now anyway.
        self.file_lock.release();
    }

    /// Returns whether several replicas may share this database (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.backend() == DbBackend::Postgres
    }
}

fn sqlite_options(url: &str, max_connections: u32) -> ConnectOptions {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        // A local file does not drop connections; a ping per checkout would be one more
        // hand-off to the connection's thread per transaction.
        .test_before_acquire(false)
        .sqlx_logging(false)
        .map_sqlx_sqlite_opts(|opts: SqliteConnectOptions| {
            opts.create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // Durable before acknowledged: every commit is fsynced.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(false)
        });
    opts
}

/// Returns `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    if db.get_database_backend() == DbBackend::Postgres {
        // Replicas starting together migrate once: the first takes the lock, the others wait
        // and then find nothing pending. A transaction-scoped lock needs no unlock on failure.
        let txn = db.begin().await?;
        txn.execute_unprepared("SELECT pg_advisory_xact_lock(4242001)")
            .await?;
        migration::up(&txn).await?;
        txn.commit().await
    } else {
        migration::up(db).await
    }
}

/// Sends `payload` on a PostgreSQL notification channel; inside a transaction it goes out when
/// (and only if) the transaction commits.
pub async fn notify(db: &impl ConnectionTrait, channel: &str, payload: &str) -> Result<(), Error> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    ))
    .await?;
    Ok(())
}

/// Converts stored milliseconds to a time.
pub(crate) fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Converts a time to stored milliseconds.
pub(crate) fn ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

/// Returns the file of a `sqlite:` URL.
pub fn parse_sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    SqliteConnectOptions::from_str(url)
        .ok()
        .map(|opts| opts.get_filename().to_path_buf())
}
