//! Many credentials in one process: 100,000 brokers, each with its own
//! `MemoryStore`, registered in one `Brokers` registry.
//!
//! Measured: the time to register all 100,000 (criterion's figure, one
//! iteration = one whole registry); the idle memory per credential once
//! every actor has started (a counting allocator's level, less what was
//! allocated before the stores were made, less the token bytes, divided by
//! the credentials); and `token()` on a broker of the full registry beside
//! a raw `ArcSwap` read, as in `benches/hot_path.rs`.
//!
//! Goals: at most 2 s to register 100,000; at most 2 KiB per idle
//! credential beyond its token bytes; `token()` as fast as in `hot_path`.
//!
//! Extra figures are printed to stderr and written to
//! `target/bench-extra/registry.json`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use futures_util::FutureExt;
use token_broker::credentials::{Expiry, ExpirySource, TokenSet};
use token_broker::store::MemoryStore;
use token_broker::{Brokers, TokenBroker};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);

/// Live allocations by size (up to 4 KiB), for `REGISTRY_QUICK`'s profile.
static BY_SIZE: [AtomicUsize; 4097] = [const { AtomicUsize::new(0) }; 4097];

fn by_size(size: usize) -> &'static AtomicUsize {
    &BY_SIZE[size.min(4096)]
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            CURRENT.fetch_add(layout.size(), Ordering::Relaxed);
            by_size(layout.size()).fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        by_size(layout.size()).fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            CURRENT.fetch_add(new_size, Ordering::Relaxed);
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            by_size(new_size).fetch_add(1, Ordering::Relaxed);
            by_size(layout.size()).fetch_sub(1, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const CREDENTIALS: usize = 100_000;

/// A token set valid for a day, with tokens of realistic length.
fn tokens(i: usize) -> TokenSet {
    let access = format!("at-{i:08}-{}", "a".repeat(52));
    let refresh = format!("rt-{i:08}-{}", "r".repeat(36));
    let mut set = TokenSet::new(&access, Some(&refresh)).unwrap();
    set.expiry = Some(Expiry {
        at: SystemTime::now() + Duration::from_secs(86_400),
        lifetime: None,
        source: ExpirySource::Stored,
    });
    set
}

/// The token bytes themselves: each token's text and its `Arc<str>`
/// header (two reference counts), shared by the store, the actor and the
/// published snapshot.
fn token_bytes(set: &TokenSet) -> usize {
    let access = set.access_token.expose().len() + 16;
    let refresh = set.refresh_token.as_ref().map_or(0, |t| t.expose().len() + 16);
    access + refresh
}

struct Filled {
    brokers: Brokers,
    insert_time: Duration,
    bytes_per_credential: f64,
    token_bytes_per_credential: f64,
}

/// Registers `n` credentials; returns once every actor has started and
/// published its token.
fn fill(rt: &tokio::runtime::Runtime, n: usize) -> Filled {
    let token_total: usize = (0..n).map(|i| token_bytes(&tokens(i))).sum();
    let base = CURRENT.load(Ordering::SeqCst);
    let brokers = Brokers::new();
    let start = Instant::now();
    for i in 0..n {
        let store = Arc::new(MemoryStore::new(tokens(i)));
        let builder = TokenBroker::oauth2("https://idp.example.com/oauth/token", "bench-client").store(store);
        brokers.insert(format!("cred-{i:06}"), builder).unwrap();
    }
    let insert_time = start.elapsed();
    // Wait until every actor has started (published its token), then let
    // the arbiters settle.
    rt.block_on(async {
        // Arbiters take actors in turn: the last few cover every arbiter.
        for i in n.saturating_sub(8)..n {
            let name = format!("cred-{i:06}");
            let broker = brokers.get(&name).unwrap();
            broker.status().await.unwrap();
        }
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = CURRENT.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
        }
    });
    let level = CURRENT.load(Ordering::SeqCst);
    // Everything but the token bytes: the registry's entry (with the
    // name), the handle, the actor, its mailbox and task, the store.
    let per = (level.saturating_sub(base) as f64 - token_total as f64) / n as f64;
    Filled {
        brokers,
        insert_time,
        bytes_per_credential: per,
        token_bytes_per_credential: token_total as f64 / n as f64,
    }
}

