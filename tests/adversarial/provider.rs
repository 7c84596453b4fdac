//! See `tests/adversarial.rs`: the token endpoint misbehaves.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use token_broker::sim::unsigned_jwt;
use token_broker::{BrokerError, TokenBroker};

use crate::common::*;

/// A small HTTP server on 127.0.0.1 with its own thread and runtime, for
/// providers the simulated one cannot play (redirecting, echoing). Stops
/// when dropped.
struct Loopback {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loopback {
    fn start(app: axum::Router) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Loopback {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A token response a hostile origin would send: a JWT valid for an hour.
fn foreign_tokens() -> serde_json::Value {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    serde_json::json!({
        "access_token": unsigned_jwt(&format!(r#"{{"exp":{exp},"sub":"attacker"}}"#)),
        "refresh_token": "rt_from_the_other_origin",
        "token_type": "Bearer",
        "expires_in": 3600,
    })
}

/// An origin that records every request it gets (method, path, body) and
/// answers each, whatever its method, with tokens.
fn recording_origin() -> (Loopback, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri, body: axum::body::Bytes| {
        let log = log.clone();
        async move {
            log.lock()
                .unwrap()
                .push(format!("{method} {uri} {}", String::from_utf8_lossy(&body)));
            axum::Json(foreign_tokens())
        }
    });
    (Loopback::start(app), seen)
}

/// A token endpoint that answers every request with `status` and a
/// `Location` on another origin.
fn redirecting_endpoint(status: u16, location: String) -> Loopback {
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            (
                StatusCode::from_u16(status).unwrap(),
                [(header::LOCATION, location)],
                "moved",
            )
                .into_response()
        }
    });
    Loopback::start(app)
}

/// #11: a redirect from the token endpoint is never followed: the refresh
/// token (and any client secret) never reaches the other origin, nothing it
/// says is saved, and the error names only the other origin.
#[test]
fn a_redirect_from_the_token_endpoint_is_never_followed() {
    for status in [301u16, 302, 303, 307, 308] {
        let fx = Fixture::codex();
        let (other, seen) = recording_origin();
        let endpoint = redirecting_endpoint(status, other.url("/steal/path-part?query-part=1"));
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let before = std::fs::read(&path).unwrap();

        let out = cli_command()
            .args(["token", "--auth-file"])
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", endpoint.url("/oauth/token"))
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(
            seen.lock().unwrap().is_empty(),
            "{status}: followed to {:?}",
            seen.lock().unwrap()
        );
        assert_eq!(out.status.code(), Some(5), "{status}: {err}");
        assert!(out.stdout.is_empty(), "{status}: printed a token");
        assert_eq!(std::fs::read(&path).unwrap(), before, "{status}: the file changed");
        assert_eq!(err.lines().count(), 1, "{status}: {err}");
        assert!(err.contains("redirect"), "{status}: {err}");
        assert!(err.contains(&format!("HTTP {status}")), "{status}: {err}");
        assert!(err.contains(&other.origin()), "{status}: names the other origin: {err}");
        assert!(
            !err.contains("path-part") && !err.contains("query-part"),
            "{status}: only the origin is named: {err}"
        );
    }
}

/// #11: the same through the library, with a client secret in the form
/// (`client_secret_post`): the typed error says redirect, and the other
/// origin never sees the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_never_carries_the_client_secret_away() {
    use token_broker::credentials::Secret;
    use token_broker::provider::{ClientAuth, Failure, RefreshError};

    let fx = Fixture::codex();
    let (other, seen) = recording_origin();
    let endpoint = redirecting_endpoint(307, other.url("/token"));
    let path = fx.path("credentials.json");
    std::fs::write(&path, token_broker::sim::oauth2_credentials_json(&fx.sim.sign_in(-1.0))).unwrap();
    let broker = TokenBroker::oauth2(endpoint.url("/token"), "client")
        .client_auth(ClientAuth::Post(Secret::new("client-secret-for-redirect-test")))
        .credentials_path(&path)
        .build()
        .unwrap();
    let err = broker.token().await.unwrap_err();
    broker.shutdown().await;
    assert!(seen.lock().unwrap().is_empty(), "followed: {:?}", seen.lock().unwrap());
    match &err {
        BrokerError::Unavailable {
            cause: RefreshError::Transient { kind, .. },
            ..
        } => assert!(matches!(kind, Failure::Redirect { status: 307, .. }), "{kind:?}"),
        other => panic!("expected a provider fault, got {other:?}"),
    }
    assert!(err.to_string().contains(&other.origin()), "{err}");
}

