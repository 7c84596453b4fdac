//! The process's one shared actix runtime: a small pool of arbiters (one
//! thread each, as many as the machine has cores, at most
//! [`MAX_ARBITERS`]) on which every [`TokenActor`] of the process runs,
//! whether it was built alone ([`TokenBroker::codex`](crate::TokenBroker::codex))
//! or in a [`Brokers`](crate::Brokers) registry. Never a thread per
//! credential.
//!
//! The pool starts with the first broker and lives until the process exits.
//! Handles reach their actor through its address, which works from any
//! runtime (a plain `#[tokio::main]`, a current-thread runtime, or code
//! inside another actix System).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use actix::dev::channel;
use actix::prelude::*;
use actix_rt::ArbiterHandle;

use futures_util::FutureExt;

use crate::actor::{Config, Published, TokenActor};
use crate::credentials::TokenSet;
use crate::error::BrokerError;
use crate::store::{Changes, Loaded, Version};

/// The most arbiter threads the shared runtime starts.
pub(crate) const MAX_ARBITERS: usize = 4;

/// The actors' mailbox buffer (actix's default; the actor raises its
/// capacity when it starts).
const MAILBOX: usize = 16;

pub(crate) struct Runtime {
    arbiters: Vec<ArbiterHandle>,
    next: AtomicUsize,
    /// The first arbiter's tokio runtime: the context in which stores'
    /// futures are made and, when they need one, run.
    tokio: tokio::runtime::Handle,
}

static SHARED: OnceLock<Result<Runtime, String>> = OnceLock::new();

/// The shared runtime, started on first use.
pub(crate) fn shared() -> Result<&'static Runtime, BrokerError> {
    SHARED
        .get_or_init(Runtime::start)
        .as_ref()
        .map_err(|e| BrokerError::Config(e.clone()))
}

impl Runtime {
    fn start() -> Result<Runtime, String> {
        let size = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_ARBITERS);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("token-broker".into())
            .spawn(move || {
                let system = actix_rt::System::new();
                system.block_on(async move {
                    let mut arbiters = vec![actix_rt::Arbiter::current()];
                    let mut owned = Vec::new();
                    for _ in 1..size {
                        match actix_rt::Arbiter::try_new() {
                            Ok(arbiter) => {
                                arbiters.push(arbiter.handle());
                                owned.push(arbiter);
                            }
                            Err(_) => break,
                        }
                    }
                    let _ = tx.send((arbiters, tokio::runtime::Handle::current()));
                    // Runs (and keeps the other arbiters) until the process exits.
                    std::future::pending::<()>().await;
                    drop(owned);
                });
            })
            .map_err(|e| format!("could not start the broker thread: {e}"))?;
        let (arbiters, tokio) = rx.recv().map_err(|_| "the broker thread failed to start".to_owned())?;
        Ok(Runtime {
            arbiters,
            next: AtomicUsize::new(0),
            tokio,
        })
    }

    /// Subscribes to the store's changes (unless watching is off), loads the
    /// credentials and starts their actor: subscribing first, so that a
    /// change made between the load and the actor's start is not missed.
    /// Blocks until the load is done; a load error comes back here.
    pub(crate) fn open(&self, cfg: Arc<Config>, published: Published) -> Result<Addr<TokenActor>, BrokerError> {
        let (changes, ready) = {
            // Stores make their futures and streams in a tokio context (a
            // file store's reads run on its blocking pool).
            let _context = self.tokio.enter();
            let changes = (!cfg.watch_interval.is_zero()).then(|| cfg.store.changes(cfg.watch_interval));
            // A store that answers at once (memory) needs no round trip:
            // 100,000 credentials register in well under a second.
            (changes, cfg.store.load().now_or_never())
        };
        let Loaded { tokens, version } = match ready {
            Some(loaded) => loaded?,
            None => self.load(&cfg)?,
        };
        self.spawn(cfg, tokens, Some(version), changes, published)
    }

    /// Loads the credentials on the runtime and waits for them.
    fn load(&self, cfg: &Arc<Config>) -> Result<Loaded, BrokerError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let store = cfg.store.clone();
        self.tokio.spawn(async move {
            let _ = tx.send(store.load().await);
        });
        match rx.recv() {
            Ok(loaded) => Ok(loaded?),
            Err(_) => Err(BrokerError::Config("the broker runtime has stopped".into())),
        }
    }

    /// Starts a [`TokenActor`] on one of the arbiters and returns its
    /// address at once (the actor is built and started on its arbiter).
    /// When the actor has stopped and been dropped, `published` is marked
    /// done (see [`TokenBroker::finish`](crate::TokenBroker::finish)).
    fn spawn(
        &self,
        cfg: Arc<Config>,
        tokens: TokenSet,
        version: Option<Version>,
        changes: Option<Changes>,
        published: Published,
    ) -> Result<Addr<TokenActor>, BrokerError> {
        let (tx, rx) = channel::channel::<TokenActor>(MAILBOX);
        let addr = Addr::new(tx);
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.arbiters.len();
        let started = self.arbiters[index].spawn_fn(move || {
            let guard = Finished(published.clone());
            let actor = TokenActor::new(cfg, tokens, version, published).with_changes(changes);
            let fut = Context::with_receiver(rx).into_future(actor);
            // A plain struct, not an async block: an async block would hold
            // the actor twice (its capture and its awaited future), doubling
            // the task's 1.3 KiB.
            actix_rt::spawn(Run { fut, _guard: guard });
        });
        if !started {
            return Err(BrokerError::Config("the broker runtime has stopped".into()));
        }
        Ok(addr)
    }
}

/// The actor's task: its context future, then the [`Finished`] guard
/// (dropped after the actor, when the task completes or is torn down).
struct Run {
    fut: actix::dev::ContextFut<TokenActor, Context<TokenActor>>,
    _guard: Finished,
}

impl std::future::Future for Run {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.fut).poll(cx)
    }
}

/// Dropped once the actor has stopped and been dropped (or its task was
/// torn down): `finish` returns, and callers still parked (only if the
/// actor never ran its `stopped`) hear that the broker stopped.
struct Finished(Published);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.mark_done();
    }
}
