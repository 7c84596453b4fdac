//! The real Codex CLI (`codex exec`, npm `@openai/codex`, the version pinned
//! in `common/codex_cli.rs`) against the simulated provider and a simulated
//! model API, all inside a network namespace that has only loopback.
//!
//! The binary comes from `.ci/install-codex-cli` (run on first use) or
//! `TOKEN_BROKER_CODEX_BIN`; see `common/codex_cli.rs`.

#[path = "common/codex_cli.rs"]
mod codex_cli;
mod common;
#[path = "common/model_api.rs"]
mod model_api;

use std::sync::Arc;

use codex_cli::{Codex, CodexHome};
use model_api::{ModelApi, ANSWER};
use token_broker::credentials::Secret;
use token_broker::sim::{Issued, ProviderServer, SimConfig};
use token_broker::store::CodexAuthFile;

/// A simulated provider issuing whole-second `exp` claims (the Codex CLI
/// reads `exp` as an integer, as real OpenAI tokens have it), a model API
/// accepting its live tokens, and a `CODEX_HOME` signed in with a token
/// that expires in `expires_in` seconds.
struct Setup {
    sim: Arc<ProviderServer>,
    api: ModelApi,
    issued: Issued,
    home: CodexHome,
}

impl Setup {
    fn new(expires_in: f64) -> Self {
        let sim = Arc::new(
            ProviderServer::start(SimConfig {
                whole_second_exp: true,
                ..SimConfig::default()
            })
            .expect("start the simulated provider"),
        );
        let api = ModelApi::start(sim.clone());
        let issued = sim.sign_in(expires_in);
        let home = CodexHome::new(&api.origin(), &issued);
        Setup { sim, api, issued, home }
    }

    fn exec(&self, codex: &Codex) -> codex_cli::CodexRun {
        let run = self.home.exec(codex, &self.sim, "Reply with the word pong.");
        println!(
            "{}\nsim: {:?}\nmodel API: {:?}, other requests: {:?}",
            run.report(),
            self.sim.counts(),
            self.api.counts(),
            self.api.other_paths()
        );
        run
    }

    fn tokens_on_disk(&self) -> (String, String) {
        let auth = self.home.auth_json();
        let tokens = &auth["tokens"];
        (
            tokens["access_token"].as_str().expect("access_token").to_owned(),
            tokens["refresh_token"].as_str().expect("refresh_token").to_owned(),
        )
    }
}

fn fp(token: &str) -> String {
    Secret::new(token).fingerprint()
}

#[test]
fn codex_exec_with_a_fresh_token_makes_no_token_request() {
    let Some(codex) = codex_cli::enter("codex_exec_with_a_fresh_token_makes_no_token_request") else {
        return;
    };
    let setup = Setup::new(3600.0);

    let run = setup.exec(&codex);

    run.assert_success();
    assert!(
        run.stdout.contains(ANSWER),
        "codex printed the answer\n{}",
        run.report()
    );
    assert_eq!(setup.sim.token_requests(), 0, "a fresh token is used as is");
    let api = setup.api.counts();
    assert_eq!(api.answered, 1, "{api:?}");
    assert_eq!(api.unauthorized, 0, "{api:?}");
    assert_eq!(
        setup.api.bearer_fingerprints(),
        vec![fp(&setup.issued.access_token)],
        "the model API saw the signed-in access token"
    );
    let (access, refresh) = setup.tokens_on_disk();
    assert!(
        access == setup.issued.access_token && refresh == setup.issued.refresh_token,
        "auth.json still holds the signed-in tokens"
    );
}

#[test]
fn codex_exec_with_an_expired_token_refreshes_once_and_writes_auth_json() {
    let Some(codex) = codex_cli::enter("codex_exec_with_an_expired_token_refreshes_once_and_writes_auth_json") else {
        return;
    };
    let setup = Setup::new(-60.0);

    let run = setup.exec(&codex);

    run.assert_success();
    assert!(
        run.stdout.contains(ANSWER),
        "codex printed the answer\n{}",
        run.report()
    );
    let sim = setup.sim.counts();
    assert_eq!(sim.token_requests, 1, "one refresh through the override URL: {sim:?}");
    assert_eq!(sim.refreshed, 1, "{sim:?}");
    let api = setup.api.counts();
    assert_eq!(api.unauthorized, 0, "codex refreshed before calling the model: {api:?}");
    assert_eq!(api.answered, 1, "{api:?}");

    // Codex wrote the rotated tokens, and token-broker still reads the file.
    let (access, refresh) = setup.tokens_on_disk();
    assert_ne!(access, setup.issued.access_token, "auth.json holds a new access token");
    assert!(setup.sim.is_live(&access), "the new access token is live");
    assert!(
        setup.sim.issued_together(&access, &refresh),
        "auth.json holds one refresh response"
    );
    assert!(setup.sim.is_unspent(&refresh), "the new refresh token is unspent");
    assert_eq!(setup.api.bearer_fingerprints(), vec![fp(&access)]);
    let loaded = CodexAuthFile::new(setup.home.auth_path())
        .load_blocking()
        .expect("token-broker loads the auth.json codex wrote")
        .tokens;
    assert_eq!(loaded.access_token.expose(), access);
    assert_eq!(
        loaded.refresh_token.as_ref().map(|r| r.expose()),
        Some(refresh.as_str())
    );
    assert_eq!(loaded.account_id.as_deref(), Some(setup.issued.account_id.as_str()));
    assert!(loaded.expiry.is_some(), "the new access token is dated");
    assert!(loaded.last_refresh.is_some(), "codex recorded last_refresh");
    assert_eq!(common::mode(&setup.home.auth_path()), 0o600);
}

#[test]
fn codex_exec_refreshes_a_token_with_less_than_five_minutes_left() {
    let Some(codex) = codex_cli::enter("codex_exec_refreshes_a_token_with_less_than_five_minutes_left") else {
        return;
    };
    let setup = Setup::new(240.0);

    let run = setup.exec(&codex);

    run.assert_success();
    assert!(
        run.stdout.contains(ANSWER),
        "codex printed the answer\n{}",
        run.report()
    );
    assert_eq!(setup.sim.token_requests(), 1, "codex refreshes 5 minutes before exp");
    let (access, _) = setup.tokens_on_disk();
    assert_ne!(access, setup.issued.access_token);
    assert_eq!(setup.api.counts().unauthorized, 0);
}

#[test]
fn a_run_past_its_timeout_is_killed_with_everything_it_started() {
    // No codex needed: `sh` starts a background `sleep` that holds the
    // output pipe; only killing the whole process group ends the run early.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "sleep 30 & sleep 30"]);
    let run = codex_cli::run_with_timeout(&mut cmd, std::time::Duration::from_millis(300));
    assert!(run.timed_out(), "{}", run.describe());
    assert!(
        run.elapsed < std::time::Duration::from_secs(10),
        "the background child was killed too: {}",
        run.describe()
    );
}
