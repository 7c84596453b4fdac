//! See `tests/adversarial.rs`: findings of the hostile review of the fixes
//! themselves (the review's numbering). Each failed before its fix.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use token_broker::clock::ManualClock;
use token_broker::credentials::{AccessToken, RefreshToken};
use token_broker::sim::{codex_auth_json, Fault, ProviderServer, SimConfig};
use token_broker::store::CodexAuthFile;
use token_broker::TokenBroker;

use crate::common::*;

/// A Codex file whose saves fail (a full disk).
type Failing = FailingSaves<CodexAuthFile>;

/// A Codex broker over `path` whose next `failures` saves fail, with the
/// short test winner wait.
fn failing_broker(fx: &Fixture, path: &std::path::Path, failures: u32) -> (Arc<Failing>, TokenBroker) {
    failing_broker_at(fx, path, failures, None)
}

/// [`failing_broker`] on `clock`, if given.
fn failing_broker_at(
    fx: &Fixture,
    path: &std::path::Path,
    failures: u32,
    clock: Option<&ManualClock>,
) -> (Arc<Failing>, TokenBroker) {
    let store = FailingSaves::new(CodexAuthFile::new(path), failures);
    let mut builder = TokenBroker::codex()
        .store(store.clone())
        .token_url(fx.sim.token_url())
        .winner_wait(TEST_WINNER_WAIT);
    if let Some(clock) = clock {
        builder = builder.clock(Arc::new(clock.clone()));
    }
    (store, builder.build().unwrap())
}

/// A second broker on `path`, while the first holds the brokers' lock with
/// tokens it could not write: it spends nothing and is told to try again.
async fn a_second_broker_is_told_to_try_again(fx: &Fixture, path: &std::path::Path) {
    let two = fx
        .codex_broker(path)
        .lock_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = two.token().await.unwrap_err();
    assert!(err.to_string().contains("another process is refreshing"), "{err}");
    two.shutdown().await;
    assert_eq!(fx.sim.counts().reused, 0, "{:?}", fx.sim.spends());
}

/// A clock standing at the wall clock's time, moved only by the test.
fn manual_clock() -> ManualClock {
    ManualClock::new(std::time::SystemTime::now())
}

/// Review 1: the file holds other tokens of the same account (D) that the
/// broker has not re-read yet; the upstream API rejects the broker's token;
/// the refresh spends D's refresh token and its result T cannot be written.
/// T must later be written over D, never dropped for D with D's (spent)
/// refresh token sent again, whether or not the broker watches the file.
async fn unwritten_tokens_replace_what_they_replaced(watch: Duration) {
    let fx = Fixture::codex();
    let held = fx.sim.sign_in(3600.0);
    let path = fx.write_codex(&held);
    let store = FailingSaves::new(CodexAuthFile::new(&path), 0);
    let clock = manual_clock();
    let broker = TokenBroker::codex()
        .store(store.clone())
        .token_url(fx.sim.token_url())
        .winner_wait(TEST_WINNER_WAIT)
        .watch_interval(watch)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    assert_eq!(broker.token().await.unwrap().expose(), held.access_token);
    std::fs::write(&path, codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
    // One more failure than the retries under the lock.
    store.failures_left.store(4, Ordering::SeqCst);
    assert!(broker
        .reject(&AccessToken::new(held.access_token.as_str()))
        .await
        .is_err());
    // Past the backoff, by the broker's clock.
    clock.advance(Duration::from_millis(1500));
    let token = broker.token().await.unwrap();
    broker.finish().await.unwrap();
    let counts = fx.sim.counts();
    assert_eq!(
        counts.reused,
        0,
        "a refresh token was spent twice: {:?}",
        fx.sim.spends()
    );
    assert_eq!(counts.refreshed, 1, "{counts:?}");
    assert_eq!(read_json(&path)["tokens"]["access_token"], token.expose());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_tokens_are_written_over_what_they_replaced() {
    unwritten_tokens_replace_what_they_replaced(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_tokens_survive_a_reload_of_what_they_replaced() {
    unwritten_tokens_replace_what_they_replaced(Duration::from_millis(100)).await;
}

/// Review 2: a temporary file from a crash long ago (generation A, spent
/// since) must not be adopted over the live tokens (B) now on disk, whose
/// own interrupted-refresh record came later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_orphan_is_never_written_over_newer_tokens() {
    let fx = Fixture::codex();
    let old = fx.sim.sign_in(-1.0);
    fx.sim.spend(&old.refresh_token);
    std::fs::write(fx.path(".auth.json.tb-OLD123.tmp"), codex_auth_json(&old)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let live = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&live);
    let hash = RefreshToken::new(live.refresh_token.as_str()).sha256_hex();
    std::fs::write(
        fx.path("auth.json.refreshing"),
        format!("{{\"pid\":999999,\"refresh_token_sha256\":\"{hash}\"}}\n"),
    )
    .unwrap();
    let broker = fx.codex_broker(&path).build().unwrap();
    let token = broker.token().await.unwrap();
    broker.shutdown().await;
    assert!(fx.sim.is_live(token.expose()));
    let on_disk = read_json(&path);
    assert!(fx.sim.is_unspent(on_disk["tokens"]["refresh_token"].as_str().unwrap()));
    assert_ne!(on_disk["tokens"]["refresh_token"], old.refresh_token.as_str());
}

/// Review 3 (and 4): two brokers on one file in one process (or in two pid
/// namespaces). The first spends the token and cannot write the result; the
/// second must not take that for a crash and spend the token again: the
/// first keeps the brokers' lock until its tokens are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_in_the_process_never_spends_what_the_first_holds() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    // Its writes fail until the test lets them succeed.
    let (store, one) = failing_broker(&fx, &path, u32::MAX);
    assert!(one.token().await.is_err(), "its write failed");
    a_second_broker_is_told_to_try_again(&fx, &path).await;
    // The disk is fixed: the first writes its tokens (on its next attempt,
    // or its last one on shutdown).
    store.failures_left.store(0, Ordering::SeqCst);
    one.finish().await.unwrap();
    assert!(fx
        .sim
        .is_unspent(read_json(&path)["tokens"]["refresh_token"].as_str().unwrap()));
}

/// Review 5: SIGTERM while `token` waits for another broker's lock. When
/// the lock comes free, nothing may be spent any more: the process is
/// leaving and could not write the result.
#[test]
fn a_signal_while_waiting_for_the_lock_spends_nothing() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let lock = hold_broker_lock(&path);
    fx.sim.inject([Fault::HangAfterSpend(Duration::from_secs(5))]);
    let child = cli_command()
        .args(["--auth-file", path.to_str().unwrap(), "--timeout", "1s", "token"])
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(1000));
    drop(lock);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert_eq!(fx.sim.token_requests(), 0, "nothing spent after the signal");
    assert!(fx.sim.is_unspent(&issued.refresh_token));
}