/// #11, a sibling: a proxy from the environment (`HTTP_PROXY`,
/// `ALL_PROXY`) never gets a loopback token endpoint's request, which
/// would carry the refresh token in clear text to another origin (and no
/// proxy can reach our loopback anyway). The refresh goes to the endpoint.
#[test]
fn a_proxy_from_the_environment_never_gets_a_loopback_request() {
    let fx = Fixture::codex();
    let (proxy, seen) = recording_origin();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY"] {
        let out = cli_command()
            .args(["token", "--auth-file"])
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
            .env(var, proxy.origin())
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(
            seen.lock().unwrap().is_empty(),
            "{var}: the proxy got {:?}",
            seen.lock().unwrap()
        );
        assert_eq!(out.status.code(), Some(0), "{var}: {}", stderr(&out));
        assert!(fx.sim.is_live(stdout(&out).trim()), "{var}: the provider's token");
        std::fs::write(&path, token_broker::sim::codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
    }
}

/// #11: plain `http://` is refused for any token endpoint that is not on
/// loopback, however it is given: library, `--token-url`, or
/// `CODEX_REFRESH_TOKEN_URL_OVERRIDE`.
#[test]
fn plain_http_is_refused_except_to_loopback() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(3600.0));
    let refused = [
        "http://auth.example.com/oauth/token",
        "http://10.0.0.1/oauth/token",
        "http://0.0.0.0:8080/oauth/token",
        "http://127.0.0.1.nip.io/oauth/token",
        "http://localhost.example.com/oauth/token",
        "http://[2001:db8::1]/oauth/token",
        "http://[::ffff:10.0.0.1]/oauth/token",
    ];
    let allowed = [
        "https://auth.example.com/oauth/token",
        "http://127.0.0.1:9/oauth/token",
        "http://127.3.4.5/oauth/token",
        "http://localhost:9/oauth/token",
        "http://LOCALHOST:9/oauth/token",
        "http://[::1]:9/oauth/token",
    ];
    for url in refused {
        let err = TokenBroker::codex()
            .credentials_path(&path)
            .token_url(url)
            .build()
            .unwrap_err();
        assert!(matches!(err, BrokerError::Config(_)), "{url}: {err:?}");
        assert!(err.to_string().contains("http://"), "{url}: {err}");
        let err = TokenBroker::oauth2(url, "client")
            .credentials_path(&path)
            .build()
            .unwrap_err();
        assert!(matches!(err, BrokerError::Config(_)), "{url}: {err:?}");

        let by_flag = fx.cli(&["status", "--auth-file", path.to_str().unwrap(), "--token-url", url]);
        assert_eq!(by_flag.status.code(), Some(2), "{url}: {}", stderr(&by_flag));
        assert_eq!(stderr(&by_flag).lines().count(), 1, "{}", stderr(&by_flag));
        let by_env = cli_command()
            .args(["status", "--auth-file"])
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", url)
            .output()
            .unwrap();
        assert_eq!(by_env.status.code(), Some(2), "{url}: {}", stderr(&by_env));
        assert!(
            stderr(&by_env).contains("CODEX_REFRESH_TOKEN_URL_OVERRIDE"),
            "{}",
            stderr(&by_env)
        );
    }
    for url in allowed {
        let broker = TokenBroker::codex().credentials_path(&path).token_url(url).build();
        assert!(broker.is_ok(), "{url}: {:?}", broker.err());
        let out = fx.cli(&["status", "--auth-file", path.to_str().unwrap(), "--token-url", url]);
        assert_eq!(out.status.code(), Some(0), "{url}: {}", stderr(&out));
    }
}

