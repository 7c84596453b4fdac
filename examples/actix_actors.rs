//! For readers who live in actix: request actors and a cron actor in one
//! actix System, messaging the credential's [`TokenActor`] directly with
//! [`GetToken`] and [`Reject`].
//!
//! Twenty request actors each handle a request every 20 to 60 ms: they ask
//! the `TokenActor` for a token, "call the API" with it (the simulated
//! provider on 127.0.0.1 says whether the token is live) and, when the API
//! refuses it, send `Reject` and retry once with the token they get back. A
//! cron actor asks for the token every second and prints which generation
//! it got. Access tokens last 2 seconds; halfway through, the provider
//! revokes the current one (as after a password change): the request actors
//! that hold it see a 401 and reject it, and one refresh follows however
//! many reject it.
//! The run ends by checking that every token request replaced exactly one
//! token and no request failed after its retry (exit status 1 otherwise).
//!
//! ```sh
//! cargo run --example actix_actors          # 6 seconds
//! cargo run --example actix_actors -- 3     # 3 seconds
//! ```
//!
//! `tests/examples.rs` runs the same code.

use std::error::Error;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use token_broker::actor::{GetToken, Reject, TokenActor};
use token_broker::sim::{codex_auth_json, token_serial, ProviderServer, SimConfig};
use token_broker::TokenBroker;

/// What a run showed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests served with a token the API accepted, at once.
    pub served: u64,
    /// Requests served after a `Reject` and one retry.
    pub retried: u64,
    /// Requests that failed even after the retry.
    pub failed: u64,
    /// Requests the provider's token endpoint received.
    pub token_requests: u64,
    /// Refreshes that succeeded: each replaced one expiring or revoked token.
    pub refreshes: u64,
    /// Requests that spent an already-spent refresh token.
    pub reused: u64,
}

impl Outcome {
    /// Every request was served (some after a retry), and every token
    /// request replaced exactly one token.
    pub fn one_request_per_token(&self) -> bool {
        self.served > 0
            && self.failed == 0
            && self.refreshes > 0
            && self.token_requests == self.refreshes
            && self.reused == 0
    }
}

/// The request actors' tallies.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// How one request ended.
enum Served {
    AtOnce,
    AfterRetry,
    Failed,
}

/// Serve one request: ask the `TokenActor` for a token and call the API
/// with it; on a 401, reject the token and retry once with the answer.
async fn handle_request(tokens: Addr<TokenActor>, api: Arc<ProviderServer>) -> Served {
    let Ok(Ok(token)) = tokens.send(GetToken).await else {
        return Served::Failed;
    };
    if api.is_live(token.expose()) {
        return Served::AtOnce;
    }
    // 401: tell the TokenActor. However many actors reject the same token,
    // it is refreshed once; a token already replaced is not refreshed again.
    let refused = token_serial(token.expose()).unwrap_or(0);
    match tokens.send(Reject { token }).await {
        Ok(Ok(retry_with)) if api.is_live(retry_with.expose()) => {
            let generation = token_serial(retry_with.expose()).unwrap_or(0);
            println!(
                "request: the API refused token generation {refused}; rejected it, served with generation {generation}"
            );
            Served::AfterRetry
        }
        _ => Served::Failed,
    }
}

/// Handles a request now and then, until the deadline.
struct RequestActor {
    tokens: Addr<TokenActor>,
    api: Arc<ProviderServer>,
    tally: Arc<Tally>,
    deadline: Instant,
}

/// Handle the next request.
#[derive(Message)]
#[rtype(result = "()")]
struct NextRequest;

impl Actor for RequestActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.notify(NextRequest);
    }
}

impl Handler<NextRequest> for RequestActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _msg: NextRequest, _ctx: &mut Self::Context) -> Self::Result {
        let request = handle_request(self.tokens.clone(), self.api.clone());
        Box::pin(request.into_actor(self).map(|served, act, ctx| {
            let counter = match served {
                Served::AtOnce => &act.tally.served,
                Served::AfterRetry => &act.tally.retried,
                Served::Failed => &act.tally.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if Instant::now() < act.deadline {
                ctx.notify_later(NextRequest, Duration::from_millis(fastrand::u64(20..=60)));
            } else {
                ctx.stop();
            }
        }))
    }
}

/// Every second, asks for the token and prints its generation.
struct CronActor {
    tokens: Addr<TokenActor>,
}

impl Actor for CronActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            let ask = act.tokens.send(GetToken);
            ctx.spawn(ask.into_actor(act).map(|answer, _act, _ctx| match answer {
                Ok(Ok(token)) => {
                    let generation = token_serial(token.expose()).unwrap_or(0);
                    println!("cron: token generation {generation}");
                }
                Ok(Err(e)) => println!("cron: no token: {e}"),
                Err(e) => println!("cron: the TokenActor is gone: {e}"),
            }));
        });
    }
}

/// Runs the actors for `duration` on the current actix System and reports
/// what happened.
pub async fn run(duration: Duration) -> Result<Outcome, Box<dyn Error>> {
    let api = Arc::new(ProviderServer::start(SimConfig {
        access_lifetime: Duration::from_secs(2),
        latency: Duration::from_millis(20),
        ..SimConfig::default()
    })?);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("auth.json");
    std::fs::write(&path, codex_auth_json(&api.sign_in(2.0)))?;
    // The broker starts the credential's one TokenActor; keep the handle for
    // as long as the actor is used (dropping the last one stops it).
    let broker = TokenBroker::codex()
        .credentials_path(&path)
        .token_url(api.token_url())
        .build()?;
    let tokens: Addr<TokenActor> = broker.addr().clone();

    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + duration;
    for _ in 0..20 {
        RequestActor {
            tokens: tokens.clone(),
            api: api.clone(),
            tally: tally.clone(),
            deadline,
        }
        .start();
    }
    let cron = CronActor { tokens: tokens.clone() }.start();

    // Halfway through, the provider revokes the current access token.
    actix_rt::time::sleep(duration / 2).await;
    let current = tokens.send(GetToken).await??;
    api.revoke_access(current.expose());
    println!(
        "provider: revoked token generation {}",
        token_serial(current.expose()).unwrap_or(0)
    );
    actix_rt::time::sleep(duration - duration / 2).await;
    // Let the requests in flight finish.
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    drop(cron);
    broker.shutdown().await;

    let counts = api.counts();
    Ok(Outcome {
        served: tally.served.load(Ordering::Relaxed),
        retried: tally.retried.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        token_requests: counts.token_requests,
        refreshes: counts.refreshed,
        reused: counts.reused,
    })
}

/// How long to run: the first argument, in seconds (default 6).
fn duration() -> Result<Duration, String> {
    match std::env::args().nth(1) {
        None => Ok(Duration::from_secs(6)),
        Some(arg) => arg
            .parse::<f64>()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{arg:?} is not a number of seconds")),
    }
}

fn main() -> ExitCode {
    let duration = match duration() {
        Ok(duration) => duration,
        Err(e) => {
            eprintln!("actix_actors: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match actix_rt::System::new().block_on(run(duration)) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("actix_actors: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    println!("requests served:            {}", outcome.served);
    println!("served after Reject:        {}", outcome.retried);
    println!("failed:                     {}", outcome.failed);
    println!("token requests:             {}", outcome.token_requests);
    println!("tokens replaced (refreshes): {}", outcome.refreshes);
    if outcome.one_request_per_token() {
        ExitCode::SUCCESS
    } else {
        eprintln!("actix_actors: expected one token request per replaced token and no failed request: {outcome:?}");
        ExitCode::FAILURE
    }
}
