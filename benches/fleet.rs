//! A fleet of daemons sharing one credential on a real 3-member etcd cluster
//! (Debian's `etcd-server` on loopback), beside the file store, in one run.
//!
//! Measured:
//!
//! 1. The store's own operations (criterion): one linearizable load, and one
//!    lock-and-release, of the etcd store vs the file store (a Codex
//!    `auth.json`).
//! 2. Refreshes per expiry with 1, 2, 4 and 8 daemons (4 client loops
//!    each, `FLEET_BENCH_SECONDS`, default 12 s, of 2 s tokens refreshed 1 s
//!    ahead): token requests, token generations the clients saw after the
//!    imported one, token requests per generation (1.0 is the goal: one
//!    refresh per expiry fleet-wide), reused tokens, and calls served per
//!    second.
//! 3. The latency a client sees at expiry: the same run with one daemon,
//!    `keep_fresh = false` and no refresh-ahead, so that the first callers
//!    after each expiry wait for the refresh: etcd vs file. The slowest
//!    call of each generation (the one that waited for the refresh), p50
//!    and max over the generations, and every call's p50/p99.
//!
//! `cargo bench --features etcd --bench fleet`. The figures that are not
//! criterion's are printed to stderr and written to
//! `target/bench-extra/fleet.json`.

#[path = "../tests/common/etcd.rs"]
mod etcd;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};
use token_broker::store::{CodexAuthFile, EtcdSettings, EtcdStore, Store};

const CLI: &str = env!("CARGO_BIN_EXE_token-broker");
const TOKEN_PATH: &str = "/v1/profiles/codex/token";
const LOOPS_PER_DAEMON: usize = 4;

/// A running `token-broker serve`, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(config: &Path, socket: &Path) -> Daemon {
        let mut child = Command::new(CLI)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the daemon");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("listening"), "{first}");
        Daemon {
            child,
            socket: socket.to_path_buf(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One token request on a new connection: the status and the token.
fn get_token(socket: &Path) -> Option<String> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    stream
        .write_all(format!("GET {TOKEN_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    if !raw.starts_with("HTTP/1.1 200") {
        return None;
    }
    let body = raw.split_once("\r\n\r\n")?.1;
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json["access_token"].as_str().map(str::to_owned)
}

/// What the client loops saw.
#[derive(Default)]
struct Seen {
    calls: Vec<(String, Duration)>,
    failed: usize,
}

/// Runs `LOOPS_PER_DAEMON` client loops on each socket for `run`.
fn drive(sockets: &[PathBuf], run: Duration) -> Seen {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
    let mut loops = Vec::new();
    for socket in sockets {
        for _ in 0..LOOPS_PER_DAEMON {
            let (socket, stop, seen) = (socket.clone(), stop.clone(), seen.clone());
            loops.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let token = get_token(&socket);
                    let took = started.elapsed();
                    let mut seen = seen.lock();
                    match token {
                        Some(t) => seen.calls.push((t, took)),
                        None => seen.failed += 1,
                    }
                    drop(seen);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
    }
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    Arc::try_unwrap(seen).ok().unwrap().into_inner()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A folder with a daemon configuration for one profile.
fn config(root: &Path, name: &str, profile: &str) -> (PathBuf, PathBuf) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("run").join("tb.sock");
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!("[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\n{profile}"),
    )
    .unwrap();
    (path, socket)
}

fn etcd_profile(cluster: &etcd::Cluster, sim: &ProviderServer, prefix: &str, extra: &str) -> String {
    format!(
        "provider = \"codex\"\nstore = \"etcd\"\netcd_endpoints = {}\netcd_prefix = {prefix:?}\n\
         token_url = {:?}\ntimeout = \"3s\"\nlease_ttl = \"10s\"\n{extra}",
        cluster.toml_endpoints(),
        sim.token_url()
    )
}

fn import(config: &Path, auth: &Path) {
    let out = Command::new(CLI)
        .args(["fleet", "import", "--profile", "codex", "--from"])
        .arg(auth)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn strict() -> SimConfig {
    SimConfig {
        access_lifetime: Duration::from_secs(2),
        revoke_family_on_reuse: true,
        ..SimConfig::default()
    }
}

/// Part 2: `n` daemons on one credential.
fn fleet_run(cluster: &etcd::Cluster, n: usize, run: Duration) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let sim = ProviderServer::start(strict()).unwrap();
    let prefix = format!("/bench/fleet{n}-{}", fastrand::u32(..));
    let profile = etcd_profile(cluster, &sim, &prefix, "refresh_ahead = \"1s\"\n");
    let hosts: Vec<(PathBuf, PathBuf)> = (0..n)
        .map(|i| {
            let (config, socket) = config(dir.path(), &format!("h{i}"), &profile);
            let spool = dir.path().join(format!("h{i}")).join("spool");
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&format!("spool_dir = {spool:?}\n"));
            std::fs::write(&config, text).unwrap();
            (config, socket)
        })
        .collect();
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&sim.sign_in(2.0))).unwrap();
    import(&hosts[0].0, &auth);
    let daemons: Vec<Daemon> = hosts.iter().map(|(c, s)| Daemon::start(c, s)).collect();
    let sockets: Vec<PathBuf> = daemons.iter().map(|d| d.socket.clone()).collect();
    let seen = drive(&sockets, run);
    let counts = sim.counts();
    let generations: BTreeSet<&str> = seen.calls.iter().map(|(t, _)| t.as_str()).collect();
    // The first generation is the imported one: every later one came from
    // one token request, ideally.
    let refreshed_generations = generations.len().saturating_sub(1).max(1);
    let per = counts.token_requests as f64 / refreshed_generations as f64;
    eprintln!(
        "fleet: {n} daemon(s): {} token requests, {} generations seen after the imported one, {per:.2} requests/generation, \
         {} reused, {} calls served ({:.0}/s), {} failed",
        counts.token_requests,
        refreshed_generations,
        counts.reused,
        seen.calls.len(),
        seen.calls.len() as f64 / run.as_secs_f64(),
        seen.failed
    );
    serde_json::json!({
        "daemons": n,
        "seconds": run.as_secs_f64(),
        "token_requests": counts.token_requests,
        "generations_seen": refreshed_generations,
        "requests_per_generation": per,
        "reused": counts.reused,
        "served": seen.calls.len(),
        "failed": seen.failed,
    })
}

