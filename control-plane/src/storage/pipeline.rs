//! SQLite write transactions in few hand-offs. sqlx runs each SQLite connection on a thread of its
//! own and hands it one statement at a time: a transaction of five statements costs five round
//! trips between threads (two context switches each), which at everyday rates, where every
//! transaction carries one event, is most of what a delivery costs.
//!
//! A [`Pipelined`] transaction holds the writer connection and sends statements only when it
//! must: writes (`execute`) are buffered, and go with the next read (`query`) or with the
//! `COMMIT`, as one multi-statement command (SQLite binds each statement's `?` parameters in
//! turn). `BEGIN` goes with the first command. So the publish transaction (read the
//! subscriptions, insert the events and the deliveries, commit) is two hand-offs instead of
//! five. The price: a buffered write's effect is not known when `execute` returns (its
//! `rows_affected` is 0), so only code that never reads it uses this; an error in a buffered
//! write surfaces at the next read or at `commit`.
//!
//! Failures follow [`super::writer`]'s rule: a transaction that does not end in a successful
//! `COMMIT` discards its connection, and every failure is classified and counted there.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::TryStreamExt as _;
use sea_orm::sqlx::sqlite::{Sqlite, SqliteQueryResult, SqliteRow};
use sea_orm::sqlx::{self, Either, pool::PoolConnection};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, ExecResult, QueryResult, RuntimeErr, Statement};
use sea_query_sqlx::SqlxValues;
use tokio::sync::Mutex;

use super::Error;
use super::writer::WriterState;

/// A write transaction on SQLite's writer connection that sends its statements in batches.
pub struct Pipelined {
    inner: Mutex<Buffer>,
    state: Arc<WriterState>,
}

struct Buffer {
    /// `None` once the transaction ended (or its connection was given up).
    conn: Option<PoolConnection<Sqlite>>,
    sql: String,
    values: Vec<sea_orm::Value>,
    /// Statements in `sql`.
    statements: usize,
    /// The last failed command failed at its last statement (or could not tell where).
    failed_at_end: bool,
}

impl Buffer {
    fn push(&mut self, sql: &str, values: Option<sea_orm::Values>) {
        if !self.sql.is_empty() {
            self.sql.push_str(";\n");
        }
        self.sql.push_str(sql);
        if let Some(values) = values {
            self.values.extend(values.0);
        }
        self.statements += 1;
    }
}

fn db_err(err: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(err)))
}

impl Pipelined {
    /// Starts a transaction on `conn` (the writer's, taken from its pool); nothing is sent yet.
    pub(crate) fn begin(conn: PoolConnection<Sqlite>, state: Arc<WriterState>) -> Self {
        let mut buffer = Buffer {
            conn: Some(conn),
            sql: String::new(),
            values: Vec::new(),
            statements: 0,
            failed_at_end: false,
        };
        if let Some(limit) = state.page_limit() {
            buffer.push(&format!("PRAGMA max_page_count = {limit}"), None);
        }
        buffer.push("BEGIN IMMEDIATE", None);
        Self {
            inner: Mutex::new(buffer),
            state,
        }
    }