/// A refresh token and a client secret with characters that every
/// encoding we send changes: form encoding, JSON escaping, Basic's base64.
const ECHO_REFRESH: &str = "rt/adv+secret=1&x=\"y\"\\z ünï-0123456789abcdef";
const ECHO_SECRET: &str = "cs/adv+secret:2&\"q\"\\w ß-9876543210fedcba";
const ECHO_CLIENT: &str = "echo-client";

/// Every form in which we send `secret`, and every 12-byte piece of each.
fn encoded_forms(secret: &str) -> Vec<String> {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let form = form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>();
    let json = serde_json::to_string(secret).unwrap();
    let json = json.trim_matches('"').to_owned();
    let client = form_urlencoded::byte_serialize(ECHO_CLIENT.as_bytes()).collect::<String>();
    vec![
        secret.to_owned(),
        form.clone(),
        form.replace('+', "%20"),
        json,
        b64(&format!("{client}:{form}")),
        b64(&format!("{ECHO_CLIENT}:{secret}")),
    ]
}

/// Records in `leaks` where `text` holds a piece of a secret.
fn check_no_secret(leaks: &mut Vec<String>, what: &str, text: &str) {
    for secret in [ECHO_REFRESH, ECHO_SECRET] {
        for form in encoded_forms(secret) {
            let bytes = form.as_bytes();
            // Base64 of `client:secret` starts with the client id's, which is
            // not secret: only pieces past it count.
            let skip = if form.len() > 40 && !form.contains(['/', '%', '"']) {
                16
            } else {
                0
            };
            for piece in bytes[skip.min(bytes.len())..].windows(12.min(bytes.len())) {
                let piece = String::from_utf8_lossy(piece);
                if text.contains(piece.as_ref()) {
                    leaks.push(format!(
                        "{what}: a piece {piece:?} of an encoding of a secret leaked:\n{text}"
                    ));
                    return;
                }
            }
        }
    }
}

/// A token endpoint that quotes the whole request (headers and body) in
/// its error, as some identity providers do: `status`, in the dialect's
/// error shape; for 5xx the quote is in the error code.
fn echoing_endpoint(openai: bool, status: u16) -> Loopback {
    let app = axum::Router::new().fallback(
        move |method: Method, headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
            let mut echo = format!("bad request: {method} {} | ", String::from_utf8_lossy(&body));
            let mut headers: Vec<_> = headers.iter().collect();
            headers.sort_by_key(|(name, _)| *name != header::AUTHORIZATION);
            for (name, value) in headers {
                echo += &format!("{name}: {} | ", String::from_utf8_lossy(value.as_bytes()));
            }
            let (code, description) = if status >= 500 {
                (echo.clone(), "upstream failure".to_owned())
            } else {
                ("invalid_request".to_owned(), echo)
            };
            let body = if openai {
                serde_json::json!({"error": {"message": description, "type": "invalid_request_error", "code": code}})
            } else {
                serde_json::json!({"error": code, "error_description": description})
            };
            (StatusCode::from_u16(status).unwrap(), axum::Json(body))
        },
    );
    Loopback::start(app)
}

