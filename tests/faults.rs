//! A misbehaving provider: every fault gives a typed error, the current
//! token is served while valid, retries back off, a refresh whose outcome is
//! unknown is retried once under the lock, and the file only changes when
//! new tokens were really obtained.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use token_broker::clock::ManualClock;
use token_broker::provider::{Failure, RefreshError};
use token_broker::sim::{Fault, SimConfig};
use token_broker::{BrokerError, TokenBroker};

fn unavailable_kind(err: &BrokerError) -> &Failure {
    match err {
        BrokerError::Unavailable {
            cause: RefreshError::Transient { kind, .. },
            ..
        } => kind,
        other => panic!("expected a provider-unavailable error, got {other:?}"),
    }
}

fn no_marker(fx: &Fixture) -> bool {
    !fx.path("auth.json.refreshing").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_transient_and_spends_nothing() {
    let fx = Fixture::codex();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/oauth/token", closed.local_addr().unwrap());
    drop(closed);
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let before = std::fs::read(&path).unwrap();

    let broker = fx.codex_broker(&path).token_url(&url).build().unwrap();
    let err = broker.token().await.unwrap_err();
    assert!(matches!(unavailable_kind(&err), Failure::Connect(_)), "{err}");
    // The CLI's exit 5, try again later (checked below).
    assert!(matches!(err, BrokerError::Unavailable { .. }), "{err}");
    broker.shutdown().await;
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert!(no_marker(&fx), "a request that never left leaves no record");

    let out = cli_command()
        .args(["token", "--auth-file"])
        .arg(&path)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains(&url), "{}", stderr(&out));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(fx.sim.token_requests(), 0);
}

/// 500, 502 and 503: typed errors, one attempt however many callers, backoff
/// before the next, the file untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_back_off_and_change_nothing() {
    for status in [500u16, 502, 503] {
        let fx = Fixture::codex();
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let before = std::fs::read(&path).unwrap();
        fx.sim.inject([Fault::Status {
            status,
            retry_after: None,
        }]);
        // Time moves when the test says: the backoff ends without a sleep.
        let clock = ManualClock::new(SystemTime::now());
        let broker = fx.codex_broker(&path).clock(Arc::new(clock.clone())).build().unwrap();
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let broker = broker.clone();
                tokio::spawn(async move { broker.token().await })
            })
            .collect();
        for caller in callers {
            let err = caller.await.unwrap().unwrap_err();
            assert!(
                matches!(unavailable_kind(&err), Failure::Status { status: s, .. } if *s == status),
                "{err}"
            );
        }
        assert_eq!(fx.sim.token_requests(), 1, "HTTP {status}: one attempt in flight");
        assert_eq!(std::fs::read(&path).unwrap(), before, "HTTP {status}: nothing written");
        assert!(no_marker(&fx), "HTTP {status}: the provider spent nothing");
        // Inside the backoff: fail fast, no request, and say when.
        let err = broker.token().await.unwrap_err();
        assert!(
            matches!(&err, BrokerError::Unavailable { retry_in: Some(d), .. } if *d <= Duration::from_secs(1)),
            "{err:?}"
        );
        assert!(err.to_string().contains("retrying in"), "{err}");
        assert_eq!(fx.sim.token_requests(), 1);
        // After the backoff, the next caller tries again and succeeds.
        clock.advance(Duration::from_millis(1100));
        let token = broker.token().await.unwrap();
        assert!(fx.sim.is_live(token.expose()));
        assert_eq!(fx.sim.token_requests(), 2);
        broker.shutdown().await;
        assert_ne!(std::fs::read(&path).unwrap(), before);
    }
}

/// 429 with `Retry-After`: honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_honour_retry_after() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let before = std::fs::read(&path).unwrap();
    fx.sim.inject([Fault::Status {
        status: 429,
        retry_after: Some(2),
    }]);
    let clock = ManualClock::new(SystemTime::now());
    let broker = fx.codex_broker(&path).clock(Arc::new(clock.clone())).build().unwrap();
    let err = broker.token().await.unwrap_err();
    assert_eq!(unavailable_kind(&err), &Failure::RateLimited);
    let err = broker.token().await.unwrap_err();
    let BrokerError::Unavailable {
        retry_in: Some(wait), ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(wait, Duration::from_secs(2), "the clock has not moved");
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing written");
    clock.advance(Duration::from_millis(1900));
    assert!(broker.token().await.is_err(), "still inside Retry-After");
    assert_eq!(fx.sim.token_requests(), 1);
    clock.advance(Duration::from_millis(100));
    broker.token().await.unwrap();
    assert_eq!(fx.sim.token_requests(), 2);
    broker.shutdown().await;
}

