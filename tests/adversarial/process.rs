//! See `tests/adversarial.rs`: the broker process is signalled, stopped,
//! starved, or its writes fail.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use token_broker::sim::{codex_auth_json, SimConfig};

use crate::common::*;

/// A child process that is killed if the test fails before it ends it.
struct Reaped(Option<Child>);

impl Reaped {
    fn take(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(mut child: Child) -> std::process::Output {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Finding 1: a long-running broker refreshed, could not write the result
/// (a file size limit) and keeps the new tokens to write later. Its record
/// must not be taken for a crash: another process must not spend the old
/// refresh token again (it would be refused, and the credential burned with
/// a provider that revokes the family).
#[test]
fn a_live_broker_with_unwritten_tokens_is_never_taken_for_a_dead_one() {
    let fx = Fixture::new(SimConfig {
        revoke_family_on_reuse: true,
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(-1.0);
    // Pad the file past the size limit below, so every rewrite fails.
    let mut auth: serde_json::Value = serde_json::from_str(&codex_auth_json(&issued)).unwrap();
    auth["padding"] = "x".repeat(16 * 1024).into();
    let path = fx.path("auth.json");
    std::fs::write(&path, auth.to_string()).unwrap();

    let script = format!(
        "trap '' XFSZ; ulimit -f 8; exec \"$0\" watch --interval 50ms --auth-file {}",
        path.display()
    );
    let watch = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg(CLI)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .env("TOKEN_BROKER_WINNER_WAIT", "300ms")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let watch = Reaped(Some(watch));
    wait_until(Duration::from_secs(10), "the watcher has refreshed", || {
        fx.sim.counts().refreshed == 1
    });
    // Its write fails and is retried under the lock; then it keeps the tokens.
    std::thread::sleep(Duration::from_secs(2));
    assert!(path.with_file_name("auth.json.refreshing").exists(), "the record stays");

    // The watcher keeps the brokers' lock while it holds unwritten tokens
    // (and its record says it is alive): a newcomer spends nothing and is
    // told to try again.
    let out = fx.cli(&["token", "--timeout", "1s", "--auth-file", path.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(4), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(5), "try again later: {}", stderr(&out));
    assert!(
        stderr(&out).contains("another process is refreshing"),
        "{}",
        stderr(&out)
    );
    let counts = fx.sim.counts();
    assert_eq!(counts.reused, 0, "the spent refresh token was sent again: {counts:?}");
    assert_eq!(counts.token_requests, 1, "{counts:?}");

    let out = terminate(watch.take());
    assert!(
        !out.status.success(),
        "watch exits non-zero when rotated tokens could not be written"
    );
}

/// Finding 4: SIGTERM, SIGINT or SIGHUP while `token` waits for a refresh
/// (`timeout 1 token-broker token`, Ctrl-C) is deferred until the rotated
/// tokens are written; the next run needs no request.
#[test]
fn a_signal_during_a_refresh_waits_for_the_write() {
    for (signal, code) in [("TERM", 143), ("INT", 130), ("HUP", 129)] {
        let fx = Fixture::new(SimConfig {
            latency: Duration::from_millis(1500),
            ..SimConfig::default()
        });
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let child = cli_command()
            .args(["token", "--auth-file", path.to_str().unwrap()])
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "the request is in flight", || {
            fx.sim.token_requests() == 1
        });
        let _ = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {}", stderr(&out));
        assert!(stderr(&out).contains("no refresh was cut short"), "{}", stderr(&out));
        let counts = fx.sim.counts();
        assert_eq!(counts.refreshed, 1, "SIG{signal}: {counts:?}");
        let on_disk = read_json(&path);
        assert!(
            fx.sim.is_unspent(on_disk["tokens"]["refresh_token"].as_str().unwrap()),
            "SIG{signal}: the rotated tokens are on disk"
        );
        let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(fx.sim.token_requests(), 1, "SIG{signal}: the next run needs no request");
    }
}

/// Finding 4, second half: in the refresh-ahead case the token is printed
/// and the refresh runs behind it; when its tokens cannot be written,
/// `token` must not exit 0 as if all were well.
#[test]
fn a_background_refresh_whose_tokens_are_lost_is_not_exit_0() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(200),
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(120.0); // inside the refresh-ahead window
    let mut auth: serde_json::Value = serde_json::from_str(&codex_auth_json(&issued)).unwrap();
    auth["padding"] = "x".repeat(16 * 1024).into();
    let path = fx.path("auth.json");
    std::fs::write(&path, auth.to_string()).unwrap();
    let script = "trap '' XFSZ; ulimit -f 8; exec \"$0\" token --auth-file \"$1\"";
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(CLI)
        .arg(&path)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .env("TOKEN_BROKER_WINNER_WAIT", "300ms")
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out).trim(),
        issued.access_token,
        "the still-valid token is printed"
    );
    assert_eq!(fx.sim.counts().refreshed, 1);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("could not write"), "{}", stderr(&out));
}