    /// Sends what is buffered as one command; returns the rows of its last statement.
    async fn flush(&self, buffer: &mut Buffer) -> Result<Vec<SqliteRow>, DbErr> {
        let sql = std::mem::take(&mut buffer.sql);
        let values = std::mem::take(&mut buffer.values);
        let statements = std::mem::replace(&mut buffer.statements, 0);
        let Some(conn) = buffer.conn.as_mut() else {
            return Err(DbErr::Custom("transaction already ended".into()));
        };
        if statements == 0 {
            return Ok(Vec::new());
        }
        // Each statement ends with its result (`Left`); the rows (`Right`) before the last
        // statement's result are the ones asked for.
        let mut done = 0;
        let mut rows = Vec::new();
        // sqlx 0.9 still runs several statements of one prepared query on SQLite, binding
        // parameters in order, but marks it deprecated (launchbadge/sqlx#3108): the unit
        // tests below pin the behaviour this module needs, so an upgrade that drops it fails
        // them.
        #[allow(deprecated)]
        let mut stream = sqlx::query_with(
            sqlx::AssertSqlSafe(sql),
            SqlxValues(sea_orm::Values(values)),
        )
        .fetch_many(&mut **conn);
        let outcome: Result<(), sqlx::Error> = async {
            while let Some(item) = stream.try_next().await? {
                match item {
                    Either::Left(_) => done += 1,
                    Either::Right(row) if done + 1 == statements => rows.push(row),
                    Either::Right(_) => {}
                }
            }
            Ok(())
        }
        .await;
        drop(stream);
        match outcome {
            Ok(()) => Ok(rows),
            Err(err) => {
                let err = db_err(err);
                buffer.failed_at_end = done + 1 >= statements;
                self.give_up(buffer);
                self.state.failed(&Error::of(&err));
                Err(err)
            }
        }
    }

    /// Gives the connection back to be closed: its transaction's state is unknown.
    fn give_up(&self, buffer: &mut Buffer) {
        self.state.discard.store(true, Ordering::Release);
        buffer.conn.take();
    }

    /// Commits (with the writes still buffered). On an error, whether the transaction may be in
    /// the database: `false` when a statement before the `COMMIT` failed (nothing was
    /// committed), `true` when the `COMMIT` itself failed (the outcome is unknown, as for
    /// [`super::Transaction::commit`]).
    pub async fn commit(self) -> Result<(), (Error, bool)> {
        let mut buffer = self.inner.lock().await;
        buffer.push("COMMIT", None);
        match self.flush(&mut buffer).await {
            Ok(_) => {
                self.state.succeeded(false);
                // Back to the pool, ready for the next transaction.
                buffer.conn.take();
                Ok(())
            }
            Err(err) => Err((Error::of(&err), buffer.failed_at_end)),
        }
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        let buffer = self.inner.get_mut();
        if buffer.conn.is_some() {
            // Not committed (an error, or a cancelled task): the connection may hold an open
            // transaction. The flag is set before the connection goes back to the pool.
            self.state.discard.store(true, Ordering::Release);
            buffer.conn.take();
        }
    }
}

/// A write transaction whose writes may be buffered: [`Pipelined`] on SQLite, an ordinary
/// [`super::Transaction`] on PostgreSQL (its round trips are per statement anyway). For code
/// that never reads what its writes return (see the module comment).
pub enum BatchedWrite {
    Pipelined(Pipelined),
    Plain(super::Transaction),
}

impl BatchedWrite {
    /// Commits; on an error, whether the transaction may be in the database (see
    /// [`Pipelined::commit`]; a failed plain `COMMIT` always may be).
    pub async fn commit(self) -> Result<(), (Error, bool)> {
        match self {
            Self::Pipelined(txn) => txn.commit().await,
            Self::Plain(txn) => txn.commit().await.map_err(|err| (err, true)),
        }
    }
}

/// Runs `$body` on whichever transaction `$write` holds.
macro_rules! on_either {
    ($write:expr, $txn:ident => $body:expr) => {
        match $write {
            BatchedWrite::Pipelined($txn) => $body,
            BatchedWrite::Plain($txn) => $body,
        }
    };
}

#[async_trait::async_trait]
impl ConnectionTrait for BatchedWrite {
    fn get_database_backend(&self) -> DbBackend {
        on_either!(self, txn => txn.get_database_backend())
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        on_either!(self, txn => txn.execute_raw(stmt).await)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        on_either!(self, txn => txn.execute_unprepared(sql).await)
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        on_either!(self, txn => txn.query_one_raw(stmt).await)
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        on_either!(self, txn => txn.query_all_raw(stmt).await)
    }

    fn support_returning(&self) -> bool {
        on_either!(self, txn => txn.support_returning())
    }
}

fn exec_result() -> ExecResult {
    ExecResult::from(SqliteQueryResult::default())
}