/// While the provider fails, a token that is still valid keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_is_served_through_provider_failures() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(120.0); // inside the 10-minute window
    let path = fx.write_codex(&issued);
    fx.sim.inject([Fault::Status {
        status: 503,
        retry_after: None,
    }]);
    let broker = fx.codex_broker(&path).build().unwrap();
    for _ in 0..20 {
        assert_eq!(broker.token().await.unwrap().expose(), issued.access_token);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(fx.sim.token_requests(), 1, "one background attempt, then backoff");
    let status = broker.status().await.unwrap();
    assert!(status.last_error.unwrap().contains("503"));
    broker.shutdown().await;
}

/// A provider with `reuse_grace` that will misbehave with `faults`, a Codex
/// file holding an expired token, and a broker with a 500 ms HTTP timeout.
fn expired_with_faults(reuse_grace: Duration, faults: Vec<Fault>) -> (Fixture, std::path::PathBuf, TokenBroker) {
    let fx = Fixture::new(SimConfig {
        reuse_grace,
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    fx.sim.inject(faults);
    let broker = fx
        .codex_broker(&path)
        .http_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    (fx, path, broker)
}

/// A fault, and the kind of failure it must be classified as.
type FaultCase = (&'static str, Fault, fn(&Failure) -> bool);

/// Faults after the provider spent the token (the answer never arrives or is
/// unusable): the broker re-reads the file and retries once. Without a reuse
/// grace period the retry is refused: login-required, saying the refresh was
/// interrupted, file unchanged. With one, the retry gets the same new tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_outcomes_are_retried_once_under_the_lock() {
    let faults: Vec<FaultCase> = vec![
        ("reset mid-response", Fault::ResetAfterSpend, |k| {
            matches!(k, Failure::Interrupted(_))
        }),
        (
            "timeout after spending",
            Fault::HangAfterSpend(Duration::from_secs(3)),
            |k| matches!(k, Failure::Timeout(_)),
        ),
        ("200 with HTML", Fault::Html200, |k| {
            matches!(k, Failure::Malformed { .. })
        }),
        ("200 with truncated JSON", Fault::Truncated200, |k| {
            matches!(k, Failure::Malformed { .. })
        }),
        ("200 without access_token", Fault::NoAccessToken200, |k| {
            matches!(k, Failure::Malformed { .. })
        }),
        ("200 with a 10 MB body", Fault::Huge200(10 << 20), |k| {
            matches!(k, Failure::TooLarge { .. })
        }),
    ];
    for (name, fault, _) in &faults {
        // No grace: the retry is refused.
        let (fx, path, broker) = expired_with_faults(Duration::ZERO, vec![fault.clone()]);
        let before = std::fs::read(&path).unwrap();
        let err = broker.token().await.unwrap_err();
        assert!(matches!(err, BrokerError::LoginRequired { .. }), "{name}: {err}");
        let text = err.to_string();
        assert!(text.contains("interrupted"), "{name}: {text}");
        assert!(text.contains("refresh_token_reused"), "{name}: {text}");
        assert_eq!(fx.sim.token_requests(), 2, "{name}: one attempt and one retry");
        // Never again for this snapshot.
        assert!(broker.token().await.is_err());
        assert_eq!(fx.sim.token_requests(), 2, "{name}");
        broker.shutdown().await;
        assert_eq!(std::fs::read(&path).unwrap(), before, "{name}");
        assert!(no_marker(&fx), "{name}");

        // A provider with a reuse grace period: the retry recovers.
        let (fx, path, broker) = expired_with_faults(Duration::from_secs(10), vec![fault.clone()]);
        let token = broker.token().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        broker.shutdown().await;
        assert!(fx.sim.is_live(token.expose()), "{name}");
        assert_eq!(fx.sim.counts().replayed, 1, "{name}");
        assert_eq!(fx.sim.token_requests(), 2, "{name}");
        let file = read_json(&path);
        assert_eq!(file["tokens"]["access_token"], token.expose(), "{name}");
        assert!(
            fx.sim.is_unspent(file["tokens"]["refresh_token"].as_str().unwrap()),
            "{name}"
        );
        assert!(no_marker(&fx), "{name}");
    }
    // Each fault is classified as its own kind when the retry fails the same
    // way (the grace period lets the retry reach the fault again).
    for (name, fault, is_kind) in faults {
        let (fx, _path, broker) = expired_with_faults(Duration::from_secs(10), vec![fault.clone(), fault]);
        let err = broker.token().await.unwrap_err();
        assert!(is_kind(unavailable_kind(&err)), "{name}: {err}");
        assert_eq!(fx.sim.token_requests(), 2, "{name}");
        broker.shutdown().await;
        assert!(!no_marker(&fx), "{name}: the record stays while the outcome is unknown");
    }
}

/// A timeout before the provider decided: the one retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_before_the_provider_decided_recovers_on_the_retry() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    fx.sim.inject([Fault::HangBeforeSpend(Duration::from_secs(3))]);
    let broker = fx
        .codex_broker(&path)
        .http_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let token = broker.token().await.unwrap();
    broker.shutdown().await;
    assert!(fx.sim.is_live(token.expose()));
    assert_eq!(read_json(&path)["tokens"]["access_token"], token.expose());
}

/// A caller that gives up never cancels the refresh: the rotation lands on
/// disk and the next caller gets it without another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_does_not_cancel_the_refresh() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(400),
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(50), broker.token()).await;
    assert!(gave_up.is_err(), "the caller stopped waiting");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let file = read_json(&path);
    let stored = file["tokens"]["access_token"].as_str().unwrap().to_owned();
    assert_ne!(stored, issued.access_token, "the rotation was persisted");
    assert!(fx.sim.is_unspent(file["tokens"]["refresh_token"].as_str().unwrap()));
    assert_eq!(broker.token().await.unwrap().expose(), stored);
    assert_eq!(fx.sim.token_requests(), 1);
    broker.shutdown().await;
}

