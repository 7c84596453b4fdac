//! An in-memory store, for tests and for embedding where the application
//! keeps credentials itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::{Changed, Changes, HeldLock, Loaded, Location, Store, StoreError, StoreFuture, StoreLock, Version};
use crate::credentials::TokenSet;

/// Credentials kept in memory. Clones share the same credentials.
///
/// Its version is a write counter; [`changes`](Store::changes) wake on
/// every write ([`set`](Self::set) or a save) through an in-process
/// notification: no thread, no timer.
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
    /// One allocation per store: 100,000 of them live in a registry.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The tokens and their revision (a write counter).
    state: Mutex<(TokenSet, u64)>,
    /// Woken on every write; subscribers compare the revision.
    changed: tokio::sync::Notify,
    /// The brokers' lock: one permit.
    lock: tokio::sync::Semaphore,
    /// Refused refresh tokens: SHA-256 hex and when.
    refused: Mutex<Vec<(String, SystemTime)>>,
}

impl Shared {
    fn revision(&self) -> u64 {
        self.state.lock().1
    }
}

impl MemoryStore {
    /// A store holding `tokens`.
    pub fn new(tokens: TokenSet) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new((tokens, 0)),
                changed: tokio::sync::Notify::new(),
                lock: tokio::sync::Semaphore::new(1),
                refused: Mutex::default(),
            }),
        }
    }

    /// Replaces the credentials, as an outside writer would.
    pub fn set(&self, tokens: TokenSet) {
        {
            let mut state = self.shared.state.lock();
            state.0 = tokens;
            state.1 += 1;
        }
        self.shared.changed.notify_waiters();
    }

    /// The stored tokens, now (no waiting).
    pub fn get(&self) -> TokenSet {
        self.shared.state.lock().0.clone()
    }

    fn location_of(&self) -> Location {
        Location::named("memory")
    }
}

/// The memory store's lock: its one permit, given back when released.
struct MemoryLock(Arc<Shared>);

impl Drop for MemoryLock {
    fn drop(&mut self) {
        self.0.lock.add_permits(1);
    }
}

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
        let state = self.shared.state.lock();
        let loaded = Loaded {
            tokens: state.0.clone(),
            version: Version::from_revision(state.1),
        };
        Box::pin(std::future::ready(Ok(loaded)))
    }

    fn save<'a>(&'a self, tokens: &'a TokenSet, expected: &'a Version) -> StoreFuture<'a, Result<Version, StoreError>> {
        let result = {
            let mut state = self.shared.state.lock();
            if Version::from_revision(state.1) != *expected {
                Err(StoreError::Conflict {
                    location: self.location_of(),
                })
            } else {
                state.0 = tokens.clone();
                state.1 += 1;
                Ok(Version::from_revision(state.1))
            }
        };
        if result.is_ok() {
            self.shared.changed.notify_waiters();
        }
        Box::pin(std::future::ready(result))
    }

    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<StoreLock, StoreError>> {
        let shared = self.shared.clone();
        let location = self.location_of();
        Box::pin(async move {
            let acquired = match tokio::time::timeout(timeout, shared.lock.acquire()).await {
                Ok(Ok(permit)) => {
                    // Given back by the guard's drop.
                    permit.forget();
                    true
                }
                Ok(Err(_)) | Err(_) => false,
            };
            if acquired {
                Ok(StoreLock::new(MemoryLock(shared)))
            } else {
                Err(StoreError::LockTimeout {
                    location,
                    waited: timeout,
                })
            }
        })
    }

    /// An event on every write, through the store's own channel: no
    /// thread, no polling; `fallback_poll` is not needed.
    fn changes(&self, _fallback_poll: Duration) -> Changes {
        let shared = self.shared.clone();
        let seen = shared.revision();
        Changes::new(futures_util::stream::unfold(
            (shared, seen),
            |(shared, mut seen)| async move {
                loop {
                    {
                        // Registered before the revision is read: no write is
                        // missed between the two.
                        let notified = shared.changed.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        let now = shared.revision();
                        if now == seen {
                            notified.await;
                            continue;
                        }
                        seen = now;
                    }
                    return Some((Changed, (shared, seen)));
                }
            },
        ))
    }

    fn record_refused<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        let hash = key.to_owned();
        let mut refused = self.shared.refused.lock();
        refused.retain(|(h, _)| *h != hash);
        refused.push((hash, SystemTime::now()));
        let excess = refused.len().saturating_sub(32);
        refused.drain(..excess);
        Box::pin(std::future::ready(Ok(())))
    }

    fn refused_at<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<Option<SystemTime>, StoreError>> {
        let at = self
            .shared
            .refused
            .lock()
            .iter()
            .find(|(h, _)| h == key)
            .map(|(_, at)| *at);
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
