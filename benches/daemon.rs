//! The daemon (`token-broker serve`), as real processes on a Unix socket,
//! with the simulated provider behind it (tokens valid for 8 hours: nothing
//! refreshes while this runs).
//!
//! Measured, each beside its baseline in the same run:
//!
//! 1. Start to exit of one client process (criterion):
//!    `token-broker token --profile codex --daemon require` (asks the
//!    daemon) vs `--daemon never` (reads the file itself) vs `cat` of the
//!    same auth.json (the floor); then again outside criterion, the three
//!    interleaved round by round, so that the machine's noisy phases hit
//!    all three alike.
//! 2. One request's round trip on one kept-alive connection and on a new
//!    connection each (criterion; the first again outside criterion, the
//!    two routes interleaved in batches), and
//!    fixed-duration runs with 64 kept-alive connections at once: requests/s
//!    and p50/p99 latency of `GET /v1/profiles/codex/token` vs `GET /healthz`
//!    (a constant answer: the difference is the broker's own work). The
//!    client is a minimal HTTP/1.1 one on tokio in this process, on the same
//!    2 cores as the daemon; the two routes alternate in rounds.
//! 3. Memory of a daemon serving 1,000 profiles (1,000 Codex auth.json
//!    files, one profile each) vs one serving 1: `VmRSS` and `VmHWM` from
//!    `/proc/PID/status` after start and after one token request to every
//!    profile; bytes per profile = the difference / 999.
//!
//! `cargo bench --bench daemon`. The figures that are not criterion's are
//! printed to stderr and written to `target/bench-extra/daemon.json`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};

const CLI: &str = env!("CARGO_BIN_EXE_token-broker");

/// Tokens live this long: nothing refreshes during the bench.
const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// Connections at once in the throughput runs.
const CONNECTIONS: usize = 64;

/// One throughput round per route; the routes alternate.
const ROUND: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 3;
const WARM_UP: Duration = Duration::from_millis(500);

/// Rounds of the interleaved client-process measurement.
const CLIENT_ROUNDS: usize = 200;

/// Profiles of the large daemon in the memory comparison.
const MANY: usize = 1000;

const TOKEN_PATH: &str = "/v1/profiles/codex/token";
const HEALTHZ_PATH: &str = "/healthz";

/// A running `token-broker serve`, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    /// From spawn to its "listening" line.
    started_in: Duration,
}

impl Daemon {
    fn start(config: &Path, socket: &Path, log: &Path) -> Daemon {
        let started = Instant::now();
        let mut child = Command::new(CLI)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .env_remove("TOKEN_BROKER_CONFIG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start the daemon");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let started_in = started.elapsed();
        assert!(
            first.contains("listening on"),
            "the daemon did not start: {first}{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        Daemon {
            child,
            socket: socket.to_path_buf(),
            started_in,
        }
    }