/// Part 3: one daemon, no refresh ahead: what the callers at expiry wait.
fn expiry_run(cluster: &etcd::Cluster, store: &str, run: Duration) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let sim = ProviderServer::start(strict()).unwrap();
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&sim.sign_in(2.0))).unwrap();
    let extra = "refresh_ahead = \"0s\"\nkeep_fresh = false\n";
    let profile = if store == "etcd" {
        format!(
            "{}spool_dir = {:?}\n",
            etcd_profile(cluster, &sim, &format!("/bench/expiry-{}", fastrand::u32(..)), extra),
            dir.path().join("spool")
        )
    } else {
        format!(
            "provider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {:?}\ntimeout = \"3s\"\n{extra}",
            sim.token_url()
        )
    };
    let (config, socket) = config(dir.path(), store, &profile);
    if store == "etcd" {
        import(&config, &auth);
    }
    let daemon = Daemon::start(&config, &socket);
    let seen = drive(std::slice::from_ref(&daemon.socket), run);
    // The slowest call of each generation: the one that waited.
    let mut worst: std::collections::BTreeMap<&str, Duration> = Default::default();
    for (token, took) in &seen.calls {
        let w = worst.entry(token.as_str()).or_default();
        *w = (*w).max(*took);
    }
    let mut waits: Vec<Duration> = worst.values().copied().collect();
    waits.sort();
    let mut all: Vec<Duration> = seen.calls.iter().map(|(_, d)| *d).collect();
    all.sort();
    let (w50, wmax) = (percentile(&waits, 0.5), waits.last().copied().unwrap_or_default());
    let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
    eprintln!(
        "expiry: {store}: {} generations, wait at expiry p50 {:.1} ms max {:.1} ms; every call p50 {:.2} ms p99 {:.1} ms; {} failed",
        waits.len(),
        ms(w50),
        ms(wmax),
        ms(p50),
        ms(p99),
        seen.failed
    );
    serde_json::json!({
        "store": store,
        "generations": waits.len(),
        "wait_at_expiry_p50_ms": ms(w50),
        "wait_at_expiry_max_ms": ms(wmax),
        "call_p50_ms": ms(p50),
        "call_p99_ms": ms(p99),
        "failed": seen.failed,
    })
}

fn main() {
    let cluster = etcd::Cluster::start(3);
    let run = Duration::from_secs(
        std::env::var("FLEET_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(12),
    );

    // 1. The stores' own operations.
    let dir = tempfile::tempdir().unwrap();
    let sim = ProviderServer::start(SimConfig::default()).unwrap();
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&sim.sign_in(8.0 * 3600.0))).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let file = CodexAuthFile::new(&auth);
    let remote = EtcdStore::new(EtcdSettings::new(cluster.endpoints(), "/bench/ops").unwrap());
    runtime.block_on(async {
        let tokens = file.load().await.unwrap().tokens;
        remote.import(&tokens, true).await.unwrap();
    });
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("store");
    group.bench_function("file load", |b| b.iter(|| runtime.block_on(file.load()).unwrap()));
    group.bench_function("etcd load", |b| b.iter(|| runtime.block_on(remote.load()).unwrap()));
    group.bench_function("file lock+release", |b| {
        b.iter(|| {
            runtime.block_on(async {
                file.lock(Duration::from_secs(5))
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        })
    });
    group.bench_function("etcd lock+release", |b| {
        b.iter(|| {
            runtime.block_on(async {
                remote
                    .lock(Duration::from_secs(5))
                    .await
                    .unwrap()
                    .release()
                    .await
                    .unwrap();
            })
        })
    });
    group.finish();
    c.final_summary();

    // 2 and 3.
    let fleets: Vec<serde_json::Value> = [1, 2, 4, 8].iter().map(|&n| fleet_run(&cluster, n, run)).collect();
    let expiry: Vec<serde_json::Value> = ["file", "etcd"].iter().map(|s| expiry_run(&cluster, s, run)).collect();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-extra");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(
        out.join("fleet.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "fleets": fleets, "expiry": expiry })).unwrap(),
    );
}