/// #13: a provider that echoes the request in its error never gets the
/// refresh token or the client secret, in any encoding we sent them, onto
/// the CLI's stderr (text or JSON), into `status`'s `last_error`, or into
/// the error's `Display`/`Debug`. Both dialects; basic and post client
/// authentication; a 4xx (description) and a 5xx (error code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoing_provider_never_gets_secrets_into_errors() {
    use token_broker::credentials::Secret;
    use token_broker::provider::ClientAuth;

    let fx = Fixture::codex();
    let mut issued = fx.sim.sign_in(-1.0);
    issued.refresh_token = ECHO_REFRESH.to_owned();
    let codex_file = fx.path("auth.json");
    let oauth2_file = fx.path("credentials.json");
    let cases = [("codex", "none"), ("oauth2", "basic"), ("oauth2", "post")];
    let mut leaks = Vec::new();
    for (provider, auth) in cases {
        for status in [400u16, 503] {
            let case = format!("{provider}/{auth}/{status}");
            let endpoint = echoing_endpoint(provider == "codex", status);
            let url = endpoint.url("/oauth/token");
            std::fs::write(&codex_file, token_broker::sim::codex_auth_json(&issued)).unwrap();
            std::fs::write(&oauth2_file, token_broker::sim::oauth2_credentials_json(&issued)).unwrap();
            let path = if provider == "codex" { &codex_file } else { &oauth2_file };

            // The library: the error, and the status afterwards.
            let builder = if provider == "codex" {
                TokenBroker::codex().client_id(ECHO_CLIENT)
            } else {
                let secret = Secret::new(ECHO_SECRET);
                TokenBroker::oauth2(&url, ECHO_CLIENT).client_auth(if auth == "basic" {
                    ClientAuth::Basic(secret)
                } else {
                    ClientAuth::Post(secret)
                })
            };
            let broker = builder
                .credentials_path(path)
                .token_url(&url)
                .winner_wait(TEST_WINNER_WAIT)
                .build()
                .unwrap();
            let err = broker.token().await.unwrap_err();
            let shown = format!("{err}\n{err:?}");
            assert!(
                shown.contains(&format!("HTTP {status}")),
                "{case}: the error still says what failed: {shown}"
            );
            check_no_secret(&mut leaks, &format!("{case}: error"), &shown);
            let status_now = broker.status().await.unwrap();
            let json = status_now.to_json(std::time::SystemTime::now());
            assert!(json["last_error"].is_string(), "{case}: {json}");
            check_no_secret(&mut leaks, &format!("{case}: status --json"), &json.to_string());
            check_no_secret(
                &mut leaks,
                &format!("{case}: status"),
                &status_now.display_at(std::time::SystemTime::now()).to_string(),
            );
            broker.shutdown().await;

            // The CLI, text and JSON.
            for json in [false, true] {
                let mut cmd = cli_command();
                cmd.arg("token").arg("--auth-file").arg(path).env_remove("RUST_LOG");
                if json {
                    cmd.arg("--json");
                }
                if provider == "codex" {
                    cmd.args(["--client-id", ECHO_CLIENT])
                        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &url);
                } else {
                    cmd.args(["--provider", "oauth2", "--token-url", &url, "--client-id", ECHO_CLIENT])
                        .args(["--client-auth", auth, "--client-secret-env", "TB_ECHO_SECRET"])
                        .env("TB_ECHO_SECRET", ECHO_SECRET);
                }
                let out = cmd.output().unwrap();
                let err = stderr(&out);
                assert_eq!(
                    out.status.code(),
                    Some(if status >= 500 { 5 } else { 4 }),
                    "{case}: {err}"
                );
                assert!(err.contains(&format!("HTTP {status}")), "{case}: {err}");
                check_no_secret(&mut leaks, &format!("{case}: CLI stderr (json: {json})"), &err);
            }
        }
    }
    assert!(leaks.is_empty(), "{} leaks:\n\n{}", leaks.len(), leaks.join("\n\n"));
}

/// A child process that is let go on drop (continued, then killed), so that
/// a failed assertion never leaves a stopped process behind.
struct Running(Option<std::process::Child>);

