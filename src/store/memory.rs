//! An in-memory store, for tests and for embedding where the application
//! keeps credentials itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::{Changes, HeldLock, Loaded, Location, Store, StoreError, StoreFuture, StoreLock, Version};
use crate::credentials::TokenSet;

/// Credentials kept in memory. Clones share the same credentials.
///
/// Its version is a write counter; [`changes`](Store::changes) are sent
/// through an in-process channel on every write ([`set`](Self::set) or a
/// save).
///
/// ```
/// use token_broker::credentials::TokenSet;
/// use token_broker::store::{MemoryStore, Store};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryStore::new(TokenSet::new("access", Some("refresh")).unwrap());
/// assert_eq!(store.load().await.unwrap().tokens.access_token.expose(), "access");
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    /// The tokens and their revision; every write goes through `revision`'s
    /// sender, which also tells the subscribers.
    inner: Arc<Mutex<TokenSet>>,
    revision: Arc<tokio::sync::watch::Sender<u64>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Refused refresh tokens: SHA-256 hex and when.
    refused: Arc<Mutex<Vec<(String, SystemTime)>>>,
}

impl MemoryStore {
    /// A store holding `tokens`.
    pub fn new(tokens: TokenSet) -> Self {
        MemoryStore {
            inner: Arc::new(Mutex::new(tokens)),
            revision: Arc::new(tokio::sync::watch::Sender::new(0)),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            refused: Arc::default(),
        }
    }

    /// Replaces the credentials, as an outside writer would.
    pub fn set(&self, tokens: TokenSet) {
        let mut inner = self.inner.lock();
        *inner = tokens;
        self.revision.send_modify(|r| *r += 1);
    }

    /// The stored tokens, now (no waiting).
    pub fn get(&self) -> TokenSet {
        self.inner.lock().clone()
    }

    fn location_of(&self) -> Location {
        Location::named("memory")
    }
}

/// The memory store's lock: a guard of an in-process mutex, valid until
/// released.
struct MemoryLock(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<()>);

impl std::fmt::Debug for MemoryLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryLock")
    }
}

impl HeldLock for MemoryLock {
    fn is_valid(&self) -> bool {
        true
    }

    fn release(self: Box<Self>) -> StoreFuture<'static, Result<(), StoreError>> {
        drop(self);
        Box::pin(std::future::ready(Ok(())))
    }
}

impl Store for MemoryStore {
    fn location(&self) -> &str {
        "memory"
    }

    fn load(&self) -> StoreFuture<'_, Result<Loaded, StoreError>> {
        let inner = self.inner.lock();
        let loaded = Loaded {
            tokens: inner.clone(),
            version: Version::from_revision(*self.revision.borrow()),
        };
        Box::pin(std::future::ready(Ok(loaded)))
    }

    fn save<'a>(&'a self, tokens: &'a TokenSet, expected: &'a Version) -> StoreFuture<'a, Result<Version, StoreError>> {
        let mut inner = self.inner.lock();
        let current = *self.revision.borrow();
        let result = if Version::from_revision(current) != *expected {
            Err(StoreError::Conflict {
                location: self.location_of(),
            })
        } else {
            *inner = tokens.clone();
            self.revision.send_modify(|r| *r += 1);
            Ok(Version::from_revision(current + 1))
        };
        Box::pin(std::future::ready(result))
    }

    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<StoreLock, StoreError>> {
        let lock = self.lock.clone();
        let location = self.location_of();
        Box::pin(async move {
            match tokio::time::timeout(timeout, lock.lock_owned()).await {
                Ok(guard) => Ok(StoreLock::new(MemoryLock(guard))),
                Err(_) => Err(StoreError::LockTimeout {
                    location,
                    waited: timeout,
                }),
            }
        })
    }

    /// An event on every write, through the store's own channel: no
    /// thread, no polling; `fallback_poll` is not needed.
    fn changes(&self, _fallback_poll: Duration) -> Changes {
        Changes::from_watch(self.revision.subscribe())
    }

    fn record_refused<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        let hash = key.to_owned();
        let mut refused = self.refused.lock();
        refused.retain(|(h, _)| *h != hash);
        refused.push((hash, SystemTime::now()));
        let excess = refused.len().saturating_sub(32);
        refused.drain(..excess);
        Box::pin(std::future::ready(Ok(())))
    }

    fn refused_at<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<Option<SystemTime>, StoreError>> {
        let at = self.refused.lock().iter().find(|(h, _)| h == key).map(|(_, at)| *at);
        Box::pin(std::future::ready(Ok(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn tokens(access: &str, refresh: &str) -> TokenSet {
        TokenSet::new(access, Some(refresh)).unwrap()
    }

    #[tokio::test]
    async fn save_is_a_compare_and_swap() {
        let store = MemoryStore::new(tokens("a1", "r1"));
        let first = store.load().await.unwrap();
        let v2 = store.save(&tokens("a2", "r2"), &first.version).await.unwrap();
        assert_ne!(v2, first.version);
        // A second save from the same starting point is refused: someone
        // (the first) wrote since.
        let err = store.save(&tokens("a3", "r3"), &first.version).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "credential store memory was changed by another writer during the refresh; not overwriting it"
        );
        let now = store.load().await.unwrap();
        assert_eq!(now.tokens.access_token.expose(), "a2");
        assert_eq!(now.version, v2);
        // An outside write moves the version on too.
        store.set(tokens("a4", "r4"));
        let err = store.save(&tokens("a5", "r5"), &v2).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
        assert_eq!(store.get().access_token.expose(), "a4");
    }

    #[tokio::test]
    async fn writes_are_notified() {
        let store = MemoryStore::new(tokens("a1", "r1"));
        let mut changes = store.changes(Duration::ZERO);
        let quiet = tokio::time::timeout(Duration::from_millis(50), changes.next()).await;
        assert!(quiet.is_err(), "no event before any write");
        store.set(tokens("a2", "r2"));
        let event = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
        assert_eq!(event.unwrap(), Some(super::super::Changed));
        let v = store.load().await.unwrap().version;
        store.save(&tokens("a3", "r3"), &v).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(1), changes.next()).await;
        assert_eq!(event.unwrap(), Some(super::super::Changed));
    }

    #[tokio::test]
    async fn the_lock_is_exclusive_until_released() {
        let store = MemoryStore::new(tokens("a1", "r1"));
        let held = store.lock(Duration::from_millis(10)).await.unwrap();
        assert!(held.is_valid());
        assert_eq!(held.valid_for(), None);
        let err = store.lock(Duration::from_millis(10)).await.unwrap_err();
        assert!(matches!(err, StoreError::LockTimeout { .. }), "{err}");
        held.release().await.unwrap();
        store.lock(Duration::from_millis(10)).await.unwrap();
    }
}
