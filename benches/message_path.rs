//! The message path: `addr.send(GetToken)` round trips to the TokenActor,
//! sequentially and from 1,000 concurrent callers, beside a bare actix
//! actor that answers a constant. Both actors run the same way (a System on
//! a thread of their own); the callers run on a tokio runtime.
//!
//! Goal: at most 1.2x the bare actor.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use token_broker::actor::GetToken;
use token_broker::credentials::{Expiry, ExpirySource, TokenSet};
use token_broker::store::MemoryStore;
use token_broker::{AccessToken, TokenBroker};

/// The bare baseline: an actor that answers a constant token.
struct Bare(AccessToken);

impl Actor for Bare {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1 << 20);
    }
}

#[derive(Message)]
#[rtype(result = "Result<AccessToken, ()>")]
struct GetConst;

impl Handler<GetConst> for Bare {
    type Result = MessageResult<GetConst>;
    fn handle(&mut self, _: GetConst, _: &mut Self::Context) -> Self::Result {
        MessageResult(Ok(self.0.clone()))
    }
}

fn start_bare(token: AccessToken) -> Addr<Bare> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            tx.send(Bare(token).start()).unwrap();
            std::future::pending::<()>().await;
        })
    });
    rx.recv().unwrap()
}

fn valid_broker() -> TokenBroker {
    let mut tokens = TokenSet::new("message-path-access-token", Some("refresh")).unwrap();
    tokens.expiry = Some(Expiry {
        at: std::time::SystemTime::now() + Duration::from_secs(86_400),
        lifetime: None,
        source: ExpirySource::Stored,
    });
    TokenBroker::oauth2("http://127.0.0.1:9/token", "bench")
        .store(Arc::new(MemoryStore::new(tokens)))
        .build()
        .unwrap()
}

const CALLERS: u64 = 1000;

fn message_path(c: &mut Criterion) {
    let broker = valid_broker();
    let token = broker.fresh_token().unwrap_or_else(|| AccessToken::new("x"));
    let bare = start_bare(token);
    let addr = broker.addr().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let token_actor = move || {
        let addr = addr.clone();
        async move { std::hint::black_box(addr.send(GetToken).await.unwrap().unwrap()) }
    };
    let bare_actor = move || {
        let bare = bare.clone();
        async move { std::hint::black_box(bare.send(GetConst).await.unwrap().unwrap()) }
    };

    let mut group = c.benchmark_group("message_path/sequential");
    group.throughput(Throughput::Elements(1));
    group.bench_function("TokenActor GetToken", |b| {
        b.iter_custom(|n| sequential(&rt, n, &token_actor))
    });
    group.bench_function("bare actor constant", |b| {
        b.iter_custom(|n| sequential(&rt, n, &bare_actor))
    });
    group.finish();

    // 1,000 concurrent callers; one iteration = one round of 1,000 messages.
    let mut group = c.benchmark_group("message_path/1000_concurrent");
    group.throughput(Throughput::Elements(CALLERS));
    group.bench_function("TokenActor GetToken", |b| {
        b.iter_custom(|n| concurrent(&rt, n, &token_actor))
    });
    group.bench_function("bare actor constant", |b| {
        b.iter_custom(|n| concurrent(&rt, n, &bare_actor))
    });
    group.finish();
}

/// `n` round trips, one after another.
fn sequential<F, Fut>(rt: &tokio::runtime::Runtime, n: u64, call: &F) -> Duration
where
    F: Fn() -> Fut,
    Fut: Future,
{
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            call().await;
        }
        start.elapsed()
    })
}

/// [`CALLERS`] tasks each making `n` round trips at once.
fn concurrent<F, Fut>(rt: &tokio::runtime::Runtime, n: u64, call: &F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future + Send,
{
    rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..CALLERS)
            .map(|_| {
                let call = call.clone();
                tokio::spawn(async move {
                    for _ in 0..n {
                        call().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start.elapsed()
    })
}

criterion_group!(benches, message_path);
criterion_main!(benches);
