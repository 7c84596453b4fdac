//! The hot path: `TokenBroker::token()` with a valid token, on 1 and 2
//! threads, beside a raw `ArcSwap` load and a `parking_lot::RwLock` read of
//! the same token (each baseline also clones the token out, as a caller
//! must).
//!
//! Goal: within 2x of the raw ArcSwap read, and at least 40 M tokens/s in
//! total on 2 cores.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::FutureExt;
use token_broker::credentials::TokenSet;
use token_broker::store::MemoryStore;
use token_broker::{AccessToken, TokenBroker};

fn valid_broker() -> TokenBroker {
    // A token valid for a day, as the access token in a real Codex file.
    let exp = std::time::SystemTime::now() + Duration::from_secs(86_400);
    let mut tokens = TokenSet::new("hot-path-access-token", Some("refresh")).unwrap();
    tokens.expiry = Some(token_broker::credentials::Expiry {
        at: exp,
        lifetime: None,
        source: token_broker::credentials::ExpirySource::Stored,
    });
    let broker = TokenBroker::oauth2("http://127.0.0.1:9/token", "bench")
        .store(Arc::new(MemoryStore::new(tokens)))
        .build()
        .unwrap();
    // The first call publishes the snapshot.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(broker.token()).unwrap();
    broker
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns
/// the wall time (one iteration = one op per thread).
fn on_threads<F>(threads: usize, iters: u64, op: F) -> Duration
where
    F: Fn() + Sync,
{
    let barrier = std::sync::Barrier::new(threads);
    let elapsed = std::sync::Mutex::new(Duration::ZERO);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    op();
                }
                let took = start.elapsed();
                let mut e = elapsed.lock().unwrap();
                *e = (*e).max(took);
            });
        }
    });
    elapsed.into_inner().unwrap()
}

fn hot_path(c: &mut Criterion) {
    let broker = valid_broker();
    let token = broker.fresh_token().unwrap();
    let swap = ArcSwapOption::from_pointee(token.clone());
    let rwlock = parking_lot::RwLock::new(Some(token.clone()));

    let token_call = || black_box(broker.token().now_or_never().unwrap().unwrap());
    let fresh_call = || black_box(broker.fresh_token().unwrap());
    let swap_call = || black_box(swap.load().as_deref().cloned().unwrap());
    let rwlock_call = || black_box(rwlock.read().clone().unwrap());

    for threads in [1usize, 2] {
        let mut group = c.benchmark_group(format!("hot_path/{threads}_thread"));
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function("TokenBroker::token", |b| {
            b.iter_custom(|n| on_threads(threads, n, || drop(token_call())))
        });
        group.bench_function("TokenBroker::fresh_token", |b| {
            b.iter_custom(|n| on_threads(threads, n, || drop(fresh_call())))
        });
        group.bench_function("raw ArcSwap load+clone", |b| {
            b.iter_custom(|n| on_threads(threads, n, || drop(swap_call())))
        });
        group.bench_function("parking_lot RwLock read+clone", |b| {
            b.iter_custom(|n| on_threads(threads, n, || drop(rwlock_call())))
        });
        group.finish();
    }
    let _: AccessToken = token;
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
