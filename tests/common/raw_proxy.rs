//! A real `token-broker proxy` or `serve` process for the proxy's hostile
//! reviews, a raw HTTP/1.1 client and a raw upstream: what tests/proxy_review.rs and
//! tests/proxy_pool_review.rs share.
//!
//! Mount it with `#[path = "common/raw_proxy.rs"] mod raw_proxy;` next to
//! `mod common;`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::common::*;
use token_broker::sim::{codex_auth_json, Issued, ProviderServer, SimConfig};

// ---------------------------------------------------------------------
// The proxy processes.

/// A running `token-broker proxy` (or `serve`), killed on drop.
pub struct Running {
    pub child: Child,
    /// The proxies' addresses, in the order printed.
    pub addrs: Vec<String>,
    pub key: Option<String>,
    pub stderr: PathBuf,
}

impl Running {
    pub fn addr(&self) -> &str {
        &self.addrs[0]
    }
    pub fn key(&self) -> &str {
        self.key.as_deref().expect("a client key")
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the `... on http://ADDR ...` lines until the key line.
pub fn started(mut child: Child, state: &Path, stderr: PathBuf, lines_wanted: usize) -> Running {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs = Vec::new();
    while addrs.len() < lines_wanted {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!(
                "it stopped before naming its address: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        if let Some(rest) = line.split("http://").nth(1) {
            addrs.push(rest.split_whitespace().next().unwrap().trim_end_matches(';').to_owned());
        }
    }
    // Keep the pipe drained.
    std::thread::spawn(move || for _ in lines {});
    let key = std::fs::read_to_string(state.join("token-broker/client-key"))
        .ok()
        .map(|k| k.trim().to_owned());
    Running {
        child,
        addrs,
        key,
        stderr,
    }
}

/// A signed-in credential for an hour.
pub struct Cred {
    pub sim: Arc<ProviderServer>,
    pub dir: tempfile::TempDir,
    pub auth: PathBuf,
    pub issued: Issued,
}

impl Cred {
    pub fn new() -> Cred {
        Cred::with_lifetime(3600.0)
    }

    pub fn with_lifetime(lifetime: f64) -> Cred {
        let sim = Arc::new(ProviderServer::start(SimConfig::default()).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let issued = sim.sign_in(lifetime);
        let auth = dir.path().join("auth.json");
        std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
        Cred { sim, dir, auth, issued }
    }

    pub fn current_token(&self) -> String {
        read_json(&self.auth)["tokens"]["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `token-broker proxy --upstream upstream` with `args`, env `env`.
    pub fn proxy(&self, upstream: &str, args: &[&str], env: &[(&str, &str)]) -> Running {
        let stderr = self.dir.path().join(format!("proxy-{}.stderr", rand_suffix()));
        let child = cli_command()
            .arg("proxy")
            .args(["--listen", "127.0.0.1:0", "--upstream", upstream, "--auth-file"])
            .arg(&self.auth)
            .args(["--token-url", &self.sim.token_url()])
            .args(args)
            .env("XDG_STATE_HOME", self.dir.path())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        started(child, self.dir.path(), stderr, 1)
    }

    /// The daemon's configuration with this profile as `codex` and
    /// `proxies` (TOML tables, each `[proxies.NAME]` with its settings).
    pub fn config(&self, proxies: &str) -> (PathBuf, PathBuf) {
        let socket = self.dir.path().join("run/tb.sock");
        let config = self.dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {:?}\n\
                 token_url = {:?}\nwinner_wait = \"300ms\"\ntimeout = \"10s\"\n\n{proxies}",
                self.auth,
                self.sim.token_url()
            ),
        )
        .unwrap();
        (config, socket)
    }

    /// `token-broker serve` with `proxies`, `n` of them.
    pub fn serve(&self, proxies: &str, n: usize) -> Running {
        let (config, _) = self.config(proxies);
        let stderr = self.dir.path().join(format!("serve-{}.stderr", rand_suffix()));
        let child = cli_command()
            .args(["serve", "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", self.dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        started(child, self.dir.path(), stderr, n)
    }
}

pub fn rand_suffix() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

// ---------------------------------------------------------------------
// A raw client.

/// A parsed answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// Reads one answer from `reader` (`head_only` for a HEAD or a status
/// without a body).
pub fn read_answer(reader: &mut BufReader<TcpStream>, head_only: bool) -> Option<Answer> {
    let mut head = String::new();
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).ok()? == 0 {
            return None;
        }
        if l == "\r\n" || l == "\n" {
            if head.is_empty() {
                continue;
            }
            break;
        }
        head.push_str(&l);
    }
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let find = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let mut body = Vec::new();
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
    } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                reader.read_line(&mut end).ok()?;
                break;
            }
            let mut c = vec![0; n + 2];
            reader.read_exact(&mut c).ok()?;
            body.extend_from_slice(&c[..n]);
        }
    } else if let Some(n) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body = vec![0; n];
        reader.read_exact(&mut body).ok()?;
    } else {
        reader.read_to_end(&mut body).ok()?;
    }
    Some(Answer { status, head, body })
}

