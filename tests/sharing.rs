//! Sharing one credentials file across processes: the lock, re-reading,
//! adopting outside writes, crash safety and account switches. Every test
//! runs real CLI processes or real files against the simulated provider.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use token_broker::credentials::{decode_claims, AccessToken};
use token_broker::sim::{codex_auth_json, SimConfig};
use token_broker::store::CodexAuthFile;
use token_broker::{BrokerError, State};

/// 8 CLI processes calling `token` in a loop for 20 s with 2 s access
/// tokens: no refresh token is ever reused, one request per expiry, and
/// every printed token is valid when printed.
#[test]
fn eight_processes_share_one_refresh_per_expiry() {
    let fx = Fixture::new(SimConfig {
        access_lifetime: Duration::from_secs(2),
        latency: Duration::from_millis(20),
        // One reuse anywhere would lock every process out.
        revoke_family_on_reuse: true,
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(2.0));
    let url = fx.sim.token_url();
    let run_for = Duration::from_secs(20);
    let started = Instant::now();

    let workers: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                let mut printed = Vec::new();
                while started.elapsed() < run_for {
                    let out = cli_command()
                        .arg("token")
                        .arg("--auth-file")
                        .arg(&path)
                        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &url)
                        .output()
                        .unwrap();
                    let seen_at = SystemTime::now();
                    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
                    printed.push((stdout(&out).trim_end().to_owned(), seen_at));
                }
                printed
            })
        })
        .collect();
    let printed: Vec<_> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed();

    for (token, seen_at) in &printed {
        let exp = decode_claims(token).unwrap().exp().unwrap().unwrap();
        assert!(exp > *seen_at, "a token was printed after it expired");
    }
    let counts = fx.sim.counts();
    assert_eq!(counts.reused, 0, "{counts:?}");
    assert_eq!(counts.invalid, 0, "{counts:?}");
    assert_eq!(counts.token_requests, counts.refreshed, "{counts:?}");
    // Refreshed at half-life (1 s): one request per token generation.
    let generations = elapsed.as_secs_f64() / 1.0;
    assert!(
        (counts.token_requests as f64) <= generations + 2.0,
        "{} requests in {elapsed:?}: more than one per expiry",
        counts.token_requests
    );
    assert!(counts.token_requests as f64 >= generations / 2.0, "{counts:?}");
    let distinct: std::collections::HashSet<_> = printed.iter().map(|(t, _)| t).collect();
    println!(
        "{} invocations, {} requests, {} distinct tokens in {elapsed:?}",
        printed.len(),
        counts.token_requests,
        distinct.len()
    );
}

/// Reads lines from a child's stdout on a thread.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => continue,
            Err(_) => panic!("no line containing {needle} within {within:?}"),
        }
    }
}

/// Two long-running brokers in separate processes; an outside writer
/// rewrites the file in place mid-run, as `codex login` does. Both adopt the
/// new tokens with no token request.
#[test]
fn long_running_brokers_adopt_an_outside_login() {
    let fx = Fixture::codex();
    let first = fx.sim.sign_in(3600.0);
    let path = fx.write_codex(&first);
    let spawn = || {
        cli_command()
            .args([
                "watch",
                "--json",
                "--interval",
                "50ms",
                "--duration",
                "30s",
                "--auth-file",
            ])
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut a = spawn();
    let mut b = spawn();
    let (rx_a, rx_b) = (lines_of(&mut a), lines_of(&mut b));
    let old_fp = AccessToken::new(first.access_token.as_str()).fingerprint();
    wait_for_line(&rx_a, &old_fp, Duration::from_secs(10));
    wait_for_line(&rx_b, &old_fp, Duration::from_secs(10));

    // `codex login`: a new token family, written in place with truncation,
    // in two halves so that readers may catch the file half-written.
    let second = fx.sim.sign_in(3600.0);
    let text = codex_auth_json(&second);
    let (head, tail) = text.split_at(text.len() / 2);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(head.as_bytes()).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(60));
    file.write_all(tail.as_bytes()).unwrap();
    drop(file);

    let new_fp = AccessToken::new(second.access_token.as_str()).fingerprint();
    let line_a = wait_for_line(&rx_a, &new_fp, Duration::from_secs(10));
    let line_b = wait_for_line(&rx_b, &new_fp, Duration::from_secs(10));
    for line in [line_a, line_b] {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["token_requests"], 0, "{line}");
        assert_eq!(v["adoptions"], 1, "{line}");
    }
    for child in [&mut a, &mut b] {
        unsafe_terminate(child);
    }
    assert_eq!(fx.sim.token_requests(), 0);
    assert_eq!(read_json(&path)["tokens"]["access_token"], second.access_token.as_str());
}