impl Running {
    fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of our own child, which we have not
        // reaped yet, so the pid cannot have been reused.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0, "kill {signal}");
    }

    fn wait(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// #7: the broker is stopped (Ctrl-Z, `docker pause`) while its request is
/// in flight; the provider's answer lands in the socket meanwhile, and the
/// broker is continued after its `--timeout` has passed. It uses that
/// answer: one token request, exit 0, the rotated tokens on disk. (It used
/// to time out, retry the spent refresh token, and lose the credential.)
#[test]
fn an_answer_that_arrived_while_the_broker_was_stopped_is_used() {
    use std::process::Stdio;
    use std::time::Instant;

    let fx = Fixture::new(token_broker::sim::SimConfig {
        // The answer comes 1 s after the request arrives.
        latency: Duration::from_millis(1000),
        ..Default::default()
    });
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let broker = Running(Some(
        cli_command()
            .args(["token", "--timeout", "2s", "--auth-file"])
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let started = Instant::now();
    while fx.sim.token_requests() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the broker never sent its request"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    broker.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // The answer arrives about 1 s into the stop; the 2 s timeout passes.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(fx.sim.counts().refreshed, 1, "the provider answered meanwhile");
    broker.signal(libc::SIGCONT);
    let out = broker.wait();
    assert!(stopped.elapsed() < Duration::from_secs(10));

    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(fx.sim.token_requests(), 1, "one token request; {:?}", fx.sim.spends());
    let token = stdout(&out).trim().to_owned();
    assert!(fx.sim.is_live(&token), "the printed token is the provider's answer");
    let file = read_json(&path);
    assert_eq!(file["tokens"]["access_token"], token.as_str());
    let refresh = file["tokens"]["refresh_token"].as_str().unwrap();
    assert_ne!(refresh, issued.refresh_token, "the rotated refresh token is on disk");
    assert!(fx.sim.is_unspent(refresh));
}

/// The owner of `/proc/<pid>/environ`: the process's user while it is
/// dumpable, root once it is not. Returns (owner, the process's real uid).
fn proc_owner(pid: i32) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}/environ")).unwrap().uid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap();
    (owner, uid)
}

/// The soft core-size limit in `/proc/<pid>/limits`.
fn core_limit(pid: i32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    line["Max core file size".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Makes `cmd` start with core dumps allowed (soft limit raised to the hard
/// one) and, when we are root, as an unprivileged user, so that
/// `/proc/<pid>` ownership shows whether the process is dumpable.
fn dumpable_start(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls (getrlimit, setrlimit) run
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_CORE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max;
                libc::setrlimit(libc::RLIMIT_CORE, &limit);
            }
            Ok(())
        });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65534).gid(65534);
    }
}

/// #12: the CLI holds live tokens in memory; a core dump (`kill -ABRT`, a
/// crash) must not write them to disk, and another process of the same user
/// must not read its memory. `watch` runs non-dumpable (its `/proc/<pid>`
/// files turn root-owned) with a zero core-size limit, although it was
/// started with core dumps allowed. A control process started the same way
/// shows that the checks tell the difference.
#[test]
fn the_cli_is_not_dumpable_and_writes_no_core() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Stdio;

    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(3600.0));
    // Readable by the unprivileged user the processes run as.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut control = std::process::Command::new("sleep");
    control.arg("30");
    dumpable_start(&mut control);
    let control = Running(Some(control.spawn().unwrap()));
    std::thread::sleep(Duration::from_millis(200));
    let (owner, uid) = proc_owner(control.pid());
    assert_eq!(owner, uid, "a dumpable process owns its /proc files");
    assert_ne!(core_limit(control.pid()), "0", "the control may dump core");
    let dumpable_owner = owner;
    drop(control);

    let mut watch = cli_command();
    watch
        .args(["watch", "--interval", "100ms", "--duration", "30s", "--auth-file"])
        .arg(&path)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    dumpable_start(&mut watch);
    let mut watch = Running(Some(watch.spawn().unwrap()));
    let mut first = String::new();
    std::io::BufReader::new(watch.0.as_mut().unwrap().stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("token sha256:"), "watch is serving: {first:?}");
    let (owner, uid) = proc_owner(watch.pid());
    assert_eq!(uid, dumpable_owner, "started like the control");
    assert_eq!(owner, 0, "watch is not dumpable: its /proc files belong to root");
    assert_eq!(core_limit(watch.pid()), "0", "watch writes no core file");
}

