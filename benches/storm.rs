//! Refresh storms across credentials (a measurement run once, not a
//! criterion loop): many credentials of one token endpoint, each with its
//! own `MemoryStore`, in one `Brokers` registry, all falling due at once
//! against the simulated provider.
//!
//! 1. **Storm**: 10,000 credentials whose access tokens are still valid for
//!    2 minutes but inside the refresh-ahead window, so every broker
//!    refreshes at once (keep-fresh); meanwhile callers ask for tokens of
//!    random credentials. Measured: the peak of concurrent token requests
//!    the provider saw (must be at most the endpoint limit, 8), the time
//!    until all 10,000 are refreshed, and the failed calls (must be 0: every
//!    caller's token is still valid).
//! 2. **429**: 1,000 credentials, half of them expired, half still valid;
//!    the provider answers the first token request 429 with
//!    `Retry-After: 2`. Measured: the token requests that arrived during
//!    the pause (beyond those already sent), failed calls for valid tokens
//!    (must be 0), and the errors callers of expired tokens got (an
//!    `Unavailable` with `retry_in`), and the time until all are refreshed.
//!
//! ```sh
//! cargo bench --bench storm
//! ```
//!
//! Figures are printed and written to `target/bench-extra/storm.json`.
//! `STORM_CREDENTIALS` changes the storm's size.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use token_broker::sim::{Fault, ProviderServer, SimConfig};
use token_broker::store::MemoryStore;
use token_broker::{BrokerError, Brokers, TokenBroker, TokenSet};

const LIMIT: usize = 8;
const LATENCY: Duration = Duration::from_millis(10);

fn store(issued: &token_broker::sim::Issued) -> Arc<MemoryStore> {
    let mut tokens = TokenSet::new(&issued.access_token, Some(&issued.refresh_token)).unwrap();
    tokens.account_id = Some(issued.account_id.clone());
    Arc::new(MemoryStore::new(tokens))
}

#[derive(Default)]
struct Calls {
    ok: AtomicU64,
    failed: AtomicU64,
    unavailable_with_retry_in: AtomicU64,
}

