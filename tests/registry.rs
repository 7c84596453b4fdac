//! Many credentials in one process: the `Brokers` registry, the
//! per-endpoint limit on token requests in flight, and the pause a 429
//! from an endpoint imposes on every credential of that endpoint. Against
//! the simulated provider on 127.0.0.1; every assertion is about counts
//! and outcomes, never timings.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use token_broker::provider::{Failure, RefreshError};
use token_broker::sim::{Fault, Issued, ProviderServer, SimConfig};
use token_broker::store::{MemoryStore, Store};
use token_broker::{BrokerError, Brokers, TokenBroker, TokenSet};

fn sim(latency: Duration) -> ProviderServer {
    ProviderServer::start(SimConfig {
        latency,
        ..SimConfig::default()
    })
    .unwrap()
}

fn store(issued: &Issued) -> Arc<MemoryStore> {
    let mut tokens = TokenSet::new(&issued.access_token, Some(&issued.refresh_token)).unwrap();
    tokens.account_id = Some(issued.account_id.clone());
    Arc::new(MemoryStore::new(tokens))
}

/// A broker that refreshes only when asked.
fn builder(sim: &ProviderServer, store: Arc<MemoryStore>) -> token_broker::BrokerBuilder {
    TokenBroker::codex()
        .store(store)
        .token_url(sim.token_url())
        .keep_fresh(false)
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_get_names_and_remove() {
    let sim = sim(Duration::ZERO);
    let brokers = Brokers::new();
    assert!(brokers.is_empty());
    for name in ["b", "a", "c"] {
        brokers
            .insert(name, builder(&sim, store(&sim.sign_in(3600.0))))
            .unwrap();
    }
    assert_eq!(brokers.names(), ["a", "b", "c"]);
    assert_eq!(brokers.len(), 3);
    let a = brokers.get("a").unwrap();
    assert!(sim.is_live(a.token().await.unwrap().expose()));
    assert!(brokers.get("nobody").is_none());

    // A name is registered once: the second insert fails, reads nothing
    // and replaces nothing.
    let err = brokers
        .insert("a", builder(&sim, store(&sim.sign_in(3600.0))))
        .unwrap_err();
    assert!(matches!(err, BrokerError::Config(_)), "{err}");
    assert_eq!(
        brokers.get("a").unwrap().token().await.unwrap(),
        a.token().await.unwrap()
    );

    assert_eq!(brokers.remove("a").await, Some(Ok(())));
    assert_eq!(brokers.remove("a").await, None);
    assert_eq!(brokers.names(), ["b", "c"]);
    // A handle kept elsewhere learns that its broker stopped.
    assert!(matches!(a.reload().await, Err(BrokerError::Stopped { .. })));
    // The name is free again.
    brokers.insert("a", builder(&sim, store(&sim.sign_in(3600.0)))).unwrap();
    brokers.finish().await.unwrap();
    assert!(brokers.is_empty());
    assert_eq!(sim.token_requests(), 0);
}

/// `remove` while a refresh is in flight: the refresh finishes, its new
/// tokens are written to the store, and the caller that waited gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_lets_a_refresh_in_flight_write_its_tokens() {
    let sim = sim(Duration::from_millis(400));
    let brokers = Brokers::new();
    let issued = sim.sign_in(-1.0);
    let store = store(&issued);
    let broker = brokers.insert("expired", builder(&sim, store.clone())).unwrap();
    let caller = tokio::spawn(async move { broker.token().await });
    wait_for(|| sim.concurrent_token_requests() == 1).await;
    assert_eq!(brokers.remove("expired").await, Some(Ok(())));
    let token = caller.await.unwrap().unwrap();
    assert!(sim.is_live(token.expose()));
    let stored = store.load().await.unwrap().tokens;
    assert_eq!(stored.access_token, token, "written before anyone was told");
    assert!(sim.is_unspent(stored.refresh_token.unwrap().expose()));
    assert!(!sim.is_unspent(&issued.refresh_token));
    assert_eq!(sim.token_requests(), 1);
}

/// Many credentials, many callers each: one refresh per credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_credentials_one_refresh_each() {
    let sim = sim(Duration::from_millis(20));
    let brokers = Brokers::new().endpoint_limit(16);
    let n = 200;
    for i in 0..n {
        brokers
            .insert(format!("cred-{i}"), builder(&sim, store(&sim.sign_in(-1.0))))
            .unwrap();
    }
    let callers: Vec<_> = (0..n * 10)
        .map(|i| {
            let broker = brokers.get(&format!("cred-{}", i % n)).unwrap();
            tokio::spawn(async move { broker.token().await })
        })
        .collect();
    for caller in callers {
        assert!(sim.is_live(caller.await.unwrap().unwrap().expose()));
    }
    let counts = sim.counts();
    assert_eq!(counts.token_requests, n as u64);
    assert_eq!(counts.refreshed, n as u64);
    assert_eq!(counts.reused, 0);
    brokers.finish().await.unwrap();
}

