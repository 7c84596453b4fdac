//! token-broker beside the real Codex CLI on one `auth.json`: the two must
//! never burn each other's credential.
//!
//! Everything runs inside a loopback-only network namespace (see
//! `common/codex_cli.rs`): the simulated provider (single-use refresh
//! tokens), a simulated model API that accepts only live access tokens,
//! `token-broker` processes and `codex exec` (npm `@openai/codex`, pinned).
//! The brokers run with the default winner wait (8 s).

#[path = "common/codex_cli.rs"]
mod codex_cli;
mod common;
#[path = "common/model_api.rs"]
mod model_api;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codex_cli::{Codex, CodexHome};
use model_api::{ModelApi, ANSWER};
use token_broker::credentials::Secret;
use token_broker::sim::{Fault, ProviderServer, SimConfig, SpendRecord};

/// The broker's `User-Agent` at the token endpoint; anything else is the
/// Codex CLI.
const BROKER_AGENT: &str = "token-broker/";

struct Setup {
    sim: Arc<ProviderServer>,
    api: ModelApi,
    home: CodexHome,
}

impl Setup {
    fn new(config: SimConfig, expires_in: f64) -> Self {
        let sim = Arc::new(
            ProviderServer::start(SimConfig {
                whole_second_exp: true,
                ..config
            })
            .expect("start the simulated provider"),
        );
        let api = ModelApi::start(sim.clone());
        let issued = sim.sign_in(expires_in);
        let home = CodexHome::new(&api.origin(), &issued);
        Setup { sim, api, home }
    }

    /// `token-broker ARGS --auth-file auth.json` against the simulated
    /// provider, with the default winner wait.
    fn broker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(common::CLI);
        cmd.args(args)
            .arg("--auth-file")
            .arg(self.home.auth_path())
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", self.sim.token_url())
            .env_remove("TOKEN_BROKER_WINNER_WAIT")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        cmd
    }

    fn codex(&self, codex: &Codex) -> codex_cli::CodexRun {
        self.home.exec(codex, &self.sim, "Reply with the word pong.")
    }

    /// The tokens on disk: (access, refresh).
    fn on_disk(&self) -> (String, String) {
        let auth = self.home.auth_json();
        (
            auth["tokens"]["access_token"].as_str().unwrap_or_default().to_owned(),
            auth["tokens"]["refresh_token"].as_str().unwrap_or_default().to_owned(),
        )
    }

    /// The credential is alive: the refresh token on disk is unspent and
    /// belongs with the access token beside it.
    fn assert_alive(&self, context: &str) {
        let (access, refresh) = self.on_disk();
        assert!(
            self.sim.is_unspent(&refresh),
            "{context}: the refresh token on disk is spent: the credential is burned\nspends: {:?}",
            self.sim.spends()
        );
        assert!(
            self.sim.issued_together(&access, &refresh),
            "{context}: a torn pair on disk"
        );
    }
}

fn by_broker(spends: &[SpendRecord]) -> usize {
    spends.iter().filter(|s| s.user_agent.starts_with(BROKER_AGENT)).count()
}

/// What one round saw.
#[derive(Debug, Default)]
struct Round {
    latency_ms: u64,
    brokers: usize,
    token_requests: u64,
    refreshed: u64,
    reused: u64,
    /// Token requests the brokers sent (the rest are the Codex CLI's).
    broker_requests: usize,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "latency {:>4} ms, {} brokers: {} token requests ({} by brokers), {} refreshed, {} refused as reused",
            self.latency_ms, self.brokers, self.token_requests, self.broker_requests, self.refreshed, self.reused
        )
    }
}

