//! Secrets at rest across master key changes: sealing what is still in clear once a key is set,
//! and re-sealing everything under a new key during a rotation. In batches, each its own
//! transaction; a run interrupted by a crash is simply run again (it converges).

use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};

use super::entity::subscription;
use super::{Error, Store};

/// Which values to seal again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reseal {
    /// Only values stored in clear (at start with a key).
    Clear,
    /// Every value the current key does not open by itself (a rotation).
    All,
}

/// Seals again the subscriptions' API keys and signing secrets (every sealed kind) that `which`
/// names, `batch` subscriptions per transaction; returns how many values it sealed.
pub async fn reseal(store: &Store, which: Reseal, batch: u64) -> Result<u64, Error> {
    if !store.sealer.has_key() {
        return Ok(0);
    }
    let mut sealed = 0;
    let mut after = String::new();
    loop {
        let mut query = subscription::Entity::find()
            .filter(subscription::Column::Id.gt(after.clone()))
            .order_by_asc(subscription::Column::Id)
            .limit(batch);
        if which == Reseal::Clear {
            // Only rows with something in clear (NULL matches neither side of NOT LIKE).
            let clear = |column: subscription::Column| column.not_like("sealed1:%");
            query = query.filter(
                Condition::any()
                    .add(clear(subscription::Column::SigningSecret))
                    .add(clear(subscription::Column::ApiKey))
                    .add(clear(subscription::Column::PreviousSecret))
                    // Secret custom headers are checked one by one below.
                    .add(subscription::Column::Headers.like("%\"secret\":true%")),
            );
        }
        let rows = query.all(&store.db).await?;
        let Some(last) = rows.last() else {
            return Ok(sealed);
        };
        after = last.id.clone();
        let txn = store.begin_write().await?;
        for row in rows {
            let mut again = |value: &Option<String>| -> Result<Option<String>, Error> {
                match value {
                    Some(v) if store.sealer.needs_reseal(v) => {
                        sealed += 1;
                        Ok(Some(store.sealer.seal(&store.sealer.open(v)?)))
                    }
                    _ => Ok(None),
                }
            };
            let signing_secret = again(&Some(row.signing_secret.clone()))?;
            let api_key = again(&row.api_key)?;
            let previous_secret = again(&row.previous_secret)?;
            let headers = match row.headers.as_deref() {
                Some(text) => {
                    let mut headers: Vec<crate::domain::model::CustomHeader> =
                        serde_json::from_str(text)
                            .map_err(|err| Error::Internal(err.to_string()))?;
                    let mut changed = false;
                    for header in headers.iter_mut().filter(|h| h.secret) {
                        if let Some(v) = again(&Some(header.value.clone()))? {
                            header.value = v;
                            changed = true;
                        }
                    }
                    changed
                        .then(|| serde_json::to_string(&headers))
                        .transpose()
                        .map_err(|err| Error::Internal(err.to_string()))?
                }
                None => None,
            };
            if signing_secret.is_none()
                && api_key.is_none()
                && previous_secret.is_none()
                && headers.is_none()
            {
                continue;
            }
            let mut update = subscription::ActiveModel {
                id: Set(row.id.clone()),
                ..Default::default()
            };
            if let Some(v) = signing_secret {
                update.signing_secret = Set(v);
            }
            if let Some(v) = api_key {
                update.api_key = Set(Some(v));
            }
            if let Some(v) = previous_secret {
                update.previous_secret = Set(Some(v));
            }
            if let Some(v) = headers {
                update.headers = Set(Some(v));
            }
            // Only if the row still holds what was read: a secret rotated meanwhile was sealed
            // under the current key already.
            subscription::Entity::update_many()
                .set(update)
                .filter(subscription::Column::Id.eq(row.id.clone()))
                .filter(subscription::Column::SigningSecret.eq(row.signing_secret.clone()))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{CustomHeader, Subscription};
    use crate::storage::{StoreOptions, subscriptions};

    async fn open(dir: &tempfile::TempDir, key: Option<[u8; 32]>) -> Store {
        Store::open(StoreOptions {
            url: format!("sqlite://{}?mode=rwc", dir.path().join("s.db").display()),
            max_connections: 2,
            master_key: key,
            previous_master_key: None,
            sqlite_page_limit: None,
        })
        .await
        .unwrap()
    }

    /// Secret custom headers written without a key are sealed by the first start with one,
    /// like the API key and signing secret, and still open to their values.
    #[tokio::test]
    async fn secret_headers_are_sealed_once_a_key_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let subscription = Subscription {
            headers: vec![
                CustomHeader {
                    name: "X-Plain".into(),
                    value: "visible".into(),
                    secret: false,
                },
                CustomHeader {
                    name: "X-Shared".into(),
                    value: "s3cr3t".into(),
                    secret: true,
                },
            ],
            ..Subscription::example("sub_1", "ten_a")
        };
        let clear = open(&dir, None).await;
        subscriptions::insert(&clear.writer, &clear.sealer, &subscription)
            .await
            .unwrap();
        clear.close().await;

        let keyed = open(&dir, Some([9u8; 32])).await;
        // What a start with a key does first: the signing secret and the secret header.
        assert_eq!(reseal(&keyed, Reseal::Clear, 10).await.unwrap(), 2);
        let stored = |store: Store| async move {
            let row = subscription::Entity::find_by_id("sub_1".to_owned())
                .one(&store.db)
                .await
                .unwrap()
                .unwrap();
            row.headers.unwrap()
        };
        let headers = stored(keyed.clone()).await;
        assert!(!headers.contains("s3cr3t"), "{headers}");
        assert!(
            headers.contains("visible"),
            "plain values stay in clear: {headers}"
        );
        let read = subscriptions::get(&keyed.db, &keyed.sealer, "ten_a", "sub_1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read.headers, subscription.headers);
        // Nothing left to seal: a second pass changes nothing.
        assert_eq!(reseal(&keyed, Reseal::Clear, 10).await.unwrap(), 0);
    }
}
