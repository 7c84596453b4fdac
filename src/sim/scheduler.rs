//! The `simulate` demonstration: a scheduler of cron-job actors and request
//! actors sharing one credential against the simulated provider, with the
//! broker, or with the naive design it replaces.
//!
//! Every job is an actix actor running one loop: ask for a token, check it
//! against the provider (as the upstream API would), then wait (a cron job
//! sleeps 100 to 500 ms; a request actor spends 5 to 25 ms on its "API
//! call"). The run ends after a fixed duration with a [`Summary`] and, from
//! [`run_recorded`], a [`Timeline`] of what happened when.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;

use super::{codex_auth_json, ProviderServer, SimConfig};
use crate::credentials::{AccessToken, TokenSet};
use crate::policy::{freshness, Freshness};
use crate::provider::{Dialect, Provider, CODEX_CLIENT_ID};
use crate::store::CodexAuthFile;
use crate::TokenBroker;

/// Which design hands out the tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One [`TokenBroker`] for every job.
    Broker,
    /// The design the broker replaces: every job keeps its own copy of the
    /// credentials, read once at start, and refreshes on its own when it
    /// sees an expired token (retrying a failed refresh once a second).
    Naive,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimulationConfig {
    /// Broker or naive.
    pub mode: Mode,
    /// Cron-job actors.
    pub jobs: usize,
    /// A cron job fires after a random pause in this range.
    pub job_interval: (Duration, Duration),
    /// Request actors, each serving requests back to back.
    pub concurrency: usize,
    /// A request's upstream call takes a random time in this range.
    pub request_time: (Duration, Duration),
    /// The provider's access-token lifetime.
    pub token_lifetime: Duration,
    /// The provider's latency per token request.
    pub latency: Duration,
    /// The fraction of token requests the provider answers with 503.
    pub fault_rate: f64,
    /// Seeds which token requests fail (see [`SimConfig::fault_seed`]).
    pub fault_seed: Option<u64>,
    /// The provider revokes a whole token family when a refresh token is
    /// reused, as some providers do.
    pub revoke_family_on_reuse: bool,
    /// How long the load runs.
    pub duration: Duration,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        SimulationConfig {
            mode: Mode::Broker,
            jobs: 16,
            job_interval: (Duration::from_millis(100), Duration::from_millis(500)),
            concurrency: 1000,
            request_time: (Duration::from_millis(5), Duration::from_millis(25)),
            token_lifetime: Duration::from_secs(2),
            latency: Duration::from_millis(50),
            fault_rate: 0.0,
            fault_seed: None,
            revoke_family_on_reuse: false,
            duration: Duration::from_secs(10),
        }
    }
}

/// Counters that a live progress display may read while the run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    /// Token asks so far.
    pub calls: AtomicU64,
    /// Calls that failed so far.
    pub failed: AtomicU64,
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Broker or naive.
    pub mode: Mode,
    /// Cron-job actors.
    pub jobs: usize,
    /// Request actors.
    pub concurrency: usize,
    /// Access-token lifetime, seconds.
    pub token_lifetime_s: f64,
    /// Provider latency, milliseconds.
    pub provider_latency_ms: f64,
    /// Injected fault rate.
    pub fault_rate: f64,
    /// Whether the provider revoked token families on reuse.
    pub revoke_family_on_reuse: bool,
    /// How long the load ran, seconds.
    pub elapsed_s: f64,
    /// Token asks made by the jobs.
    pub calls: u64,
    /// Calls that got a token the provider accepted.
    pub served: u64,
    /// Calls that got an error, or a token the provider refused.
    pub failed: u64,
    /// Requests to the token endpoint.
    pub token_requests: u64,
    /// Successful refreshes (token generations after the first).
    pub refreshes: u64,
    /// Token requests per expiry: requests per successful refresh, each of
    /// which replaced one expiring token generation (1.00 is the goal).
    pub requests_per_expiry: f64,
    /// Requests that spent an already-spent refresh token.
    pub reused_token_errors: u64,
    /// Token requests the provider refused: reused, or invalidated with a
    /// revoked family.
    pub refused_token_requests: u64,
    /// Token requests the provider failed on purpose (`fault_rate`).
    pub provider_faults: u64,
    /// Median time to get a token, microseconds.
    pub latency_p50_us: f64,
    /// 99th percentile, microseconds.
    pub latency_p99_us: f64,
    /// Worst, microseconds.
    pub latency_max_us: f64,
}

/// The width of a [`Timeline`]'s count buckets: 100 ms.
pub const BUCKET: Duration = Duration::from_millis(100);

