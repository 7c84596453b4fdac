//! [`Brokers`]: many credentials in one process, by name.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::BrokerError;
use crate::handle::{BrokerBuilder, TokenBroker};

/// A registry of named credentials, each with its own [`TokenActor`](crate::actor::TokenActor),
/// all running on the process's one shared runtime (a small pool of actix
/// arbiters, one thread per core): never a thread per credential. 100,000
/// credentials fit in one process (see `BENCHMARKS.md`).
///
/// Cheap to clone (clones share the registry), `Send + Sync`, and usable
/// from any async runtime. Brokers of the same token endpoint share one
/// HTTP client, at most [`endpoint_limit`](Self::endpoint_limit) token
/// requests in flight, and any pause the endpoint asks for (a 429 or 503
/// with `Retry-After`): see [`provider::limit`](crate::provider::limit).
///
/// [`insert`](Self::insert) of a name already registered is an error
/// ([`BrokerError::Config`]); nothing is replaced. To replace a
/// credential, [`remove`](Self::remove) it first (which lets a refresh in
/// flight write its tokens).
///
/// ```
/// use std::sync::Arc;
/// use token_broker::sim::{ProviderServer, SimConfig};
/// use token_broker::store::MemoryStore;
/// use token_broker::{Brokers, TokenBroker, TokenSet};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let provider = ProviderServer::start(SimConfig::default())?;
/// let brokers = Brokers::new().endpoint_limit(4);
/// for name in ["alice", "bob", "carol"] {
///     let issued = provider.sign_in(-1.0); // already expired
///     let mut tokens = TokenSet::new(&issued.access_token, Some(&issued.refresh_token))?;
///     tokens.account_id = Some(issued.account_id);
///     let store = Arc::new(MemoryStore::new(tokens));
///     let builder = TokenBroker::codex().store(store).token_url(provider.token_url());
///     // Refresh when asked (a Codex broker otherwise keeps its token fresh unasked).
///     brokers.insert(name, builder.keep_fresh(false))?;
/// }
/// assert_eq!(brokers.names(), ["alice", "bob", "carol"]);
///
/// // Each credential refreshes once, however many callers ask.
/// let bob = brokers.get("bob").expect("registered");
/// let token = bob.token().await?;
/// assert!(provider.is_live(token.expose()));
/// assert_eq!(provider.token_requests(), 1);
///
/// // A name is registered once; remove it to replace it.
/// assert!(brokers.insert("bob", TokenBroker::codex()).is_err());
/// assert_eq!(brokers.remove("bob").await, Some(Ok(())));
/// assert!(brokers.get("bob").is_none());
///
/// // Before the process exits: every refresh in flight writes its tokens.
/// brokers.finish().await?;
/// assert!(brokers.is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
pub struct Brokers {
    inner: Arc<Registry>,
}

#[derive(Default)]
struct Registry {
    brokers: RwLock<HashMap<Box<str>, TokenBroker>>,
    endpoint_limit: Option<usize>,
}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Brokers")
            .field("len", &self.len())
            .field("endpoint_limit", &self.inner.endpoint_limit)
            .finish_non_exhaustive()
    }
}

impl Brokers {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `limit` token requests in flight per token endpoint, for
    /// the brokers inserted from now on whose builder does not set its own
    /// [`BrokerBuilder::endpoint_limit`] (default
    /// [`DEFAULT_ENDPOINT_LIMIT`](crate::provider::limit::DEFAULT_ENDPOINT_LIMIT)).
    /// The limit holds across the process: every broker of the same token
    /// URL shares it. Zero counts as one.
    ///
    /// Call it on a new registry (it returns a registry with the setting;
    /// clones made before do not see it).
    pub fn endpoint_limit(self, limit: usize) -> Self {
        let brokers = std::mem::take(&mut *self.inner.brokers.write());
        Brokers {
            inner: Arc::new(Registry {
                brokers: RwLock::new(brokers),
                endpoint_limit: Some(limit),
            }),
        }
    }

    /// Builds the broker `builder` describes, registers it as `name` and
    /// returns its handle. Reads the credentials (as
    /// [`BrokerBuilder::build`] does) and starts the actor on the shared
    /// runtime without waiting for it.
    ///
    /// Fails with [`BrokerError::Config`] when `name` is already registered
    /// (nothing is replaced, no credential is read), and with the errors of
    /// [`BrokerBuilder::build`].
    pub fn insert(&self, name: impl Into<String>, builder: BrokerBuilder) -> Result<TokenBroker, BrokerError> {
        let name: Box<str> = name.into().into_boxed_str();
        let exists = || {
            BrokerError::Config(format!(
                "a credential named {name:?} is already registered; remove it first"
            ))
        };
        if self.inner.brokers.read().contains_key(&name) {
            return Err(exists());
        }
        let builder = match self.inner.endpoint_limit {
            Some(limit) => builder.default_endpoint_limit(limit),
            None => builder,
        };
        let broker = builder.build()?;
        let mut brokers = self.inner.brokers.write();
        if brokers.contains_key(&name) {
            // Inserted by someone else meanwhile: this one stops unused.
            drop(brokers);
            return Err(exists());
        }
        brokers.insert(name, broker.clone());
        Ok(broker)
    }

    /// The handle of the credential registered as `name`.
    pub fn get(&self, name: &str) -> Option<TokenBroker> {
        self.inner.brokers.read().get(name).cloned()
    }

    /// Unregisters `name` and stops its actor once a refresh in flight has
    /// written its tokens; waits for that. `None` when no such name is
    /// registered; otherwise what [`TokenBroker::finish`] reports. Handles
    /// still held elsewhere get [`BrokerError::Stopped`] from then on.
    pub async fn remove(&self, name: &str) -> Option<Result<(), BrokerError>> {
        let broker = self.inner.brokers.write().remove(name)?;
        Some(broker.finish().await)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.brokers.read().keys().map(|k| k.to_string()).collect();
        names.sort_unstable();
        names
    }

    /// How many credentials are registered.
    pub fn len(&self) -> usize {
        self.inner.brokers.read().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unregisters every credential and stops them all (each once its
    /// refresh in flight has written its tokens), and waits for that.
    /// `Err` with the first failure [`TokenBroker::finish`] reported (some
    /// rotated tokens could not be written); every broker is stopped
    /// either way.
    pub async fn finish(&self) -> Result<(), BrokerError> {
        let brokers: Vec<TokenBroker> = self.inner.brokers.write().drain().map(|(_, b)| b).collect();
        // Ask them all first, so that they stop concurrently.
        let stops: Vec<_> = brokers.iter().map(|b| b.addr().send(crate::actor::Shutdown)).collect();
        let mut outcome = Ok(());
        for (broker, stop) in brokers.iter().zip(stops) {
            let result = stop.await.unwrap_or(Ok(()));
            broker.wait_stopped().await;
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }

    /// Like [`finish`](Self::finish), ignoring the outcome.
    pub async fn shutdown(&self) {
        let _ = self.finish().await;
    }
}
