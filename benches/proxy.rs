//! The auth-injecting proxy (`token-broker proxy`, a real process) beside
//! nginx's `proxy_pass` and beside no proxy at all, against one loopback
//! upstream in this process.
//!
//! The upstream is a minimal hyper server on its own thread: `POST
//! /v1/chat/completions` answers a small chat-completion JSON
//! (`Content-Length`), or, when the body asks `"stream":true`, an SSE
//! stream of `SSE_EVENTS` events (`Transfer-Encoding: chunked`), all at
//! once or, when the body asks `"pause":true`, the first at once and the
//! others after `PAUSE`. It checks the token cheaply: the `Authorization`
//! and `ChatGPT-Account-Id` headers must equal the simulated provider's
//! issued token and account (a string comparison, no provider on the hot
//! path); anything else is a 401 and is counted.
//!
//! The three routes to it:
//!
//! - direct: the client sends the token and account itself;
//! - ours: `token-broker proxy` with its client key on (the client sends
//!   the key; the proxy checks it, puts the token from its broker on the
//!   request and streams the answer back);
//! - nginx: `proxy_pass` to an `upstream {}` block with `keepalive 64`,
//!   `proxy_http_version 1.1`, `Connection ""`, `proxy_buffering off`; it
//!   checks the same client key (`if ($http_authorization != ...)`) and
//!   sets the same two headers (`proxy_set_header`): the same job. It runs
//!   as a child process (`nginx -c <conf> -g 'daemon off;'`) with a
//!   generated configuration in a temporary folder. When it is missing,
//!   the bench installs Debian's `nginx` package (as root), else says how
//!   and leaves the nginx column out.
//!
//! `token-broker proxy` serves HTTP on one thread (the CLI runs a
//! current-thread tokio runtime; the broker's actor has its own, idle
//! here), so nginx runs `worker_processes 1`: each proxy has at most one
//! core for its requests. `PROXY_BENCH_NGINX_WORKERS=2` changes that.
//!
//! Measured, each beside its baselines in the same run:
//!
//! 1. One request's round trip on one kept-alive connection, JSON and SSE
//!    (criterion), for the three routes.
//! 2. Fixed-duration runs with 64 kept-alive connections at once, the
//!    routes alternating round by round: requests/s, p50/p99 latency, and
//!    the CPU each proxy process spent per request. Added latency =
//!    proxied minus direct. The client is a minimal HTTP/1.1 one on one
//!    tokio thread of this process; client, upstream and proxy share the
//!    machine's cores.
//! 3. Time to the first SSE event (the upstream sends it at once and the
//!    rest after `PAUSE`), one request at a time, the routes interleaved.
//!
//! `cargo bench --bench proxy`. The figures that are not criterion's are
//! printed to stderr and written to `target/bench-extra/proxy.json`.
//!
//! Knobs: `PROXY_BENCH_CLI` (another `token-broker` as ours),
//! `PROXY_BENCH_ALSO` (another one beside it), `PROXY_BENCH_NGINX_WORKERS`,
//! `PROXY_BENCH_ONLY=json|sse`, `PROXY_BENCH_ROUND_MS`, and
//! `PROXY_BENCH_COUNT=N` (only N requests through ours, then stop: with
//! `PROXY_BENCH_CLI` a script that runs `valgrind --tool=callgrind` on the
//! build, two counts give the instructions a request; see BENCHMARKS.md).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, Response, StatusCode};
use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};

const CLI: &str = env!("CARGO_BIN_EXE_token-broker");

/// Tokens live this long: nothing refreshes during the bench.
const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// Connections at once in the throughput runs.
const CONNECTIONS: usize = 64;

/// One throughput round per route and kind; the routes alternate.
const ROUND: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 3;
const WARM_UP: Duration = Duration::from_millis(500);

/// Events of a streamed answer.
const SSE_EVENTS: usize = 16;

/// The pause after the first event in the time-to-first-event runs.
const PAUSE: Duration = Duration::from_millis(20);
const FIRST_EVENT_ROUNDS: usize = 100;

const PATH: &str = "/v1/chat/completions";
const JSON_BODY: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"Say PONG."}],"max_tokens":16}"#;
const SSE_BODY: &str =
    r#"{"model":"bench-model","messages":[{"role":"user","content":"Say PONG."}],"max_tokens":16,"stream":true}"#;
