//! The broker core against a simulated provider on loopback: one refresh per
//! expiry, no refresh while a token is valid, files written safely.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use token_broker::sim::SimConfig;
use token_broker::{BrokerError, State};

const DAY: f64 = 86400.0;

/// The reported bug: the access token is valid for days but another process
/// already spent the refresh token. The broker must not touch it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_with_spent_refresh_token_makes_no_request() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(3.0 * DAY);
    fx.sim.spend(&issued.refresh_token);
    let path = fx.write_codex(&issued);
    let before = std::fs::read(&path).unwrap();

    let broker = fx.codex_broker(&path).build().unwrap();
    for _ in 0..100 {
        assert_eq!(broker.token().await.unwrap().expose(), issued.access_token);
    }
    let status = broker.status().await.unwrap();
    assert_eq!(status.state, State::Valid);
    broker.shutdown().await;

    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", issued.access_token));
    assert_eq!(stderr(&out), "");

    assert_eq!(fx.sim.token_requests(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing may be written");
}

/// Inside the refresh-ahead window: exactly one refresh, the current token
/// served meanwhile. Outside it: none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_window_refreshes_once_and_serves_current_meanwhile() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(300),
        ..SimConfig::default()
    });
    // Issued an hour ago, 5 minutes left: inside the default 10-minute window.
    let issued = fx.sim.sign_in(300.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();

    // While the one refresh is in flight (300 ms), callers get the current token.
    for _ in 0..50 {
        assert_eq!(broker.token().await.unwrap().expose(), issued.access_token);
    }
    let new = wait_for_new_token(&broker, &issued.access_token).await;
    assert_eq!(fx.sim.token_requests(), 1);
    assert!(fx.sim.is_live(new.expose()));
    let file = read_json(&path);
    assert_eq!(file["tokens"]["access_token"], new.expose());
    for _ in 0..50 {
        assert_eq!(broker.token().await.unwrap(), new);
    }
    assert_eq!(fx.sim.token_requests(), 1, "the new token is outside the window");
    broker.shutdown().await;

    // Outside the window: no request at all.
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(3600.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();
    for _ in 0..100 {
        assert_eq!(broker.token().await.unwrap().expose(), issued.access_token);
    }
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 0);
}

async fn wait_for_new_token(broker: &token_broker::TokenBroker, old: &str) -> token_broker::AccessToken {
    for _ in 0..200 {
        let token = broker.token().await.unwrap();
        if token.expose() != old {
            return token;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the background refresh never landed");
}

/// Expired access token, live refresh token: one request, the file updated
/// in place of the owned fields only, unknown keys and the API key kept,
/// mode 0600.
#[test]
fn expired_token_is_refreshed_once_and_written_safely() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-60.0);
    let path = fx.path("auth.json");
    let original = serde_json::json!({
        "OPENAI_API_KEY": "sk-test-kept",
        "tokens": {
            "id_token": issued.id_token,
            "access_token": issued.access_token,
            "refresh_token": issued.refresh_token,
            "account_id": issued.account_id,
            "future_token_field": {"kept": true}
        },
        "last_refresh": "2026-01-01T00:00:00Z",
        "some_future_key": [1, 2, 3]
    });
    std::fs::write(&path, serde_json::to_string_pretty(&original).unwrap()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = stdout(&out).trim_end().to_owned();
    assert_ne!(printed, issued.access_token);
    assert!(fx.sim.is_live(&printed));
    assert_eq!(fx.sim.token_requests(), 1);

    let file = read_json(&path);
    assert_eq!(file["tokens"]["access_token"], printed.as_str());
    let new_refresh = file["tokens"]["refresh_token"].as_str().unwrap();
    assert_ne!(new_refresh, issued.refresh_token);
    assert!(fx.sim.is_unspent(new_refresh), "the rotated refresh token is kept");
    assert_eq!(file["OPENAI_API_KEY"], "sk-test-kept");
    assert_eq!(file["some_future_key"], serde_json::json!([1, 2, 3]));
    assert_eq!(file["tokens"]["future_token_field"], serde_json::json!({"kept": true}));
    assert_eq!(file["tokens"]["account_id"], issued.account_id.as_str());
    assert_ne!(file["last_refresh"], "2026-01-01T00:00:00Z");
    assert_eq!(mode(&path), 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        // The lock files stay (a lock file is never deleted: that would let
        // two holders in); nothing else may.
        .filter(|n| {
            !matches!(
                n.as_str(),
                "auth.json" | "auth.json.lock" | "auth.lock" | "auth.json.broker.lock"
            )
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// Expired access token and a refresh token someone already spent: exit 4,
/// a message saying what to do, and the file byte-for-byte unchanged.
#[test]
fn expired_token_with_spent_refresh_token_exits_4_and_changes_nothing() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-60.0);
    fx.sim.spend(&issued.refresh_token);
    let path = fx.write_codex(&issued);
    let before = std::fs::read(&path).unwrap();

    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("refresh_token_reused"), "{err}");
    assert!(err.contains("codex login"), "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(std::fs::read(&path).unwrap(), before);

    let out = fx.cli(&["token", "--json", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let err: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(err["error"]["kind"], "login_required");
    assert_eq!(err["error"]["exit_code"], 4);
}

/// `exp` decides, not a stale `last_refresh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exp_wins_over_stale_last_refresh() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(2.0 * DAY);
    let path = fx.write_codex(&issued);
    let mut file = read_json(&path);
    file["last_refresh"] = "2025-01-01T00:00:00.000000Z".into();
    std::fs::write(&path, file.to_string()).unwrap();

    let broker = fx.codex_broker(&path).build().unwrap();
    assert_eq!(broker.token().await.unwrap().expose(), issued.access_token);
    assert_eq!(broker.status().await.unwrap().state, State::Valid);
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 0);
}

/// A refresh response without `id_token` keeps the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_without_id_token_keeps_the_old_one() {
    let fx = Fixture::new(SimConfig {
        omit_id_token: true,
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();
    let token = broker.token().await.unwrap();
    broker.shutdown().await;
    assert_ne!(token.expose(), issued.access_token);
    assert_eq!(fx.sim.token_requests(), 1);
    let file = read_json(&path);
    assert_eq!(file["tokens"]["id_token"], issued.id_token.as_str());
    assert_eq!(file["tokens"]["access_token"], token.expose());
}

/// 1,000 callers at the instant of expiry: one request, one new token for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_callers_at_expiry_make_one_request() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(100),
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let broker = broker.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                broker.token().await
            })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        tokens.insert(task.await.unwrap().unwrap().expose().to_owned());
    }
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(tokens.len(), 1, "every caller gets the same new token");
    let token = tokens.into_iter().next().unwrap();
    assert_ne!(token, issued.access_token);
    assert!(fx.sim.is_live(&token));
}