/// What happened during a run, over time, counted from its start: the
/// token requests the provider saw, the expiries of the access tokens it
/// issued, the jobs' failed calls per [`BUCKET`] and their wait for a token
/// per second.
///
/// Recorded by the jobs and the simulated provider, never by the broker.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// How long the run lasted, seconds.
    pub elapsed_s: f64,
    /// When each token request reached the provider, seconds.
    pub token_requests_s: Vec<f64>,
    /// When an access token the provider issued expired during the run,
    /// seconds.
    pub expiries_s: Vec<f64>,
    /// Failed calls in each [`BUCKET`], from the start.
    pub failed_calls: Vec<u64>,
    /// The jobs' wait for a token in each second of the run, from the
    /// start (a second with no call has none).
    pub latency: Vec<Option<Percentiles>>,
}

/// The spread of the jobs' wait for a token in one second of a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Percentiles {
    /// The median wait, microseconds.
    pub p50_us: f64,
    /// The 99th percentile, microseconds.
    pub p99_us: f64,
}

impl Timeline {
    /// Token requests in each [`BUCKET`], from the start to the end of the
    /// run.
    pub fn token_requests_per_bucket(&self) -> Vec<u64> {
        let buckets = (self.elapsed_s / BUCKET.as_secs_f64()).ceil().max(1.0) as usize;
        let mut counts = vec![0; buckets];
        for &at in &self.token_requests_s {
            let i = ((at / BUCKET.as_secs_f64()) as usize).min(buckets - 1);
            counts[i] += 1;
        }
        counts
    }
}

/// Runs a simulation. Call from inside an actix System (the job actors run
/// on the current one). `progress` is updated live.
pub async fn run(config: SimulationConfig, progress: Arc<Progress>) -> std::io::Result<Summary> {
    run_recorded(config, progress).await.map(|(summary, _)| summary)
}

/// Like [`run`], and returns the run's [`Timeline`] too.
pub async fn run_recorded(config: SimulationConfig, progress: Arc<Progress>) -> std::io::Result<(Summary, Timeline)> {
    let sim = Arc::new(ProviderServer::start(SimConfig {
        access_lifetime: config.token_lifetime,
        latency: config.latency,
        fault_rate: config.fault_rate,
        fault_seed: config.fault_seed,
        revoke_family_on_reuse: config.revoke_family_on_reuse,
        ..SimConfig::default()
    })?);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("auth.json");
    std::fs::write(
        &path,
        codex_auth_json(&sim.sign_in(config.token_lifetime.as_secs_f64())),
    )?;

    let broker = match config.mode {
        Mode::Broker => Some(
            TokenBroker::codex()
                .credentials_path(&path)
                .token_url(sim.token_url())
                .build()
                .map_err(std::io::Error::other)?,
        ),
        Mode::Naive => None,
    };
    let provider = Arc::new(Provider::new(sim.token_url(), CODEX_CLIENT_ID, Dialect::Codex));
    let started = Instant::now();
    let started_wall = SystemTime::now();
    let deadline = crate::policy::instant_after(config.duration);

    let mut done = Vec::new();
    let kinds = std::iter::repeat_n(Kind::Cron(config.job_interval), config.jobs).chain(std::iter::repeat_n(
        Kind::Request(config.request_time),
        config.concurrency,
    ));
    for kind in kinds {
        let source = match &broker {
            Some(broker) => Source::Broker(broker.clone()),
            None => Source::Naive(NaiveClient {
                provider: provider.clone(),
                tokens: CodexAuthFile::new(&path)
                    .load_blocking()
                    .map_err(std::io::Error::other)?
                    .tokens,
                retry_at: None,
            }),
        };
        let (tx, rx) = oneshot::channel();
        Job {
            kind,
            source: Some(source),
            sim: sim.clone(),
            progress: progress.clone(),
            started,
            deadline,
            done: Some(tx),
        }
        .start();
        done.push(rx);
    }
    let mut latencies = Vec::new();
    let mut per_second: Vec<Vec<u64>> = Vec::new();
    let mut failed_calls: Vec<u64> = Vec::new();
    let mut served = 0;
    for rx in done {
        if let Ok(stats) = rx.await {
            add_up(&mut failed_calls, &stats.failed_per_bucket);
            if per_second.len() < stats.second_starts.len() {
                per_second.resize_with(stats.second_starts.len(), Vec::new);
            }
            for (second, waits) in per_second.iter_mut().zip(stats.by_second()) {
                second.extend_from_slice(waits);
            }
            latencies.extend(stats.latencies_ns);
            served += stats.served;
        }
    }
    let elapsed = started.elapsed();
    if let Some(broker) = broker {
        broker.shutdown().await;
    }
    let counts = sim.counts();
    latencies.sort_unstable();
    let pct = |p: f64| percentile_us(&latencies, p);
    let timeline = Timeline {
        elapsed_s: elapsed.as_secs_f64(),
        token_requests_s: sim
            .token_request_times()
            .into_iter()
            .map(|at| at.saturating_duration_since(started).as_secs_f64())
            .collect(),
        expiries_s: sim
            .access_expiries()
            .into_iter()
            .filter_map(|exp| exp.duration_since(started_wall).ok())
            .map(|after| after.as_secs_f64())
            .filter(|&at| at > 0.0 && at <= elapsed.as_secs_f64())
            .collect(),
        failed_calls,
        latency: per_second
            .into_iter()
            .map(|mut waits| {
                waits.sort_unstable();
                (!waits.is_empty()).then(|| Percentiles {
                    p50_us: percentile_us(&waits, 0.50),
                    p99_us: percentile_us(&waits, 0.99),
                })
            })
            .collect(),
    };
    let summary = Summary {
        mode: config.mode,
        jobs: config.jobs,
        concurrency: config.concurrency,
        token_lifetime_s: config.token_lifetime.as_secs_f64(),
        provider_latency_ms: config.latency.as_secs_f64() * 1000.0,
        fault_rate: config.fault_rate,
        revoke_family_on_reuse: config.revoke_family_on_reuse,
        elapsed_s: elapsed.as_secs_f64(),
        calls: progress.calls.load(Ordering::Relaxed),
        served,
        failed: progress.failed.load(Ordering::Relaxed),
        token_requests: counts.token_requests,
        refreshes: counts.refreshed,
        requests_per_expiry: counts.token_requests as f64 / counts.refreshed.max(1) as f64,
        reused_token_errors: counts.reused,
        refused_token_requests: counts.reused + counts.invalid,
        provider_faults: counts.faults,
        latency_p50_us: pct(0.50),
        latency_p99_us: pct(0.99),
        latency_max_us: latencies.last().map_or(0.0, |&ns| ns as f64 / 1000.0),
    };
    Ok((summary, timeline))
}