const PAUSE_BODY: &str = r#"{"model":"bench-model","messages":[{"role":"user","content":"Say PONG."}],"max_tokens":16,"stream":true,"pause":true}"#;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764374400,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"PONG"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":2,"total_tokens":14}}"#;
const EVENT: &str = "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"PONG\"}}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";

// ---------------------------------------------------------------------------
// The upstream.

type UpBody = BoxBody<Bytes, Infallible>;

struct UpstreamState {
    /// `Bearer <token>` and the account, as they must arrive.
    bearer: String,
    account: String,
    answered: AtomicU64,
    refused: AtomicU64,
    /// The Linux thread id of its one thread, for its CPU time.
    tid: AtomicU64,
}

struct Upstream {
    addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    /// On its own thread and current-thread runtime, for the bench's life.
    fn start(bearer: String, account: String) -> Upstream {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            bearer,
            account,
            answered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            tid: AtomicU64::new(0),
        });
        let shared = state.clone();
        std::thread::Builder::new()
            .name("upstream".into())
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                shared.tid.store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| answer(shared.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .keep_alive(true)
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
            })
            .unwrap();
        while state.tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        Upstream { addr, state }
    }

    fn cpu(&self) -> Duration {
        let tid = self.state.tid.load(Ordering::SeqCst);
        schedstat(&format!("/proc/self/task/{tid}/schedstat"))
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    let authorized = req.headers().get("authorization").map(|v| v.as_bytes()) == Some(state.bearer.as_bytes())
        && req.headers().get("chatgpt-account-id").map(|v| v.as_bytes()) == Some(state.account.as_bytes());
    let right_place = req.method() == hyper::Method::POST && req.uri().path() == PATH;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let respond = |status: StatusCode, content_type: &'static str, body: UpBody| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert("content-type", hyper::header::HeaderValue::from_static(content_type));
        Ok(response)
    };
    if !right_place {
        return respond(StatusCode::NOT_FOUND, "text/plain", Full::new(Bytes::new()).boxed());
    }
    if !authorized {
        state.refused.fetch_add(1, Ordering::Relaxed);
        let body = Full::new(Bytes::from_static(br#"{"error":{"code":"invalid_api_key"}}"#)).boxed();
        return respond(StatusCode::UNAUTHORIZED, "application/json", body);
    }
    state.answered.fetch_add(1, Ordering::Relaxed);
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    if !has(br#""stream":true"#) {
        return respond(
            StatusCode::OK,
            "application/json",
            Full::new(Bytes::from_static(ANSWER.as_bytes())).boxed(),
        );
    }
    let pause = has(br#""pause":true"#);
    // Event i is sent after the pause when i > 0 and the body asked one.
    let events = futures_util::stream::unfold(0usize, move |i| async move {
        if i > SSE_EVENTS {
            return None;
        }
        if pause && i == 1 {
            tokio::time::sleep(PAUSE).await;
        }
        let data = if i == SSE_EVENTS { DONE } else { EVENT };
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(data.as_bytes()))),
            i + 1,
        ))
    });
    respond(StatusCode::OK, "text/event-stream", StreamBody::new(events).boxed())
}

// ---------------------------------------------------------------------------
// The proxies.

/// A route to the upstream: where the client connects and what it sends
/// as its `Authorization` (and account).
#[derive(Clone)]
struct Route {
    name: &'static str,
    addr: SocketAddr,
    auth_headers: String,
    /// The process serving it (none for direct).
    pid: Option<u32>,
}

impl Route {
    fn request(&self, body: &str) -> Vec<u8> {
        format!(
            "POST {PATH} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: application/json\r\nAccept: */*\r\nUser-Agent: proxy-bench/1\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.auth_headers,
            body.len()
        )
        .into_bytes()
    }

    /// The CPU time its process (every thread of every process of it) has
    /// spent so far.
    fn cpu(&self) -> Duration {
        self.pid.map(tree_cpu).unwrap_or_default()
    }
}

/// A running `token-broker proxy`, killed on drop.
struct Ours {
    child: Child,
    addr: SocketAddr,
    key: String,
}