/// One round: a freshly expired credential, 3 to 5 one-shot `token` calls
/// and one `codex exec` started at random offsets, provider latency from
/// 0.1 to 2.5 s.
fn race_round(codex: &Codex, seed: u64) -> Round {
    let mut rng = fastrand::Rng::with_seed(seed);
    let latency = Duration::from_millis(rng.u64(100..=2500));
    let setup = Setup::new(
        SimConfig {
            latency,
            ..SimConfig::default()
        },
        -1.0,
    );
    let brokers = rng.usize(3..=5);
    let offsets: Vec<Duration> = (0..=brokers).map(|_| Duration::from_millis(rng.u64(0..1500))).collect();
    let context = format!("round {seed} (latency {latency:?}, {brokers} brokers)");

    let (exits, run) = std::thread::scope(|s| {
        let started = Instant::now();
        let calls: Vec<_> = offsets[..brokers]
            .iter()
            .map(|&offset| {
                let setup = &setup;
                s.spawn(move || {
                    std::thread::sleep(offset.saturating_sub(started.elapsed()));
                    let out = setup.broker(&["token"]).output().expect("run token-broker");
                    (
                        out.status.code(),
                        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                        common::stderr(&out),
                    )
                })
            })
            .collect();
        let codex_offset = offsets[brokers];
        let setup = &setup;
        let codex_run = s.spawn(move || {
            std::thread::sleep(codex_offset.saturating_sub(started.elapsed()));
            setup.codex(codex)
        });
        let exits: Vec<_> = calls.into_iter().map(|c| c.join().expect("broker thread")).collect();
        (exits, codex_run.join().expect("codex thread"))
    });

    assert!(
        run.succeeded() && run.stdout.contains(ANSWER),
        "{context}: codex exec failed\n{}\nspends: {:?}",
        run.report(),
        setup.sim.spends()
    );
    for (code, token, stderr) in &exits {
        assert_ne!(
            *code,
            Some(4),
            "{context}: a false 'login required' from a broker: {stderr}"
        );
        assert_eq!(*code, Some(0), "{context}: a broker failed: {stderr}");
        assert!(
            setup.sim.issued_secrets().contains(token),
            "{context}: a broker printed something the provider never issued"
        );
    }
    setup.assert_alive(&context);
    let spends = setup.sim.spends();
    let broker_requests = by_broker(&spends);
    assert!(
        broker_requests <= 1,
        "{context}: brokers sent {broker_requests} token requests; one at most (single flight, and a refused token is never sent again): {spends:?}"
    );
    let counts = setup.sim.counts();
    Round {
        latency_ms: latency.as_millis() as u64,
        brokers,
        token_requests: counts.token_requests,
        refreshed: counts.refreshed,
        reused: counts.reused,
        broker_requests,
    }
}

/// 50 rounds of one-shot brokers and `codex exec` racing on a freshly
/// expired credential: the credential is never burned, no broker reports a
/// false "login required", every `codex exec` succeeds.
#[test]
fn one_shot_brokers_racing_codex_exec_never_burn_the_credential() {
    let Some(codex) = codex_cli::enter("one_shot_brokers_racing_codex_exec_never_burn_the_credential") else {
        return;
    };
    const ROUNDS: u64 = 50;
    // Two rounds at a time: each waits mostly on the provider's latency.
    const AT_ONCE: usize = 2;
    let next = AtomicUsize::new(0);
    let rounds = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..AT_ONCE {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst) as u64;
                if seed >= ROUNDS {
                    break;
                }
                let round = race_round(&codex, seed);
                rounds.lock().unwrap().push(round);
            });
        }
    });
    let rounds = rounds.into_inner().unwrap();
    assert_eq!(rounds.len() as u64, ROUNDS);
    let requests: u64 = rounds.iter().map(|r| r.token_requests).sum();
    let reused: u64 = rounds.iter().map(|r| r.reused).sum();
    let refreshed: u64 = rounds.iter().map(|r| r.refreshed).sum();
    println!(
        "{ROUNDS} rounds: 0 burned, 0 false exit 4, every codex exec succeeded; \
         {requests} token requests ({refreshed} refreshed, {reused} refused as reused), \
         {:.2} requests per round",
        requests as f64 / ROUNDS as f64
    );
    for r in &rounds {
        println!("  {r}");
    }
}

