//! Hostile review of the issue-10 redesign (state machine, shared runtime,
//! store seam, endpoint limiter). Each test reproduces one finding and
//! failed on the code before its fix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use token_broker::actor::GetToken;
use token_broker::clock::{FixedJitter, ManualClock};
use token_broker::sim::{Issued, ProviderServer, SimConfig};
use token_broker::store::{Changes, Loaded, MemoryStore, Store, StoreError, StoreFuture, StoreLock, Version};
use token_broker::{BrokerError, TokenBroker, TokenSet};

fn sim(config: SimConfig) -> ProviderServer {
    ProviderServer::start(config).expect("start the simulated provider")
}

fn set(issued: &Issued) -> TokenSet {
    let mut tokens = TokenSet::new(&issued.access_token, Some(&issued.refresh_token)).unwrap();
    tokens.account_id = Some(issued.account_id.clone());
    tokens
}

/// A memory store that counts its loads.
#[derive(Debug)]
struct Counting {
    inner: MemoryStore,
    loads: AtomicU64,
}

impl Store for Counting {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn load(&self) -> StoreFuture<'_, Result<Loaded, StoreError>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load()
    }
    fn save<'a>(&'a self, tokens: &'a TokenSet, expected: &'a Version) -> StoreFuture<'a, Result<Version, StoreError>> {
        self.inner.save(tokens, expected)
    }
    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<StoreLock, StoreError>> {
        self.inner.lock(timeout)
    }
    fn changes(&self, fallback_poll: Duration) -> Changes {
        self.inner.changes(fallback_poll)
    }
}

/// Finding 1: the refresh cycle decides freshness by `SystemTime::now()`,
/// not by the broker's clock (`BrokerBuilder::clock`). With a manual clock
/// past the token's expiry, the machine says "expired, wait for a refresh",
/// the cycle says "fresh, nothing to do": the caller gets an error and the
/// expired token is never refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_clock_past_expiry_gets_a_refresh() {
    let sim = sim(SimConfig {
        access_lifetime: Duration::from_secs(7200),
        ..SimConfig::default()
    });
    let issued = sim.sign_in(3600.0);
    let clock = ManualClock::new(SystemTime::now());
    let broker = TokenBroker::codex()
        .store(Arc::new(MemoryStore::new(set(&issued))))
        .token_url(sim.token_url())
        .keep_fresh(false)
        .watch_interval(Duration::ZERO)
        .clock(Arc::new(clock.clone()))
        .jitter(Arc::new(FixedJitter(0.0)))
        .build()
        .unwrap();
    // By the broker's clock, the token has expired.
    clock.advance(Duration::from_secs(3700));
    let got = broker.addr().send(GetToken).await.unwrap();
    let token = match got {
        Ok(token) => token,
        Err(e) => panic!("an expired token is refreshed, got: {e}"),
    };
    assert_ne!(token.expose(), issued.access_token);
    assert_eq!(sim.token_requests(), 1);
    broker.shutdown().await;
}

/// Finding 1, keep-fresh: with the broker's clock inside the refresh-ahead
/// window (the wall clock is not), the machine starts a cycle, the cycle
/// finds nothing to do, and the machine starts the next one at once: a
/// busy loop of lock + load, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_fresh_with_a_broker_clock_does_not_spin() {
    let sim = sim(SimConfig {
        access_lifetime: Duration::from_secs(7200),
        ..SimConfig::default()
    });
    let issued = sim.sign_in(3600.0);
    let store = Arc::new(Counting {
        inner: MemoryStore::new(set(&issued)),
        loads: AtomicU64::new(0),
    });
    let clock = ManualClock::new(SystemTime::now());
    let broker = TokenBroker::codex()
        .store(store.clone())
        .token_url(sim.token_url())
        .keep_fresh(true)
        .watch_interval(Duration::ZERO)
        .clock(Arc::new(clock.clone()))
        .jitter(Arc::new(FixedJitter(0.0)))
        .build()
        .unwrap();
    // Inside the window by the broker's clock (less than 10 minutes left).
    clock.advance(Duration::from_secs(3300));
    // Any event makes the actor look at the time again.
    broker.reload().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loads = store.loads.load(Ordering::SeqCst);
    assert!(loads < 20, "{loads} loads in half a second: a refresh-cycle loop");
    assert_eq!(sim.token_requests(), 1, "one refresh-ahead inside the window");
    broker.shutdown().await;
}