impl Ours {
    fn start(cli: &str, dir: &Path, upstream: SocketAddr, auth: &Path, token_url: &str) -> Ours {
        let mut child = Command::new(cli)
            .args(["proxy", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(format!("http://{upstream}"))
            .arg("--auth-file")
            .arg(auth)
            .args(["--token-url", token_url])
            .env("XDG_STATE_HOME", dir)
            .env("RUST_LOG", "warn")
            .env_remove("TOKEN_BROKER_CONFIG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
            .spawn()
            .expect("start token-broker proxy");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the proxy did not start: {line:?}\n{}",
                    std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
                )
            });
        let key = std::fs::read_to_string(dir.join("token-broker/client-key"))
            .unwrap()
            .trim()
            .to_owned();
        Ours { child, addr, key }
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A running nginx (master and workers), stopped on drop.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    workers: usize,
    version: String,
    _dir: tempfile::TempDir,
}

/// The nginx binary, installed when missing and this runs as root;
/// `Err` says why there is none.
fn nginx_binary() -> Result<PathBuf, String> {
    let find = || {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from));
        dirs.into_iter().map(|d| d.join("nginx")).find(|p| p.is_file())
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("nginx is not installed and this is not root: install it with \
             `sudo apt-get install -y nginx` and run the bench again"
            .into());
    }
    eprintln!("proxy bench: nginx is missing; installing Debian's package (apt-get install -y nginx)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").stdout(Stdio::null()).status();
        if !install() {
            return Err("`apt-get install -y nginx` failed".into());
        }
    }
    find().ok_or_else(|| "nginx was installed but is not on PATH or in /usr/sbin".into())
}