/// Runs `cmd` for at most `limit`; `None` if it had to be killed. (Its
/// output must fit in the pipes meanwhile: a usage error's does.)
fn output_within(cmd: &mut std::process::Command, limit: Duration) -> Option<std::process::Output> {
    use std::process::Stdio;
    let mut child = Running(Some(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()));
    let started = std::time::Instant::now();
    loop {
        // `wait` after a successful `try_wait` returns the recorded status.
        if child.0.as_mut().unwrap().try_wait().unwrap().is_some() {
            return Some(child.wait());
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// #18: an absurd value of any duration (or size) flag is a usage error,
/// exit 2 with a message naming the flag; nothing panics, nothing hangs.
#[test]
fn absurd_flag_values_are_usage_errors() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(3600.0));
    let auth = path.to_str().unwrap();
    let huge = ["300000000000y", "18446744073709551615s", "100000y"];
    let mut cases: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |flag: &str, values: &[&str], args: &[&str]| {
        for value in values {
            let mut argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let at = argv.iter().position(|a| a == "@").unwrap();
            argv.splice(at..=at, [flag.to_owned(), value.to_string()]);
            cases.push((format!("{flag} {value}"), argv));
        }
    };
    let token = ["--auth-file", auth, "@", "token"];
    add("--refresh-ahead", &[&huge[..], &["2y"]].concat(), &token);
    add("--winner-wait", &[&huge[..], &["1h"]].concat(), &token);
    add("--timeout", &[&huge[..], &["0s", "2h"]].concat(), &token);
    let watch = ["--auth-file", auth, "watch", "--duration", "1s", "@"];
    add("--interval", &[&huge[..], &["2d"]].concat(), &watch);
    let watch = ["--auth-file", auth, "watch", "@"];
    add("--duration", &[&huge[..], &["2y"]].concat(), &watch);
    let simulate = ["simulate", "--duration", "1s", "@"];
    add("--token-lifetime", &[&huge[..], &["0s", "2d"]].concat(), &simulate);
    add("--latency", &[&huge[..], &["2m"]].concat(), &simulate);
    add("--jobs", &["18446744073709551615", "1000000"], &simulate);
    add("--concurrency", &["18446744073709551615", "10000000"], &simulate);
    let simulate = ["simulate", "@"];
    add("--duration", &[&huge[..], &["2d"]].concat(), &simulate);

    let mut failures = Vec::new();
    for (case, argv) in &cases {
        let mut cmd = cli_command();
        cmd.args(argv)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
            .env_remove("RUST_LOG");
        let Some(out) = output_within(&mut cmd, Duration::from_secs(10)) else {
            failures.push(format!("{case}: still running after 10 s"));
            continue;
        };
        let err = stderr(&out);
        let flag = case.split(' ').next().unwrap();
        if out.status.code() != Some(2) || err.contains("panicked") || !err.contains(flag) {
            failures.push(format!("{case}: exit {:?}: {}", out.status.code(), err.trim()));
        }
    }
    // The environment variable behind --winner-wait is bounded too.
    let out = cli_command()
        .args(["--auth-file", auth, "token"])
        .env("TOKEN_BROKER_WINNER_WAIT", "300000000000y")
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .output()
        .unwrap();
    if out.status.code() != Some(2) {
        failures.push(format!(
            "TOKEN_BROKER_WINNER_WAIT: exit {:?}: {}",
            out.status.code(),
            stderr(&out)
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len() + 1,
        failures.join("\n")
    );
}

/// #18: an embedder may pass any `Duration`, however large: the broker
/// saturates instead of panicking, and still serves and refreshes tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_max_settings_never_panic() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let broker = TokenBroker::codex()
        .credentials_path(&path)
        .token_url(fx.sim.token_url())
        .refresh_ahead(Duration::MAX)
        .http_timeout(Duration::MAX)
        .lock_timeout(Duration::MAX)
        .watch_interval(Duration::MAX)
        .winner_wait(Duration::MAX)
        .keep_fresh(true)
        .build()
        .unwrap();
    let token = broker.token().await.unwrap();
    assert!(fx.sim.is_live(token.expose()));
    // An unbounded window is capped by the half-life rule: the new token is
    // fresh, served again without another request.
    let again = broker.token().await.unwrap();
    assert_eq!(again, token);
    assert_eq!(fx.sim.token_requests(), 1);
    let status = broker.status().await.unwrap();
    assert!(status.last_error.is_none(), "{status:?}");

    // A refusal with an unbounded winner wait: the wait is bounded by
    // nothing but the file; a new sign-in written to it ends it.
    let dead = fx.sim.sign_in(-1.0);
    fx.sim.spend(&dead.refresh_token);
    let path2 = fx.path("other.json");
    std::fs::write(&path2, token_broker::sim::codex_auth_json(&dead)).unwrap();
    let refused = TokenBroker::codex()
        .credentials_path(&path2)
        .token_url(fx.sim.token_url())
        .winner_wait(Duration::MAX)
        .lock_timeout(Duration::MAX)
        .build()
        .unwrap();
    let waiting = tokio::spawn({
        let refused = refused.clone();
        async move { refused.token().await }
    });
    while fx.sim.counts().reused == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&path2, token_broker::sim::codex_auth_json(&fx.sim.sign_in(3600.0))).unwrap();
    let adopted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the winner's tokens end the wait")
        .unwrap()
        .unwrap();
    assert!(fx.sim.is_live(adopted.expose()));
    refused.shutdown().await;
    broker.shutdown().await;
}

/// Numbers in keys the broker does not own, as their writer wrote them:
/// beyond u64 and f64 range and precision, trailing zeros, negative zero,
/// exponents; and a string with escapes. `(key, literal)`; keys are unique
/// in the file.
const ODD_NUMBERS: [(&str, &str); 11] = [
    ("tb_big", "123456789012345678901234567890"),
    ("tb_negative_big", "-98765432109876543210987654321"),
    ("tb_trailing_zero", "1.10"),
    ("tb_negative_zero", "-0.0"),
    ("tb_too_large", "1e400"),
    ("tb_too_small", "1e-400"),
    ("tb_exponent", "1.5E+10"),
    ("tb_precise", "0.30000000000000000000000000001"),
    ("tb_list", "[1.10,-0.0,1e400,18446744073709551616]"),
    // Strings as written too: escapes are not decoded and re-encoded.
    ("tb_escaped", r#""caf\u00e9\/\ud83d\ude00""#),
    ("tb_compact_object", r#"{"z":1.0}"#),
];

/// `ODD_NUMBERS` as JSON members (after `prefix` on each key), each
/// followed by a comma.
fn odd_members(prefix: &str) -> String {
    ODD_NUMBERS
        .iter()
        .map(|(key, literal)| format!("\"{prefix}{key}\": {literal},\n"))
        .collect()
}

/// The literal text of the value of `"key"` in `text` (whitespace removed
/// inside an array).
fn literal_of(text: &str, key: &str) -> Option<String> {
    let at = text.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('[') {
        rest.find(']')? + 1
    } else if rest.starts_with('{') {
        rest.find('}')? + 1
    } else if let Some(string) = rest.strip_prefix('"') {
        string.find('"')? + 2
    } else {
        rest.find([',', '}', ']', '\n', ' '])?
    };
    Some(rest[..end].chars().filter(|c| !c.is_whitespace()).collect())
}

/// Checks that every odd number (under `prefix`) kept its literal text.
fn assert_numbers_kept(case: &str, text: &str, prefix: &str) {
    let mut lost = Vec::new();
    for (key, literal) in ODD_NUMBERS {
        let key = format!("{prefix}{key}");
        match literal_of(text, &key) {
            Some(now) if now == literal => {}
            now => lost.push(format!("{key}: {literal} became {now:?}")),
        }
    }
    assert!(lost.is_empty(), "{case}: numbers changed:\n{}\n{text}", lost.join("\n"));
}

/// #19: numbers in keys the broker does not own survive a refresh exactly
/// as written (the literal, not just the value a float can hold), at the
/// top level, nested, and inside `tokens`; in a Codex `auth.json` and a
/// generic OAuth2 file.
#[test]
fn unknown_numbers_survive_a_refresh_as_written() {
    use token_broker::sim::{SimClientAuth, SimConfig};
    use token_broker::Dialect;

    // Codex: top level, in `tokens`, and nested.
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let original = token_broker::sim::codex_auth_json(&issued);
    let text = original
        .replacen(
            '{',
            &format!(
                "{{\n{}\"tb_nested\": {{{}\"end\": 0}},\n",
                odd_members(""),
                odd_members("n_")
            ),
            1,
        )
        .replacen("\"tokens\": {", &format!("\"tokens\": {{\n{}", odd_members("t_")), 1);
    let path = fx.path("auth.json");
    std::fs::write(&path, &text).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "codex: {}", stderr(&out));
    assert_eq!(fx.sim.counts().refreshed, 1);
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(!after.contains(&issued.refresh_token), "the refresh token was rotated");
    for prefix in ["", "n_", "t_"] {
        assert_numbers_kept("codex", &after, prefix);
    }

    // A generic OAuth2 file.
    let fx = Fixture::new(SimConfig {
        dialect: Dialect::OAuth2,
        client_auth: SimClientAuth::None,
        client_id: "odd-numbers".into(),
        ..SimConfig::default()
    });
    let issued = fx.sim.sign_in(-1.0);
    let text = token_broker::sim::oauth2_credentials_json(&issued).replacen(
        '{',
        &format!(
            "{{\n{}\"tb_nested\": {{{}\"end\": 0}},\n",
            odd_members(""),
            odd_members("n_")
        ),
        1,
    );
    let path = fx.path("credentials.json");
    std::fs::write(&path, &text).unwrap();
    let out = cli_command()
        .args([
            "token",
            "--provider",
            "oauth2",
            "--client-id",
            "odd-numbers",
            "--token-url",
        ])
        .arg(fx.sim.token_url())
        .arg("--auth-file")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "oauth2: {}", stderr(&out));
    assert_eq!(fx.sim.counts().refreshed, 1);
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(!after.contains(&issued.refresh_token), "the refresh token was rotated");
    for prefix in ["", "n_"] {
        assert_numbers_kept("oauth2", &after, prefix);
    }
}

/// A token URL on loopback where nothing listens.
fn unreachable_url() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/oauth/token", closed.local_addr().unwrap());
    drop(closed);
    url
}