pub fn connect(addr: &str) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

/// Sends `raw` on a new connection and reads one answer.
pub fn send_raw(addr: &str, raw: &[u8]) -> Option<Answer> {
    let (mut stream, mut reader) = connect(addr);
    stream.write_all(raw).unwrap();
    read_answer(&mut reader, raw.starts_with(b"HEAD "))
}

pub fn get(addr: &str, key: &str, target: &str) -> Option<Answer> {
    send_raw(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
}

// ---------------------------------------------------------------------
// A raw upstream: records every request as it arrived, answers through a
// handler (and, with `start_with`, may answer from a request's head alone
// or close the connection after an answer).

/// One request as the upstream read it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request line.
    pub line: String,
    /// The header lines, as sent.
    pub headers: Vec<(String, String)>,
    /// The body, decoded from its framing.
    pub body: Vec<u8>,
}

impl Seen {
    pub fn method(&self) -> &str {
        self.line.split(' ').next().unwrap_or("")
    }
    pub fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn head_text(&self) -> String {
        let mut s = self.line.clone();
        for (n, v) in &self.headers {
            s.push_str(&format!("\n{n}: {v}"));
        }
        s
    }
}

/// What a handler says about the connection after its answer.
pub enum Then {
    KeepAlive,
    Close,
}

type Handler = dyn Fn(&Seen, &mut TcpStream) -> Then + Send + Sync;
type Early = dyn Fn(&str, &mut TcpStream) -> bool + Send + Sync;

pub struct RawUpstream {
    pub addr: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// The connections it accepted.
    pub connections: Arc<AtomicU64>,
}

impl RawUpstream {
    /// Answers every request with `handler`, keeping the connection.
    pub fn start(handler: impl Fn(&Seen, &mut TcpStream) + Send + Sync + 'static) -> RawUpstream {
        RawUpstream::start_with(no_early, move |r, s| {
            handler(r, s);
            Then::KeepAlive
        })
    }

    /// `early` may answer a request from its head alone, before its body
    /// is read (given the target and the socket): then it returns true and
    /// the connection is left. Else `handler` answers it and says whether
    /// the connection stays.
    pub fn start_with(
        early: impl Fn(&str, &mut TcpStream) -> bool + Send + Sync + 'static,
        handler: impl Fn(&Seen, &mut TcpStream) -> Then + Send + Sync + 'static,
    ) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let early: Arc<Early> = Arc::new(early);
        {
            let (seen, connections) = (seen.clone(), connections.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (seen, handler, early) = (seen.clone(), handler.clone(), early.clone());
                    std::thread::spawn(move || serve_raw(stream, &seen, &*early, &*handler));
                }
            });
        }
        RawUpstream {
            addr,
            seen,
            connections,
        }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The request targets it read, in order.
    pub fn targets(&self) -> Vec<String> {
        self.seen().iter().map(|s| s.target().to_owned()).collect()
    }
}

/// Reads requests from one connection (keep-alive) and answers each.
fn serve_raw(stream: TcpStream, seen: &Mutex<Vec<Seen>>, early: &Early, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').unwrap_or((h, ""));
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if early(line.split(' ').nth(1).unwrap_or(""), &mut writer) {
            return;
        }
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap_or(0);
                if n == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let mut t = String::new();
                        if reader.read_line(&mut t).unwrap_or(0) == 0 || t.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = vec![0; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let mut b = vec![0; n];
            if reader.read_exact(&mut b).is_err() {
                return;
            }
            body = b;
        }
        let request = Seen { line, headers, body };
        seen.lock().unwrap().push(request.clone());
        let then = handler(&request, &mut writer);
        let _ = writer.flush();
        if let Then::Close = then {
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// An `early` that never answers early.
pub fn no_early(_: &str, _: &mut TcpStream) -> bool {
    false
}

/// A 200 with `body`, keep-alive.
pub fn ok(stream: &mut TcpStream, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}
