//! Deliveries (one event x one subscription) and their attempts: the delivery log, and the lease
//! columns through which agents own work.

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    QueryTrait as _, Set,
};

use super::entity::{attempt, delivery};
use super::tenants::paginate;
use super::{Error, ms, time};
use crate::domain::model::{Attempt, AttemptError, Delivery, DeliveryState, Page, PageRequest};

const INSERT_CHUNK: usize = 1000;

/// Which deliveries a list shows.
#[derive(Debug, Clone)]
pub enum ListBy {
    Tenant,
    Subscription(String),
    Event(String),
}

pub async fn insert_many(db: &impl ConnectionTrait, deliveries: &[Delivery]) -> Result<(), Error> {
    for chunk in deliveries.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|d| delivery::ActiveModel {
            id: Set(d.id.clone()),
            tenant_id: Set(d.tenant_id.clone()),
            event_id: Set(d.event_id.clone()),
            subscription_id: Set(d.subscription_id.clone()),
            state: Set(d.state as i32),
            attempt_count: Set(d.attempt_count as i32),
            next_attempt_at: Set(ms(d.next_attempt_at)),
            lease_id: Set(None),
            lease_expires_at: Set(None),
            agent_id: Set(None),
            ordering_key: Set(d.ordering_key.clone()),
            event_type: Set(Some(d.event_type.clone())),
            last_status_code: Set(d.last_status_code.map(|c| c as i32)),
            last_error: Set(d.last_error.map(|e| e as i32)),
            created_at: Set(ms(d.created_at)),
            updated_at: Set(ms(d.created_at)),
        });
        delivery::Entity::insert_many(rows)
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

/// Returns the ids of an event's deliveries, oldest first (the publish reply's order).
pub async fn ids_for_event(
    db: &impl ConnectionTrait,
    event_id: &str,
) -> Result<Vec<String>, Error> {
    Ok(delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::EventId.eq(event_id))
        .order_by_asc(delivery::Column::Id)
        .into_tuple()
        .all(db)
        .await?)
}

/// Returns the subscriptions that got a delivery of an event, sorted.
pub async fn subscriptions_for_event(
    db: &impl ConnectionTrait,
    event_id: &str,
) -> Result<Vec<String>, Error> {
    let mut ids: Vec<String> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::SubscriptionId)
        .filter(delivery::Column::EventId.eq(event_id))
        .into_tuple()
        .all(db)
        .await?;
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

pub async fn get(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
) -> Result<Option<Delivery>, Error> {
    Ok(delivery::Entity::find_by_id(id.to_owned())
        .filter(delivery::Column::TenantId.eq(tenant_id))
        .one(db)
        .await?
        .map(from_model))
}

/// Lists deliveries newest first. By subscription or by event, the caller has checked that it
/// is the tenant's (see [`list_query`]).
pub async fn list(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    by: &ListBy,
    state: Option<DeliveryState>,
    page: &PageRequest,
) -> Result<Page<Delivery>, Error> {
    let rows = list_query(tenant_id, by, state, page).all(db).await?;
    Ok(paginate(
        rows.into_iter().map(from_model).collect(),
        page,
        |d| &d.id,
    ))
}

/// [`list`]'s statement, for the tests of its plan.
pub fn list_statement(
    backend: sea_orm::DbBackend,
    tenant_id: &str,
    by: &ListBy,
    state: Option<DeliveryState>,
    page: &PageRequest,
) -> sea_orm::Statement {
    list_query(tenant_id, by, state, page).build(backend)
}

/// By subscription or by event the query does not repeat the tenant: the id is enough, and
/// with the tenant's index beside the subscription's, PostgreSQL's planner, when its statistics
/// lag behind a burst of publishes (before autovacuum analyzes the table), intersected the two
/// and sorted the whole subscription: 2.9 s per page behind a backlog of a million deliveries,
/// where walking `deliveries_subscription (subscription_id, id)` backwards takes 0.4 ms.
fn list_query(
    tenant_id: &str,
    by: &ListBy,
    state: Option<DeliveryState>,
    page: &PageRequest,
) -> sea_orm::Select<delivery::Entity> {
    let mut query = delivery::Entity::find().order_by_desc(delivery::Column::Id);
    query = match by {
        ListBy::Tenant => query.filter(delivery::Column::TenantId.eq(tenant_id)),
        ListBy::Subscription(id) => query.filter(delivery::Column::SubscriptionId.eq(id.clone())),
        ListBy::Event(id) => query.filter(delivery::Column::EventId.eq(id.clone())),
    };
    if let Some(state) = state {
        query = query.filter(delivery::Column::State.eq(state as i32));
    }
    if let Some(after) = &page.after {
        query = query.filter(delivery::Column::Id.lt(after.clone()));
    }
    query.limit(page.size + 1)
}

