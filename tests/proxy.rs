//! The auth-injecting proxy with real processes: `token-broker proxy` and
//! `token-broker serve` with `[proxies]`, in front of a loopback model API
//! that checks every bearer token against the simulated provider.

mod common;
#[path = "common/model_api.rs"]
mod model_api;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use model_api::ModelApi;
use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};

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