impl Nginx {
    fn start(binary: &Path, upstream: SocketAddr, key: &str, bearer: &str, account: &str, workers: usize) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
            probe.local_addr().unwrap().port()
        };
        let d = dir.path().display();
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root root;"
        } else {
            ""
        };
        let conf = format!(
            r#"{user}
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    upstream model {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            if ($http_authorization != "Bearer {key}") {{
                return 401 '{{"error":{{"code":"invalid_client_key"}}}}';
            }}
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{bearer}";
            proxy_set_header ChatGPT-Account-Id "{account}";
            proxy_buffering off;
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let version = Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
            .unwrap_or_default();
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen on {addr}: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Until its workers are up.
        while children(child.id()).len() < workers {
            std::thread::sleep(Duration::from_millis(10));
        }
        Nginx {
            child,
            addr,
            workers,
            version,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid (SIGQUIT: a graceful stop,
        // its workers with it).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// CPU time.

/// The first field of a `schedstat` file: time on a CPU, in nanoseconds.
fn schedstat(path: &str) -> Duration {
    let ns = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|f| f.parse::<u64>().ok()))
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// The CPU time of every thread of process `pid` so far.
fn process_cpu(pid: u32) -> Duration {
    let mut total = Duration::ZERO;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            total += schedstat(&format!("{}/schedstat", task.path().display()));
        }
    }
    total
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The CPU time of process `pid` and its children (nginx's workers).
fn tree_cpu(pid: u32) -> Duration {
    process_cpu(pid) + children(pid).into_iter().map(process_cpu).sum::<Duration>()
}

/// The CPU time of the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

// ---------------------------------------------------------------------------
// A minimal HTTP/1.1 client: the request's bytes as they are; the answer
// read to its Content-Length or its last chunk.

/// Where an answer stands.
#[derive(Default)]
struct Answer {
    /// The end of the head, once it is in.
    head_end: Option<usize>,
    /// The body's length, or `None` for chunked.
    length: Option<usize>,
    /// Chunked: where the next chunk's size line starts.
    next_chunk: usize,
    /// Where the first SSE event (a blank line) ends, once in.
    first_event: Option<usize>,
}

impl Answer {
    /// Whether `buf` (everything read so far) holds the whole answer;
    /// panics unless it is a 200.
    fn complete(&mut self, buf: &[u8]) -> bool {
        let head_end = match self.head_end {
            Some(h) => h,
            None => {
                let Some(h) = find(buf, b"\r\n\r\n") else { return false };
                let head_end = h + 4;
                let head = std::str::from_utf8(&buf[..head_end]).expect("an ASCII head");
                assert!(head.starts_with("HTTP/1.1 200 "), "not a 200: {head}");
                let field = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                self.length = field("content-length").map(|v| v.parse().unwrap());
                if self.length.is_none() {
                    assert!(
                        field("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")),
                        "neither Content-Length nor chunked: {head}"
                    );
                }
                self.head_end = Some(head_end);
                self.next_chunk = head_end;
                head_end
            }
        };
        if self.first_event.is_none() {
            self.first_event = find(&buf[head_end..], b"\n\n").map(|i| head_end + i + 2);
        }
        if let Some(length) = self.length {
            assert!(buf.len() <= head_end + length, "an answer with more than asked");
            return buf.len() == head_end + length;
        }
        loop {
            let Some(line) = find(&buf[self.next_chunk..], b"\r\n") else {
                return false;
            };
            let size_text = std::str::from_utf8(&buf[self.next_chunk..self.next_chunk + line]).unwrap();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            let data = self.next_chunk + line + 2;
            if size == 0 {
                // No trailers: the last chunk ends with an empty line.
                if buf.len() < data + 2 {
                    return false;
                }
                assert_eq!(buf.len(), data + 2, "an answer with more than asked");
                return true;
            }
            if buf.len() < data + size + 2 {
                return false;
            }
            self.next_chunk = data + size + 2;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One exchange on a blocking stream; returns when the answer is whole,
/// with the time its first SSE event arrived.
fn exchange(stream: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Option<Instant> {
    stream.write_all(request).unwrap();
    buf.clear();
    let mut answer = Answer::default();
    let mut first = None;
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let whole = answer.complete(buf);
        if first.is_none() && answer.first_event.is_some() {
            first = Some(Instant::now());
        }
        if whole {
            return first;
        }
    }
}

/// One exchange on a tokio stream (readiness and `try_*`).
async fn exchange_async(stream: &tokio::net::TcpStream, request: &[u8], buf: &mut Vec<u8>) {
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
    let mut answer = Answer::default();
    let mut chunk = [0u8; 8192];
    loop {
        stream.readable().await.unwrap();
        match stream.try_read(&mut chunk) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("read: {e}"),
        }
        if answer.complete(buf) {
            return;
        }
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream
}

// ---------------------------------------------------------------------------
// 2. Throughput and latency with 64 connections.

#[derive(Default)]
struct Run {
    requests: u64,
    seconds: f64,
    /// Every request's round trip, in nanoseconds.
    latencies: Vec<u64>,
    /// CPU time of the proxy's process(es) within the measured window.
    proxy_cpu: Duration,
    /// CPU time of the upstream's thread within the window.
    upstream_cpu: Duration,
    /// CPU time of the client's (one) thread within the window.
    client_cpu: Duration,
}

/// `CONNECTIONS` kept-alive connections sending `body` back to back for
/// `warm_up + measure`; counts only what ends within the measured window.
fn load(
    rt: &tokio::runtime::Runtime,
    route: &Route,
    upstream: &Upstream,
    body: &str,
    warm_up: Duration,
    measure: Duration,
) -> Run {
    rt.block_on(async {
        let request: Arc<[u8]> = route.request(body).into();
        let begin = Instant::now() + warm_up;
        let end = begin + measure;
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let stream = tokio::net::TcpStream::connect(route.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let request = request.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut latencies = Vec::with_capacity(1 << 16);
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    exchange_async(&stream, &request, &mut buf).await;
                    let done = Instant::now();
                    if t >= begin && done <= end {
                        latencies.push((done - t).as_nanos() as u64);
                    }
                }
                latencies
            }));
        }
        // On the client's own thread (a current-thread runtime).
        tokio::time::sleep_until(begin.into()).await;
        let (p0, u0, c0) = (route.cpu(), upstream.cpu(), thread_cpu());
        tokio::time::sleep_until(end.into()).await;
        let (p1, u1, c1) = (route.cpu(), upstream.cpu(), thread_cpu());
        let mut run = Run {
            seconds: measure.as_secs_f64(),
            proxy_cpu: p1 - p0,
            upstream_cpu: u1 - u0,
            client_cpu: c1 - c0,
            ..Run::default()
        };
        for task in tasks {
            run.latencies.extend(task.await.unwrap());
        }
        run.requests = run.latencies.len() as u64;
        run
    })
}

/// `count` requests of `body` (spread over `CONNECTIONS` kept-alive
/// connections) through `route`; the CPU its process spent meanwhile.
fn counted(route: &Route, body: &str, count: usize) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let request: Arc<[u8]> = route.request(body).into();
        let mut streams = Vec::new();
        for _ in 0..CONNECTIONS {
            let stream = tokio::net::TcpStream::connect(route.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            streams.push(stream);
        }
        let before = route.cpu();
        let tasks: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, stream)| {
                let request = request.clone();
                // The first `count % CONNECTIONS` connections send one more.
                let n = count / CONNECTIONS + usize::from(i < count % CONNECTIONS);
                tokio::spawn(async move {
                    let mut buf = Vec::with_capacity(4096);
                    for _ in 0..n {
                        exchange_async(&stream, &request, &mut buf).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        route.cpu() - before
    })
}

/// `ROUND`, or `PROXY_BENCH_ROUND_MS` (longer rounds for profiling).
fn round_length() -> Duration {
    std::env::var("PROXY_BENCH_ROUND_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(ROUND)
}

fn merge(runs: Vec<Run>) -> Run {
    let mut all = Run::default();
    for r in runs {
        all.requests += r.requests;
        all.seconds += r.seconds;
        all.latencies.extend(r.latencies);
        all.proxy_cpu += r.proxy_cpu;
        all.upstream_cpu += r.upstream_cpu;
        all.client_cpu += r.client_cpu;
    }
    all.latencies.sort_unstable();
    all
}

fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

fn summary(run: &Run) -> serde_json::Value {
    let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / run.requests as f64;
    serde_json::json!({
        "requests": run.requests,
        "seconds": run.seconds,
        "requests_per_s": run.requests as f64 / run.seconds,
        "latency_us_p50": percentile_us(&run.latencies, 0.50),
        "latency_us_p99": percentile_us(&run.latencies, 0.99),
        "latency_us_max": run.latencies.last().map(|&n| n as f64 / 1000.0),
        "proxy_cpu_us_per_request": per_request(run.proxy_cpu),
        "upstream_cpu_us_per_request": per_request(run.upstream_cpu),
        "client_cpu_us_per_request": per_request(run.client_cpu),
    })
}

/// The routes in rounds, each round in a rotated order; per route, the
/// merged summary and the added latency (minus direct, the first route).
fn throughput(routes: &[Route], upstream: &Upstream, body: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runs: Vec<Vec<Run>> = routes.iter().map(|_| Vec::new()).collect();
    for round in 0..ROUNDS {
        for k in 0..routes.len() {
            let i = (round + k) % routes.len();
            runs[i].push(load(&rt, &routes[i], upstream, body, WARM_UP, round_length()));
        }
    }
    let merged: Vec<Run> = runs.into_iter().map(merge).collect();
    let mut report = serde_json::Map::new();
    report.insert("connections".into(), CONNECTIONS.into());
    report.insert("rounds_per_route".into(), ROUNDS.into());
    let direct = &merged[0].latencies;
    for (route, run) in routes.iter().zip(&merged) {
        let mut s = summary(run);
        let added = |q: f64| percentile_us(&run.latencies, q) - percentile_us(direct, q);
        s["added_latency_us_p50"] = added(0.50).into();
        s["added_latency_us_p99"] = added(0.99).into();
        report.insert(route.name.into(), s);
    }
    serde_json::Value::Object(report)
}

// ---------------------------------------------------------------------------
// 3. Time to the first SSE event.

/// `FIRST_EVENT_ROUNDS` rounds, one paused SSE request per route each on
/// its kept-alive connection, in rotated order: percentiles of the time
/// to the first event and to the whole answer, in µs.
fn first_event(routes: &[Route]) -> serde_json::Value {
    let mut streams: Vec<TcpStream> = routes.iter().map(|r| connect(r.addr)).collect();
    let requests: Vec<Vec<u8>> = routes.iter().map(|r| r.request(PAUSE_BODY)).collect();
    let mut buf = Vec::with_capacity(4096);
    let mut first: Vec<Vec<u64>> = routes.iter().map(|_| Vec::new()).collect();
    let mut whole: Vec<Vec<u64>> = routes.iter().map(|_| Vec::new()).collect();
    for round in 0..FIRST_EVENT_ROUNDS {
        for k in 0..routes.len() {
            let i = (round + k) % routes.len();
            let t = Instant::now();
            let at = exchange(&mut streams[i], &requests[i], &mut buf).expect("an event");
            first[i].push((at - t).as_nanos() as u64);
            whole[i].push(t.elapsed().as_nanos() as u64);
        }
    }
    let mut report = serde_json::Map::new();
    report.insert("rounds".into(), FIRST_EVENT_ROUNDS.into());
    report.insert(
        "pause_after_first_event_ms".into(),
        (PAUSE.as_secs_f64() * 1000.0).into(),
    );
    report.insert("events".into(), (SSE_EVENTS + 1).into());
    for (i, route) in routes.iter().enumerate() {
        first[i].sort_unstable();
        whole[i].sort_unstable();
        report.insert(
            route.name.into(),
            serde_json::json!({
                "first_event_us_p50": percentile_us(&first[i], 0.5),
                "first_event_us_p90": percentile_us(&first[i], 0.9),
                "first_event_us_p99": percentile_us(&first[i], 0.99),
                "whole_answer_ms_p50": percentile_us(&whole[i], 0.5) / 1000.0,
            }),
        );
    }
    serde_json::Value::Object(report)
}

// ---------------------------------------------------------------------------

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    // `PROXY_BENCH_CLI=/path/to/token-broker` measures another build.
    let cli = std::env::var("PROXY_BENCH_CLI").unwrap_or_else(|_| CLI.to_owned());
    let sim = ProviderServer::start(SimConfig {
        access_lifetime: LIFETIME,
        ..SimConfig::default()
    })
    .unwrap();
    let issued = sim.sign_in_as("acct-proxy-bench", LIFETIME.as_secs_f64());
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
    let bearer = format!("Bearer {}", issued.access_token);
    let upstream = Upstream::start(bearer.clone(), issued.account_id.clone());
    let ours = Ours::start(&cli, dir.path(), upstream.addr, &auth, &sim.token_url());
    // `PROXY_BENCH_ALSO=/path/to/another/token-broker`: that build too, as
    // the route `ours_also` (before and after a change, interleaved).
    let also_dir = tempfile::tempdir().unwrap();
    let also = std::env::var("PROXY_BENCH_ALSO")
        .ok()
        .map(|other| Ours::start(&other, also_dir.path(), upstream.addr, &auth, &sim.token_url()));

    let workers: usize = std::env::var("PROXY_BENCH_NGINX_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(1);
    let nginx = match nginx_binary() {
        Ok(binary) => Some(Nginx::start(
            &binary,
            upstream.addr,
            &ours.key,
            &bearer,
            &issued.account_id,
            workers,
        )),
        Err(why) => {
            eprintln!("\n!!! proxy bench: NO NGINX COLUMN: {why}\n");
            None
        }
    };

    let mut routes = vec![
        Route {
            name: "direct",
            addr: upstream.addr,
            auth_headers: format!(
                "Authorization: {bearer}\r\nChatGPT-Account-Id: {}\r\n",
                issued.account_id
            ),
            pid: None,
        },
        Route {
            name: "ours",
            addr: ours.addr,
            auth_headers: format!("Authorization: Bearer {}\r\n", ours.key),
            pid: Some(ours.child.id()),
        },
    ];
    if let Some(also) = &also {
        routes.push(Route {
            name: "ours_also",
            addr: also.addr,
            auth_headers: format!("Authorization: Bearer {}\r\n", also.key),
            pid: Some(also.child.id()),
        });
    }
    if let Some(nginx) = &nginx {
        routes.push(Route {
            name: "nginx",
            addr: nginx.addr,
            auth_headers: format!("Authorization: Bearer {}\r\n", ours.key),
            pid: Some(nginx.child.id()),
        });
    }
    // Every route answers, and the clients' key is checked by both proxies.
    for route in &routes {
        let mut buf = Vec::new();
        for body in [JSON_BODY, SSE_BODY] {
            exchange(&mut connect(route.addr), &route.request(body), &mut buf);
        }
        if route.pid.is_some() {
            let mut stream = connect(route.addr);
            let wrong = Route {
                auth_headers: "Authorization: Bearer wrong-key\r\n".into(),
                ..route.clone()
            };
            stream.write_all(&wrong.request(JSON_BODY)).unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 401", "{} let a wrong key through", route.name);
        }
    }

    // `PROXY_BENCH_COUNT=N`: only N requests through ours (JSON, or SSE
    // with `PROXY_BENCH_ONLY=sse`) on the 64 connections, then stop: for
    // instruction counts with `PROXY_BENCH_CLI` a wrapper that runs
    // `valgrind --tool=callgrind` (two counts, their difference over the
    // difference of N is the cost of a request without the start).
    if let Some(count) = std::env::var("PROXY_BENCH_COUNT").ok().and_then(|n| n.parse().ok()) {
        let body = match std::env::var("PROXY_BENCH_ONLY").as_deref() {
            Ok("sse") => SSE_BODY,
            _ => JSON_BODY,
        };
        let cpu = counted(&routes[1], body, count);
        eprintln!(
            "proxy count: {count} requests through ours, its CPU {:.1} µs a request",
            cpu.as_secs_f64() * 1e6 / count.max(1) as f64
        );
        return;
    }

    // 1. One request at a time on a kept-alive connection.
    {
        let mut group = c.benchmark_group("proxy_round_trip");
        group.sample_size(50);
        for (kind, body) in [("json", JSON_BODY), ("sse", SSE_BODY)] {
            for route in &routes {
                let mut stream = connect(route.addr);
                let request = route.request(body);
                let mut buf = Vec::with_capacity(4096);
                group.bench_function(format!("{kind} {}", route.name), |b| {
                    b.iter(|| exchange(&mut stream, &request, &mut buf))
                });
            }
        }
        group.finish();
    }
    c.final_summary();

    // Skip the measurements that are not criterion's when a filter excludes
    // them (`cargo bench --bench proxy -- proxy_round_trip`).
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if !filter.is_empty()
        && !filter
            .iter()
            .any(|f| "proxy_load proxy_first_event".contains(f.as_str()))
    {
        return;
    }

    // 2. 64 connections, JSON answers and SSE streams.
    // For profiling one kind at a time: `PROXY_BENCH_ONLY=json` or `sse`.
    let only = std::env::var("PROXY_BENCH_ONLY").unwrap_or_default();
    if only == "sse" {
        let sse_load = throughput(&routes, &upstream, SSE_BODY);
        eprintln!("proxy load, SSE: {}", serde_json::to_string_pretty(&sse_load).unwrap());
        return;
    }
    let json_load = throughput(&routes, &upstream, JSON_BODY);
    eprintln!(
        "proxy load, JSON: {}",
        serde_json::to_string_pretty(&json_load).unwrap()
    );
    if only == "json" {
        return;
    }
    let sse_load = throughput(&routes, &upstream, SSE_BODY);
    eprintln!("proxy load, SSE: {}", serde_json::to_string_pretty(&sse_load).unwrap());

    // 3. Time to the first event.
    let first = first_event(&routes);
    eprintln!(
        "proxy time to first SSE event: {}",
        serde_json::to_string_pretty(&first).unwrap()
    );

    let refused = upstream.state.refused.load(Ordering::SeqCst);
    assert_eq!(refused, 0, "the upstream refused {refused} requests' tokens");
    assert_eq!(sim.counts().token_requests, 0, "a token was refreshed");

    let ratio = |load: &serde_json::Value, key: &str| match (&load["ours"][key], &load["nginx"][key]) {
        (serde_json::Value::Number(a), serde_json::Value::Number(b)) => {
            serde_json::json!(a.as_f64().unwrap() / b.as_f64().unwrap())
        }
        _ => serde_json::Value::Null,
    };
    let goals = |load: &serde_json::Value| {
        let added_p99 = |name: &str| load[name]["added_latency_us_p99"].as_f64();
        serde_json::json!({
            "ours_per_nginx_throughput": ratio(load, "requests_per_s"),
            "ours_per_nginx_proxy_cpu_per_request": ratio(load, "proxy_cpu_us_per_request"),
            "ours_added_p99_minus_nginx_added_p99_us": match (added_p99("ours"), added_p99("nginx")) {
                (Some(a), Some(b)) => serde_json::json!(a - b),
                _ => serde_json::Value::Null,
            },
        })
    };
    let report = serde_json::json!({
        "nginx": nginx.as_ref().map(|n| serde_json::json!({ "version": n.version, "worker_processes": n.workers })),
        "client": "one tokio thread in the bench process, raw HTTP/1.1, keep-alive",
        "upstream": "hyper on one thread of the bench process",
        "sse_events": SSE_EVENTS + 1,
        "load_json": json_load,
        "load_json_goals": goals(&json_load),
        "load_sse": sse_load,
        "load_sse_goals": goals(&sse_load),
        "first_event": first,
        "upstream_answered": upstream.state.answered.load(Ordering::SeqCst),
    });
    eprintln!("proxy goals, JSON: {}", report["load_json_goals"]);
    eprintln!("proxy goals, SSE: {}", report["load_sse_goals"]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-extra");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("proxy.json"), serde_json::to_string_pretty(&report).unwrap());
}