/// Returns a delivery's attempts, oldest first.
pub async fn attempts(db: &impl ConnectionTrait, delivery_id: &str) -> Result<Vec<Attempt>, Error> {
    Ok(attempt::Entity::find()
        .filter(attempt::Column::DeliveryId.eq(delivery_id))
        .order_by_asc(attempt::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(attempt_from_model)
        .collect())
}

pub async fn insert_attempts(db: &impl ConnectionTrait, attempts: &[Attempt]) -> Result<(), Error> {
    for chunk in attempts.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|a| attempt::ActiveModel {
            id: Set(a.id.clone()),
            delivery_id: Set(a.delivery_id.clone()),
            agent_id: Set(a.agent_id.clone()),
            region: Set(a.region.clone()),
            started_at: Set(ms(a.started_at)),
            duration_ms: Set(a.duration_ms.min(i32::MAX as u32) as i32),
            status_code: Set(a.status_code as i32),
            response_headers: Set(
                serde_json::to_string(&a.response_headers).unwrap_or_else(|_| "[]".into())
            ),
            response_excerpt: Set(a.response_excerpt.clone()),
            error: Set(a.error as i32),
            error_message: Set(a.error_message.clone()),
        });
        // A results write whose COMMIT outcome was unknown is written again: attempts already
        // stored stay as they are.
        attempt::Entity::insert_many(rows)
            .on_conflict(
                sea_orm::sea_query::OnConflict::column(attempt::Column::Id)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
    }
    Ok(())
}

pub async fn count(db: &impl ConnectionTrait) -> Result<u64, Error> {
    use sea_orm::PaginatorTrait;
    Ok(delivery::Entity::find().count(db).await?)
}

pub(crate) fn from_model(m: delivery::Model) -> Delivery {
    Delivery {
        id: m.id,
        tenant_id: m.tenant_id,
        event_id: m.event_id,
        subscription_id: m.subscription_id,
        state: DeliveryState::from_i32(m.state).unwrap_or(DeliveryState::Pending),
        attempt_count: m.attempt_count.max(0) as u32,
        next_attempt_at: time(m.next_attempt_at),
        ordering_key: m.ordering_key,
        event_type: m.event_type.unwrap_or_default(),
        last_status_code: m.last_status_code.map(|c| c.max(0) as u32),
        last_error: m.last_error.map(AttemptError::from_i32),
        created_at: time(m.created_at),
    }
}

fn attempt_from_model(m: attempt::Model) -> Attempt {
    Attempt {
        id: m.id,
        delivery_id: m.delivery_id,
        agent_id: m.agent_id,
        region: m.region,
        started_at: time(m.started_at),
        duration_ms: m.duration_ms.max(0) as u32,
        status_code: m.status_code.max(0) as u32,
        response_headers: serde_json::from_str(&m.response_headers).unwrap_or_default(),
        response_excerpt: m.response_excerpt,
        error: AttemptError::from_i32(m.error),
        error_message: m.error_message,
    }
}

/// The skip scan of [`subscriptions_with_waiting_work`].
const WAITING_SUBSCRIPTIONS: &str = "WITH RECURSIVE waiting(subscription_id) AS (\
        SELECT (SELECT subscription_id FROM deliveries WHERE state IN (1, 4) \
                ORDER BY subscription_id LIMIT 1) \
        UNION ALL \
        SELECT (SELECT d.subscription_id FROM deliveries AS d WHERE d.state IN (1, 4) \
                AND d.subscription_id > waiting.subscription_id \
                ORDER BY d.subscription_id LIMIT 1) \
        FROM waiting WHERE waiting.subscription_id IS NOT NULL) \
        SELECT subscription_id FROM waiting WHERE subscription_id IS NOT NULL";

/// Returns the subscriptions that have deliveries waiting (pending or failed, due now or
/// later): a skip scan of `deliveries_waiting`, one index probe per such subscription in one
/// statement, whatever the size of their backlogs.
pub async fn subscriptions_with_waiting_work(
    db: &impl ConnectionTrait,
) -> Result<Vec<String>, Error> {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            WAITING_SUBSCRIPTIONS,
        ))
        .await?;
    rows.iter()
        .map(|row| {
            row.try_get_by_index::<String>(0)
                .map_err(|err| Error::Internal(err.to_string()))
        })
        .collect()
}

/// The statement of [`oldest_waiting`]: the skip scan of [`WAITING_SUBSCRIPTIONS`], then each
/// subscription's earliest waiting delivery, the first entry of its range in `deliveries_waiting`.
const OLDEST_WAITING: &str = "WITH RECURSIVE waiting(subscription_id) AS (\
        SELECT (SELECT subscription_id FROM deliveries WHERE state IN (1, 4) \
                ORDER BY subscription_id LIMIT 1) \
        UNION ALL \
        SELECT (SELECT d.subscription_id FROM deliveries AS d WHERE d.state IN (1, 4) \
                AND d.subscription_id > waiting.subscription_id \
                ORDER BY d.subscription_id LIMIT 1) \
        FROM waiting WHERE waiting.subscription_id IS NOT NULL) \
        SELECT MIN((SELECT MIN(d.next_attempt_at) FROM deliveries AS d \
                    WHERE d.subscription_id = waiting.subscription_id AND d.state IN (1, 4))) \
        FROM waiting WHERE subscription_id IS NOT NULL";

