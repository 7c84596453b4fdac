//! The auth-injecting proxy with real processes: `token-broker proxy` and
//! `token-broker serve` with `[proxies]`, in front of loopback APIs that
//! check every bearer token against the simulated provider, with the
//! official OpenAI Python SDK as the client (see tests/common/openai_sdk.rs;
//! `.ci/install-openai-sdk` installs it).
//!
//! No assertion here is about speed: streaming is checked causally (a
//! chunk reaches the client before the upstream sends the next one).

#[path = "common/chat_api.rs"]
mod chat_api;
mod common;
#[path = "common/model_api.rs"]
mod model_api;
#[path = "common/openai_sdk.rs"]
mod openai_sdk;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chat_api::{ChatApi, StreamEnd};
use common::*;
use model_api::ModelApi;
use openai_sdk::SdkRun;
use serde_json::Value;
use token_broker::credentials::Secret;
use token_broker::sim::{codex_auth_json, Issued, ProviderServer, SimConfig};

/// A running `token-broker proxy`.
struct ProxyProcess {
    child: Child,
    addr: String,
    key: Option<String>,
}

impl ProxyProcess {
    fn start(args: &[&str], state: &std::path::Path, env: &[(&str, &str)]) -> ProxyProcess {
        let mut child = cli_command()
            .arg("proxy")
            .args(args)
            .env("XDG_STATE_HOME", state)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        let key = std::fs::read_to_string(state.join("token-broker/client-key"))
            .ok()
            .map(|k| k.trim().to_owned());
        ProxyProcess { child, addr, key }
    }
}

impl ProxyProcess {
    /// The OpenAI base URL through the proxy.
    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn key(&self) -> &str {
        self.key.as_deref().expect("a client key was made")
    }

    /// `(VmRSS, VmHWM)` of the proxy process, in bytes: its resident
    /// memory now and at its peak.
    fn memory(&self) -> (u64, u64) {
        proc_memory(self.child.id())
    }
}

/// `(VmRSS, VmHWM)` of process `pid`, in bytes.
fn proc_memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request over a new connection: status and body.
fn request(addr: &str, method: &str, path: &str, bearer: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_standalone_proxy_puts_the_token_on_requests_and_refuses_clients_without_the_key() {
    let sim = Arc::new(ProviderServer::start(SimConfig::default()).unwrap());
    let api = ModelApi::start(sim.clone());
    let dir = tempfile::tempdir().unwrap();
    let issued = sim.sign_in(3600.0);
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
    let proxy = ProxyProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &api.origin(),
            "--auth-file",
            auth.to_str().unwrap(),
            "--token-url",
            &sim.token_url(),
        ],
        dir.path(),
        &[],
    );
    let key = proxy.key.clone().expect("a client key was made");
    assert_eq!(key.len(), 43, "32 bytes in base64url");
    assert_eq!(mode(&dir.path().join("token-broker/client-key")), 0o600);

    let (status, body) = request(&proxy.addr, "POST", "/v1/responses", Some(&key), b"{}");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(model_api::ANSWER), "{body}");
    assert_eq!(api.counts().answered, 1);

    let (status, body) = request(&proxy.addr, "POST", "/v1/responses", Some("wrong"), b"{}");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_client_key"), "{body}");
    let (status, _) = request(&proxy.addr, "POST", "/v1/responses", None, b"{}");
    assert_eq!(status, 401);
    assert_eq!(api.counts().responses, 1, "refused clients never reach the upstream");
    assert_eq!(sim.counts().token_requests, 0);
}

