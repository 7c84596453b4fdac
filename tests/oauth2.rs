//! The RFC 6749 dialect against the simulated provider speaking it, with
//! each client-authentication method.

mod common;

use std::time::Duration;

use common::*;
use token_broker::credentials::Secret;
use token_broker::provider::ClientAuth;
use token_broker::sim::{oauth2_credentials_json, SimClientAuth, SimConfig};
use token_broker::{BrokerError, Dialect, TokenBroker};

const CLIENT_ID: &str = "client-under-test";
const SECRET: &str = "s3cret:with/odd chars";

fn fixture(auth: SimClientAuth) -> Fixture {
    Fixture::new(SimConfig {
        dialect: Dialect::OAuth2,
        client_auth: auth,
        client_id: CLIENT_ID.to_owned(),
        access_lifetime: Duration::from_secs(1800),
        ..SimConfig::default()
    })
}

async fn refresh_with(sim_auth: SimClientAuth, auth: ClientAuth) {
    let fx = fixture(sim_auth);
    let issued = fx.sim.sign_in(-5.0);
    let path = fx.path("credentials.json");
    let mut file: serde_json::Value = serde_json::from_str(&oauth2_credentials_json(&issued)).unwrap();
    file["custom"] = "kept".into();
    std::fs::write(&path, file.to_string()).unwrap();

    let broker = TokenBroker::oauth2(fx.sim.token_url(), CLIENT_ID)
        .client_auth(auth)
        .credentials_path(&path)
        .build()
        .unwrap();
    let token = broker.token().await.unwrap();
    assert_eq!(broker.token().await.unwrap(), token);
    broker.shutdown().await;

    assert_eq!(fx.sim.token_requests(), 1);
    assert!(fx.sim.is_live(token.expose()));
    let file = read_json(&path);
    assert_eq!(file["access_token"], token.expose());
    assert!(fx.sim.is_unspent(file["refresh_token"].as_str().unwrap()));
    assert_eq!(file["custom"], "kept");
    assert!(file["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_client() {
    refresh_with(SimClientAuth::None, ClientAuth::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_basic() {
    refresh_with(
        SimClientAuth::Basic(SECRET.into()),
        ClientAuth::Basic(Secret::new(SECRET)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_post() {
    refresh_with(
        SimClientAuth::Post(SECRET.into()),
        ClientAuth::Post(Secret::new(SECRET)),
    )
    .await;
}

/// A wrong client secret is a permanent rejection; the file stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_rejected_and_changes_nothing() {
    let fx = fixture(SimClientAuth::Basic(SECRET.into()));
    let issued = fx.sim.sign_in(-5.0);
    let path = fx.path("credentials.json");
    std::fs::write(&path, oauth2_credentials_json(&issued)).unwrap();
    let before = std::fs::read(&path).unwrap();
    let broker = TokenBroker::oauth2(fx.sim.token_url(), CLIENT_ID)
        .client_auth(ClientAuth::Basic(Secret::new("wrong")))
        .credentials_path(&path)
        .build()
        .unwrap();
    let err = broker.token().await.unwrap_err();
    assert!(
        matches!(&err, BrokerError::LoginRequired { reason, .. } if reason.contains("invalid_client")),
        "{err}"
    );
    // The refused snapshot is remembered: no second request.
    assert!(matches!(broker.token().await, Err(BrokerError::LoginRequired { .. })));
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// Runs `token` with the oauth2 provider, `--client-auth auth` and the
/// secret in the environment variable `var` (unset when `secret` is None).
fn oauth2_cli(
    fx: &Fixture,
    path: &std::path::Path,
    auth: &str,
    var: &str,
    secret: Option<&str>,
) -> std::process::Output {
    let mut cmd = cli_command();
    cmd.args([
        "token",
        "--provider",
        "oauth2",
        "--token-url",
        &fx.sim.token_url(),
        "--client-id",
        CLIENT_ID,
    ])
    .args(["--client-auth", auth, "--client-secret-env", var, "--auth-file"])
    .arg(path);
    match secret {
        Some(value) => cmd.env(var, value),
        None => cmd.env_remove(var),
    };
    cmd.output().unwrap()
}

/// A spent refresh token gets `invalid_grant`: CLI exit 4, file unchanged.
#[test]
fn spent_refresh_token_is_invalid_grant_exit_4() {
    let fx = fixture(SimClientAuth::Post(SECRET.into()));
    let issued = fx.sim.sign_in(-5.0);
    fx.sim.spend(&issued.refresh_token);
    let path = fx.path("credentials.json");
    std::fs::write(&path, oauth2_credentials_json(&issued)).unwrap();
    let before = std::fs::read(&path).unwrap();
    let out = oauth2_cli(&fx, &path, "post", "TB_TEST_SECRET", Some(SECRET));
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid_grant"), "{}", stderr(&out));
    assert!(!stderr(&out).contains(SECRET));
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// The CLI with `client_secret_basic`, the secret read from the environment.
#[test]
fn cli_with_basic_auth_from_env() {
    let fx = fixture(SimClientAuth::Basic(SECRET.into()));
    let issued = fx.sim.sign_in(-5.0);
    let path = fx.path("credentials.json");
    std::fs::write(&path, oauth2_credentials_json(&issued)).unwrap();
    let run = || oauth2_cli(&fx, &path, "basic", "TB_TEST_SECRET", Some(SECRET));
    let first = run();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let second = run();
    assert_eq!(
        stdout(&first),
        stdout(&second),
        "the second run reuses the stored token"
    );
    assert_eq!(fx.sim.token_requests(), 1);

    // A missing secret variable is a usage error naming the variable.
    let out = oauth2_cli(&fx, &path, "basic", "TB_TEST_UNSET_VAR", None);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("TB_TEST_UNSET_VAR"));
}