/// Returns when the oldest waiting delivery (pending or failed) is or was due, `None` when
/// nothing waits: the skip scan of [`subscriptions_with_waiting_work`] with one index probe per
/// such subscription for its earliest `next_attempt_at`, whatever the size of the backlogs.
pub async fn oldest_waiting(
    db: &impl ConnectionTrait,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Error> {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            OLDEST_WAITING,
        ))
        .await?;
    let oldest = match row {
        Some(row) => row
            .try_get_by_index::<Option<i64>>(0)
            .map_err(|err| Error::Internal(err.to_string()))?,
        None => None,
    };
    Ok(oldest.map(time))
}

/// Returns each subscription's oldest due deliveries (pending or failed with their time come),
/// at most the given number per subscription: one range scan of `deliveries_waiting` each, a
/// statement per 64 subscriptions.
pub async fn due_of(
    db: &impl ConnectionTrait,
    now: chrono::DateTime<chrono::Utc>,
    wanted: &[(String, u64)],
) -> Result<Vec<Delivery>, Error> {
    let backend = db.get_database_backend();
    let placeholder = |n: usize| match backend {
        sea_orm::DbBackend::Postgres => format!("${n}"),
        _ => "?".to_owned(),
    };
    let mut found = Vec::new();
    for chunk in wanted.chunks(64) {
        let mut arms = Vec::with_capacity(chunk.len());
        let mut values: Vec<sea_orm::Value> = Vec::with_capacity(chunk.len() * 3);
        for (subscription_id, limit) in chunk {
            let n = values.len();
            arms.push(due_arm(n, placeholder));
            values.push(subscription_id.clone().into());
            values.push(ms(now).into());
            values.push(i64::try_from(*limit).unwrap_or(i64::MAX).into());
        }
        let sql = arms.join(" UNION ALL ");
        let rows = delivery::Entity::find()
            .from_raw_sql(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .all(db)
            .await?;
        found.extend(rows.into_iter().map(from_model));
    }
    Ok(found)
}

/// One subscription's part of [`due_of`]: its oldest due deliveries, a range scan of
/// `deliveries_waiting` (the states are literals: SQLite uses a partial index only for terms it
/// can compare as written). Placeholders n+1..n+3: subscription, now, limit.
fn due_arm(n: usize, placeholder: impl Fn(usize) -> String) -> String {
    format!(
        "SELECT * FROM (SELECT * FROM deliveries WHERE subscription_id = {} \
         AND state IN (1, 4) AND next_attempt_at <= {} \
         ORDER BY next_attempt_at LIMIT {}) AS due{n}",
        placeholder(n + 1),
        placeholder(n + 2),
        placeholder(n + 3),
    )
}

/// Returns deliveries in flight under an expired lease (their agent or replica is gone): a scan
/// of the partial index `deliveries_in_flight`, which holds only what is in flight.
pub async fn under_expired_lease(
    db: &impl ConnectionTrait,
    now: chrono::DateTime<chrono::Utc>,
    limit: u64,
) -> Result<Vec<Delivery>, Error> {
    // A literal state: SQLite uses a partial index only for terms it can compare as written.
    Ok(delivery::Entity::find()
        .filter(sea_orm::sea_query::Expr::cust("state = 2"))
        .filter(delivery::Column::LeaseExpiresAt.lte(ms(now)))
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(from_model)
        .collect())
}

/// The state column as an expression no index can answer. Claims and completions name their
/// deliveries by id; given an indexable `state` term next to the ids, SQLite's planner walked
/// an index of the state (`deliveries_due` then, `deliveries_waiting` now) instead, which is
/// every due delivery (the whole backlog) per statement.
const STATE_UNINDEXED: &str = "(state + 0)";

fn claimable(now: i64) -> sea_orm::Condition {
    use sea_orm::Condition;
    use sea_orm::sea_query::{Expr, ExprTrait as _};
    let state = || Expr::cust(STATE_UNINDEXED);
    Condition::any()
        .add(
            Condition::all()
                .add(state().is_in([DeliveryState::Pending as i32, DeliveryState::Failed as i32]))
                .add(delivery::Column::NextAttemptAt.lte(now)),
        )
        .add(
            Condition::all()
                .add(state().eq(DeliveryState::InFlight as i32))
                .add(delivery::Column::LeaseExpiresAt.lte(now)),
        )
}

/// Deliveries of one subscription to lease together, in the order they should go.
#[derive(Debug, Clone)]
pub struct ClaimGroup {
    pub subscription_id: String,
    /// How many of the subscription's deliveries may be in flight at once, across replicas.
    pub max_concurrency: u32,
    pub ids: Vec<String>,
}

/// One lease to take: which agent, until when, over which subscriptions' deliveries.
#[derive(Debug, Clone)]
pub struct LeaseClaim {
    pub lease_id: String,
    pub agent_id: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub groups: Vec<ClaimGroup>,
}

/// What [`claim_leases`] did.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// Leased now under the lease id: (delivery id, attempt count). The attempt count may be
    /// newer than the caller's copy: another replica may have attempted it meanwhile.
    pub leased: Vec<(String, u32)>,
    /// Not tried: their subscription had no free slot left across replicas. Still due.
    pub deferred: Vec<String>,
}