/// New tokens that cannot be written are never handed out and never lost:
/// callers get the write error, and the next attempt writes the tokens it
/// already has instead of spending the (now rotated) refresh token again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_cannot_be_written_are_kept_and_written_later() {
    use token_broker::store::Store;
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let mut tokens = token_broker::TokenSet::new(&issued.access_token, Some(&issued.refresh_token)).unwrap();
    tokens.account_id = Some(issued.account_id.clone());
    let store = // One more failure than the broker's retries under the lock.
    FailingSaves::new(token_broker::store::MemoryStore::new(tokens), 4);
    let clock = ManualClock::new(SystemTime::now());
    let broker = token_broker::TokenBroker::codex()
        .store(store.clone())
        .token_url(fx.sim.token_url())
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let err = broker.token().await.unwrap_err();
    assert!(err.to_string().contains("no space left on device"), "{err}");
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(
        store.load().await.unwrap().tokens.access_token.expose(),
        issued.access_token,
        "nothing written yet"
    );

    // After the backoff, the kept tokens are written; no second request.
    clock.advance(Duration::from_millis(1100));
    let token = broker.token().await.unwrap();
    assert_eq!(
        fx.sim.token_requests(),
        1,
        "the rotated refresh token was not spent again"
    );
    assert!(fx.sim.is_live(token.expose()));
    let stored = store.load().await.unwrap().tokens;
    assert_eq!(stored.access_token, token);
    assert!(fx.sim.is_unspent(stored.refresh_token.unwrap().expose()));
    broker.shutdown().await;
}

/// Tokens that could not be written become stale when someone else writes
/// newer ones meanwhile: theirs are adopted, ours are never written over
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_tokens_never_overwrite_newer_ones() {
    use token_broker::store::Store;
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let set = |i: &token_broker::sim::Issued| {
        let mut t = token_broker::TokenSet::new(&i.access_token, Some(&i.refresh_token)).unwrap();
        t.account_id = Some(i.account_id.clone());
        t
    };
    let store = // One more failure than the broker's retries under the lock.
    FailingSaves::new(token_broker::store::MemoryStore::new(set(&issued)), 4);
    let clock = ManualClock::new(SystemTime::now());
    let broker = token_broker::TokenBroker::codex()
        .store(store.clone())
        .token_url(fx.sim.token_url())
        .watch_interval(Duration::ZERO)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    assert!(broker.token().await.is_err());
    // Someone signs in again meanwhile.
    let theirs = fx.sim.sign_in(3600.0);
    store.inner.set(set(&theirs));
    clock.advance(Duration::from_millis(1100));
    assert_eq!(broker.token().await.unwrap().expose(), theirs.access_token);
    broker.reload().await.unwrap();
    assert_eq!(
        store.load().await.unwrap().tokens.access_token.expose(),
        theirs.access_token
    );
    // The next refresh spends *their* refresh token; it does not write ours.
    let next = broker.reject(&broker.token().await.unwrap()).await.unwrap();
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 2);
    assert!(!fx.sim.is_unspent(&theirs.refresh_token));
    let stored = store.load().await.unwrap().tokens;
    assert_eq!(stored.access_token, next);
    assert!(fx.sim.is_unspent(stored.refresh_token.unwrap().expose()));
}