/// #20: `watch` on an expired token with the provider unreachable prints
/// the error once, when it starts, not on every tick with a new "retrying
/// in" countdown; nor again on exit. Text and JSON.
#[test]
fn watch_prints_a_lasting_error_once() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    for json in [false, true] {
        let mut cmd = cli_command();
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .args(["watch", "--interval", "100ms", "--duration", "3500ms", "--auth-file"])
            .arg(&path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", unreachable_url())
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(5), "json {json}: {err}");
        assert_eq!(err.lines().count(), 1, "json {json}: the error once:\n{err}");
        assert!(err.contains("could not connect"), "json {json}: {err}");
        if json {
            let line: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
            assert_eq!(line["error"]["kind"], "provider_unavailable", "{err}");
        }
    }
}

/// #20: a path with a newline (or a terminal escape) in it never splits an
/// error over two lines nor reaches the terminal raw: every message quotes
/// and escapes it. Missing file, invalid file, a directory, a refresh
/// that fails (the location in the error), and `status`.
#[test]
fn a_path_with_a_newline_gives_one_line_errors() {
    let fx = Fixture::codex();
    let dir = fx.path("line\nbreak \u{1b}[31mred");
    std::fs::create_dir(&dir).unwrap();
    let missing = dir.join("missing.json");
    let invalid = dir.join("invalid\n.json");
    std::fs::write(&invalid, "{").unwrap();
    let expired = dir.join("expired.json");
    std::fs::write(&expired, token_broker::sim::codex_auth_json(&fx.sim.sign_in(-1.0))).unwrap();
    let directory = dir.join("a directory");
    std::fs::create_dir(&directory).unwrap();

    let url = unreachable_url();
    for (case, path, code) in [
        ("missing", &missing, 3),
        ("invalid", &invalid, 3),
        ("directory", &directory, 3),
        ("unavailable", &expired, 5),
    ] {
        for json in [false, true] {
            let mut cmd = cli_command();
            if json {
                cmd.arg("--json");
            }
            let out = cmd
                .args(["token", "--auth-file"])
                .arg(path)
                .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", &url)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(code), "{case}: {err}");
            assert_eq!(err.lines().count(), 1, "{case} (json {json}): one line:\n{err}");
            assert!(
                !err.contains('\u{1b}'),
                "{case}: a raw escape reached the terminal: {err:?}"
            );
            let message = if json {
                let line: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
                line["error"]["message"].as_str().unwrap().to_owned()
            } else {
                err.clone()
            };
            assert!(
                message.contains("line\\nbreak"),
                "{case}: the path is shown, escaped: {err}"
            );
        }
    }
    let out = fx.cli(&["status", "--auth-file", expired.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("credentials:") && lines[0].contains("line\\nbreak"),
        "{text}"
    );
    assert!(lines[1].starts_with("state:"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text:?}");
}
