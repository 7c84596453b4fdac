//! `token-broker serve` with real processes: the daemon on a Unix socket in
//! a private folder, clients (our CLI, curl) asking it, the simulated
//! provider on loopback behind it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use token_broker::sim::{codex_auth_json, SimConfig};

/// A running `token-broker serve` and its folder.
#[allow(dead_code)]
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    config: PathBuf,
    stderr: std::sync::Arc<parking_lot::Mutex<String>>,
}

#[allow(dead_code)]
impl Daemon {
    /// Starts `serve --config config` and waits for its "listening" line.
    fn start(config: &Path, socket: &Path) -> Daemon {
        let mut child = cli_command()
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let stderr = std::sync::Arc::new(parking_lot::Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.contains("listening on"),
            "the daemon did not start: {first}{}",
            stderr.lock()
        );
        Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            config: config.to_path_buf(),
            stderr,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Sends SIGTERM and waits for the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.take().unwrap().wait().unwrap()
    }

    fn logs(&self) -> String {
        self.stderr.lock().clone()
    }

    /// `token-broker <args> --config <config>`.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_command()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One HTTP/1.1 exchange on the socket, raw: the status and the body.
fn http(socket: &Path, request: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn get(socket: &Path, path: &str) -> (u16, String) {
    http(
        socket,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// A provider, a Codex auth.json signed in with `lifetime`, and a config
/// with one profile `codex` on it.
fn setup(lifetime: f64, sim: SimConfig) -> (Fixture, PathBuf, PathBuf) {
    let fx = Fixture::new(sim);
    let issued = fx.sim.sign_in(lifetime);
    let auth = fx.path("auth.json");
    std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
    let socket = fx.path("run/tb.sock");
    let config = fx.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {url:?}\nwinner_wait = \"300ms\"\ntimeout = \"10s\"\n",
            url = fx.sim.token_url(),
        ),
    )
    .unwrap();
    (fx, config, socket)
}

#[test]
fn a_client_gets_the_token_through_the_daemon_and_every_format() {
    let (fx, config, socket) = setup(3600.0, SimConfig::default());
    let daemon = Daemon::start(&config, &socket);
    let issued_token = read_json(&fx.path("auth.json"))["tokens"]["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let out = daemon.cli(&["token", "--profile", "codex", "--daemon", "require"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{issued_token}\n"));

    let out = daemon.cli(&["token", "--profile", "codex", "--daemon", "require", "--format", "json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["access_token"], issued_token.as_str());
    assert_eq!(json["token_type"], "Bearer");
    assert!(json["expires_at"].as_str().unwrap().ends_with('Z'), "{json}");
    assert_eq!(json["account_id"], "acct-sim-0001");

    let out = daemon.cli(&["token", "--profile", "codex", "--format", "header"]);
    assert_eq!(stdout(&out), format!("Authorization: Bearer {issued_token}\n"));

    let out = daemon.cli(&["token", "--profile", "codex", "--format", "exec-credential"]);
    let cred: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(cred["kind"], "ExecCredential");
    assert_eq!(cred["status"]["token"], issued_token.as_str());
    assert!(cred["status"]["expirationTimestamp"].as_str().unwrap().ends_with('Z'));

    let out = daemon.cli(&["status", "--profile", "codex", "--json", "--daemon", "require"]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["state"], "valid", "{status}");

    let (code, body) = get(&socket, "/v1/profiles");
    assert_eq!(code, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["profiles"][0]["name"], "codex");
    assert!(!body.contains(&issued_token));

    let (code, body) = get(&socket, "/v1/profiles/nope/token");
    assert_eq!(code, 404);
    assert!(body.contains("unknown_profile"), "{body}");
    let out = daemon.cli(&["token", "--profile", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let (code, body) = get(&socket, "/metrics");
    assert_eq!(code, 200);
    assert!(
        body.contains("token_broker_tokens_served_total{profile=\"codex\"} 4"),
        "{body}"
    );
    assert!(
        body.contains("token_broker_profile_state{profile=\"codex\",state=\"valid\"} 1"),
        "{body}"
    );
    assert_eq!(get(&socket, "/healthz").0, 200);

    let status = daemon.stop();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the socket is removed at exit");
    assert_eq!(fx.sim.counts().token_requests, 0, "a valid token is never refreshed");
}
