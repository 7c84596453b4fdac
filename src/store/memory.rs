//! An in-memory store, for tests and for embedding where the application
//! keeps credentials itself.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::{Store, StoreError, StoreLock, StoreVersion};
use crate::credentials::TokenSet;

/// Credentials kept in memory. Clones share the same credentials.
///
/// ```
/// use token_broker::credentials::TokenSet;
/// use token_broker::store::{MemoryStore, Store};
/// let store = MemoryStore::new(TokenSet::new("access", Some("refresh")).unwrap());
/// assert_eq!(store.load().unwrap().access_token.expose(), "access");
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<(TokenSet, u64)>>,
    lock: Arc<Mutex<()>>,
    /// Refused refresh tokens: SHA-256 hex and when.
    refused: Arc<Mutex<Vec<(String, SystemTime)>>>,
}

impl MemoryStore {
    /// A store holding `tokens`.
    pub fn new(tokens: TokenSet) -> Self {
        MemoryStore {
            inner: Arc::new(Mutex::new((tokens, 0))),
            lock: Arc::new(Mutex::new(())),
            refused: Arc::default(),
        }
    }

    /// Replaces the credentials, as an outside writer would.
    pub fn set(&self, tokens: TokenSet) {
        let mut inner = self.inner.lock();
        inner.0 = tokens;
        inner.1 += 1;
    }
}

impl Store for MemoryStore {
    fn location(&self) -> &str {
        "memory"
    }

    fn load(&self) -> Result<TokenSet, StoreError> {
        Ok(self.inner.lock().0.clone())
    }

    fn save(&self, tokens: &TokenSet, replaces: &TokenSet) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        if inner.0.differs_from(replaces) {
            return Err(StoreError::Conflict { path: "memory".into() });
        }
        inner.0 = tokens.clone();
        inner.1 += 1;
        Ok(())
    }

    fn version(&self) -> Option<StoreVersion> {
        Some(StoreVersion::Memory(self.inner.lock().1))
    }

    fn record_refused(&self, key: &str) -> Result<(), StoreError> {
        let hash = key.to_owned();
        let mut refused = self.refused.lock();
        refused.retain(|(h, _)| *h != hash);
        refused.push((hash, SystemTime::now()));
        let excess = refused.len().saturating_sub(32);
        refused.drain(..excess);
        Ok(())
    }

    fn refused_at(&self, key: &str) -> Option<SystemTime> {
        self.refused.lock().iter().find(|(h, _)| h == key).map(|(_, at)| *at)
    }

    fn lock(&self, timeout: Duration) -> Result<StoreLock, StoreError> {
        self.lock
            .try_lock_arc_for(timeout)
            .map(StoreLock::InProcess)
            .ok_or(StoreError::LockTimeout {
                path: "memory".into(),
                waited: timeout,
            })
    }
}
