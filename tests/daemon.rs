//! `token-broker serve` with real processes: the daemon on a Unix socket in
//! a private folder, clients (our CLI, curl) asking it, the simulated
//! provider on loopback behind it.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use daemon::Daemon;
use token_broker::sim::{codex_auth_json, SimConfig};

/// One HTTP/1.1 exchange on the socket, raw: the status and the body.
fn http(socket: &Path, request: &str) -> (u16, String) {
    http_bytes(socket, request.as_bytes())
}

/// Like [`http`] with any bytes; a request the daemon stops reading (it
/// answered early, or closed) is not an error: status 0 means closed
/// without an answer.
fn http_bytes(socket: &Path, request: &[u8]) -> (u16, String) {
    try_http(socket, request).unwrap()
}

/// Like [`http_bytes`]; an error when the socket cannot be reached.
fn try_http(socket: &Path, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = stream.write_all(request);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    Ok(daemon::status_and_body(&raw))
}

fn get(socket: &Path, path: &str) -> (u16, String) {
    http(
        socket,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// Writes `text` to `path` whole (a reader never sees half a file).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The access token in a Codex auth.json.
fn access_token_in(auth: &Path) -> String {
    read_json(auth)["tokens"]["access_token"].as_str().unwrap().to_owned()
}

/// The refresh token in a Codex auth.json.
fn refresh_token_in(auth: &Path) -> String {
    read_json(auth)["tokens"]["refresh_token"].as_str().unwrap().to_owned()
}

/// The access token of a token answer's JSON body.
fn token_in_body(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    json["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {body}"))
        .to_owned()
}

/// `token-broker token --profile <profile> --daemon <mode> --config <config>`.
fn token_cli(config: &Path, profile: &str, mode: &str) -> std::process::Output {
    cli_command()
        .args(["token", "--profile", profile, "--daemon", mode, "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Runs `serve --config config`, which must fail to start: its output.
fn serve_fails(config: &Path) -> std::process::Output {
    let mut child = cli_command()
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the daemon started: {}{}", stdout(&out), stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The value of an unlabelled metric in `/metrics`.
fn metric(socket: &Path, name: &str) -> f64 {
    let (code, body) = get(socket, "/metrics");
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// A provider, a Codex auth.json signed in with `lifetime`, and a config
/// with one profile `codex` on it (plus the TOML lines `extra`).
fn setup(lifetime: f64, sim: SimConfig, extra: &str) -> (Fixture, PathBuf, PathBuf) {
    let fx = Fixture::new(sim);
    let issued = fx.sim.sign_in(lifetime);
    let auth = fx.path("auth.json");
    std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
    let socket = fx.path("run/tb.sock");
    let config = fx.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {url:?}\nwinner_wait = \"300ms\"\ntimeout = \"10s\"\n{extra}",
            url = fx.sim.token_url(),
        ),
    )
    .unwrap();
    (fx, config, socket)
}

#[test]
fn a_client_gets_the_token_through_the_daemon_and_every_format() {
    let (fx, config, socket) = setup(3600.0, SimConfig::default(), "");
    let mut daemon = Daemon::start(&config, &socket);
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

#[test]
fn eight_client_processes_make_one_token_request_per_expiry() {
    // 2-second tokens, due 500 ms before expiry, refreshed only when a
    // client asks: every expiry is a stampede of the eight clients.
    let sim = SimConfig {
        access_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let began = Instant::now();
    let (fx, config, socket) = setup(2.0, sim, "refresh_ahead = \"500ms\"\nkeep_fresh = false\n");
    let mut daemon = Daemon::start(&config, &socket);
    let until = Instant::now() + Duration::from_millis(6500);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let config = config.clone();
            std::thread::spawn(move || {
                let mut tokens = Vec::new();
                while Instant::now() < until {
                    let out = token_cli(&config, "codex", "require");
                    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
                    tokens.push(stdout(&out).trim_end().to_owned());
                }
                tokens
            })
        })
        .collect();
    let tokens: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    // A refresh in flight reaches the provider's ledger before the exit.
    assert_eq!(daemon.stop().code(), Some(0));
    let elapsed = began.elapsed().as_secs_f64();

    let counts = fx.sim.counts();
    assert!(counts.refreshed >= 2, "several expiries: {counts:?}");
    assert_eq!(
        counts.token_requests, counts.refreshed,
        "one request per refresh: {counts:?}"
    );
    assert_eq!((counts.reused, counts.invalid, counts.faults), (0, 0, 0), "{counts:?}");
    // A token is due 1.5 s after it was issued: no more than one refresh
    // per 1.5 s since the sign-in.
    assert!(
        counts.refreshed as f64 <= elapsed / 1.5 + 1.0,
        "more than one token request per expiry: {counts:?} in {elapsed:.1} s"
    );
    // Every refresh's token reached the clients; every token they got was
    // issued by the provider.
    let issued = fx.sim.issued_secrets();
    let distinct: std::collections::BTreeSet<&String> = tokens.iter().collect();
    assert!(
        distinct.iter().all(|t| issued.contains(t)),
        "a token the provider never issued"
    );
    assert!(
        distinct.len() as u64 >= counts.refreshed && distinct.len() as u64 <= counts.refreshed + 1,
        "{} distinct tokens for {counts:?}",
        distinct.len()
    );
    assert!(tokens.len() >= 16, "{} client calls", tokens.len());
}

/// Whether `path` and every folder above it let others in (execute).
fn executable_by_others(path: &Path) -> bool {
    path.ancestors()
        .all(|p| p.as_os_str().is_empty() || mode(p) & 0o001 != 0)
}

#[test]
fn a_client_of_another_user_is_refused_until_allowed() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: skipped, running as another user needs root");
        return;
    }
    if !executable_by_others(Path::new(CLI)) {
        eprintln!("note: skipped, {CLI} is not executable by uid {NOBODY}");
        return;
    }
    let (fx, config, socket) = setup(3600.0, SimConfig::default(), "");
    let token = access_token_in(&fx.path("auth.json"));
    let mut daemon = Daemon::start(&config, &socket);
    // Open the filesystem to nobody: only the peer check stands in its way.
    let open = |path: &Path, mode: u32| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    open(fx.dir.path(), 0o711);
    open(&config, 0o644);
    open(socket.parent().unwrap(), 0o711);
    open(&socket, 0o666);
    let as_nobody = || {
        cli_command()
            .args(["token", "--profile", "codex", "--daemon", "require", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap()
    };
    assert_eq!(metric(&socket, "token_broker_refused_connections_total"), 0.0);

    let out = as_nobody();
    assert_eq!(out.status.code(), Some(5), "{}{}", stdout(&out), stderr(&out));
    assert!(!stdout(&out).contains(&token));
    assert!(
        stderr(&out).contains("no token-broker daemon answers"),
        "{}",
        stderr(&out)
    );
    daemon.wait_for_log("refused a connection from another user");
    let logs = daemon.logs();
    let line = logs.lines().find(|l| l.contains("refused a connection")).unwrap();
    assert!(line.contains(&format!("uid={NOBODY}")), "{line}");
    assert_eq!(metric(&socket, "token_broker_refused_connections_total"), 1.0);
    // The daemon's own user is still served.
    assert_eq!(stdout(&token_cli(&config, "codex", "require")), format!("{token}\n"));

    let text = std::fs::read_to_string(&config).unwrap();
    write_atomic(
        &config,
        &text.replace("[daemon]\n", &format!("[daemon]\nallowed_uids = [{NOBODY}]\n")),
    );
    open(&config, 0o644);
    daemon.reload("reloaded the configuration");
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{token}\n"));
    assert_eq!(metric(&socket, "token_broker_refused_connections_total"), 1.0);
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn sighup_adds_and_removes_profiles_under_load_and_a_broken_config_changes_nothing() {
    let fx = Fixture::new(SimConfig::default());
    let socket = fx.path("run/tb.sock");
    let config = fx.path("config.toml");
    let mut tokens = std::collections::BTreeMap::new();
    let mut profile = std::collections::BTreeMap::new();
    for name in ["a", "b", "c"] {
        let issued = fx.sim.sign_in(3600.0);
        let auth = fx.path(&format!("{name}.json"));
        std::fs::write(&auth, codex_auth_json(&issued)).unwrap();
        tokens.insert(name, issued.access_token);
        profile.insert(
            name,
            format!(
                "[profiles.{name}]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {:?}\nwinner_wait = \"300ms\"\n\n",
                fx.sim.token_url()
            ),
        );
    }
    let daemon_table = format!("[daemon]\nsocket = {socket:?}\n\n");
    write_atomic(&config, &format!("{daemon_table}{}{}", profile["a"], profile["c"]));
    // The clients read a copy: the daemon's own file is about to change.
    let client_config = fx.path("client.toml");
    std::fs::copy(&config, &client_config).unwrap();
    let mut daemon = Daemon::start(&config, &socket);

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let a_token = tokens["a"].clone();
    let mut load: Vec<_> = (0..3)
        .map(|_| {
            let (stop, served, failures, socket, a_token) = (
                stop.clone(),
                served.clone(),
                failures.clone(),
                socket.clone(),
                a_token.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let answer = try_http(
                        &socket,
                        b"GET /v1/profiles/a/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    );
                    match answer {
                        Ok((200, body)) if body.contains(&a_token) => {}
                        other => failures.lock().push(format!("{other:?}")),
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    load.push({
        let (stop, served, failures, a_token) = (stop.clone(), served.clone(), failures.clone(), a_token.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = token_cli(&client_config, "a", "require");
                if out.status.code() != Some(0) || stdout(&out) != format!("{a_token}\n") {
                    failures.lock().push(format!("cli: {:?} {}", out.status, stderr(&out)));
                }
                served.fetch_add(1, Ordering::SeqCst);
            }
        })
    });
    let more = |n: u64| {
        let mark = served.load(Ordering::SeqCst);
        wait_until(Duration::from_secs(20), "the clients are served", || {
            served.load(Ordering::SeqCst) >= mark + n
        });
    };
    more(30);

    // Add b, remove c, keep a.
    write_atomic(&config, &format!("{daemon_table}{}{}", profile["a"], profile["b"]));
    daemon.reload("reloaded the configuration");
    more(30);
    let logs = daemon.logs();
    let line = logs.lines().find(|l| l.contains("reloaded the configuration")).unwrap();
    for part in ["started=[\"b\"]", "stopped=[\"c\"]", "restarted=[]", "unchanged=1"] {
        assert!(line.contains(part), "{part} in {line}");
    }
    let (code, body) = get(&socket, "/v1/profiles/b/token");
    assert_eq!((code, token_in_body(&body)), (200, tokens["b"].clone()));
    let (code, body) = get(&socket, "/v1/profiles/c/token");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("\"unknown_profile\""), "{body}");

    // A configuration that does not parse: the one in force stays.
    write_atomic(&config, &format!("{daemon_table}[profiles.a\nprovider = "));
    daemon.reload("the configuration is not reloaded; the one in force stays");
    more(30);
    let (code, body) = get(&socket, "/v1/profiles/b/token");
    assert_eq!((code, token_in_body(&body)), (200, tokens["b"].clone()));
    assert_eq!(get(&socket, "/v1/profiles/c/token").0, 404);
    let (_, list) = get(&socket, "/v1/profiles");
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&list).unwrap()["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a", "b"]);

    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(
        failures.lock().as_slice(),
        &[] as &[String],
        "profile a failed under reloads"
    );
    assert!(served.load(Ordering::SeqCst) >= 90);
    assert_eq!(
        fx.sim.counts().token_requests,
        0,
        "no profile was refreshed: a kept its actor and token"
    );
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn sigterm_during_a_refresh_exits_after_the_rotated_tokens_are_stored() {
    // An expired token, refreshed only when a client asks; the provider
    // takes 2 s (the refresh token is spent half way).
    let sim = SimConfig {
        latency: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let (fx, config, socket) = setup(-60.0, sim, "keep_fresh = false\n");
    let auth = fx.path("auth.json");
    let (old_access, old_refresh) = (access_token_in(&auth), refresh_token_in(&auth));
    let mut daemon = Daemon::start_logging(&config, &socket, "debug");
    // Callers waiting for the refresh when the daemon is told to stop:
    // two client processes and six raw requests.
    let clients: Vec<Child> = (0..2)
        .map(|_| {
            cli_command()
                .args(["token", "--profile", "codex", "--daemon", "require", "--config"])
                .arg(&config)
                .env_remove("RUST_LOG")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let raw: Vec<_> = (0..6)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || get(&socket, "/v1/profiles/codex/token"))
        })
        .collect();
    wait_until(Duration::from_secs(10), "the refresh is in flight", || {
        fx.sim.concurrent_token_requests() == 1
    });
    let waiting = "token_broker_callers_waiting{profile=\"codex\"} 8";
    wait_until(Duration::from_secs(10), "8 callers wait", || {
        get(&socket, "/metrics").1.contains(waiting)
    });
    assert_eq!(fx.sim.counts().refreshed, 0, "the refresh is still under way");
    let status = daemon.stop();
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(!socket.exists(), "the socket is removed at exit");
    let counts = fx.sim.counts();
    assert_eq!(
        (counts.token_requests, counts.refreshed, counts.reused),
        (1, 1, 0),
        "{counts:?}"
    );

    // The rotated tokens are on disk, a pair, the refresh token unspent.
    let (access, refresh) = (access_token_in(&auth), refresh_token_in(&auth));
    assert_ne!(refresh, old_refresh, "the rotated refresh token was stored");
    assert_ne!(access, old_access);
    assert!(fx.sim.issued_together(&access, &refresh));
    assert!(fx.sim.is_unspent(&refresh));
    // The callers that waited got the new token.
    for client in clients {
        let out = client.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}\n{}", stderr(&out), daemon.logs());
        assert_eq!(stdout(&out), format!("{access}\n"));
    }
    for request in raw {
        let (code, body) = request.join().unwrap();
        assert_eq!(code, 200, "{body}\n{}", daemon.logs());
        assert_eq!(token_in_body(&body), access);
    }

    // A new daemon serves the stored token, and the provider accepts the
    // stored refresh token.
    fx.sim.reconfigure(|c| c.latency = Duration::ZERO);
    let mut daemon = Daemon::start(&config, &socket);
    assert_eq!(stdout(&token_cli(&config, "codex", "require")), format!("{access}\n"));
    assert_eq!(fx.sim.counts().token_requests, 1);
    let (code, body) = http(
        &socket,
        &format!(
            "POST /v1/profiles/codex/reject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            serde_json::json!({"access_token": access}).to_string().len(),
            serde_json::json!({"access_token": access})
        ),
    );
    assert_eq!(code, 200, "{body}");
    assert_ne!(token_in_body(&body), access);
    let counts = fx.sim.counts();
    assert_eq!(
        (counts.refreshed, counts.reused, counts.invalid),
        (2, 0, 0),
        "{counts:?}"
    );
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn the_socket_stale_taken_not_a_socket_or_in_an_open_folder() {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let (fx, config, socket) = setup(3600.0, SimConfig::default(), "");

    // A daemon killed outright leaves its socket behind; the next replaces it.
    let killed = Daemon::start(&config, &socket);
    killed.signal(libc::SIGKILL);
    drop(killed);
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    let mut daemon = Daemon::start(&config, &socket);
    daemon.wait_for_log("replacing a stale socket");
    assert_eq!(get(&socket, "/healthz").0, 200);

    // A second daemon on the same socket exits 1 and leaves the first be.
    let out = serve_fails(&config);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "another token-broker daemon already listens on {}",
            socket.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(get(&socket, "/healthz").0, 200);
    assert_eq!(
        stdout(&token_cli(&config, "codex", "require")).trim_end(),
        access_token_in(&fx.path("auth.json"))
    );
    assert_eq!(daemon.stop().code(), Some(0));

    // Something else at the socket's path is not touched.
    let text = std::fs::read_to_string(&config).unwrap();
    let with_socket = |path: &Path| {
        let other = fx.path("other.toml");
        write_atomic(&other, &text.replace(&format!("{socket:?}"), &format!("{path:?}")));
        other
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(fx.path("private"))
        .unwrap();
    let file = fx.path("private/tb.sock");
    std::fs::write(&file, "not a socket").unwrap();
    let out = serve_fails(&with_socket(&file));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exists and is not a socket; not touching it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket");

    // A folder others may enter is refused.
    std::fs::DirBuilder::new().mode(0o755).create(fx.path("open")).unwrap();
    std::fs::set_permissions(fx.path("open"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = serve_fails(&with_socket(&fx.path("open/tb.sock")));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("must be mode 0700"), "{}", stderr(&out));
    assert!(stderr(&out).contains("it is 0755"), "{}", stderr(&out));
    assert!(!fx.path("open/tb.sock").exists());
}

/// Lifts this process's soft descriptor limit to its hard limit; the limit.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

#[test]
fn malformed_slow_and_idle_clients_leave_the_daemon_serving() {
    let (fx, config, socket) = setup(3600.0, SimConfig::default(), "");
    let token = access_token_in(&fx.path("auth.json"));
    let mut daemon = Daemon::start(&config, &socket);
    let post = |path: &str, kind: &str, body: &str| {
        http(
            &socket,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };

    // Half a request head, then nothing.
    let mut slow = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"GET /v1/profiles/codex/token HTTP/1.1\r\nHost: x\r\nX-Sl")
        .unwrap();

    let (code, body) = http_bytes(
        &socket,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\xff\xfe garbage\r\n\r\n",
    );
    assert!(code == 400 || code == 0, "garbage: {code} {body}");
    let (code, body) = http_bytes(&socket, b"GET /healthz HTTP/9.9\r\nHost \xff\r\n\r\n");
    assert!(code == 400 || code == 505 || code == 0, "bad head: {code} {body}");

    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (code, body) = http(&socket, &big);
    assert!(code == 431 || code == 0, "oversized head: {code} {body}");

    let huge = serde_json::json!({ "access_token": "a".repeat(70 * 1024) }).to_string();
    let (code, body) = post("/v1/profiles/codex/reject", "application/json", &huge);
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("\"payload_too_large\""), "{body}");
    // The same without a length: chunked.
    let chunked = format!(
        "POST /v1/profiles/codex/reject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{huge}\r\n0\r\n\r\n",
        huge.len()
    );
    let (code, body) = http(&socket, &chunked);
    assert_eq!(code, 413, "{body}");

    for (kind, bad) in [
        ("application/json", "{\"access_token\": "),
        ("application/json", "[1, 2"),
        ("application/json", "{\"token\": \"x\"}"),
        ("application/json", "{\"access_token\": 7}"),
        ("application/json", "{\"access_token\": \"a\\nb\"}"),
        ("text/plain", "{\"access_token\": \"x\"}"),
    ] {
        let (code, body) = post("/v1/profiles/codex/reject", kind, bad);
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body.contains("\"bad_request\""), "{body}");
    }
    let (code, body) = get(&socket, "/v1/nothing/here");
    assert_eq!(code, 404, "{body}");

    // The others are served while the slow client stalls.
    assert_eq!(get(&socket, "/healthz").0, 200);
    assert_eq!(stdout(&token_cli(&config, "codex", "require")), format!("{token}\n"));

    // Many idle connections, and a client still gets its token.
    let limit = raise_nofile();
    let want: usize = 10_000;
    let mut idle = Vec::with_capacity(want);
    while idle.len() < want {
        match UnixStream::connect(&socket) {
            Ok(s) => idle.push(s),
            Err(e) => {
                eprintln!(
                    "note: {} idle connections, not {want} (descriptor limit {limit}): {e}",
                    idle.len()
                );
                break;
            }
        }
    }
    assert!(idle.len() >= 1000, "only {} idle connections", idle.len());
    let out = token_cli(&config, "codex", "require");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{token}\n"));
    assert_eq!(get(&socket, "/healthz").0, 200);
    drop(idle);

    // The stalled head is given up on (after the header read timeout).
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    match slow.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the stalled client was not closed: {e}"
        ),
    }
    assert!(!String::from_utf8_lossy(&rest).contains(&token));

    let (code, body) = get(&socket, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(daemon.stop().code(), Some(0));
}

#[test]
fn without_a_daemon_auto_reads_the_file_and_require_fails() {
    let (fx, config, socket) = setup(3600.0, SimConfig::default(), "");
    let token = access_token_in(&fx.path("auth.json"));

    let out = token_cli(&config, "codex", "auto");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{token}\n"));
    assert_eq!(fx.sim.counts().token_requests, 0);

    let out = token_cli(&config, "codex", "require");
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");
    let line = stderr(&out);
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains(&socket.display().to_string()), "{line}");
    assert!(line.contains("no token-broker daemon answers"), "{line}");

    let out = cli_command()
        .args(["token", "--profile", "codex", "--auth-file"])
        .arg(fx.path("auth.json"))
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--auth-file cannot be used with a profile"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn no_token_text_in_the_logs_or_error_bodies() {
    // Expired: the first request refreshes.
    let (fx, config, socket) = setup(-60.0, SimConfig::default(), "");
    let auth = fx.path("auth.json");
    let mut daemon = Daemon::start_logging(&config, &socket, "debug");
    let bogus = "bogus-access-token-SECRET-4711";
    let reject = |profile: &str, kind: &str, body: &str| {
        http(
            &socket,
            &format!(
                "POST /v1/profiles/{profile}/reject HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let json_token = |t: &str| serde_json::json!({ "access_token": t }).to_string();

    let (code, body) = get(&socket, "/v1/profiles/codex/token");
    assert_eq!(code, 200, "{body}");
    let first = token_in_body(&body);
    let (code, body) = reject("codex", "application/json", &json_token(&first));
    assert_eq!(code, 200, "{body}");
    let second = token_in_body(&body);
    assert_ne!(first, second);
    assert_eq!(reject("codex", "application/json", &json_token(bogus)).0, 200);

    let mut errors = Vec::new();
    for (code, body) in [
        reject("nope", "application/json", &json_token(&second)),
        reject("codex", "text/plain", &json_token(&second)),
        reject(
            "codex",
            "application/json",
            &format!("{{\"access_token\": \"{second}\""),
        ),
        reject(
            "codex",
            "application/json",
            &format!("{{\"access_token\": \"{second}\\n\"}}"),
        ),
        reject(
            "codex",
            "application/json",
            &format!("{{\"access_token\": \"{second}\", \"x\": {}", "1".repeat(70 * 1024)),
        ),
        get(&socket, &format!("/v1/profiles/{second}/token")),
        get(&socket, &format!("/v1/{second}")),
    ] {
        assert!(code >= 400, "{code} {body}");
        errors.push(body);
    }
    // The credential is signed out elsewhere: login_required.
    fx.sim.spend(&refresh_token_in(&auth));
    let (code, body) = reject("codex", "application/json", &json_token(&second));
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"login_required\""), "{body}");
    errors.push(body);
    let out = cli_command()
        .args(["token", "--profile", "codex", "--daemon", "require", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    errors.push(stderr(&out));
    for path in ["/v1/profiles", "/v1/profiles/codex/status", "/metrics"] {
        errors.push(get(&socket, path).1);
    }
    // Tokens pasted into the configuration where they do not belong: the
    // reload's error is logged without them.
    let text = std::fs::read_to_string(&config).unwrap();
    let refresh = refresh_token_in(&auth);
    for pasted in [
        text.replace("provider = \"codex\"", &format!("provider = {refresh:?}")),
        format!("{text}{refresh} = \"x\"\n"),
        text.replace("token_url = \"http://", &format!("token_url = \"http://u:{refresh}@")),
    ] {
        write_atomic(&config, &pasted);
        daemon.reload("the configuration is not reloaded; the one in force stays");
    }
    assert_eq!(daemon.stop().code(), Some(0));
    let logs = daemon.logs();

    let mut secrets = fx.sim.issued_secrets();
    secrets.push(bogus.to_owned());
    assert!(secrets.len() >= 6, "{secrets:?}");
    assert!(logs.contains("DEBUG"), "the daemon logged at debug level:\n{logs}");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a token in the daemon's logs:\n{logs}");
        for body in &errors {
            assert!(!body.contains(secret.as_str()), "a token in an error: {body}");
        }
    }
}