/// Callers asking for tokens of random credentials until `stop`.
fn callers(
    rt: &tokio::runtime::Runtime,
    brokers: Arc<Vec<(TokenBroker, bool)>>,
    stop: Arc<AtomicBool>,
) -> (Arc<Calls>, Arc<Calls>, Vec<tokio::task::JoinHandle<()>>) {
    let valid = Arc::new(Calls::default());
    let expired = Arc::new(Calls::default());
    let tasks = (0..4)
        .map(|_| {
            let (brokers, stop, valid, expired) = (brokers.clone(), stop.clone(), valid.clone(), expired.clone());
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (broker, was_valid) = &brokers[fastrand::usize(..brokers.len())];
                    let calls = if *was_valid { &valid } else { &expired };
                    match broker.token().await {
                        Ok(_) => calls.ok.fetch_add(1, Ordering::Relaxed),
                        Err(BrokerError::Unavailable { retry_in: Some(_), .. }) => {
                            calls.unavailable_with_retry_in.fetch_add(1, Ordering::Relaxed);
                            calls.failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => calls.failed.fetch_add(1, Ordering::Relaxed),
                    };
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    (valid, expired, tasks)
}

/// Waits until all `n` credentials are refreshed (or 10 minutes), then
/// stops the callers and the registry: whether all were, and when.
fn settle(
    rt: &tokio::runtime::Runtime,
    sim: &ProviderServer,
    n: usize,
    start: Instant,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    registry: &Brokers,
) -> (bool, Duration) {
    let all = wait_until(Duration::from_secs(600), || sim.counts().refreshed >= n as u64);
    let took = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = rt.block_on(task);
    }
    rt.block_on(registry.finish()).unwrap();
    (all, took)
}

fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

fn storm(rt: &tokio::runtime::Runtime, n: usize) -> serde_json::Value {
    let sim = ProviderServer::start(SimConfig {
        latency: LATENCY,
        ..SimConfig::default()
    })
    .unwrap();
    // Valid for 2 more minutes of a 1-hour life: inside the 10-minute
    // refresh-ahead window, so every credential is due now.
    let issued: Vec<_> = (0..n).map(|_| sim.sign_in(120.0)).collect();
    let registry = Brokers::new().endpoint_limit(LIMIT);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for (i, issued) in issued.iter().enumerate() {
        // Codex brokers keep their credential fresh: they refresh unasked.
        let builder = TokenBroker::codex().store(store(issued)).token_url(sim.token_url());
        handles.push((registry.insert(format!("cred-{i}"), builder).unwrap(), true));
    }
    let registered = start.elapsed();
    let (valid, _, tasks) = callers(rt, Arc::new(handles), stop.clone());
    let (all, took) = settle(rt, &sim, n, start, &stop, tasks, &registry);
    let counts = sim.counts();
    serde_json::json!({
        "credentials": n,
        "endpoint_limit": LIMIT,
        "provider_latency_ms": LATENCY.as_millis() as u64,
        "registered_ms": registered.as_secs_f64() * 1000.0,
        "all_refreshed": all,
        "time_until_all_refreshed_ms": took.as_secs_f64() * 1000.0,
        "peak_concurrent_token_requests": sim.peak_concurrent_token_requests(),
        "token_requests": counts.token_requests,
        "refreshed": counts.refreshed,
        "reused": counts.reused,
        "calls_ok": valid.ok.load(Ordering::SeqCst),
        "calls_failed": valid.failed.load(Ordering::SeqCst),
    })
}

fn rate_limited(rt: &tokio::runtime::Runtime, n: usize) -> serde_json::Value {
    let sim = ProviderServer::start(SimConfig {
        latency: LATENCY,
        ..SimConfig::default()
    })
    .unwrap();
    let retry_after = 2;
    sim.inject([Fault::Status {
        status: 429,
        retry_after: Some(retry_after),
    }]);
    let registry = Brokers::new().endpoint_limit(LIMIT);
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        // Half expired, half valid (due) tokens.
        let valid = i % 2 == 0;
        let issued = sim.sign_in(if valid { 120.0 } else { -1.0 });
        let builder = TokenBroker::codex().store(store(&issued)).token_url(sim.token_url());
        handles.push((registry.insert(format!("cred-{i}"), builder).unwrap(), valid));
    }
    let (valid, expired, tasks) = callers(rt, Arc::new(handles), stop.clone());
    // The 429 is answered; then count the requests that arrive while the
    // endpoint is paused (until 1.9 s after the 429 was seen).
    wait_until(Duration::from_secs(30), || sim.counts().faults >= 1);
    let at_429 = sim.token_requests();
    std::thread::sleep(Duration::from_millis(retry_after * 1000 - 100));
    let during_pause = sim.token_requests() - at_429;
    let (all, took) = settle(rt, &sim, n, start, &stop, tasks, &registry);
    serde_json::json!({
        "credentials": n,
        "retry_after_s": retry_after,
        "token_requests_at_the_429": at_429,
        "token_requests_during_the_pause": during_pause,
        "all_refreshed": all,
        "time_until_all_refreshed_ms": took.as_secs_f64() * 1000.0,
        "peak_concurrent_token_requests": sim.peak_concurrent_token_requests(),
        "reused": sim.counts().reused,
        "valid_token_calls_ok": valid.ok.load(Ordering::SeqCst),
        "valid_token_calls_failed": valid.failed.load(Ordering::SeqCst),
        "expired_token_calls_ok": expired.ok.load(Ordering::SeqCst),
        "expired_token_calls_failed": expired.failed.load(Ordering::SeqCst),
        "expired_token_failures_unavailable_with_retry_in": expired.unavailable_with_retry_in.load(Ordering::SeqCst),
    })
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = std::env::var("STORM_CREDENTIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let storm = storm(&rt, n);
    eprintln!("storm: {storm}");
    let limited = rate_limited(&rt, 1_000);
    eprintln!("429: {limited}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-extra");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("storm.json"),
        serde_json::to_string_pretty(&serde_json::json!({"storm": storm, "429": limited})).unwrap_or_default(),
    );
}
