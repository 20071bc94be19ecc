//! `herald-control-plane backup`: a consistent copy of an SQLite database, taken while a control
//! plane may be running on it. `VACUUM INTO` reads one snapshot (WAL lets the control plane go
//! on writing meanwhile) and writes a compact copy; it lands under a temporary name, is synced,
//! checked and renamed, so a file with the backup's name is always a whole backup. PostgreSQL
//! is backed up with its own tools (`pg_dump`).

use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sea_orm::sqlx::{self, ConnectOptions as _, Connection as _};

/// Why a backup was not made.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "HERALD_DATABASE_URL: backup copies SQLite databases; back up PostgreSQL with pg_dump (docs/OPERATIONS.md)"
    )]
    NotSqlite,
    #[error("HERALD_DATABASE_URL: {0}")]
    Url(String),
    #[error("HERALD_DATABASE_URL: {}: no such database file", .0.display())]
    Missing(PathBuf),
    #[error("--to {}: the file exists; name a new one (a backup never overwrites another)", .0.display())]
    Exists(PathBuf),
    #[error("{}: not a Herald database ({reason})", path.display())]
    NotHerald { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Sqlite { path: PathBuf, reason: String },
    #[error("--to {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--to {}: the copy failed its check: {0}", path.display())]
    Check { path: PathBuf, problem: String },
}

/// Copies the SQLite database of `url` to `to` (which must not exist); returns the copy's size
/// in bytes.
pub async fn sqlite(url: &str, to: &Path) -> Result<u64, BackupError> {
    if !url.starts_with("sqlite:") {
        return Err(BackupError::NotSqlite);
    }
    let source =
        SqliteConnectOptions::from_str(url).map_err(|e| BackupError::Url(e.to_string()))?;
    let path = source.get_filename().to_path_buf();
    if !path.is_file() {
        return Err(BackupError::Missing(path));
    }
    if to.exists() {
        return Err(BackupError::Exists(to.to_owned()));
    }
    let sqlite_err = |path: &Path| {
        let path = path.to_owned();
        move |err: sqlx::Error| BackupError::Sqlite {
            path: path.clone(),
            reason: err.to_string(),
        }
    };
    // The control plane's own settings, without creating anything: a missing file is an error.
    let mut conn = SqliteConnectOptions::from_str(url)
        .map_err(|e| BackupError::Url(e.to_string()))?
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30))
        .foreign_keys(false)
        .connect()
        .await
        .map_err(sqlite_err(&path))?;
    let migrations: Result<i64, _> = sqlx::query_scalar("SELECT COUNT(*) FROM seaql_migrations")
        .fetch_one(&mut conn)
        .await;
    if let Err(err) = migrations {
        let _ = conn.close().await;
        return Err(BackupError::NotHerald {
            path,
            reason: err.to_string(),
        });
    }
    let partial = partial_name(to);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BackupError::Io {
            path: path.clone(),
            source,
        }
    };
    // Left by a backup that was interrupted: never a backup (it has no backup's name).
    let _ = std::fs::remove_file(&partial);
    let vacuumed = sqlx::query("VACUUM INTO ?")
        .bind(partial.to_string_lossy().into_owned())
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    if let Err(err) = vacuumed {
        let _ = std::fs::remove_file(&partial);
        return Err(BackupError::Sqlite {
            path: to.to_owned(),
            reason: err.to_string(),
        });
    }
    if let Err(err) = check(&partial).await {
        let _ = std::fs::remove_file(&partial);
        return Err(err);
    }
    // On disk before it has the backup's name, and the name on disk before success is told.
    let file = std::fs::File::open(&partial).map_err(io_err(&partial))?;
    file.sync_all().map_err(io_err(&partial))?;
    let bytes = file.metadata().map_err(io_err(&partial))?.len();
    drop(file);
    std::fs::rename(&partial, to).map_err(io_err(to))?;
    if let Some(dir) = to.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(bytes)
}

/// `<to>.partial`, next to `to` (the rename stays on one file system).
fn partial_name(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Opens the copy on its own and runs SQLite's `quick_check` on it.
async fn check(path: &Path) -> Result<(), BackupError> {
    let failed = |problem: String| BackupError::Check {
        path: path.to_owned(),
        problem,
    };
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .read_only(true)
        .connect()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let verdict: Result<String, _> = sqlx::query_scalar("PRAGMA quick_check")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    match verdict {
        Ok(verdict) if verdict == "ok" => Ok(()),
        Ok(verdict) => Err(failed(verdict)),
        Err(err) => Err(failed(err.to_string())),
    }
}