/// Finding 2: the store switches to another account (a `codex login` as
/// someone else) while the refresh request is in flight. The save meets a
/// conflict and the cycle adopts what it finds without comparing the
/// account: the broker then serves the other account's token to its
/// callers, where a re-read under the lock or a `Reload` would say
/// "signed in to another account".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_written_during_a_refresh_is_never_served() {
    let sim = sim(SimConfig {
        latency: Duration::from_millis(600),
        ..SimConfig::default()
    });
    let mine = sim.sign_in(-1.0);
    let store = Arc::new(MemoryStore::new(set(&mine)));
    let broker = TokenBroker::codex()
        .store(store.clone())
        .token_url(sim.token_url())
        .keep_fresh(false)
        .build()
        .unwrap();
    let caller = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.token().await })
    };
    // The request is on its way: someone signs in as another account.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let theirs = sim.sign_in_as("acct-other-0002", 3600.0);
    store.set(set(&theirs));
    let got = caller.await.unwrap();
    assert_eq!(sim.token_requests(), 1);
    match got {
        Err(BrokerError::AccountChanged { .. }) => {}
        Ok(token) => {
            assert!(
                token.expose() != theirs.access_token,
                "the other account's token was served"
            );
        }
        Err(other) => panic!("{other:?}"),
    }
    // Nor later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(token) = broker.addr().send(GetToken).await.unwrap() {
        assert!(
            token.expose() != theirs.access_token,
            "the other account's token is served"
        );
    }
    broker.shutdown().await;
}

/// Found by CI after the review: the actor answered the callers waiting
/// through messages before it published the same outcome for the callers
/// parked on the snapshot. A caller that heard the failed answer, moved
/// past the backoff and asked again at once could park in the round that
/// was about to close, and be handed the old failure instead of the new
/// token. Many rounds, to catch the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_after_a_failed_answer_never_gets_that_old_failure() {
    let sim = sim(SimConfig::default());
    for round in 0..300 {
        let issued = sim.sign_in(-1.0);
        sim.inject([token_broker::sim::Fault::Status {
            status: 503,
            retry_after: None,
        }]);
        let clock = ManualClock::new(SystemTime::now());
        let broker = TokenBroker::codex()
            .store(Arc::new(MemoryStore::new(set(&issued))))
            .token_url(sim.token_url())
            .clock(Arc::new(clock.clone()))
            .jitter(Arc::new(FixedJitter(0.0)))
            .build()
            .unwrap();
        // Answered through the message's reply channel.
        let failed = broker.addr().send(GetToken).await.unwrap();
        assert!(failed.is_err(), "round {round}: the provider failed");
        clock.advance(Duration::from_secs(2));
        // Parks on the snapshot at once.
        let token = broker.token().await;
        assert!(token.is_ok(), "round {round}: an old outcome: {token:?}");
        broker.shutdown().await;
    }
}

/// A memory store whose next load, once armed, reads at once and answers
/// late (a slow disk, a network store).
#[derive(Debug)]
struct SlowOnce {
    inner: MemoryStore,
    slow: std::sync::atomic::AtomicBool,
}

impl Store for SlowOnce {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn load(&self) -> StoreFuture<'_, Result<Loaded, StoreError>> {
        let slow = self.slow.swap(false, Ordering::SeqCst);
        let read = self.inner.load();
        Box::pin(async move {
            let loaded = read.await;
            if slow {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            loaded
        })
    }
    fn save<'a>(&'a self, tokens: &'a TokenSet, expected: &'a Version) -> StoreFuture<'a, Result<Version, StoreError>> {
        self.inner.save(tokens, expected)
    }
    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<StoreLock, StoreError>> {
        self.inner.lock(timeout)
    }
    fn changes(&self, fallback_poll: Duration) -> Changes {
        self.inner.changes(fallback_poll)
    }
}

/// Review 2: `Reload` answers with a future spawned in the actor's
/// context, so two reloads run side by side, and the `reloading` flag is
/// cleared by whichever ends first. A slow re-read that began before the
/// store switched to another account ends after a fast one that saw the
/// switch: its stale read brings "the account we started with back", and
/// the broker serves the signed-out account's token again while the store
/// holds the other account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_reload_never_undoes_a_newer_one() {
    let sim = sim(SimConfig::default());
    let mine = sim.sign_in(3600.0);
    let store = Arc::new(SlowOnce {
        inner: MemoryStore::new(set(&mine)),
        slow: Default::default(),
    });
    let broker = TokenBroker::codex()
        .store(store.clone())
        .token_url(sim.token_url())
        .keep_fresh(false)
        .build()
        .unwrap();
    assert_eq!(broker.token().await.unwrap().expose(), mine.access_token);

    // A re-read that reads now and answers late.
    store.slow.store(true, Ordering::SeqCst);
    let slow = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.reload().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Someone signs in as another account; a second re-read sees it.
    let theirs = sim.sign_in_as("acct-other-0002", 3600.0);
    store.inner.set(set(&theirs));
    let fast = broker.reload().await;
    assert!(matches!(fast, Err(BrokerError::AccountChanged { .. })), "{fast:?}");
    let _ = slow.await.unwrap();

    // The store still holds the other account: the first account's token
    // must not be served again.
    let got = broker.addr().send(GetToken).await.unwrap();
    if let Ok(token) = &got {
        assert_ne!(
            token.expose(),
            mine.access_token,
            "a stale re-read undid the account change: the signed-out account's token is served"
        );
    }
    broker.shutdown().await;
}