/// Review 6: a broker pointed at the wrong endpoint (a staging provider)
/// gets its refresh refused; correctly configured brokers must still use
/// the refresh token with the right endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_another_endpoint_stops_no_one() {
    let fx = Fixture::codex();
    let staging = ProviderServer::start(SimConfig::default()).unwrap();
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let wrong = TokenBroker::codex()
        .credentials_path(&path)
        .token_url(staging.token_url())
        .winner_wait(TEST_WINNER_WAIT)
        .build()
        .unwrap();
    assert!(wrong.token().await.is_err());
    wrong.shutdown().await;
    let right = fx.codex_broker(&path).build().unwrap();
    let token = right.token().await.unwrap();
    right.shutdown().await;
    assert!(fx.sim.is_live(token.expose()));
    assert_eq!(fx.sim.token_requests(), 1);
}

/// Second review, 1: a broker holds tokens it could not write, and the
/// file becomes unreadable for a while (an editor truncated it). Its next
/// attempt cannot even read the file: it must keep the tokens *and* the
/// lock, so that no other broker spends the old refresh token meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_tokens_keep_the_lock_while_the_file_is_unreadable() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let original = std::fs::read(&path).unwrap();
    let clock = manual_clock();
    let (store, one) = failing_broker_at(&fx, &path, u32::MAX, Some(&clock));
    assert!(one.token().await.is_err(), "its write failed");
    std::fs::write(&path, b"{ half-written").unwrap();
    // Its retry (after the 1 s backoff, by its clock) cannot read the file.
    clock.advance(Duration::from_millis(1100));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while one.status().await.unwrap().counters.failures < 2 {
        assert!(std::time::Instant::now() < deadline, "the retry never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(&path, &original).unwrap();
    a_second_broker_is_told_to_try_again(&fx, &path).await;
    store.failures_left.store(0, Ordering::SeqCst);
    one.finish().await.unwrap();
    assert!(fx
        .sim
        .is_unspent(read_json(&path)["tokens"]["refresh_token"].as_str().unwrap()));
}

/// Second review, 3: without keep-fresh, tokens that could not be written
/// are still written when the backoff ends, not only when someone asks
/// (meanwhile they hold the brokers' lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritten_tokens_are_retried_unasked() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let store = FailingSaves::new(CodexAuthFile::new(&path), 4);
    let clock = manual_clock();
    let broker = TokenBroker::codex()
        .store(store.clone())
        .token_url(fx.sim.token_url())
        .keep_fresh(false)
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    assert!(broker.token().await.is_err(), "its write failed");
    // The backoff ends by the broker's clock; nobody asks.
    clock.advance(Duration::from_millis(1100));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !fx
        .sim
        .is_unspent(read_json(&path)["tokens"]["refresh_token"].as_str().unwrap())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the kept tokens were never written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.finish().await.unwrap();
    assert_eq!(fx.sim.token_requests(), 1);
}