#[async_trait::async_trait]
impl ConnectionTrait for Pipelined {
    fn get_database_backend(&self) -> DbBackend {
        DbBackend::Sqlite
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        self.inner.lock().await.push(&stmt.sql, stmt.values);
        Ok(exec_result())
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.inner.lock().await.push(sql, None);
        Ok(exec_result())
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        Ok(self.query_all_raw(stmt).await?.into_iter().next())
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let mut buffer = self.inner.lock().await;
        buffer.push(&stmt.sql, stmt.values);
        let rows = self.flush(&mut buffer).await?;
        Ok(rows.into_iter().map(QueryResult::from).collect())
    }

    fn support_returning(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Store, StoreOptions};

    async fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(StoreOptions {
            url: format!("sqlite://{}?mode=rwc", dir.path().join("p.db").display()),
            max_connections: 2,
            master_key: None,
            previous_master_key: None,
            sqlite_page_limit: None,
        })
        .await
        .unwrap()
    }

    fn put(key: &str, value: &str) -> Statement {
        Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [key.into(), value.into()],
        )
    }

    async fn value(store: &Store, key: &str) -> Option<String> {
        store
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "SELECT value FROM meta WHERE key = ?",
                [key.into()],
            ))
            .await
            .unwrap()
            .map(|row| row.try_get_by_index::<String>(0).unwrap())
    }

    /// Buffered writes bind their own parameters in turn, a read in between sees them, and
    /// nothing is visible to others before the COMMIT.
    #[tokio::test]
    async fn writes_go_with_the_next_read_or_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let txn = store.writer.begin_pipelined().await.unwrap().unwrap();
        txn.execute_raw(put("a", "1")).await.unwrap();
        txn.execute_raw(put("b", "2")).await.unwrap();
        let read = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "SELECT key, value FROM meta WHERE key IN (?, ?) ORDER BY key",
                ["a".into(), "b".into()],
            ))
            .await
            .unwrap();
        let pairs: Vec<(String, String)> = read
            .iter()
            .map(|row| {
                (
                    row.try_get_by_index(0).unwrap(),
                    row.try_get_by_index(1).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [("a".into(), "1".into()), ("b".into(), "2".into())],
            "only the read's rows, parameters bound in order"
        );
        txn.execute_raw(put("c", "3")).await.unwrap();
        assert_eq!(value(&store, "a").await, None, "not committed yet");
        txn.commit().await.unwrap();
        for (key, expected) in [("a", "1"), ("b", "2"), ("c", "3")] {
            assert_eq!(value(&store, key).await.as_deref(), Some(expected));
        }
    }

    /// A buffered write that fails fails the commit as "not committed", leaves nothing behind,
    /// and the next transaction runs on a fresh connection.
    #[tokio::test]
    async fn a_failed_write_commits_nothing_and_the_writer_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let txn = store.writer.begin_pipelined().await.unwrap().unwrap();
        txn.execute_raw(put("x", "1")).await.unwrap();
        txn.execute_raw(put("x", "again")).await.unwrap();
        let (err, maybe_committed) = txn.commit().await.unwrap_err();
        assert!(!maybe_committed, "{err}");
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
        assert_eq!(value(&store, "x").await, None);

        // Dropped without a commit: nothing either.
        let txn = store.writer.begin_pipelined().await.unwrap().unwrap();
        txn.execute_raw(put("y", "1")).await.unwrap();
        txn.query_all_raw(put("z", "1")).await.unwrap();
        drop(txn);
        assert_eq!(value(&store, "y").await, None);

        let txn = store.writer.begin_pipelined().await.unwrap().unwrap();
        txn.execute_raw(put("x", "2")).await.unwrap();
        txn.commit().await.unwrap();
        assert_eq!(value(&store, "x").await.as_deref(), Some("2"));
        // And the ordinary transactions on the same writer still commit for real.
        let plain = store.writer.begin().await.unwrap();
        plain.execute_raw(put("w", "1")).await.unwrap();
        plain.commit().await.unwrap();
        assert_eq!(value(&store, "w").await.as_deref(), Some("1"));
    }
}