/// The lock class of the per-subscription claim locks (`pg_advisory_xact_lock(class, key)`).
const CLAIM_LOCK_CLASS: i32 = 4_242_002;

/// Returns a subscription's claim lock key: FNV-1a of its id, stable across processes and
/// versions (every replica must take the same lock).
fn claim_lock_key(subscription_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in subscription_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// An ordered delivery may go only when no earlier delivery of its entity to the same
/// subscription is unfinished (pending, in flight or failed). Matches the partial index
/// `deliveries_ordered_unfinished`.
const NOT_BLOCKED_BY_EARLIER: &str = "(ordering_key IS NULL OR NOT EXISTS (\
    SELECT 1 FROM deliveries AS earlier \
    WHERE earlier.subscription_id = deliveries.subscription_id \
    AND earlier.ordering_key = deliveries.ordering_key \
    AND earlier.id < deliveries.id \
    AND earlier.ordering_key IS NOT NULL AND earlier.state IN (1, 2, 4)))";

/// Whether [`claim_leases`] runs a single statement for `claims` (SQLite, one lease of at most
/// one chunk): atomic by itself, it needs no transaction around it.
pub fn claim_is_one_statement(claims: &[LeaseClaim], shared: bool) -> bool {
    !shared
        && claims.len() == 1
        && claims[0].groups.iter().map(|g| g.ids.len()).sum::<usize>() <= INSERT_CHUNK
}

/// Leases the claimable deliveries among each claim's groups to its agent under its lease, in
/// one transaction (`txn`). A delivery is claimable when it is due (pending or failed with its time
/// come, or in flight under an expired lease) and, for an ordered subscription, no earlier
/// delivery of its entity is unfinished; the update is conditional, so a delivery another
/// replica or agent holds is left alone.
///
/// With `shared` (PostgreSQL, several replicas), the claim first takes every subscription's
/// advisory lock (in key order, so two replicas never wait on each other in a cycle), counts
/// their deliveries in flight under unexpired leases, and tries only as many as
/// `max_concurrency` leaves free; the rest are returned as deferred. Claims of one subscription
/// are thus serialised across replicas until `txn` ends, and the limit holds cluster-wide.
///
/// Whatever the number of groups: one statement for the locks, one for the counts, and one
/// update per lease.
pub async fn claim_leases(
    txn: &impl ConnectionTrait,
    claims: &[LeaseClaim],
    now: chrono::DateTime<chrono::Utc>,
    shared: bool,
) -> Result<Claimed, Error> {
    let mut claimed = Claimed::default();
    let mut free = std::collections::HashMap::new();
    if shared {
        free = free_slots(txn, claims.iter().flat_map(|c| &c.groups), now).await?;
    }
    for claim in claims {
        let mut ids = Vec::new();
        for group in &claim.groups {
            let mut candidates = group.ids.as_slice();
            if shared {
                let slots = free.entry(group.subscription_id.as_str()).or_default();
                let take = (*slots as usize).min(candidates.len());
                *slots -= take as u64;
                claimed.deferred.extend(candidates[take..].iter().cloned());
                candidates = &candidates[..take];
            }
            ids.extend(candidates.iter().cloned());
        }
        if !ids.is_empty() {
            claimed
                .leased
                .extend(claim_ids(txn, claim, ids, now).await?);
        }
    }
    Ok(claimed)
}

/// Takes the claim locks of the groups' subscriptions and returns how many more deliveries each
/// may have in flight across replicas.
async fn free_slots<'g>(
    txn: &impl ConnectionTrait,
    groups: impl Iterator<Item = &'g ClaimGroup>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<std::collections::HashMap<&'g str, u64>, Error> {
    let mut limits = std::collections::HashMap::new();
    for group in groups {
        limits.insert(group.subscription_id.as_str(), group.max_concurrency);
    }
    if limits.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let ids: Vec<&str> = limits.keys().copied().collect();
    txn.query_all_raw(claim_locks(&ids)).await?;
    // A new statement after the locks: its snapshot sees every claim committed before.
    let mut in_flight = std::collections::HashMap::new();
    for row in txn.query_all_raw(in_flight_count(&ids, now)).await? {
        let id: String = row.try_get_by_index(0)?;
        let busy: i64 = row.try_get_by_index(1)?;
        in_flight.insert(id, u64::try_from(busy).unwrap_or(0));
    }
    Ok(limits
        .into_iter()
        .map(|(id, limit)| {
            let busy = in_flight.get(id).copied().unwrap_or(0);
            (id, u64::from(limit).saturating_sub(busy))
        })
        .collect())
}

/// The first statement of a shared claim (PostgreSQL): takes the claim locks of
/// `subscription_ids` in key order (so two replicas never wait on each other in a cycle), and
/// turns bitmap scans off until the transaction ends, for [`in_flight_count`]'s sake.
///
/// Why: every lease that ends leaves a dead entry in `deliveries_in_flight` until `VACUUM`
/// removes it. A plain index scan marks the dead entries it meets and skips them from then on
/// (once no open snapshot is older than their rows: a long transaction, a replication slot or a
/// standby's feedback hold the marking back as they hold back `VACUUM`); a bitmap scan, which
/// the planner prefers for a list of subscriptions, marks nothing and visits every dead row's
/// heap page at every claim. Behind a backlog of a million with autovacuum slow or off, that
/// made each claim round read 121,482 entries for 154 live ones (190 ms), and the drain fell
/// from 6,000/s to under 1,000/s. The setting rides in a statement the claim sends anyway, to
/// cost no round trip; the claim's other statements go by primary key or by the partial index
/// of unfinished ordered deliveries, whose plans are the same without bitmap scans.
fn claim_locks(subscription_ids: &[&str]) -> sea_orm::Statement {
    let mut keys: Vec<i32> = subscription_ids
        .iter()
        .map(|id| claim_lock_key(id))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    // The ordered subquery makes the locks be taken in key order.
    let values: Vec<String> = (0..keys.len()).map(|i| format!("(${})", i + 2)).collect();
    let sql = format!(
        "SELECT set_config('enable_bitmapscan', 'off', true), pg_advisory_xact_lock($1, sorted.key) \
         FROM (SELECT v.key FROM (VALUES {}) AS v(key) ORDER BY v.key) AS sorted",
        values.join(", ")
    );
    let mut params: Vec<sea_orm::Value> = vec![CLAIM_LOCK_CLASS.into()];
    params.extend(keys.iter().map(|&key| sea_orm::Value::from(key)));
    sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::Postgres, sql, params)
}