/// An upstream that answers 401 to everything (a wrong URL or account):
/// the proxy refreshes once for it, then passes its 401s through without
/// refreshing again for a minute, instead of one refresh per request.
#[test]
fn an_upstream_that_refuses_every_token_costs_one_refresh_not_one_per_request() {
    let sim = Arc::new(ProviderServer::start(SimConfig::default()).unwrap());
    let refusing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", refusing.local_addr().unwrap());
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let seen = seen.clone();
        std::thread::spawn(move || {
            for stream in refusing.incoming() {
                let Ok(mut stream) = stream else { continue };
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                let body = r#"{"error":{"message":"nope","type":"invalid_request_error","code":"invalid_api_key"}}"#;
                let _ = write!(
                    stream,
                    "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&sim.sign_in(3600.0))).unwrap();
    let proxy = ProxyProcess::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--no-client-key",
            "--auth-file",
            auth.to_str().unwrap(),
            "--token-url",
            &sim.token_url(),
        ],
        dir.path(),
        &[],
    );
    for _ in 0..6 {
        let (status, body) = request(&proxy.addr, "POST", "/v1/responses", None, b"{}");
        assert_eq!(status, 401, "{body}");
        assert!(
            body.contains("invalid_api_key"),
            "the upstream's own 401 reaches the client: {body}"
        );
    }
    assert_eq!(
        sim.counts().token_requests,
        1,
        "one refresh for the first 401, none for the same refusal of the new token"
    );
    // The first request was sent twice (old token, then the new one); the
    // other five once each.
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 7);
}

/// A simulated provider, the chat API in front of it, a Codex auth.json
/// signed in on it, and a `token-broker proxy` of that file to the API.
struct Setup {
    sim: Arc<ProviderServer>,
    api: ChatApi,
    dir: tempfile::TempDir,
    auth: PathBuf,
    issued: Issued,
    proxy: ProxyProcess,
    /// The OpenAI base URL through the proxy.
    base_url: String,
}

impl Setup {
    /// With an hour-long token and the proxy's defaults, plus `args`.
    fn new(args: &[&str]) -> Setup {
        let sim = Arc::new(ProviderServer::start(SimConfig::default()).unwrap());
        Setup::with(sim, 3600.0, args)
    }

    /// With `sim`, signed in for `lifetime` seconds.
    fn with(sim: Arc<ProviderServer>, lifetime: f64, args: &[&str]) -> Setup {
        let api = ChatApi::start(sim.clone());
        let dir = tempfile::tempdir().unwrap();
        let issued = sim.sign_in(lifetime);
        let auth = dir.path().join("auth.json");
        std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
        let proxy = start_proxy(&sim, &api, &auth, dir.path(), args);
        Setup {
            base_url: proxy.base_url(),
            sim,
            api,
            dir,
            auth,
            issued,
            proxy,
        }
    }

    /// The access token in the credentials file now.
    fn current_token(&self) -> String {
        read_json(&self.auth)["tokens"]["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// `command --base-url=<proxy> --api-key=<key>` and `args`, for the SDK
    /// client.
    fn sdk_args(&self, command: &str, args: &[&str]) -> Vec<String> {
        sdk_args(command, &self.base_url, Some(self.proxy.key()), args)
    }
}

/// `command --base-url=URL [--api-key=KEY] args` (with `=`: a key may
/// start with a dash).
fn sdk_args(command: &str, base_url: &str, key: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut all = vec![command.to_owned(), format!("--base-url={base_url}")];
    all.extend(key.map(|k| format!("--api-key={k}")));
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

/// `token-broker proxy` of the Codex file `auth` to `api`, its client key
/// under `state`.
fn start_proxy(sim: &ProviderServer, api: &ChatApi, auth: &Path, state: &Path, args: &[&str]) -> ProxyProcess {
    let mut all = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--upstream".to_owned(),
        api.origin(),
        "--auth-file".to_owned(),
        auth.to_str().unwrap().to_owned(),
        "--token-url".to_owned(),
        sim.token_url(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    ProxyProcess::start(&all, state, &[])
}

/// The answer the chat API streams, whole.
fn answer() -> String {
    chat_api::ANSWER.concat()
}

fn fingerprint(token: &str) -> String {
    Secret::new(token).fingerprint()
}

/// Checks a streamed answer the SDK got (`stream` command) against the
/// chat API's record of it: every chunk arrived, in order, each before the
/// API had even sent the next one.
fn assert_streamed_chunk_by_chunk(run: &SdkRun, api: &ChatApi) {
    run.assert_success();
    assert_eq!(run.expect_event("done")["content"], answer(), "{}", run.report());
    let chunks = run.expect_event("chunks")["chunks"].as_array().unwrap().clone();
    let id = chunks[0]["id"].as_str().unwrap();
    let record = api
        .stream(id)
        .unwrap_or_else(|| panic!("the chat API never streamed {id}"));
    assert_eq!(record.end, Some(StreamEnd::Completed));
    // The role, one chunk a piece, the finish reason, the usage; then [DONE].
    let expected = chat_api::ANSWER.len() + 3;
    assert_eq!(chunks.len(), expected, "{}", run.report());
    assert_eq!(record.sent_ns.len(), expected + 1, "{record:?}");
    assert!(chunks.iter().all(|c| c["id"] == id));
    assert_eq!(chunks.last().unwrap()["usage"], true, "the usage chunk comes last");
    for (i, chunk) in chunks.iter().enumerate() {
        let arrived = chunk["at_ns"].as_u64().unwrap();
        assert!(
            arrived >= record.sent_ns[i],
            "chunk {i} arrived before it was sent: the clocks are not comparable"
        );
        assert!(
            arrived < record.sent_ns[i + 1],
            "chunk {i} reached the SDK {:.1} ms after the upstream sent chunk {}: the proxy held it back \
             (sent at {:?}, arrived at {:?})",
            (arrived - record.sent_ns[i + 1]) as f64 / 1e6,
            i + 1,
            record.sent_ns,
            chunks.iter().map(|c| c["at_ns"].as_u64().unwrap()).collect::<Vec<_>>(),
        );
    }
}

#[test]
fn an_sdk_stream_through_the_proxy_arrives_chunk_by_chunk() {
    let Some(sdk) = openai_sdk::require("an_sdk_stream_through_the_proxy_arrives_chunk_by_chunk") else {
        return;
    };
    let s = Setup::new(&[]);
    s.api.set_pause(Duration::from_millis(250));
    let run = sdk.run(&s.sdk_args("stream", &[]));
    assert_streamed_chunk_by_chunk(&run, &s.api);
    let counts = s.api.counts();
    assert_eq!((counts.answered, counts.unauthorized), (1, 0), "{counts:?}");
    // The profile's token and account went up, not the client key.
    assert_eq!(
        s.api.bearers(),
        vec![("/v1/chat/completions".to_owned(), fingerprint(&s.issued.access_token))]
    );
    let headers = s.api.last_headers().unwrap();
    assert_eq!(headers["chatgpt-account-id"], s.issued.account_id.as_str());
    assert_eq!(s.sim.counts().token_requests, 0);

    // Not streamed, the same.
    let run = sdk.run(&s.sdk_args("chat", &[]));
    run.assert_success();
    assert_eq!(run.expect_event("done")["content"], answer());
}

#[test]
fn an_upstream_401_is_refreshed_once_and_retried_and_the_sdk_call_succeeds() {
    let Some(sdk) = openai_sdk::require("an_upstream_401_is_refreshed_once_and_retried_and_the_sdk_call_succeeds")
    else {
        return;
    };
    let s = Setup::new(&[]);
    // The provider no longer takes the token, whose exp is an hour ahead:
    // only the upstream's 401 can tell the proxy.
    s.sim.revoke_access(&s.issued.access_token);
    let run = sdk.run(&s.sdk_args("stream", &[]));
    assert_streamed_chunk_by_chunk(&run, &s.api);
    let sim = s.sim.counts();
    assert_eq!((sim.token_requests, sim.refreshed), (1, 1), "{sim:?}");
    let fresh = s.current_token();
    assert!(s.sim.is_live(&fresh));
    assert_eq!(
        s.api.bearers(),
        vec![
            ("/v1/chat/completions".to_owned(), fingerprint(&s.issued.access_token)),
            ("/v1/chat/completions".to_owned(), fingerprint(&fresh)),
        ],
        "the old token, its 401, then once with the new one"
    );
    let api = s.api.counts();
    assert_eq!((api.unauthorized, api.answered), (1, 1), "{api:?}");
    assert_eq!(s.api.body_sizes()[0], s.api.body_sizes()[1], "the same body twice");

    // Many requests at once with a token the provider has dropped: one
    // refresh between them all, and every one answered.
    s.sim.revoke_access(&fresh);
    let results: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| request(&s.proxy.addr, "POST", "/v1/sink", Some(s.proxy.key()), b"{}")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &results {
        assert_eq!(*status, 200, "{body}");
    }
    let sim = s.sim.counts();
    assert_eq!(
        (sim.token_requests, sim.refreshed),
        (2, 2),
        "one more refresh for 16 401s: {sim:?}"
    );
}

#[test]
fn two_hundred_concurrent_sdk_streams_across_a_token_expiry_all_succeed_with_one_refresh() {
    let Some(sdk) =
        openai_sdk::require("two_hundred_concurrent_sdk_streams_across_a_token_expiry_all_succeed_with_one_refresh")
    else {
        return;
    };
    const CLIENTS: u64 = 200;
    // The SDK first (its start is slow), so that the token's few seconds
    // are spent on requests.
    let expect = answer();
    let mut client = sdk.spawn(&[
        "many".to_owned(),
        format!("--clients={CLIENTS}"),
        format!("--expect={expect}"),
    ]);
    client.wait_event("ready", Duration::from_secs(60));

    // 4-second tokens, refreshed only when they expire (--refresh-ahead
    // 0s); the one the refresh brings lives an hour: one expiry in the run.
    let sim = Arc::new(
        ProviderServer::start(SimConfig {
            access_lifetime: Duration::from_secs(4),
            ..SimConfig::default()
        })
        .unwrap(),
    );
    let s = Setup::with(sim.clone(), 4.0, &["--refresh-ahead", "0s"]);
    sim.reconfigure(|c| c.access_lifetime = Duration::from_secs(3600));
    let old = fingerprint(&s.issued.access_token);
    // The first 200 streams all stay open until the last has started.
    s.api.gate_streams_at(CLIENTS);
    s.api.set_pause(Duration::from_millis(100));
    client.send_line(&serde_json::json!({"base_url": s.base_url, "api_key": s.proxy.key()}).to_string());

    // Run until a whole round of streams was answered for the new token.
    wait_until(
        Duration::from_secs(90),
        "200 streams were answered with the new token",
        || {
            s.api
                .answered_by_token()
                .iter()
                .any(|(token, n)| *token != old && *n >= CLIENTS)
        },
    );
    client.send_line("stop");
    let summary = client.wait_event("summary", Duration::from_secs(60));
    let status = client.wait(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", client.stderr());

    let ok = summary["ok"].as_u64().unwrap();
    assert_eq!(summary["failed"], 0, "{summary}");
    let api = s.api.counts();
    assert!(ok >= 2 * CLIENTS, "{summary} {api:?}");
    assert_eq!(api.streams, ok, "every stream the SDK got whole, and no other: {api:?}");
    let (_, peak) = s.api.open_streams();
    assert!(peak >= CLIENTS, "{CLIENTS} streams open at once (the gate), saw {peak}");
    let by_token = s.api.answered_by_token();
    assert_eq!(by_token.len(), 2, "the expiring token and its successor: {by_token:?}");
    assert!(by_token[&old] >= CLIENTS, "{by_token:?}");
    let streams = s.api.streams();
    assert!(streams.iter().all(|r| r.end == Some(StreamEnd::Completed)));
    // Across the expiry: streams of the old token still ran when the new
    // one was already in use.
    let first_new = streams
        .iter()
        .filter(|r| r.token != old)
        .map(|r| r.sent_ns[0])
        .min()
        .unwrap();
    let straddling = streams
        .iter()
        .filter(|r| r.token == old && *r.sent_ns.last().unwrap() > first_new)
        .count();
    assert!(straddling > 0, "no stream of the old token outlived its expiry");
    let counts = sim.counts();
    assert_eq!(
        (counts.token_requests, counts.refreshed, counts.reused, counts.invalid),
        (1, 1, 0, 0),
        "exactly one refresh for the expiry: {counts:?}"
    );
    println!(
        "{ok} streams, {straddling} of the old token still running when the new one was in use, \
         {} answered 401 first and resent, peak {peak} open",
        api.unauthorized
    );
}

#[test]
fn sdk_clients_without_the_client_key_get_an_authentication_error_that_names_it() {
    let Some(sdk) = openai_sdk::require("sdk_clients_without_the_client_key_get_an_authentication_error_that_names_it")
    else {
        return;
    };
    let s = Setup::new(&[]);
    let base_url = &s.base_url;
    // No Authorization header at all, and a key that is not the client key.
    for key in [None, Some("sk-not-the-client-key")] {
        let run = sdk.run(&sdk_args("chat", base_url, key, &[]));
        assert_eq!(run.status.and_then(|s| s.code()), Some(3), "{}", run.report());
        let error = run.expect_event("error");
        assert_eq!(error["class"], "AuthenticationError", "{}", run.report());
        assert_eq!(error["status"], 401);
        assert_eq!(error["code"], "invalid_client_key");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains("client key"), "{message}");
        let key_path = s.dir.path().join("token-broker/client-key");
        assert!(
            message.contains(key_path.to_str().unwrap()),
            "where the key is: {message}"
        );
    }
    assert_eq!(s.api.counts().requests, 0, "refused clients never reach the upstream");
    assert_eq!(s.sim.counts().token_requests, 0);
}

/// One request over a new connection whose body is `len` bytes, sent in
/// 64 KiB writes with a Content-Length or, when `chunked`, in chunks: the
/// status and the body of the answer.
fn send_body(addr: &str, path: &str, key: &str, len: usize, chunked: bool) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {len}")
    };
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/octet-stream\r\n{framing}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let piece = vec![b'x'; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(piece.len());
        if chunked {
            write!(stream, "{n:x}\r\n").unwrap();
            stream.write_all(&piece[..n]).unwrap();
            stream.write_all(b"\r\n").unwrap();
        } else {
            stream.write_all(&piece[..n]).unwrap();
        }
        left -= n;
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").unwrap();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

const MIB: usize = 1024 * 1024;

#[test]
fn bodies_up_to_the_retry_limit_are_resent_after_a_401_and_bigger_ones_get_the_401() {
    let s = Setup::new(&[]);
    let key = s.proxy.key().to_owned();
    let mut refreshes = 0;
    let mut seen = 0;
    // (body size, chunked, resent after the 401)
    let cases = [
        (0, false, true),
        (0, true, true),
        (MIB, false, true),
        (MIB, true, true),
        (MIB + 1, false, false),
        (MIB + 1, true, false),
    ];
    for (len, chunked, resent) in cases {
        let what = format!("{len} bytes{}", if chunked { ", chunked" } else { "" });
        s.sim.revoke_access(&s.current_token());
        let (status, body) = send_body(&s.proxy.addr, "/v1/sink", &key, len, chunked);
        refreshes += 1;
        let sim = s.sim.counts();
        assert_eq!(sim.refreshed, refreshes, "{what}: one refresh for the 401: {sim:?}");
        let sizes = s.api.body_sizes();
        if resent {
            assert_eq!(status, 200, "{what}: {body}");
            let json: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["bytes"], len as u64, "{what}");
            assert_eq!(sizes[seen..], [len as u64, len as u64], "{what}: sent twice, whole");
            seen += 2;
        } else {
            assert_eq!(status, 401, "{what}: the upstream's 401 is passed through: {body}");
            assert!(
                body.contains("token_expired"),
                "{what}: the upstream's own answer: {body}"
            );
            assert_eq!(sizes[seen..], [len as u64], "{what}: sent once, whole");
            seen += 1;
            // The next one goes with the token the 401 had refreshed.
            let (status, body) = send_body(&s.proxy.addr, "/v1/sink", &key, len, chunked);
            assert_eq!(status, 200, "{what}, again: {body}");
            assert_eq!(s.api.body_sizes()[seen..], [len as u64], "{what}, again");
            seen += 1;
            assert_eq!(s.sim.counts().refreshed, refreshes, "{what}: no refresh for the second");
        }
    }
}

#[test]
fn a_100_mib_body_streams_through_without_the_proxy_holding_it() {
    let s = Setup::new(&[]);
    let (_, before) = s.proxy.memory();
    let len = 100 * MIB;
    let (status, body) = send_body(&s.proxy.addr, "/v1/sink", s.proxy.key(), len, false);
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["bytes"], len as u64, "the upstream got every byte");
    assert_eq!(s.api.body_sizes(), vec![len as u64]);
    let (rss, peak) = s.proxy.memory();
    println!(
        "proxy memory: peak {:.1} MiB before, {:.1} MiB after 100 MiB (now {:.1} MiB)",
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        rss as f64 / MIB as f64
    );
    assert!(
        peak < 40 * MIB as u64,
        "the proxy's resident memory peaked at {:.1} MiB while passing 100 MiB: it held the body",
        peak as f64 / MIB as f64
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_cancels_the_upstream_stream() {
    let Some(sdk) = openai_sdk::require("a_client_that_disconnects_mid_stream_cancels_the_upstream_stream") else {
        return;
    };
    let s = Setup::new(&[]);
    // The first event, then nothing until the client goes away: as a
    // model that thinks for minutes.
    s.api.hold_streams_after(1);
    let mut client = sdk.spawn(&s.sdk_args("disconnect", &[]));
    let first = client.wait_event("chunk", Duration::from_secs(60));
    let id = first["id"].as_str().unwrap().to_owned();
    let closed = client.wait_event("closed", Duration::from_secs(10));
    // The SDK process is still running (it waits for its stdin to close):
    // only its connection went.
    wait_until(Duration::from_secs(5), "the upstream saw its stream cancelled", || {
        matches!(s.api.stream(&id).unwrap().end, Some(StreamEnd::Cancelled { .. }))
    });
    let Some(StreamEnd::Cancelled { at_ns }) = s.api.stream(&id).unwrap().end else {
        unreachable!()
    };
    assert!(
        at_ns >= closed["closing_ns"].as_u64().unwrap(),
        "the upstream stream ended before the client closed its own"
    );
    assert_eq!(
        s.api.stream(&id).unwrap().sent_ns.len(),
        1,
        "held after the first event"
    );
    client.close_stdin();
    assert!(client.wait(Duration::from_secs(10)).is_some_and(|s| s.success()));
    assert_eq!(s.api.open_streams().0, 0);
}

#[test]
fn a_client_that_gives_up_before_the_answer_cancels_the_upstream_request() {
    let Some(sdk) = openai_sdk::require("a_client_that_gives_up_before_the_answer_cancels_the_upstream_request") else {
        return;
    };
    let s = Setup::new(&[]);
    s.api.hold_answers();
    let run = sdk.run(&s.sdk_args("chat", &["--timeout", "1"]));
    assert_eq!(
        run.expect_event("error")["class"],
        "APITimeoutError",
        "{}",
        run.report()
    );
    let given_up = chat_api::monotonic_ns();
    wait_until(Duration::from_secs(5), "the upstream saw its request cancelled", || {
        matches!(
            s.api.streams().first().and_then(|r| r.end),
            Some(StreamEnd::Cancelled { .. })
        )
    });
    let Some(StreamEnd::Cancelled { at_ns }) = s.api.streams()[0].end else {
        unreachable!()
    };
    assert!(at_ns <= given_up + 5_000_000_000);
    assert_eq!(s.api.open_streams().0, 0);
}

/// A running `token-broker serve` with proxies.
struct DaemonProcess {
    child: Child,
    socket: PathBuf,
    /// Proxy name -> address.
    proxies: Vec<(String, String)>,
    key_path: PathBuf,
}

impl DaemonProcess {
    /// Starts `serve --config config` and reads the lines naming its
    /// proxies and the client key.
    fn start(config: &Path, socket: &Path, state: &Path) -> DaemonProcess {
        let mut child = cli_command()
            .args(["serve", "--config"])
            .arg(config)
            .env("XDG_STATE_HOME", state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut proxies = Vec::new();
        let key_path = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the daemon stopped before naming the client key"))
                .unwrap();
            if let Some(rest) = line.strip_prefix("token-broker: proxy clients send the key in ") {
                break PathBuf::from(rest.strip_suffix(" as their API key").unwrap());
            }
            if let Some(rest) = line.strip_prefix("token-broker: proxy ") {
                let (name, rest) = rest.split_once(" on http://").unwrap();
                let addr = rest.split_whitespace().next().unwrap();
                proxies.push((name.to_owned(), addr.to_owned()));
            }
        };
        DaemonProcess {
            child,
            socket: socket.to_path_buf(),
            proxies,
            key_path,
        }
    }

    /// `GET /metrics` on the daemon's socket.
    fn metrics(&self) -> String {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        answer
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `name{labels}` in a metrics text, 0 if absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_daemon_runs_a_configured_proxy_the_same_and_counts_its_requests_and_retries() {
    let Some(sdk) =
        openai_sdk::require("the_daemon_runs_a_configured_proxy_the_same_and_counts_its_requests_and_retries")
    else {
        return;
    };
    let sim = Arc::new(ProviderServer::start(SimConfig::default()).unwrap());
    let api = ChatApi::start(sim.clone());
    api.set_pause(Duration::from_millis(250));
    let dir = tempfile::tempdir().unwrap();
    let issued = sim.sign_in(3600.0);
    let auth = dir.path().join("auth.json");
    std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
    // In a folder of its own (the daemon makes it, private).
    let socket = dir.path().join("run/tb.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {auth:?}\n\
             token_url = {:?}\nwinner_wait = \"300ms\"\ntimeout = \"10s\"\n\n\
             [proxies.x]\nprofile = \"codex\"\nlisten = \"127.0.0.1:0\"\nupstream = {:?}\n",
            sim.token_url(),
            api.origin()
        ),
    )
    .unwrap();
    let daemon = DaemonProcess::start(&config, &socket, dir.path());
    assert_eq!(daemon.proxies.len(), 1, "{:?}", daemon.proxies);
    let (name, addr) = &daemon.proxies[0];
    assert_eq!(name, "x");
    assert_eq!(daemon.key_path, dir.path().join("token-broker/client-key"));
    let key = std::fs::read_to_string(&daemon.key_path).unwrap().trim().to_owned();
    let base_url = format!("http://{addr}/v1");

    // A stream, chunk by chunk, through a 401 for a token the provider
    // dropped: one refresh, one retry.
    sim.revoke_access(&issued.access_token);
    let run = sdk.run(&sdk_args("stream", &base_url, Some(&key), &[]));
    assert_streamed_chunk_by_chunk(&run, &api);
    let counts = sim.counts();
    assert_eq!((counts.token_requests, counts.refreshed), (1, 1), "{counts:?}");
    let fresh = read_json(&auth)["tokens"]["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        api.bearers().last().unwrap().1,
        fingerprint(&fresh),
        "the retry went with the daemon's new token"
    );
    assert_eq!(
        api.last_headers().unwrap()["chatgpt-account-id"],
        issued.account_id.as_str()
    );
    // Not streamed; and a wrong key.
    let run = sdk.run(&sdk_args("chat", &base_url, Some(&key), &[]));
    run.assert_success();
    assert_eq!(run.expect_event("done")["content"], answer());
    let run = sdk.run(&sdk_args("chat", &base_url, Some("sk-wrong"), &[]));
    assert_eq!(
        run.expect_event("error")["class"],
        "AuthenticationError",
        "{}",
        run.report()
    );
    assert!(run.expect_event("error")["message"]
        .as_str()
        .unwrap()
        .contains("client key"));

    let metrics = daemon.metrics();
    let requests = |status: &str| {
        sample(
            &metrics,
            &format!("token_broker_proxy_requests_total{{proxy=\"x\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(requests("200"), 2.0, "{metrics}");
    assert_eq!(requests("401"), 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "token_broker_proxy_retries_total{proxy=\"x\"}"),
        1.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "token_broker_proxy_upstream_latency_seconds_count{proxy=\"x\"}"
        ) >= 3.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "token_broker_proxy_bytes_total{proxy=\"x\",direction=\"down\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert_eq!(sim.counts().token_requests, 1);
}