/// The `p` quantile of `sorted` (nanoseconds), in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Adds `counts` into `total`, bucket by bucket.
fn add_up(total: &mut Vec<u64>, counts: &[u64]) {
    if total.len() < counts.len() {
        total.resize(counts.len(), 0);
    }
    for (sum, count) in total.iter_mut().zip(counts) {
        *sum += count;
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let design = match self.mode {
            Mode::Broker => "token-broker (one TokenActor for the credential)",
            Mode::Naive => "naive (every job refreshes on its own)",
        };
        writeln!(f, "design:               {design}")?;
        writeln!(
            f,
            "load:                 {} cron jobs + {} request actors for {:.1} s",
            self.jobs, self.concurrency, self.elapsed_s
        )?;
        writeln!(
            f,
            "provider:             {} s access tokens, {} ms latency, {:.0}% faults{}",
            self.token_lifetime_s,
            self.provider_latency_ms,
            self.fault_rate * 100.0,
            if self.revoke_family_on_reuse {
                ", revokes token families on reuse"
            } else {
                ""
            }
        )?;
        writeln!(f, "calls served:         {}", self.served)?;
        writeln!(f, "failed calls:         {}", self.failed)?;
        writeln!(f, "token requests:       {}", self.token_requests)?;
        writeln!(f, "refreshes:            {}", self.refreshes)?;
        writeln!(f, "requests per expiry:  {:.2}", self.requests_per_expiry)?;
        writeln!(f, "reused-token errors:  {}", self.reused_token_errors)?;
        if self.refused_token_requests != self.reused_token_errors {
            writeln!(
                f,
                "refused requests:     {} (refresh tokens of a revoked family)",
                self.refused_token_requests
            )?;
        }
        if self.fault_rate > 0.0 {
            writeln!(f, "provider faults:      {}", self.provider_faults)?;
        }
        writeln!(
            f,
            "token latency:        p50 {}  p99 {}  max {}",
            micros(self.latency_p50_us),
            micros(self.latency_p99_us),
            micros(self.latency_max_us)
        )
    }
}

fn micros(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else if us >= 10.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.2} µs")
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Cron((Duration, Duration)),
    Request((Duration, Duration)),
}

enum Source {
    Broker(TokenBroker),
    Naive(NaiveClient),
}

impl Source {
    async fn token(&mut self) -> Result<AccessToken, String> {
        match self {
            Source::Broker(broker) => broker.token().await.map_err(|e| e.to_string()),
            Source::Naive(naive) => naive.token().await,
        }
    }