/// `watch` keeps a Codex file fresh unasked (it asks for a token only once
/// an hour here): over 4 minutes of 8-minute tokens with `codex exec` every
/// few seconds, every refresh is the broker's, none the Codex CLI's, one
/// token request per generation, and the model API never sees a stale token.
#[test]
fn watch_keeps_the_file_fresh_so_codex_never_refreshes() {
    let Some(codex) = codex_cli::enter("watch_keeps_the_file_fresh_so_codex_never_refreshes") else {
        return;
    };
    const RUN: Duration = Duration::from_secs(240);
    let setup = Setup::new(
        SimConfig {
            access_lifetime: Duration::from_secs(480),
            ..SimConfig::default()
        },
        // Signed in 2 minutes ago: the broker's window (5.5 minutes before
        // expiry) opens 30 s from now, the Codex CLI's (5 minutes) later.
        360.0,
    );
    let watch = setup
        .broker(&["watch", "--interval", "1h"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start token-broker watch");
    let started = Instant::now();
    let mut runs = 0;
    while started.elapsed() < RUN {
        let run = setup.codex(&codex);
        runs += 1;
        assert!(
            run.succeeded() && run.stdout.contains(ANSWER),
            "codex exec #{runs} at {:.0?} failed\n{}\nspends: {:?}",
            started.elapsed(),
            run.report(),
            setup.sim.spends()
        );
        std::thread::sleep(Duration::from_secs(3));
    }
    // SIGTERM: `watch` exits once no refresh is in flight.
    let _ = Command::new("kill").args(["-TERM", &watch.id().to_string()]).status();
    let out = watch.wait_with_output().expect("watch exits");
    let spends = setup.sim.spends();
    let counts = setup.sim.counts();
    let api = setup.api.counts();
    println!(
        "{runs} codex exec runs over {RUN:?}; token requests: {} ({} by token-broker); model API: {api:?}\nwatch printed:\n{}",
        counts.token_requests,
        by_broker(&spends),
        common::stdout(&out)
    );
    assert!(out.status.success(), "watch: {}", common::stderr(&out));
    assert!(
        counts.refreshed >= 2,
        "the broker refreshed every generation: {spends:?}"
    );
    assert_eq!(
        by_broker(&spends),
        spends.len(),
        "every refresh is the broker's: {spends:?}"
    );
    assert_eq!(counts.reused, 0, "{spends:?}");
    assert_eq!(
        counts.token_requests, counts.refreshed,
        "one token request per generation"
    );
    assert_eq!(api.unauthorized, 0, "the Codex CLI never sent a stale token: {api:?}");
    setup.assert_alive("after the soak");
}

/// A broker whose token request stalls for 8 s while the Codex CLI
/// refreshes: the Codex CLI commits (no lock of its is held during our
/// request), the broker's late request is refused as reused, and the broker
/// adopts the Codex CLI's tokens instead of reporting "login required".
#[test]
fn a_stalled_broker_adopts_the_tokens_codex_committed_meanwhile() {
    let Some(codex) = codex_cli::enter("a_stalled_broker_adopts_the_tokens_codex_committed_meanwhile") else {
        return;
    };
    let setup = Setup::new(SimConfig::default(), -1.0);
    setup.sim.inject([Fault::HangBeforeSpend(Duration::from_secs(8))]);
    let broker = setup
        .broker(&["token"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start token-broker token");
    let deadline = Instant::now() + Duration::from_secs(10);
    while setup.sim.token_requests() == 0 {
        assert!(Instant::now() < deadline, "the broker never sent its request");
        std::thread::sleep(Duration::from_millis(10));
    }

    let run = setup.codex(&codex);
    run.assert_success();
    let (codex_access, _) = setup.on_disk();

    let out = broker.wait_with_output().expect("broker exits");
    assert_eq!(out.status.code(), Some(0), "broker: {}", common::stderr(&out));
    let printed = common::stdout(&out).trim().to_owned();
    assert!(
        printed == codex_access,
        "the broker printed the Codex CLI's token ({} vs {})",
        Secret::new(printed.as_str()).fingerprint(),
        Secret::new(codex_access.as_str()).fingerprint()
    );
    let spends = setup.sim.spends();
    let outcomes: Vec<(&str, bool)> = spends
        .iter()
        .map(|s| (s.outcome, s.user_agent.starts_with(BROKER_AGENT)))
        .collect();
    assert_eq!(
        outcomes,
        vec![("refreshed", false), ("reused", true)],
        "the Codex CLI refreshed; the broker's stalled request was refused and sent once"
    );
    assert_eq!(setup.on_disk().0, codex_access, "the broker wrote nothing");
    setup.assert_alive("after the stall");
}
