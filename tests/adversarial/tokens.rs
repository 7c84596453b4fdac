//! See `tests/adversarial.rs`: odd tokens from a provider, and whatever the
//! broker accepts and writes, it loads again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use token_broker::sim::{codex_auth_json, unsigned_jwt, SimConfig};

use crate::common::*;

/// A token endpoint on loopback that answers every refresh with what
/// `answer(n)` builds for the n-th request (counting from 1).
struct OddProvider {
    url: String,
    requests: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl OddProvider {
    fn start(answer: impl Fn(u64) -> serde_json::Value + Send + Sync + 'static) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let answer = Arc::new(answer);
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}/oauth/token", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/oauth/token",
            axum::routing::post(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let body = answer(n);
                async move { axum::Json(body) }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        OddProvider {
            url,
            requests,
            _runtime: runtime,
        }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Runs `token-broker ARGS --auth-file PATH` against `url`.
fn cli(url: &str, path: &std::path::Path, args: &[&str]) -> std::process::Output {
    cli_command()
        .args(args)
        .arg("--auth-file")
        .arg(path)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", url)
        .output()
        .unwrap()
}

/// Finding 8: the provider returns access tokens whose `exp` the broker
/// cannot use (not a JWT, `exp` after the year 3000, `exp` already past by
/// our clock while `expires_in` says an hour, nothing at all). The broker
/// accepted and wrote them; every later run must load the file again, and
/// use the token without refreshing once per process.
#[test]
fn whatever_the_broker_writes_it_loads_again() {
    type Answer = fn(u64) -> serde_json::Value;
    let cases: [(&str, Answer); 4] = [
        (
            "opaque access token, expires_in",
            |n| serde_json::json!({"access_token": format!("opaque-access-{n}-abcdefgh"), "refresh_token": format!("rt-{n}-abcdefgh"), "expires_in": 3600}),
        ),
        (
            "exp after the year 3000, expires_in",
            |n| serde_json::json!({"access_token": unsigned_jwt(&format!(r#"{{"exp":99999999999,"n":{n}}}"#)), "refresh_token": format!("rt-{n}-abcdefgh"), "expires_in": 3600}),
        ),
        (
            "exp already past (clock skew), expires_in",
            |n| serde_json::json!({"access_token": unsigned_jwt(&format!(r#"{{"exp":{},"n":{n}}}"#, now_secs() - 120)), "refresh_token": format!("rt-{n}-abcdefgh"), "expires_in": 3600}),
        ),
        (
            "opaque access token, no expiry at all",
            |n| serde_json::json!({"access_token": format!("opaque-access-{n}-abcdefgh"), "refresh_token": format!("rt-{n}-abcdefgh")}),
        ),
    ];
    for (case, answer) in cases {
        let provider = OddProvider::start(answer);
        let fx = Fixture::new(SimConfig::default());
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let first = cli(&provider.url, &path, &["token"]);
        assert_eq!(first.status.code(), Some(0), "{case}: {}", stderr(&first));
        for _ in 0..4 {
            let again = cli(&provider.url, &path, &["token"]);
            assert_eq!(
                again.status.code(),
                Some(0),
                "{case}: the file the broker wrote: {}",
                stderr(&again)
            );
            assert_eq!(stdout(&again), stdout(&first), "{case}");
        }
        let status = cli(&provider.url, &path, &["status"]);
        assert_eq!(status.status.code(), Some(0), "{case}: {}", stderr(&status));
        assert_eq!(provider.requests(), 1, "{case}: one refresh, not one per process");
    }
}

/// A guard for finding 8's fix: a record of ours names the token it
/// describes, so hand-edited tokens beside a stale record are judged by
/// their own `exp` again.
#[test]
fn a_stale_expiry_record_is_ignored() {
    let fx = Fixture::new(SimConfig::default());
    let issued = fx.sim.sign_in(-1.0);
    let mut auth: serde_json::Value = serde_json::from_str(&codex_auth_json(&issued)).unwrap();
    auth["token_broker"] =
        serde_json::json!({"access_token_sha256": "0".repeat(64), "expires_at": "2999-01-01T00:00:00Z"});
    let path = fx.path("auth.json");
    std::fs::write(&path, auth.to_string()).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(fx.sim.token_requests(), 1, "the expired token was refreshed");
}

/// Finding 9: a provider whose tokens arrive already expired. `watch
/// --interval 10ms` made 500 refreshes in 5 s; it is a provider fault, with
/// backoff.
#[test]
fn tokens_expired_on_arrival_are_a_fault_with_backoff() {
    let fx = Fixture::new(SimConfig {
        access_lifetime: Duration::from_millis(1),
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let out = fx.cli(&[
        "watch",
        "--interval",
        "10ms",
        "--duration",
        "3s",
        "--auth-file",
        path.to_str().unwrap(),
    ]);
    let requests = fx.sim.token_requests();
    assert!(
        (1..=5).contains(&requests), // the first, then at most one a second (the shortest backoff)
        "{requests} token requests in 3 s: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("expired on arrival"), "{}", stderr(&out));
}

/// Finding 17: `tokens.account_id` spelled differently from the id token's
/// claim. The account the file names stays the account: a second refresh
/// must not report "signed in to another account".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_the_file_names_stays_the_account() {
    let fx = Fixture::codex();
    let mut issued = fx.sim.sign_in(-1.0);
    issued.account_id = "acct-named-in-the-file".into();
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();
    let first = broker.token().await.unwrap();
    let second = broker.reject(&first).await.unwrap();
    assert_ne!(first, second, "refreshed twice");
    assert!(fx.sim.is_live(second.expose()));
    let status = broker.status().await.unwrap();
    assert_eq!(status.account_id.as_deref(), Some("acct-named-in-the-file"));
    broker.shutdown().await;
    assert_eq!(read_json(&path)["tokens"]["account_id"], "acct-named-in-the-file");
}

/// Finding 16: a slow but legitimate holder keeps the lock. A waiter that
/// gives up says "another process is refreshing" and exits 5 (try again),
/// and waits as long as a holder can legitimately need (derived from the
/// request timeout).
#[test]
fn a_busy_lock_is_try_again_later() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let lock = hold_broker_lock(&path);
    let started = std::time::Instant::now();
    let out = fx.cli(&["token", "--timeout", "1s", "--auth-file", path.to_str().unwrap()]);
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another process is refreshing"),
        "{}",
        stderr(&out)
    );
    assert!(
        waited >= Duration::from_secs(2),
        "waited at least two request timeouts: {waited:?}"
    );
    assert_eq!(fx.sim.token_requests(), 0);
    drop(lock);
}
