//! Schema migrations, append-only and additive (a rolling restart runs old and new code on one
//! schema). Plain SQL that SQLite and PostgreSQL both accept: times are BIGINT milliseconds since
//! the Unix epoch, states the integer values of the proto enums.
//!
//! Applied versions are recorded in `seaql_migrations`, the table of sea-orm-migration, which
//! Herald used before this runner: databases it migrated carry on. (That crate turned on sea-orm's
//! default features — rust_decimal, uuid, time, schema discovery — which Herald never uses and
//! every cold build compiled.)

use std::collections::HashSet;

use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, Statement, TransactionSession as _, TransactionTrait,
};

/// Every migration in order: its version (as recorded) and its statements.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("m0001_initial", M0001),
    ("m0002_delivery_log", M0002),
    ("m0003_agent_credentials", M0003),
    ("m0004_replicas", M0004),
    ("m0005_waiting_by_subscription", M0005),
    ("m0006_console_sessions", M0006),
    ("m0007_payload_filters", M0007),
    ("m0008_custom_headers", M0008),
    ("m0009_shared_agent_token", M0009),
];

/// Applies the migrations `db` has not recorded, in order, each in a transaction with its
/// record. Versions recorded but unknown here (a newer release migrated the database) are left
/// alone: migrations only add, so this release still runs on that schema during a rolling
/// upgrade.
pub async fn up<C: ConnectionTrait + TransactionTrait>(db: &C) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    // Looked up rather than `CREATE TABLE IF NOT EXISTS`, which PostgreSQL answers with a notice
    // (logged at every start) when the table exists.
    let exists = match backend {
        DbBackend::Postgres => "SELECT 1 WHERE to_regclass('seaql_migrations') IS NOT NULL",
        _ => "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'seaql_migrations'",
    };
    if db
        .query_one_raw(Statement::from_string(backend, exists))
        .await?
        .is_none()
    {
        db.execute_unprepared(
            "CREATE TABLE seaql_migrations \
             (version VARCHAR NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
    }
    let applied: HashSet<String> = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT version FROM seaql_migrations",
        ))
        .await?
        .iter()
        .map(|row| row.try_get_by_index::<String>(0))
        .collect::<Result<_, _>>()?;
    for (version, sql) in MIGRATIONS {
        if applied.contains(*version) {
            continue;
        }
        let txn = db.begin().await?;
        for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            txn.execute_unprepared(statement).await?;
        }
        let applied_at = chrono::Utc::now().timestamp();
        // Both values are Herald's own (a constant name, a number): no user input in the SQL.
        txn.execute_unprepared(&format!(
            "INSERT INTO seaql_migrations (version, applied_at) VALUES ('{version}', {applied_at})"
        ))
        .await?;
        txn.commit().await?;
        tracing::info!(version, "applied migration");
    }
    Ok(())
}

const M0001: &str = r#"
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    admin BOOLEAN NOT NULL,
    bootstrap BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    event_types TEXT NOT NULL,
    active BOOLEAN NOT NULL,
    status INTEGER NOT NULL,
    disabled_reason TEXT,
    api_key TEXT,
    api_key_hint TEXT,
    api_key_header TEXT NOT NULL,
    signing_secret TEXT NOT NULL,
    previous_secret TEXT,
    previous_secret_expires_at BIGINT,
    region TEXT,
    timeout_ms INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    rate_limit_per_s INTEGER NOT NULL,
    ordered BOOLEAN NOT NULL,
    last_delivery_state INTEGER,
    last_delivery_status INTEGER,
    last_delivery_at BIGINT,
    last_success_at BIGINT,
    failing_since BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX subscriptions_tenant ON subscriptions (tenant_id, id);