/// Sends SIGTERM (the watcher shuts down cleanly) and reaps the child.
fn unsafe_terminate(child: &mut std::process::Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGKILL at random instants under refresh-heavy load, 200 times: the file
/// always parses and holds a token set issued together; a refresh token the
/// provider already spent is never silently kept: the next start reports
/// login-required and says a refresh was interrupted.
#[test]
fn sigkill_at_any_instant_never_tears_the_file_or_loses_a_rotation_silently() {
    let fx = Fixture::new(SimConfig {
        access_lifetime: Duration::from_millis(1),
        latency: Duration::from_millis(16),
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let url = fx.sim.token_url();
    let (mut rotated, mut untouched, mut recovered, mut interrupted, mut still_valid) = (0, 0, 0, 0, 0);
    for round in 0..200 {
        let before = CodexAuthFile::new(&path).load_blocking().unwrap().tokens;
        let mut child = cli_command()
            .arg("token")
            .arg("--auth-file")
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..80_000)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // The provider may still be answering the dead child's request, and
        // spend its refresh token after this: judge the round only once it
        // is done, or a token spent a moment later counts as unspent, and
        // the next round's child resends it.
        settle(&fx.sim);

        let bytes = std::fs::read(&path).unwrap();
        let after_kill = CodexAuthFile::parse(&path, &bytes)
            .unwrap_or_else(|e| panic!("round {round}: the file does not parse after a kill: {e}"));
        let access = after_kill.access_token.expose();
        let refresh = after_kill.refresh_token.as_ref().unwrap().expose();
        assert!(
            fx.sim.issued_together(access, refresh),
            "round {round}: a mixed token set"
        );
        if fx.sim.is_unspent(refresh) {
            if after_kill.access_token == before.access_token {
                untouched += 1;
            } else {
                rotated += 1;
            }
            continue;
        }
        // The provider spent this refresh token but its successor never
        // reached the file. The next start either recovers the successor
        // from the temporary file the killed writer left, or says a refresh
        // was interrupted: never silence.
        let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
        let on_disk = CodexAuthFile::new(&path).load_blocking().unwrap().tokens;
        if out.status.code() == Some(0) && !fx.sim.is_unspent(on_disk.refresh_token.as_ref().unwrap().expose()) {
            // The access token on disk was still valid, so it was served
            // as is. If a refresh was tried (inside the refresh-ahead
            // window), its refusal is announced; if the token was still
            // fresh, nothing was spent and the interruption is reported
            // when it falls due.
            assert!(
                stdout(&out).trim() == on_disk.access_token.expose(),
                "round {round}: the token served is the one on disk"
            );
            if stderr(&out).contains("interrupted") {
                interrupted += 1;
            } else {
                assert_eq!(
                    fx.sim.counts().reused as usize,
                    interrupted,
                    "round {round}: a silent reuse"
                );
                still_valid += 1;
            }
            std::fs::write(&path, codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
            continue;
        }
        if out.status.code() == Some(0) {
            recovered += 1;
            let now = CodexAuthFile::new(&path).load_blocking().unwrap().tokens;
            // The recovered token, or the one before it while still valid.
            let printed = stdout(&out);
            assert!(
                [now.access_token.expose(), after_kill.access_token.expose()].contains(&printed.trim()),
                "round {round}: printed a token that is neither the recovered one nor the one before it"
            );
            assert!(
                fx.sim.is_unspent(now.refresh_token.as_ref().unwrap().expose()),
                "round {round}: the recovered rotation is live"
            );
            continue;
        }
        interrupted += 1;
        assert_eq!(out.status.code(), Some(4), "round {round}: {}", stderr(&out));
        assert!(stderr(&out).contains("interrupted"), "round {round}: {}", stderr(&out));
        // Sign in again, as the user would.
        std::fs::write(&path, codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
    }
    println!(
        "rotated {rotated}, untouched {untouched}, recovered {recovered}, interrupted {interrupted}, \
         served while still valid {still_valid}"
    );
    // One clean refresh sweeps up temporary files the killed writers left.
    std::fs::write(&path, codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let orphans: Vec<_> = std::fs::read_dir(fx.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(orphans.is_empty(), "{orphans:?}");
    assert!(rotated > 0, "no kill landed after a completed refresh");
    assert!(untouched > 0, "no kill landed before a refresh");
    assert_eq!(
        fx.sim.counts().reused as usize,
        interrupted,
        "every reuse is a reported interruption"
    );
}

/// Waits until the simulated provider answers no token request: a request
/// whose client was killed goes on until the provider notices, and may
/// spend its refresh token after the kill (past the first half of the
/// latency, the spend comes before the provider looks at the connection
/// again). One whose handler had not started yet is dropped unanswered.
fn settle(sim: &token_broker::sim::ProviderServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.concurrent_token_requests() > 0 {
        assert!(Instant::now() < deadline, "the provider never finished a request");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A refresh interrupted after the provider spent the token, found on the
/// next start: login-required, saying so, file untouched.
#[test]
fn an_interrupted_refresh_is_reported_on_the_next_start() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let store = CodexAuthFile::new(&path);
    // The record a broker that died mid-refresh leaves (written here by a
    // process that has exited, so its holder is provably gone).
    let status = Command::new("sh")
        .args([
            "-c",
            r#"printf '{"pid":%s,"refresh_token_sha256":"%s"}' $$ "$1" > "$2""#,
            "sh",
        ])
        .arg(token_broker::credentials::RefreshToken::new(issued.refresh_token.as_str()).sha256_hex())
        .arg(path.with_file_name("auth.json.refreshing"))
        .status()
        .unwrap();
    assert!(status.success());
    fx.sim.spend(&issued.refresh_token);
    let before = std::fs::read(&path).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(fx.sim.token_requests(), 1);
    assert!(
        store.interrupted_refresh_blocking().is_none(),
        "the record is cleared once the outcome is known"
    );
}

/// A lock held by a process that is killed mid-refresh: the next broker gets
/// the lock within its timeout, and since the request never reached the
/// provider, its one retry of the refresh succeeds.
#[test]
fn a_lock_left_by_a_killed_process_does_not_block() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    // A "provider" that accepts connections and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_url = format!("http://{}/oauth/token", black_hole.local_addr().unwrap());
    let mut holder = cli_command()
        .arg("token")
        .arg("--auth-file")
        .arg(&path)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &hole_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it holds the lock and has sent its request.
    let (_conn, _) = black_hole.accept().unwrap();
    let lock = std::fs::File::open(path.with_file_name("auth.json.broker.lock")).unwrap();
    assert!(matches!(lock.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
    // The Codex CLI's own locks are free during the request: it can commit
    // a refresh of its own meanwhile.
    for codex_lock in ["auth.lock", "auth.json.lock"] {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.with_file_name(codex_lock))
            .unwrap();
        file.try_lock()
            .unwrap_or_else(|e| panic!("{codex_lock} is held across the request: {e:?}"));
    }
    holder.kill().unwrap();
    holder.wait().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = rt.block_on(async {
        let broker = fx
            .codex_broker(&path)
            .lock_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let token = broker.token().await.unwrap();
        broker.shutdown().await;
        token
    });
    assert!(fx.sim.is_live(token.expose()));
    assert_eq!(fx.sim.token_requests(), 1);
    assert_eq!(read_json(&path)["tokens"]["access_token"], token.expose());
}

/// While another process holds the lock, a broker with a valid token still
/// serves it (the lock is never taken for that); one that must refresh
/// times out with a typed error and spends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_times_out_cleanly_and_never_blocks_a_valid_token() {
    let fx = Fixture::codex();
    let valid = fx.sim.sign_in(3600.0);
    let path = fx.write_codex(&valid);
    let lock = hold_broker_lock(&path);

    let broker = fx
        .codex_broker(&path)
        .lock_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert_eq!(broker.token().await.unwrap().expose(), valid.access_token);
    broker.shutdown().await;

    std::fs::write(&path, codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
    let broker = fx
        .codex_broker(&path)
        .lock_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = broker.token().await.unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 0);
    drop(lock);
}

/// The file now belongs to another account: a clear error, no request, the
/// file untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_switch_is_refused_without_spending_or_writing() {
    let fx = Fixture::codex();
    let mine = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&mine);
    let broker = fx
        .codex_broker(&path)
        .watch_interval(Duration::from_millis(20))
        // On demand only: keep-fresh would refresh before the switch.
        .keep_fresh(false)
        .build()
        .unwrap();
    // Someone signs in to another account; the broker's token has expired.
    std::fs::write(&path, codex_auth_json(&fx.sim.sign_in_as("acct-someone-else", -1.0))).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = broker.token().await.unwrap_err();
    assert!(matches!(err, BrokerError::AccountChanged { .. }), "{err}");
    assert!(err.to_string().contains("another account"));
    assert_eq!(broker.status().await.unwrap().state, State::AccountChanged);
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // The same through a valid token and the file watcher.
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(3600.0));
    let broker = fx
        .codex_broker(&path)
        .watch_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    broker.token().await.unwrap();
    std::fs::write(&path, codex_auth_json(&fx.sim.sign_in_as("acct-someone-else", 3600.0))).unwrap();
    let before = std::fs::read(&path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match broker.token().await {
            Err(BrokerError::AccountChanged { .. }) => break,
            Ok(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
            other => panic!("expected an account-changed error, got {other:?}"),
        }
    }
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// A lockless writer (the Codex CLI) replaces the tokens while our refresh
/// is in flight: we do not overwrite its newer tokens, we adopt them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_never_overwrites_newer_tokens() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(400),
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let broker = fx.codex_broker(&path).build().unwrap();
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.token().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let theirs = fx.sim.sign_in(3600.0);
    std::fs::write(&path, codex_auth_json(&theirs)).unwrap();

    let token = waiting.await.unwrap().unwrap();
    assert_eq!(token.expose(), theirs.access_token);
    assert_eq!(read_json(&path)["tokens"]["access_token"], theirs.access_token.as_str());
    assert_eq!(broker.status().await.unwrap().counters.adoptions, 1);
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 1);
}

/// A login-required credential recovers when the file changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_required_clears_when_the_file_changes() {
    let fx = Fixture::codex();
    let dead = fx.sim.sign_in(-1.0);
    fx.sim.spend(&dead.refresh_token);
    let path = fx.write_codex(&dead);
    let broker = fx
        .codex_broker(&path)
        .watch_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    assert!(matches!(broker.token().await, Err(BrokerError::LoginRequired { .. })));
    assert!(matches!(broker.token().await, Err(BrokerError::LoginRequired { .. })));
    assert_eq!(fx.sim.token_requests(), 1, "a rejected snapshot is never sent again");

    let fresh = fx.sim.sign_in(3600.0);
    std::fs::write(&path, codex_auth_json(&fresh)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let token = loop {
        match broker.token().await {
            Ok(token) => break token,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("still failing: {e}"),
        }
    };
    assert_eq!(token.expose(), fresh.access_token);
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 1);
}

/// A file caught half-written by an in-place writer is read again, not
/// taken for an invalid file.
#[test]
fn a_half_written_file_is_read_again() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(3600.0);
    let path = fx.path("auth.json");
    let text = codex_auth_json(&issued);
    std::fs::write(&path, &text[..text.len() / 3]).unwrap();
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            std::fs::write(&path, text).unwrap();
        })
    };
    let loaded = CodexAuthFile::new(&path).load_blocking().unwrap().tokens;
    writer.join().unwrap();
    assert_eq!(loaded.access_token.expose(), issued.access_token);
}
