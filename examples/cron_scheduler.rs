//! Cron jobs on a real scheduler, `tokio-cron-scheduler`, sharing one
//! [`TokenBroker`].
//!
//! Five jobs fire every second or every two seconds, several of them at the
//! same instant, and each asks the one broker for a token, then "calls the
//! API" with it (the simulated provider says whether the token is live).
//! The provider runs on 127.0.0.1 and issues 2-second access tokens, so the
//! token changes every second or so while the jobs run. Each job prints
//! which token generation it used; the run ends by showing one token
//! request per expiry (and exits with status 1 if it was not so).
//!
//! ```sh
//! cargo run --example cron_scheduler          # 8 seconds
//! cargo run --example cron_scheduler -- 3     # 3 seconds
//! ```
//!
//! `tests/examples.rs` runs the same code.

use std::error::Error;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use token_broker::sim::{codex_auth_json, token_serial, ProviderServer, SimConfig};
use token_broker::TokenBroker;
use tokio_cron_scheduler::{Job, JobScheduler};

/// The jobs: a name and a cron schedule (with seconds: `sec min hour day
/// month weekday`).
const JOBS: [(&str, &str); 5] = [
    ("invoices", "* * * * * *"),
    ("reports", "* * * * * *"),
    ("search-index", "* * * * * *"),
    ("backups", "*/2 * * * * *"),
    ("newsletter", "1/2 * * * * *"),
];

/// What a run showed.
#[derive(Debug)]
pub struct Outcome {
    /// Job runs that got a token the API accepted.
    pub served: u64,
    /// Job runs that got no token, or one the API refused.
    pub failed: u64,
    /// Requests the provider's token endpoint received.
    pub token_requests: u64,
    /// Refreshes that succeeded: each replaced one expiring token.
    pub refreshes: u64,
    /// Requests that spent an already-spent refresh token.
    pub reused: u64,
}

impl Outcome {
    /// Every job run was served, and every token request replaced exactly
    /// one expiring token.
    pub fn one_request_per_expiry(&self) -> bool {
        self.served > 0
            && self.failed == 0
            && self.refreshes > 0
            && self.token_requests == self.refreshes
            && self.reused == 0
    }
}

/// Runs the jobs for `duration` and reports what happened.
pub async fn run(duration: Duration) -> Result<Outcome, Box<dyn Error + Send + Sync>> {
    let lifetime = Duration::from_secs(2);
    let provider = Arc::new(ProviderServer::start(SimConfig {
        access_lifetime: lifetime,
        latency: Duration::from_millis(20),
        ..SimConfig::default()
    })?);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("auth.json");
    // Signed in just now: generation 1, which the broker replaces at
    // half-life (1 s before it expires), whichever job asks first then.
    std::fs::write(&path, codex_auth_json(&provider.sign_in(lifetime.as_secs_f64())))?;
    let broker = TokenBroker::codex()
        .credentials_path(&path)
        .token_url(provider.token_url())
        .build()?;

    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut scheduler = JobScheduler::new().await?;
    for (name, schedule) in JOBS {
        let (broker, provider) = (broker.clone(), provider.clone());
        let (served, failed) = (served.clone(), failed.clone());
        let job = Job::new_async(schedule, move |_id, _scheduler| {
            let (broker, provider) = (broker.clone(), provider.clone());
            let (served, failed) = (served.clone(), failed.clone());
            Box::pin(async move {
                match broker.token().await {
                    // The upstream API would check the token; the simulated
                    // provider knows whether it is live.
                    Ok(token) if provider.is_live(token.expose()) => {
                        served.fetch_add(1, Ordering::Relaxed);
                        let generation = token_serial(token.expose()).unwrap_or(0);
                        println!("{name:>12}: used token generation {generation}");
                    }
                    Ok(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        println!("{name:>12}: the API refused its token");
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        println!("{name:>12}: no token: {e}");
                    }
                }
            })
        })?;
        scheduler.add(job).await?;
    }
    scheduler.start().await?;
    tokio::time::sleep(duration).await;
    scheduler.shutdown().await?;
    // Lets a refresh in flight write its tokens.
    broker.shutdown().await;

    let counts = provider.counts();
    Ok(Outcome {
        served: served.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        token_requests: counts.token_requests,
        refreshes: counts.refreshed,
        reused: counts.reused,
    })
}

/// How long to run: the first argument, in seconds (default 8).
fn duration() -> Result<Duration, String> {
    match std::env::args().nth(1) {
        None => Ok(Duration::from_secs(8)),
        Some(arg) => arg
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{arg:?} is not a number of seconds")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let duration = match duration() {
        Ok(duration) => duration,
        Err(e) => {
            eprintln!("cron_scheduler: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{} cron jobs share one broker for {duration:?}; access tokens last 2 s",
        JOBS.len()
    );
    let outcome = match run(duration).await {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("cron_scheduler: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    println!("job runs served:      {}", outcome.served);
    println!("job runs failed:      {}", outcome.failed);
    println!("token requests:       {}", outcome.token_requests);
    println!("expiring tokens replaced (refreshes): {}", outcome.refreshes);
    println!(
        "token requests per expiry: {:.2}",
        outcome.token_requests as f64 / outcome.refreshes.max(1) as f64
    );
    if outcome.one_request_per_expiry() {
        ExitCode::SUCCESS
    } else {
        eprintln!("cron_scheduler: expected one token request per expiry and no failed run: {outcome:?}");
        ExitCode::FAILURE
    }
}
