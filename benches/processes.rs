//! Processes: 8 CLI processes calling `token` in a loop for 20 s against the
//! simulated provider with 2 s access tokens and 50 ms latency. Reported:
//! invocations, token requests, successful refreshes, requests per expiry
//! (goal: 1), reused refresh tokens (goal: 0), and the invocation latency.
//!
//! A measurement rather than a timing loop, so it runs once (no criterion
//! harness): `cargo bench --bench processes`. Figures go to stderr and to
//! `target/bench-extra/processes.json`.

use std::process::Command;
use std::time::{Duration, Instant};

use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};

const PROCESSES: usize = 8;
const RUN_FOR: Duration = Duration::from_secs(20);

fn main() {
    // `cargo bench` passes `--bench`; a filter that excludes us means skip.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if !args.is_empty() && !args.iter().any(|a| "processes".contains(a.as_str())) {
        return;
    }
    let sim = ProviderServer::start(SimConfig {
        access_lifetime: Duration::from_secs(2),
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.json");
    std::fs::write(&path, codex_auth_json(&sim.sign_in(2.0))).unwrap();
    let cli = env!("CARGO_BIN_EXE_token-broker");
    let url = sim.token_url();
    let started = Instant::now();
    let workers: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let (path, url) = (path.clone(), url.clone());
            std::thread::spawn(move || {
                let mut times = Vec::new();
                let mut failures = 0u64;
                while started.elapsed() < RUN_FOR {
                    let t = Instant::now();
                    let out = Command::new(cli)
                        .arg("token")
                        .arg("--auth-file")
                        .arg(&path)
                        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &url)
                        .output()
                        .unwrap();
                    times.push(t.elapsed());
                    if !out.status.success() {
                        failures += 1;
                    }
                }
                (times, failures)
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failures = 0;
    for w in workers {
        let (t, f) = w.join().unwrap();
        times.extend(t);
        failures += f;
    }
    let elapsed = started.elapsed();
    times.sort();
    let counts = sim.counts();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let report = serde_json::json!({
        "processes": PROCESSES,
        "seconds": elapsed.as_secs_f64(),
        "invocations": times.len(),
        "failed_invocations": failures,
        "token_requests": counts.token_requests,
        "refreshes": counts.refreshed,
        "requests_per_expiry": counts.token_requests as f64 / counts.refreshed.max(1) as f64,
        "reused_refresh_tokens": counts.reused,
        "expiries_expected": elapsed.as_secs_f64() / 1.0,
        "invocation_ms_p50": ms(times[times.len() / 2]),
        "invocation_ms_p99": ms(times[times.len() * 99 / 100]),
        "invocation_ms_max": ms(times[times.len() - 1]),
    });
    eprintln!("processes: {}", serde_json::to_string_pretty(&report).unwrap());
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-extra");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("processes.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    );
    assert_eq!(counts.reused, 0, "a refresh token was spent twice");
    assert_eq!(failures, 0, "an invocation failed");
}