    /// `VmRSS` and `VmHWM` in bytes, and the number of threads.
    fn memory(&self) -> (u64, u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        (field("VmRSS:") * 1024, field("VmHWM:") * 1024, field("Threads:"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A folder with `profiles` Codex auth.json files (`p{i}/auth.json`), each
/// its own profile (`codex` when there is one, else `p0000`...), and a
/// config serving them on `run/tb.sock`.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    /// The auth.json of the first profile.
    first_auth: PathBuf,
    names: Vec<String>,
}

fn setup(sim: &ProviderServer, profiles: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/tb.sock");
    let mut config = format!("[daemon]\nsocket = {socket:?}\n");
    let mut names = Vec::new();
    for i in 0..profiles {
        let name = if profiles == 1 {
            "codex".to_owned()
        } else {
            format!("p{i:04}")
        };
        let folder = dir.path().join(&name);
        std::fs::create_dir(&folder).unwrap();
        let auth = folder.join("auth.json");
        let issued = sim.sign_in_as(&format!("acct-bench-{i:04}"), LIFETIME.as_secs_f64());
        std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
        config.push_str(&format!(
            "\n[profiles.{name}]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {url:?}\n",
            url = sim.token_url()
        ));
        names.push(name);
    }
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let first_auth = dir.path().join(&names[0]).join("auth.json");
    Setup {
        config: path,
        socket,
        first_auth,
        names,
        dir,
    }
}

impl Setup {
    fn start(&self) -> Daemon {
        Daemon::start(&self.config, &self.socket, &self.dir.path().join("daemon.log"))
    }
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client: the request's bytes as they are, the answer read
// to its Content-Length.

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: token-broker\r\n\r\n").into_bytes()
}

/// The end of the answer's head and its whole length, once `buf` holds
/// the head; panics unless it is a 200 with a Content-Length.
fn answer_length(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).expect("an ASCII head");
    assert!(head.starts_with("HTTP/1.1 200 "), "not a 200: {head}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .expect("a Content-Length");
    Some(head_end + length)
}

/// One exchange on a blocking stream; returns the answer's length.
fn exchange(stream: &mut UnixStream, request: &[u8], buf: &mut Vec<u8>) -> usize {
    stream.write_all(request).unwrap();
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the daemon closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(total) = answer_length(buf) {
            if buf.len() >= total {
                assert_eq!(buf.len(), total, "an answer with more than asked");
                return total;
            }
        }
    }
}

/// The body of one answer on a fresh blocking connection.
fn get_body(socket: &Path, path: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    let mut buf = Vec::new();
    exchange(&mut stream, &request(path), &mut buf);
    let text = String::from_utf8(buf).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// One exchange on a tokio stream (readiness and `try_*`, no io-util).
async fn exchange_async(stream: &tokio::net::UnixStream, request: &[u8], buf: &mut Vec<u8>) {
    let mut written = 0;
    while written < request.len() {
        stream.writable().await.unwrap();
        match stream.try_write(&request[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        stream.readable().await.unwrap();
        match stream.try_read(&mut chunk) {
            Ok(0) => panic!("the daemon closed the connection"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("read: {e}"),
        }
        if let Some(total) = answer_length(buf) {
            if buf.len() >= total {
                assert_eq!(buf.len(), total, "an answer with more than asked");
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 2. Throughput and latency with 64 connections.

#[derive(Default)]
struct Run {
    requests: u64,
    seconds: f64,
    /// Every request's round trip, in nanoseconds.
    latencies: Vec<u64>,
    /// CPU time the daemon's threads spent within the measured window.
    daemon_cpu: Duration,
    /// CPU time of the client's (one) thread within the window.
    client_cpu: Duration,
}

/// The CPU time of every thread of process `pid` so far (the first field
/// of each `/proc/PID/task/TID/schedstat`, in nanoseconds).
fn process_cpu(pid: u32) -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// The CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `CONNECTIONS` kept-alive connections asking `path` back to back for
/// `warm_up + measure`; counts only what ends within the measured window.
fn load(rt: &tokio::runtime::Runtime, daemon: &Daemon, path: &str, warm_up: Duration, measure: Duration) -> Run {
    let (socket, pid) = (daemon.socket.as_path(), daemon.child.id());
    rt.block_on(async {
        let request: &'static [u8] = Box::leak(request(path).into_boxed_slice());
        let begin = Instant::now() + warm_up;
        let end = begin + measure;
        // On the client's own thread (a current-thread runtime).
        let cpu = tokio::spawn(async move {
            tokio::time::sleep_until(begin.into()).await;
            let (d0, c0) = (process_cpu(pid), thread_cpu());
            tokio::time::sleep_until(end.into()).await;
            (process_cpu(pid) - d0, thread_cpu() - c0)
        });
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let mut latencies = Vec::with_capacity(1 << 16);
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    exchange_async(&stream, request, &mut buf).await;
                    let done = Instant::now();
                    if t >= begin && done <= end {
                        latencies.push((done - t).as_nanos() as u64);
                    }
                }
                latencies
            }));
        }
        let mut run = Run {
            seconds: measure.as_secs_f64(),
            ..Run::default()
        };
        for task in tasks {
            run.latencies.extend(task.await.unwrap());
        }
        run.requests = run.latencies.len() as u64;
        (run.daemon_cpu, run.client_cpu) = cpu.await.unwrap();
        run
    })
}

fn merge(runs: Vec<Run>) -> Run {
    let mut all = Run::default();
    for r in runs {
        all.requests += r.requests;
        all.seconds += r.seconds;
        all.latencies.extend(r.latencies);
        all.daemon_cpu += r.daemon_cpu;
        all.client_cpu += r.client_cpu;
    }
    all.latencies.sort_unstable();
    all
}

fn summary(run: &Run) -> serde_json::Value {
    let us = |q: f64| {
        let i = ((run.latencies.len() as f64 * q) as usize).min(run.latencies.len() - 1);
        run.latencies[i] as f64 / 1000.0
    };
    serde_json::json!({
        "requests": run.requests,
        "seconds": run.seconds,
        "requests_per_s": run.requests as f64 / run.seconds,
        "latency_us_p50": us(0.50),
        "latency_us_p99": us(0.99),
        "latency_us_max": run.latencies.last().map(|&n| n as f64 / 1000.0),
        "daemon_cpu_s": run.daemon_cpu.as_secs_f64(),
        "daemon_cpu_us_per_request": run.daemon_cpu.as_secs_f64() * 1e6 / run.requests as f64,
        "client_cpu_s": run.client_cpu.as_secs_f64(),
        "client_cpu_us_per_request": run.client_cpu.as_secs_f64() * 1e6 / run.requests as f64,
    })
}

fn throughput(daemon: &Daemon) -> serde_json::Value {
    // One client thread: the daemon has two workers, on two cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut token, mut healthz) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        token.push(load(&rt, daemon, TOKEN_PATH, WARM_UP, ROUND));
        healthz.push(load(&rt, daemon, HEALTHZ_PATH, WARM_UP, ROUND));
    }
    let (token, healthz) = (summary(&merge(token)), summary(&merge(healthz)));
    let ratio = |key: &str| token[key].as_f64().unwrap() / healthz[key].as_f64().unwrap();
    serde_json::json!({
        "connections": CONNECTIONS,
        "client": "one tokio thread in the bench process, raw HTTP/1.1, keep-alive",
        "rounds_per_route": ROUNDS,
        "token": token,
        "healthz": healthz,
        "token_per_healthz_throughput": ratio("requests_per_s"),
        "token_per_healthz_daemon_cpu_per_request": ratio("daemon_cpu_us_per_request"),
    })
}

// ---------------------------------------------------------------------------
// 3. Memory: 1,000 profiles vs 1.

fn memory(sim: &ProviderServer, profiles: usize) -> serde_json::Value {
    let setup = setup(sim, profiles);
    let daemon = setup.start();
    // Let what starts with the brokers (actors, watcher) settle.
    std::thread::sleep(Duration::from_millis(500));
    let (rss_start, hwm_start, threads_start) = daemon.memory();
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    let mut buf = Vec::new();
    let started = Instant::now();
    for name in &setup.names {
        exchange(&mut stream, &request(&format!("/v1/profiles/{name}/token")), &mut buf);
    }
    let all_asked_in = started.elapsed();
    drop(stream);
    std::thread::sleep(Duration::from_millis(200));
    let (rss_served, hwm_served, threads_served) = daemon.memory();
    serde_json::json!({
        "profiles": profiles,
        "started_in_ms": daemon.started_in.as_secs_f64() * 1000.0,
        "every_profile_asked_once_in_ms": all_asked_in.as_secs_f64() * 1000.0,
        "vm_rss_after_start": rss_start,
        "vm_hwm_after_start": hwm_start,
        "vm_rss_after_one_token_each": rss_served,
        "vm_hwm_after_one_token_each": hwm_served,
        "threads_after_start": threads_start,
        "threads_after_one_token_each": threads_served,
    })
}

fn per_profile(many: &serde_json::Value, one: &serde_json::Value, key: &str) -> f64 {
    let (m, o) = (many[key].as_f64().unwrap(), one[key].as_f64().unwrap());
    (m - o) / (MANY - 1) as f64
}

// ---------------------------------------------------------------------------

fn quiet(cmd: &mut Command) {
    let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap();
    assert!(status.success(), "{cmd:?} failed");
}

fn client(setup: &Setup, mode: &str) -> Command {
    let mut cmd = Command::new(CLI);
    cmd.args(["token", "--profile", "codex", "--daemon", mode, "--config"])
        .arg(&setup.config)
        .env_remove("RUST_LOG")
        .env_remove("TOKEN_BROKER_DAEMON")
        .env_remove("TOKEN_BROKER_CONFIG");
    cmd
}

/// One request's round trip on one kept-alive connection per route, the
/// routes alternating in batches of `BATCH` (the noisy phases hit both
/// alike); the median and fastest batch's time per request, in µs.
fn round_trips_interleaved(socket: &Path) -> serde_json::Value {
    const BATCHES: usize = 30;
    const BATCH: u32 = 500;
    let routes = [("token", TOKEN_PATH), ("healthz", HEALTHZ_PATH)];
    let mut streams: Vec<UnixStream> = routes.iter().map(|_| UnixStream::connect(socket).unwrap()).collect();
    let requests: Vec<Vec<u8>> = routes.iter().map(|(_, path)| request(path)).collect();
    let mut buf = Vec::with_capacity(1024);
    let mut times: [Vec<f64>; 2] = Default::default();
    for batch in 0..BATCHES {
        for k in 0..2 {
            let i = (batch + k) % 2;
            let t = Instant::now();
            for _ in 0..BATCH {
                exchange(&mut streams[i], &requests[i], &mut buf);
            }
            times[i].push(t.elapsed().as_secs_f64() * 1e6 / f64::from(BATCH));
        }
    }
    let mut report = serde_json::Map::new();
    report.insert("batches".into(), BATCHES.into());
    report.insert("requests_per_batch".into(), BATCH.into());
    let mut p50 = [0.0; 2];
    for (i, (name, _)) in routes.iter().enumerate() {
        let t = &mut times[i];
        t.sort_by(f64::total_cmp);
        p50[i] = t[t.len() / 2];
        report.insert(
            (*name).into(),
            serde_json::json!({ "us_median_batch": t[t.len() / 2], "us_fastest_batch": t[0] }),
        );
    }
    report.insert("token_minus_healthz_us".into(), (p50[0] - p50[1]).into());
    report.insert("token_per_healthz".into(), (p50[0] / p50[1]).into());
    serde_json::Value::Object(report)
}

/// `CLIENT_ROUNDS` rounds of the three commands of part 1, each round in
/// a rotated order; start-to-exit percentiles of each, in milliseconds.
fn interleaved(setup: &Setup) -> serde_json::Value {
    let names = ["daemon_require", "daemon_never", "cat"];
    let command = |i: usize| match i {
        0 => client(setup, "require"),
        1 => client(setup, "never"),
        _ => {
            let mut cmd = Command::new("cat");
            cmd.arg(&setup.first_auth);
            cmd
        }
    };
    let mut times: [Vec<Duration>; 3] = Default::default();
    for round in 0..CLIENT_ROUNDS {
        for k in 0..3 {
            let i = (round + k) % 3;
            let mut cmd = command(i);
            let t = Instant::now();
            quiet(&mut cmd);
            times[i].push(t.elapsed());
        }
    }
    let mut report = serde_json::Map::new();
    report.insert("rounds".into(), CLIENT_ROUNDS.into());
    let mut p50 = [0.0; 3];
    for (i, name) in names.iter().enumerate() {
        let t = &mut times[i];
        t.sort();
        let ms = |q: f64| t[((t.len() as f64 * q) as usize).min(t.len() - 1)].as_secs_f64() * 1000.0;
        p50[i] = ms(0.5);
        report.insert(
            (*name).into(),
            serde_json::json!({ "ms_p10": ms(0.1), "ms_p50": ms(0.5), "ms_p90": ms(0.9) }),
        );
    }
    report.insert("require_minus_cat_ms_p50".into(), (p50[0] - p50[2]).into());
    report.insert("never_minus_cat_ms_p50".into(), (p50[1] - p50[2]).into());
    serde_json::Value::Object(report)
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let sim = ProviderServer::start(SimConfig {
        access_lifetime: LIFETIME,
        ..SimConfig::default()
    })
    .unwrap();
    let one = setup(&sim, 1);
    let daemon = one.start();
    let token = get_body(&daemon.socket, TOKEN_PATH);
    assert!(token.contains("\"access_token\""), "{token}");
    // The client agrees with the file.
    let out = client(&one, "require").output().unwrap();
    let direct = client(&one, "never").output().unwrap();
    assert!(out.status.success() && direct.status.success());
    assert_eq!(out.stdout, direct.stdout);

    // 1. One client process, start to exit.
    {
        let mut group = c.benchmark_group("daemon_client");
        group.sample_size(100);
        group.bench_function("token --daemon require (via the daemon)", |b| {
            b.iter(|| quiet(&mut client(&one, "require")))
        });
        group.bench_function("token --daemon never (reads the file)", |b| {
            b.iter(|| quiet(&mut client(&one, "never")))
        });
        group.bench_function("cat auth.json", |b| {
            b.iter(|| quiet(Command::new("cat").arg(&one.first_auth)))
        });
        group.finish();
    }

    // 2a. One request on one kept-alive connection.
    {
        let mut group = c.benchmark_group("daemon_round_trip");
        group.sample_size(50);
        for (name, path) in [("GET token", TOKEN_PATH), ("GET healthz", HEALTHZ_PATH)] {
            let mut stream = UnixStream::connect(&daemon.socket).unwrap();
            let request = request(path);
            let mut buf = Vec::with_capacity(1024);
            group.bench_function(name, |b| b.iter(|| exchange(&mut stream, &request, &mut buf)));
        }
        // What a client process does: one connection per request.
        let request = request(TOKEN_PATH);
        let mut buf = Vec::with_capacity(1024);
        group.bench_function("GET token, new connection", |b| {
            b.iter(|| {
                let mut stream = UnixStream::connect(&daemon.socket).unwrap();
                exchange(&mut stream, &request, &mut buf)
            })
        });
        group.finish();
    }
    c.final_summary();

    // Skip the measurements that are not criterion's when a filter excludes
    // them (`cargo bench --bench daemon -- daemon_client`).
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if !filter.is_empty()
        && !filter
            .iter()
            .any(|f| "daemon_processes daemon_load daemon_memory".contains(f.as_str()))
    {
        return;
    }

    // 1b. The client processes again, interleaved: the machine's noisy
    // phases hit all three alike.
    let processes = interleaved(&one);
    eprintln!(
        "daemon client processes: {}",
        serde_json::to_string_pretty(&processes).unwrap()
    );

    // 2b. One request at a time again, the routes interleaved.
    let round_trips = round_trips_interleaved(&daemon.socket);
    eprintln!(
        "daemon round trips: {}",
        serde_json::to_string_pretty(&round_trips).unwrap()
    );

    // 2c. 64 connections.
    let load = throughput(&daemon);
    eprintln!("daemon load: {}", serde_json::to_string_pretty(&load).unwrap());
    let (rss, hwm, threads) = daemon.memory();
    drop(daemon);

    // 3. Memory.
    let small = memory(&sim, 1);
    let large = memory(&sim, MANY);
    let memory = serde_json::json!({
        "one_profile": small,
        "many_profiles": large,
        "bytes_per_profile_rss_after_start": per_profile(&large, &small, "vm_rss_after_start"),
        "bytes_per_profile_rss_after_one_token_each": per_profile(&large, &small, "vm_rss_after_one_token_each"),
        "bytes_per_profile_hwm_after_one_token_each": per_profile(&large, &small, "vm_hwm_after_one_token_each"),
    });
    eprintln!("daemon memory: {}", serde_json::to_string_pretty(&memory).unwrap());
    assert_eq!(sim.counts().token_requests, 0, "a token was refreshed");

    let report = serde_json::json!({
        "client_processes_interleaved": processes,
        "round_trips_interleaved": round_trips,
        "load": load,
        "one_profile_daemon_after_load": { "vm_rss": rss, "vm_hwm": hwm, "threads": threads },
        "memory": memory,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-extra");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("daemon.json"), serde_json::to_string_pretty(&report).unwrap());
}
