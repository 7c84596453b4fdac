//! The stampede: 10,000 and 100,000 tasks ask for a token at once while the
//! token is expired, the provider answering in 50 ms. Measured: the time from
//! the refresh response to the last caller served, the token requests made
//! (must be 1), and the memory per waiting caller (a counting allocator's
//! peak, less what was allocated before the callers were spawned, divided by
//! the callers).
//!
//! Baseline in the same group: the same tasks waiting on a hand-rolled
//! `tokio::sync::watch` channel that a timer fills after 50 ms.
//!
//! Goals: exactly 1 request; at most 100 ms from response to last caller for
//! 100,000 callers; at most 1 KiB per waiting caller.
//!
//! Extra figures are printed to stderr and written to
//! `target/bench-extra/stampede.json`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};
use token_broker::TokenBroker;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LATENCY: Duration = Duration::from_millis(50);

/// One measured stampede.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    fan_out: Duration,
    requests: u64,
    bytes_per_caller: f64,
}

/// Spawns `n` callers that wait on `go`, then releases them; returns the
/// completion times and the peak memory above the starting point.
fn stampede_broker(rt: &tokio::runtime::Runtime, n: usize) -> Run {
    let sim = ProviderServer::start(SimConfig {
        latency: LATENCY,
        ..SimConfig::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.json");
    std::fs::write(&path, codex_auth_json(&sim.sign_in(-1.0))).unwrap();
    let broker = TokenBroker::codex()
        .credentials_path(&path)
        .token_url(sim.token_url())
        .build()
        .unwrap();
    let run = rt.block_on(async {
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let broker = broker.clone();
                let mut go = go_rx.clone();
                tokio::spawn(async move {
                    let _ = go.wait_for(|g| *g).await;
                    let token = broker.token().await.unwrap();
                    std::hint::black_box(token);
                    SystemTime::now()
                })
            })
            .collect();
        tokio::task::yield_now().await;
        go_tx.send(true).unwrap();
        let mut last = SystemTime::UNIX_EPOCH;
        for task in tasks {
            last = last.max(task.await.unwrap());
        }
        let peak = PEAK.load(Ordering::Relaxed);
        let responded = broker.status().await.unwrap().last_refresh.unwrap();
        Run {
            fan_out: last.duration_since(responded).unwrap_or_default(),
            requests: sim.token_requests(),
            bytes_per_caller: peak.saturating_sub(base) as f64 / n as f64,
        }
    });
    rt.block_on(broker.shutdown());
    run
}

/// The baseline: `n` tasks waiting on a watch channel filled after 50 ms.
fn stampede_watch(rt: &tokio::runtime::Runtime, n: usize) -> Run {
    rt.block_on(async {
        let token = token_broker::AccessToken::new("baseline-token");
        let (tx, rx) = tokio::sync::watch::channel::<Option<token_broker::AccessToken>>(None);
        let base = CURRENT.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let token = rx.wait_for(Option::is_some).await.unwrap().clone();
                    std::hint::black_box(token);
                    SystemTime::now()
                })
            })
            .collect();
        tokio::time::sleep(LATENCY).await;
        let sent = SystemTime::now();
        tx.send(Some(token)).unwrap();
        let mut last = SystemTime::UNIX_EPOCH;
        for task in tasks {
            last = last.max(task.await.unwrap());
        }
        Run {
            fan_out: last.duration_since(sent).unwrap_or_default(),
            requests: 0,
            bytes_per_caller: PEAK.load(Ordering::Relaxed).saturating_sub(base) as f64 / n as f64,
        }
    })
}

fn stampede(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut extra = serde_json::Map::new();
    let mut group = c.benchmark_group("stampede");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(100));
    for n in [10_000usize, 100_000] {
        let mut runs = Vec::new();
        group.bench_with_input(BenchmarkId::new("TokenBroker", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let run = stampede_broker(&rt, n);
                    assert_eq!(run.requests, 1, "one token request for {n} callers");
                    total += run.fan_out;
                    runs.push(run);
                }
                total
            })
        });
        let mut baseline = Vec::new();
        group.bench_with_input(BenchmarkId::new("watch channel baseline", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let run = stampede_watch(&rt, n);
                    total += run.fan_out;
                    baseline.push(run);
                }
                total
            })
        });
        let summary = |runs: &[Run]| {
            let mut fan: Vec<f64> = runs.iter().map(|r| r.fan_out.as_secs_f64() * 1000.0).collect();
            fan.sort_by(f64::total_cmp);
            let bytes = runs.iter().map(|r| r.bytes_per_caller).fold(0.0, f64::max);
            serde_json::json!({
                "runs": runs.len(),
                "fan_out_ms_median": fan[fan.len() / 2],
                "fan_out_ms_max": fan[fan.len() - 1],
                "token_requests_max": runs.iter().map(|r| r.requests).max(),
                "bytes_per_caller_max": bytes,
            })
        };
        let entry = serde_json::json!({"broker": summary(&runs), "watch_baseline": summary(&baseline)});
        eprintln!("stampede {n}: {entry}");
        extra.insert(n.to_string(), entry);
    }
    group.finish();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-extra");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("stampede.json"),
        serde_json::to_string_pretty(&extra).unwrap_or_default(),
    );
}

criterion_group!(benches, stampede);
criterion_main!(benches);