/// A caller that gives up (drops its future) never cancels the refresh
/// it started; the next caller gets its result without a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_cancels_nothing() {
    let sim = sim(Duration::from_millis(100));
    let brokers = Brokers::new();
    let store = store(&sim.sign_in(-1.0));
    let broker = brokers.insert("x", builder(&sim, store.clone())).unwrap();
    let mut first = broker.token();
    assert!((&mut first).now_or_never().is_none(), "parked, and the actor was asked");
    drop(first);
    wait_for(|| sim.counts().refreshed == 1).await;
    let token = broker.token().await.unwrap();
    assert_eq!(store.load().await.unwrap().tokens.access_token, token);
    assert_eq!(sim.token_requests(), 1);
    brokers.finish().await.unwrap();
}

/// At most the limit of token requests in flight per endpoint, across
/// every broker of the process that uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_limit_holds_across_credentials() {
    let sim = sim(Duration::from_millis(50));
    let brokers = Brokers::new().endpoint_limit(3);
    let n = 30;
    for i in 0..n {
        brokers
            .insert(format!("cred-{i}"), builder(&sim, store(&sim.sign_in(-1.0))))
            .unwrap();
    }
    // A broker outside the registry on the same endpoint shares the limit.
    let outside = builder(&sim, store(&sim.sign_in(-1.0))).build().unwrap();
    let mut callers: Vec<_> = brokers
        .names()
        .into_iter()
        .map(|name| {
            let broker = brokers.get(&name).unwrap();
            tokio::spawn(async move { broker.token().await })
        })
        .collect();
    let other = outside.clone();
    callers.push(tokio::spawn(async move { other.token().await }));
    for caller in callers {
        assert!(sim.is_live(caller.await.unwrap().unwrap().expose()));
    }
    assert_eq!(sim.token_requests(), n as u64 + 1);
    assert!(
        sim.peak_concurrent_token_requests() <= 3,
        "{}",
        sim.peak_concurrent_token_requests()
    );
    assert!(sim.peak_concurrent_token_requests() >= 1);
    brokers.finish().await.unwrap();
    outside.finish().await.unwrap();
}

/// A 429 with Retry-After pauses every credential of the endpoint: no
/// other credential sends a request until then; those with a valid token
/// keep getting it, those with an expired one get `Unavailable` with
/// `retry_in`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_every_credential_of_the_endpoint() {
    let sim = sim(Duration::ZERO);
    sim.inject([Fault::Status {
        status: 429,
        retry_after: Some(120),
    }]);
    let brokers = Brokers::new();
    let n = 10;
    for i in 0..n {
        brokers
            .insert(format!("expired-{i}"), builder(&sim, store(&sim.sign_in(-1.0))))
            .unwrap();
    }
    // Valid for 2 more minutes, inside the refresh-ahead window: due.
    let due = sim.sign_in(120.0);
    brokers.insert("due", builder(&sim, store(&due))).unwrap();

    let first = brokers.get("expired-0").unwrap().token().await.unwrap_err();
    let BrokerError::Unavailable {
        cause: RefreshError::Transient { kind, .. },
        retry_in: Some(retry_in),
        ..
    } = &first
    else {
        panic!("{first}")
    };
    assert_eq!(*kind, Failure::RateLimited);
    assert!(*retry_in > Duration::from_secs(60), "{retry_in:?}");
    assert_eq!(sim.token_requests(), 1);

    for i in 1..n {
        let err = brokers.get(&format!("expired-{i}")).unwrap().token().await.unwrap_err();
        let BrokerError::Unavailable {
            cause: RefreshError::Transient { kind, retry_after, .. },
            retry_in: Some(retry_in),
            ..
        } = &err
        else {
            panic!("{err}")
        };
        assert!(matches!(kind, Failure::NotSent(_)), "{err}");
        assert!(retry_after.is_some_and(|d| d > Duration::from_secs(60)), "{err}");
        assert!(*retry_in > Duration::from_secs(60), "{err}");
        assert!(err.to_string().contains("retrying in"), "{err}");
    }
    // The due credential's refresh is paused too, and its still-valid
    // token keeps being served.
    let due_broker = brokers.get("due").unwrap();
    for _ in 0..3 {
        assert_eq!(due_broker.token().await.unwrap().expose(), due.access_token);
    }
    assert_eq!(sim.token_requests(), 1, "nothing sent during the pause");
    brokers.finish().await.unwrap();
}

/// The handle works from a current-thread runtime and inside an actix
/// System, with the registry's actors on the shared runtime.
#[test]
fn handles_work_from_any_runtime() {
    let sim = sim(Duration::ZERO);
    let brokers = Brokers::new();
    brokers.insert("x", builder(&sim, store(&sim.sign_in(-1.0)))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = rt.block_on(brokers.get("x").unwrap().token()).unwrap();
    let system = actix_rt::System::new();
    let again = system.block_on(brokers.get("x").unwrap().token()).unwrap();
    assert_eq!(token, again);
    assert_eq!(sim.token_requests(), 1);
    rt.block_on(brokers.finish()).unwrap();
}