/// Rejecting an old token changes nothing; 100 callers rejecting the current
/// token at once cause one refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_refreshes_once_for_the_current_token_only() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(3600.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();
    let first = broker.token().await.unwrap();

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let broker = broker.clone();
            let first = first.clone();
            tokio::spawn(async move { broker.reject(&first).await })
        })
        .collect();
    let mut replacements = std::collections::HashSet::new();
    for task in tasks {
        replacements.insert(task.await.unwrap().unwrap());
    }
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(replacements.len(), 1);
    let second = replacements.into_iter().next().unwrap();
    assert_ne!(second, first);
    assert_eq!(broker.token().await.unwrap(), second);

    // The old token again: ignored, no request.
    assert_eq!(broker.reject(&first).await.unwrap(), second);
    assert_eq!(fx.sim.token_requests(), 1);
    broker.shutdown().await;
}

/// Works from inside an actix System too.
#[actix_rt::test]
async fn works_inside_an_actix_system() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let broker = fx.codex_broker(&path).build().unwrap();
    let token = broker
        .addr()
        .send(token_broker::actor::GetToken)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(broker.token().await.unwrap(), token);
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 1);
}

/// A missing file is a typed error and CLI exit 3.
#[test]
fn missing_file_is_exit_3() {
    let fx = Fixture::codex();
    let path = fx.path("nope.json");
    let err = fx.codex_broker(&path).build().unwrap_err();
    assert!(matches!(err, BrokerError::Store(_)), "{err}");
    let out = fx.cli(&["status", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert_eq!(fx.sim.token_requests(), 0);
}

/// A provider whose tokens are already expired on arrival (clock skew, or an
/// absurd lifetime) gets one request per caller wave, never a refresh loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expired_on_arrival_never_cause_a_refresh_loop() {
    let fx = Fixture::new(SimConfig {
        access_lifetime: Duration::from_millis(1),
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let broker = fx.codex_broker(&path).build().unwrap();
    let token = tokio::time::timeout(Duration::from_secs(10), broker.token())
        .await
        .expect("the waiter is answered")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fx.sim.token_requests(), 1, "no request without a caller");
    assert_eq!(read_json(&path)["tokens"]["access_token"], token.expose());
    broker.shutdown().await;
}

/// `status` shows the state without secrets, as text and as JSON, and
/// never makes a request.
#[test]
fn status_shows_the_state_without_secrets() {
    let fx = Fixture::codex();
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sample-auth.json");
    let out = fx.cli(&["status", "--auth-file", sample.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "state:          valid",
        "acct-sample-0001",
        "expires 2100-01-01T00:00:00",
        "(in ",
        "present",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
    let file = read_json(&sample);
    for secret in ["access_token", "refresh_token", "id_token"] {
        let value = file["tokens"][secret].as_str().unwrap();
        assert!(!text.contains(&value[value.len() - 20..]), "{secret} leaked");
    }

    let expired = fx.write_codex(&fx.sim.sign_in(-90.0));
    let out = fx.cli(&["status", "--json", "--auth-file", expired.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(status["state"], "expired");
    assert_eq!(status["has_refresh_token"], true);
    assert!(status["expires_in_seconds"].as_i64().unwrap() <= -89);
    assert_eq!(status["counters"]["token_requests"], 0);
    assert_eq!(fx.sim.token_requests(), 0);
}