/// Runs `op` in a plain loop, as `benches/hot_path.rs` does.
fn timed(b: &mut criterion::Bencher, op: impl Fn()) {
    b.iter_custom(|n| {
        let start = Instant::now();
        for _ in 0..n {
            op();
        }
        start.elapsed()
    })
}

fn registry(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Start the shared runtime before anything is counted.
    let warm = Brokers::new();
    warm.insert(
        "warm",
        TokenBroker::oauth2("https://idp.example.com/oauth/token", "bench-client")
            .store(Arc::new(MemoryStore::new(tokens(0)))),
    )
    .unwrap();
    rt.block_on(warm.finish()).unwrap();

    if std::env::var_os("REGISTRY_QUICK").is_some() {
        // One registry, figures only (for profiling changes).
        let before: Vec<usize> = BY_SIZE.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let filled = fill(&rt, CREDENTIALS);
        for (size, count) in BY_SIZE.iter().enumerate() {
            let net = count.load(Ordering::SeqCst) as i64 - before[size] as i64;
            if net.unsigned_abs() as usize >= CREDENTIALS / 2 {
                eprintln!("  {size:>5} B x {:.2} per credential", net as f64 / CREDENTIALS as f64);
            }
        }
        eprintln!(
            "registry quick: {:?} to register, {:.0} B per credential beyond {:.0} token bytes",
            filled.insert_time, filled.bytes_per_credential, filled.token_bytes_per_credential
        );
        let start = Instant::now();
        rt.block_on(filled.brokers.finish()).unwrap();
        eprintln!("finish: {:?}", start.elapsed());
        return;
    }
    let mut runs: Vec<(Duration, f64, f64)> = Vec::new();
    let mut group = c.benchmark_group("registry");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(100));
    group.bench_function("register 100,000 credentials", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let filled = fill(&rt, CREDENTIALS);
                assert_eq!(filled.brokers.len(), CREDENTIALS);
                total += filled.insert_time;
                runs.push((
                    filled.insert_time,
                    filled.bytes_per_credential,
                    filled.token_bytes_per_credential,
                ));
                rt.block_on(filled.brokers.finish()).unwrap();
            }
            total
        })
    });
    group.finish();

    // The hot path on one broker of a full registry.
    let filled = fill(&rt, CREDENTIALS);
    let broker = filled.brokers.get("cred-050000").unwrap();
    let token = broker.token().now_or_never().unwrap().unwrap();
    let swap = ArcSwapOption::from_pointee(token.clone());
    // As in benches/hot_path.rs (1 thread): the token is cloned out and
    // dropped; beside it a broker of its own, outside the registry.
    let alone = TokenBroker::oauth2("https://idp.example.com/oauth/token", "bench-client")
        .store(Arc::new(MemoryStore::new(tokens(0))))
        .build()
        .unwrap();
    rt.block_on(alone.status()).unwrap();
    let mut group = c.benchmark_group("registry/hot_path");
    group.bench_function("TokenBroker::token (100,000 registered)", |b| {
        timed(b, || drop(black_box(broker.token().now_or_never().unwrap().unwrap())))
    });
    group.bench_function("TokenBroker::token (a broker alone)", |b| {
        timed(b, || drop(black_box(alone.token().now_or_never().unwrap().unwrap())))
    });
    group.bench_function("raw ArcSwap load+clone", |b| {
        timed(b, || drop(black_box(swap.load().as_deref().cloned().unwrap())))
    });
    group.finish();
    rt.block_on(alone.finish()).unwrap();
    rt.block_on(filled.brokers.finish()).unwrap();

    if runs.is_empty() {
        // Filtered out (`cargo bench --bench registry -- hot_path`).
        return;
    }
    let mut times: Vec<f64> = runs.iter().map(|r| r.0.as_secs_f64() * 1000.0).collect();
    times.sort_by(f64::total_cmp);
    let bytes = runs.iter().map(|r| r.1).fold(0.0, f64::max);
    let entry = serde_json::json!({
        "credentials": CREDENTIALS,
        "runs": runs.len(),
        "register_ms_median": times[times.len() / 2],
        "register_ms_max": times[times.len() - 1],
        "idle_bytes_per_credential_max": bytes,
        "token_bytes_per_credential": runs.first().map(|r| r.2),
    });
    eprintln!("registry: {entry}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-extra");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join("registry.json"),
        serde_json::to_string_pretty(&entry).unwrap_or_default(),
    );
}

criterion_group!(benches, registry);
criterion_main!(benches);