    /// The upstream API refused `token`.
    async fn rejected(&mut self, token: &AccessToken) {
        if let Source::Broker(broker) = self {
            let _ = broker.reject(token).await;
        }
    }
}

/// The design the broker replaces: a private copy of the credentials and a
/// refresh whenever this job sees its copy expired.
struct NaiveClient {
    provider: Arc<Provider>,
    tokens: TokenSet,
    retry_at: Option<Instant>,
}

impl NaiveClient {
    async fn token(&mut self) -> Result<AccessToken, String> {
        let now = SystemTime::now();
        if freshness(&self.tokens, now, Duration::ZERO) != Freshness::Expired {
            return Ok(self.tokens.access_token.clone());
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err("the last refresh failed".into());
        }
        let refresh = self.tokens.refresh_token.clone().ok_or("no refresh token")?;
        match self.provider.refresh(&refresh).await {
            Ok(refreshed) => {
                self.tokens = refreshed.into_token_set(&self.tokens, SystemTime::now());
                self.retry_at = None;
                Ok(self.tokens.access_token.clone())
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                Err(e.to_string())
            }
        }
    }
}

/// What one job saw, kept by time for the [`Timeline`].
#[derive(Default)]
struct JobStats {
    served: u64,
    /// Waits for a token, nanoseconds, in the order asked.
    latencies_ns: Vec<u64>,
    /// Where each second of the run begins in `latencies_ns`.
    second_starts: Vec<usize>,
    /// Failed calls by the [`BUCKET`] of the run they began in.
    failed_per_bucket: Vec<u64>,
}

impl JobStats {
    /// A wait for a token that began `since_start` into the run.
    fn wait(&mut self, since_start: Duration, waited: Duration) {
        let second = since_start.as_secs() as usize;
        while self.second_starts.len() <= second {
            self.second_starts.push(self.latencies_ns.len());
        }
        self.latencies_ns
            .push(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
    }

    /// A call that began `since_start` into the run failed.
    fn failed(&mut self, since_start: Duration) {
        let bucket = (since_start.as_millis() / BUCKET.as_millis()) as usize;
        if self.failed_per_bucket.len() <= bucket {
            self.failed_per_bucket.resize(bucket + 1, 0);
        }
        self.failed_per_bucket[bucket] += 1;
    }

    /// The waits of each second of the run, from the start.
    fn by_second(&self) -> impl Iterator<Item = &[u64]> {
        self.second_starts.iter().enumerate().map(|(second, &start)| {
            let end = self
                .second_starts
                .get(second + 1)
                .copied()
                .unwrap_or(self.latencies_ns.len());
            &self.latencies_ns[start..end]
        })
    }
}

/// One cron job or request actor.
struct Job {
    kind: Kind,
    source: Option<Source>,
    sim: Arc<ProviderServer>,
    progress: Arc<Progress>,
    /// When the run started (the timeline's zero).
    started: Instant,
    deadline: Instant,
    done: Option<oneshot::Sender<JobStats>>,
}

impl Actor for Job {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(mut source) = self.source.take() else { return };
        let (kind, sim, progress, started, deadline) = (
            self.kind,
            self.sim.clone(),
            self.progress.clone(),
            self.started,
            self.deadline,
        );
        let work = async move {
            let mut stats = JobStats::default();
            // Spread the first firings like a real schedule would.
            let (lo, hi) = match kind {
                Kind::Cron(range) | Kind::Request(range) => range,
            };
            tokio::time::sleep(random_between(Duration::ZERO, hi)).await;
            while Instant::now() < deadline {
                let asked = Instant::now();
                let result = source.token().await;
                let waited = asked.elapsed();
                let since_start = asked.saturating_duration_since(started);
                stats.wait(since_start, waited);
                progress.calls.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(token) if sim.is_live(token.expose()) => stats.served += 1,
                    Ok(token) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                        stats.failed(since_start);
                        source.rejected(&token).await;
                    }
                    Err(_) => {
                        progress.failed.fetch_add(1, Ordering::Relaxed);
                        stats.failed(since_start);
                    }
                }
                tokio::time::sleep(random_between(lo, hi)).await;
            }
            stats
        };
        ctx.spawn(work.into_actor(self).map(|stats, act, ctx| {
            if let Some(done) = act.done.take() {
                let _ = done.send(stats);
            }
            ctx.stop();
        }));
    }
}

fn random_between(lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = (hi - lo).as_micros() as u64;
    lo + Duration::from_micros(fastrand::u64(0..=span))
}