CREATE TABLE events (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    entity_type TEXT,
    entity_id TEXT,
    action TEXT,
    payload TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    traceparent TEXT,
    occurred_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX events_idempotency ON events (tenant_id, idempotency_key);
CREATE INDEX events_tenant ON events (tenant_id, id);
CREATE INDEX events_tenant_type ON events (tenant_id, event_type, id);
CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    subscription_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    attempt_count INTEGER NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    lease_id TEXT,
    lease_expires_at BIGINT,
    agent_id TEXT,
    ordering_key TEXT,
    last_status_code INTEGER,
    last_error INTEGER,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX deliveries_subscription ON deliveries (subscription_id, id);
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE INDEX deliveries_due ON deliveries (state, next_attempt_at);
CREATE TABLE attempts (
    id TEXT PRIMARY KEY,
    delivery_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    region TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms INTEGER NOT NULL,
    status_code INTEGER NOT NULL,
    response_headers TEXT NOT NULL,
    response_excerpt TEXT NOT NULL,
    error INTEGER NOT NULL,
    error_message TEXT NOT NULL
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);
"#;

/// The delivery log by tenant, and the event type on each delivery.
const M0002: &str = r#"
ALTER TABLE deliveries ADD COLUMN event_type TEXT;
CREATE INDEX deliveries_tenant ON deliveries (tenant_id, id)
"#;

/// Per-agent credentials, stored as hashes.
const M0003: &str = r#"
CREATE TABLE agent_credentials (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    region TEXT,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT
)
"#;

/// Several replicas on one PostgreSQL database: the agents of every replica (for `ListAgents`),
/// and two small partial indexes the claim reads under its per-subscription lock: the deliveries
/// in flight per subscription (`max_concurrency` across replicas), and the unfinished deliveries
/// of ordered subscriptions per entity (an entity's next event waits for the earlier ones).
/// States: 1 pending, 2 in flight, 4 failed.
const M0004: &str = r#"
CREATE TABLE agents (
    connection_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    region TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    in_flight INTEGER NOT NULL,
    version TEXT NOT NULL,
    identity TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    connected_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    refreshed_at BIGINT NOT NULL
);
CREATE INDEX agents_replica ON agents (replica_id);
CREATE INDEX deliveries_in_flight ON deliveries (subscription_id) WHERE state = 2;
CREATE INDEX deliveries_ordered_unfinished ON deliveries (subscription_id, ordering_key, id)
    WHERE ordering_key IS NOT NULL AND state IN (1, 2, 4)
"#;

/// Fair discovery: the poller pages due work per subscription, and finds the subscriptions
/// with waiting work by skipping through this index (one probe per subscription). Partial:
/// only pending (1) and failed (4) deliveries, the backlog, not the history. It replaces
/// `deliveries_due` (every row, by state), which nothing reads any more: one index fewer to
/// keep up on the hottest table (a replica of the previous version still runs, only slower).
const M0005: &str = r#"
CREATE INDEX deliveries_waiting ON deliveries (subscription_id, next_attempt_at)
    WHERE state IN (1, 4);
DROP INDEX IF EXISTS deliveries_due
"#;

/// Console sessions and one-time sign-in links, shared by every replica and kept across restarts.
/// Keyed by the SHA-256 of the cookie or link value, never the value itself. A session names the
/// API token that opened it (revoking the token deletes its sessions); `notice` is the one-shot
/// message for the session's next page (JSON).
const M0006: &str = r#"
CREATE TABLE console_sessions (
    id_hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    token_id TEXT NOT NULL,
    notice TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_token ON console_sessions (token_id);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
CREATE TABLE console_links (
    id_hash TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    token_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_links_expiry ON console_links (expires_at)
"#;

/// A subscription's payload filter, as written (JSON text; NULL: none).
const M0007: &str = "ALTER TABLE subscriptions ADD COLUMN payload_filter TEXT";

/// A subscription's custom headers: JSON `[{name, value, secret}]`, secret values sealed like
/// the API key (NULL: none).
const M0008: &str = "ALTER TABLE subscriptions ADD COLUMN headers TEXT";

/// The shared agent token generated at first start (without `HERALD_AGENT_TOKEN`) is an agent
/// credential row marked `shared`, so `reset-agent-token` can find and revoke it.
const M0009: &str =
    "ALTER TABLE agent_credentials ADD COLUMN shared BOOLEAN NOT NULL DEFAULT FALSE";