/// Counts the deliveries of `subscription_ids` (at least one) in flight under an unexpired
/// lease, per subscription (PostgreSQL; public for the test that reads its plan): a scan of the
/// partial index `deliveries_in_flight` (the state is a literal: a bound parameter would not
/// prove the index's `state = 2` in a generic plan).
#[doc(hidden)]
pub fn in_flight_count(
    subscription_ids: &[&str],
    now: chrono::DateTime<chrono::Utc>,
) -> sea_orm::Statement {
    let list: Vec<String> = (0..subscription_ids.len())
        .map(|i| format!("${}", i + 2))
        .collect();
    let sql = format!(
        "SELECT subscription_id, COUNT(*) FROM deliveries \
         WHERE state = 2 AND lease_expires_at > $1 AND subscription_id IN ({}) \
         GROUP BY subscription_id",
        list.join(", ")
    );
    let mut params: Vec<sea_orm::Value> = vec![ms(now).into()];
    params.extend(subscription_ids.iter().map(|&id| sea_orm::Value::from(id)));
    sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::Postgres, sql, params)
}

/// Leases the claimable ones among `ids` under `claim`'s lease; returns (id, attempt count)
/// of each leased delivery.
async fn claim_ids(
    txn: &impl ConnectionTrait,
    claim: &LeaseClaim,
    ids: Vec<String>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<(String, u32)>, Error> {
    let mut leased = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(INSERT_CHUNK) {
        let update = claim_update(claim, chunk, now);
        for row in update_returning(
            txn,
            update,
            [delivery::Column::Id, delivery::Column::AttemptCount],
        )
        .await?
        {
            let id: String = row.try_get_by_index(0)?;
            let attempts: i32 = row.try_get_by_index(1)?;
            leased.push((id, attempts.max(0) as u32));
        }
    }
    Ok(leased)
}

/// The conditional update that leases the claimable ones among `ids` under `group`'s lease.
fn claim_update(
    claim: &LeaseClaim,
    ids: &[String],
    now: chrono::DateTime<chrono::Utc>,
) -> sea_orm::UpdateMany<delivery::Entity> {
    use sea_orm::sea_query::Expr;
    delivery::Entity::update_many()
        .col_expr(
            delivery::Column::State,
            Expr::value(DeliveryState::InFlight as i32),
        )
        .col_expr(
            delivery::Column::LeaseId,
            Expr::value(claim.lease_id.as_str()),
        )
        .col_expr(
            delivery::Column::LeaseExpiresAt,
            Expr::value(ms(claim.expires_at)),
        )
        .col_expr(
            delivery::Column::AgentId,
            Expr::value(claim.agent_id.as_str()),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
        .filter(delivery::Column::Id.is_in(ids.iter().cloned()))
        .filter(claimable(ms(now)))
        .filter(Expr::cust(NOT_BLOCKED_BY_EARLIER))
}

/// The new state of deliveries after results that share an outcome.
#[derive(Debug, Clone)]
pub struct Completion {
    pub state: DeliveryState,
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    pub status_code: u32,
    pub error: AttemptError,
    /// The lease ended at its expiry (no result came: a `TIMEOUT`). It applies as long as no
    /// one else leased the delivery since, past the lease's expiry too.
    pub at_expiry: bool,
}

/// Starts an update that makes deliveries due again now: `PENDING`, no lease.
///
/// A delivery of an ordered subscription is due only once its old lease would have expired:
/// its request may still reach the receiver, and the entity's next event must not overtake it.
fn back_to_pending(now: chrono::DateTime<chrono::Utc>) -> sea_orm::UpdateMany<delivery::Entity> {
    use sea_orm::sea_query::Expr;
    let now = ms(now);
    delivery::Entity::update_many()
        .col_expr(
            delivery::Column::State,
            Expr::value(DeliveryState::Pending as i32),
        )
        .col_expr(
            delivery::Column::NextAttemptAt,
            // An integer of ours, not an input: written into the statement as it is.
            Expr::cust(format!(
                "CASE WHEN ordering_key IS NULL THEN {now} ELSE COALESCE(lease_expires_at, {now}) END"
            )),
        )
        .col_expr(
            delivery::Column::LeaseId,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            delivery::Column::LeaseExpiresAt,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
}

/// Gives leased deliveries back (their agent went away): pending again at once. One statement
/// per 500 leases: a delivery is in flight under one lease at a time, so `id IN (…) AND
/// lease_id IN (…)` matches exactly the pairs given.
pub async fn release(
    db: &impl ConnectionTrait,
    leases: &[(String, String)],
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    use sea_orm::sea_query::{Expr, ExprTrait as _};
    let mut released = 0;
    for chunk in leases.chunks(500) {
        let mut lease_ids: Vec<&str> = chunk.iter().map(|(_, lease)| lease.as_str()).collect();
        lease_ids.sort_unstable();
        lease_ids.dedup();
        released += back_to_pending(now)
            .filter(delivery::Column::Id.is_in(chunk.iter().map(|(id, _)| id.clone())))
            .filter(delivery::Column::LeaseId.is_in(lease_ids))
            .filter(Expr::cust(STATE_UNINDEXED).eq(DeliveryState::InFlight as i32))
            .exec(db)
            .await?
            .rows_affected;
    }
    Ok(released)
}

/// Makes every in-flight delivery pending again: at the start of the only replica (SQLite),
/// whose leases died with the previous process.
pub async fn release_all(
    db: &impl ConnectionTrait,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    Ok(back_to_pending(now)
        .filter(delivery::Column::State.eq(DeliveryState::InFlight as i32))
        .exec(db)
        .await?
        .rows_affected)
}

/// Schedules one more attempt now for a delivery that is not in flight; `None` when it does not
/// exist, `Some(false)` when it is in flight.
pub async fn retry_now(
    db: &impl ConnectionTrait,
    tenant_id: &str,
    id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<bool>, Error> {
    let result = back_to_pending(now)
        .filter(delivery::Column::Id.eq(id))
        .filter(delivery::Column::TenantId.eq(tenant_id))
        .filter(delivery::Column::State.ne(DeliveryState::InFlight as i32))
        .exec(db)
        .await?;
    if result.rows_affected == 1 {
        return Ok(Some(true));
    }
    Ok(get(db, tenant_id, id).await?.map(|_| false))
}

/// Puts every `DEAD` delivery of a subscription created since `since` back to `PENDING`.
pub async fn replay(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    since: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    Ok(back_to_pending(now)
        .filter(delivery::Column::SubscriptionId.eq(subscription_id))
        .filter(delivery::Column::State.eq(DeliveryState::Dead as i32))
        .filter(delivery::Column::CreatedAt.gte(ms(since)))
        .exec(db)
        .await?
        .rows_affected)
}

/// Makes a disabled subscription's waiting deliveries `DEAD` (replayable).
pub async fn kill_waiting(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    use sea_orm::sea_query::Expr;
    Ok(delivery::Entity::update_many()
        .col_expr(
            delivery::Column::State,
            Expr::value(DeliveryState::Dead as i32),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
        .filter(delivery::Column::SubscriptionId.eq(subscription_id))
        .filter(
            delivery::Column::State
                .is_in([DeliveryState::Pending as i32, DeliveryState::Failed as i32]),
        )
        .exec(db)
        .await?
        .rows_affected)
}

/// Returns the newest id among the unfinished deliveries (pending, in flight or failed) of one
/// entity to an ordered subscription.
pub async fn newest_unfinished_of_entity(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    ordering_key: &str,
) -> Result<Option<String>, Error> {
    use sea_orm::sea_query::Expr;
    Ok(delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::SubscriptionId.eq(subscription_id))
        .filter(delivery::Column::OrderingKey.eq(ordering_key))
        // As in `deliveries_ordered_unfinished`, so that index answers.
        .filter(Expr::cust(
            "ordering_key IS NOT NULL AND state IN (1, 2, 4)",
        ))
        .order_by_desc(delivery::Column::Id)
        .into_tuple::<String>()
        .one(db)
        .await?)
}

/// Returns a delivery by id, whatever its tenant (the scheduler's view).
pub async fn get_any(db: &impl ConnectionTrait, id: &str) -> Result<Option<Delivery>, Error> {
    Ok(delivery::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(from_model))
}

/// Applies results that share their outcome to many deliveries at once (one statement per
/// lease), each only if its lease is still valid; returns the ids it moved.
pub async fn complete_many(
    db: &impl ConnectionTrait,
    leases: &[(&str, &str)],
    outcome: &Completion,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>, Error> {
    // A lease covers a batch of deliveries: `lease_id = ? AND id IN (…)` per lease is exact and
    // cheap to plan, where one `(id = ? AND lease_id = ?) OR …` per pair was neither.
    let mut by_lease: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (id, lease_id) in leases {
        by_lease.entry(lease_id).or_default().push(id);
    }
    let mut moved = Vec::with_capacity(leases.len());
    for (lease_id, ids) in by_lease {
        let update = completion_update(lease_id, &ids, outcome, now);
        for row in update_returning(db, update, [delivery::Column::Id]).await? {
            moved.push(row.try_get_by_index(0)?);
        }
    }
    Ok(moved)
}

/// The conditional update that applies one outcome to deliveries still leased under `lease_id`.
fn completion_update(
    lease_id: &str,
    ids: &[&str],
    outcome: &Completion,
    now: chrono::DateTime<chrono::Utc>,
) -> sea_orm::UpdateMany<delivery::Entity> {
    use sea_orm::sea_query::{Expr, ExprTrait as _};
    let update = delivery::Entity::update_many()
        .col_expr(delivery::Column::State, Expr::value(outcome.state as i32))
        .col_expr(
            delivery::Column::AttemptCount,
            Expr::col(delivery::Column::AttemptCount).add(1),
        )
        .col_expr(
            delivery::Column::NextAttemptAt,
            Expr::value(ms(outcome.next_attempt_at.unwrap_or(now))),
        )
        .col_expr(
            delivery::Column::LeaseId,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            delivery::Column::LeaseExpiresAt,
            Expr::value(Option::<i64>::None),
        )
        .col_expr(
            delivery::Column::LastStatusCode,
            Expr::value(outcome.status_code as i32),
        )
        .col_expr(
            delivery::Column::LastError,
            Expr::value(outcome.error as i32),
        )
        .col_expr(delivery::Column::UpdatedAt, Expr::value(ms(now)))
        .filter(delivery::Column::Id.is_in(ids.iter().copied()))
        .filter(delivery::Column::LeaseId.eq(lease_id))
        .filter(Expr::cust(STATE_UNINDEXED).eq(DeliveryState::InFlight as i32));
    if outcome.at_expiry {
        update
    } else {
        update.filter(delivery::Column::LeaseExpiresAt.gt(ms(now)))
    }
}

/// Runs an update and returns only the named columns of the rows it changed (sea-orm's
/// `exec_with_returning` reads and decodes whole rows).
async fn update_returning(
    db: &impl ConnectionTrait,
    update: sea_orm::UpdateMany<delivery::Entity>,
    columns: impl IntoIterator<Item = delivery::Column>,
) -> Result<Vec<sea_orm::QueryResult>, Error> {
    use sea_orm::QueryTrait;
    use sea_orm::sea_query::Query;
    let mut statement = update.into_query();
    statement.returning(Query::returning().columns(columns));
    Ok(db.query_all(&statement).await?)
}

/// Returns attempts by id with their deliveries, for `WatchDeliveries` on another replica than
/// the one that recorded them.
pub async fn attempts_with_deliveries(
    db: &impl ConnectionTrait,
    ids: &[String],
) -> Result<Vec<(Attempt, Delivery)>, Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let attempts: Vec<Attempt> = attempt::Entity::find()
        .filter(attempt::Column::Id.is_in(ids.iter().cloned()))
        .order_by_asc(attempt::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(attempt_from_model)
        .collect();
    let delivery_ids: std::collections::BTreeSet<String> =
        attempts.iter().map(|a| a.delivery_id.clone()).collect();
    let deliveries: std::collections::HashMap<String, Delivery> = delivery::Entity::find()
        .filter(delivery::Column::Id.is_in(delivery_ids))
        .all(db)
        .await?
        .into_iter()
        .map(|m| (m.id.clone(), from_model(m)))
        .collect();
    Ok(attempts
        .into_iter()
        .filter_map(|a| {
            let delivery = deliveries.get(&a.delivery_id)?.clone();
            Some((a, delivery))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    //! SQLite's planner picks an index from the terms it is given, without statistics: these
    //! check that claims and completions go by primary key. When they walked `deliveries_due`
    //! instead, each statement read every due delivery, and fanout-10 ran at a third of its
    //! speed. (PostgreSQL plans from statistics; its plans are covered by the benchmark.)
    use super::*;
    use crate::storage::{Store, StoreOptions};
    use sea_orm::{QueryTrait, Statement};

    async fn plan_of(store: &Store, update: sea_orm::UpdateMany<delivery::Entity>) -> String {
        let built = store.backend().build(&update.into_query());
        let explain = Statement {
            sql: format!("EXPLAIN QUERY PLAN {}", built.sql),
            ..built
        };
        let rows = store.db.query_all_raw(explain).await.unwrap();
        rows.iter()
            .map(|row| row.try_get::<String>("", "detail").unwrap())
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn by_primary_key(plan: &str) -> bool {
        plan.contains("sqlite_autoindex_deliveries_1 (id=?)")
            && !plan.contains("deliveries_waiting")
            && !plan.contains("deliveries_in_flight")
    }

    async fn sqlite_store(dir: &tempfile::TempDir) -> Store {
        Store::open(StoreOptions {
            url: format!("sqlite://{}?mode=rwc", dir.path().join("plan.db").display()),
            max_connections: 1,
            master_key: None,
            previous_master_key: None,
            sqlite_page_limit: None,
        })
        .await
        .unwrap()
    }

    /// Discovery costs O(subscriptions with waiting work): each statement walks a partial index
    /// of the backlog, never the table nor the history.
    #[tokio::test]
    async fn discovery_walks_the_partial_indexes_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let explain = |sql: String| {
            let store = store.clone();
            async move {
                let rows = store
                    .db
                    .query_all_raw(Statement::from_string(
                        sea_orm::DbBackend::Sqlite,
                        format!("EXPLAIN QUERY PLAN {sql}"),
                    ))
                    .await
                    .unwrap();
                rows.iter()
                    .map(|row| row.try_get::<String>("", "detail").unwrap())
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        };
        let waiting = explain(WAITING_SUBSCRIPTIONS.to_owned()).await;
        // Each step: one probe after the previous subscription id.
        assert!(
            waiting.contains("USING INDEX deliveries_waiting (subscription_id>?)"),
            "{waiting}"
        );
        assert!(
            waiting
                .split("; ")
                .filter(|step| step.starts_with("SCAN deliveries") || step.starts_with("SCAN d "))
                .all(|step| step.contains("USING INDEX deliveries_waiting")),
            "{waiting}"
        );
        let due = explain(due_arm(0, |_| "'x'".to_owned()).replace("LIMIT 'x'", "LIMIT 10")).await;
        assert!(
            due.contains("deliveries_waiting (subscription_id=? AND next_attempt_at<?)")
                || due.contains("deliveries_waiting (subscription_id="),
            "{due}"
        );
        let built = sea_orm::DbBackend::Sqlite.build(
            &delivery::Entity::find()
                .filter(sea_orm::sea_query::Expr::cust("state = 2"))
                .filter(delivery::Column::LeaseExpiresAt.lte(0))
                .into_query(),
        );
        let expired = explain(built.sql).await;
        assert!(expired.contains("deliveries_in_flight"), "{expired}");
    }

    #[tokio::test]
    async fn claims_and_completions_go_by_primary_key_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        let now = chrono::Utc::now();
        let ids: Vec<String> = (0..200).map(|i| format!("dlv_{i:04}")).collect();
        let lease = LeaseClaim {
            lease_id: "lease_1".into(),
            agent_id: "agent".into(),
            expires_at: now,
            groups: Vec::new(),
        };
        let claim = plan_of(&store, claim_update(&lease, &ids, now)).await;
        assert!(by_primary_key(&claim), "claim plan: {claim}");

        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let outcome = Completion {
            state: DeliveryState::Succeeded,
            next_attempt_at: None,
            status_code: 200,
            error: AttemptError::None,
            at_expiry: false,
        };
        let completion = plan_of(&store, completion_update("lease_1", &refs, &outcome, now)).await;
        assert!(by_primary_key(&completion), "completion plan: {completion}");
        store.close().await;
    }
}
