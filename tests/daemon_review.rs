//! A hostile review of `token-broker serve`: real daemon processes, raw
//! HTTP on the socket, the CLI as a client.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use daemon::Daemon;
use token_broker::sim::{codex_auth_json, SimConfig};

/// One HTTP/1.1 exchange on the socket, raw: the status and the body.
#[allow(dead_code)]
fn http(socket: &Path, request: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    daemon::status_and_body(&answer)
}

fn get(socket: &Path, path: &str) -> (u16, String) {
    http(
        socket,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

/// The config text of one profile `codex` on `auth`, served on `socket`.
fn config_text(socket: &Path, auth: &Path, url: &str, extra_daemon: &str) -> String {
    format!(
        "[daemon]\nsocket = {socket:?}\n{extra_daemon}\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {url:?}\nwinner_wait = \"300ms\"\ntimeout = \"10s\"\n",
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
    std::fs::write(&config, config_text(&socket, &auth, &fx.sim.token_url(), "")).unwrap();
    (fx, config, socket)
}

/// Rewrites the daemon's configuration, sends SIGHUP and waits until the
/// daemon has applied it (the `nth` reload of its life).
fn reload(daemon: &Daemon, text: &str, nth: usize) {
    std::fs::write(&daemon.config, text).unwrap();
    daemon.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(30), "the daemon reloaded", || {
        daemon.logs().matches("reloaded the configuration").count() >= nth
    });
}

/// In a forked child running as `uid`: connects to `path`, asks `first`
/// (kept alive), reports on `report` whether it was answered 200, waits for
/// a byte on `go`, asks `second` on the same connection and reports again.
/// Only async-signal-safe calls (no allocation) between fork and `_exit`.
///
/// # Safety
///
/// Call only in the child of a `fork`.
unsafe fn kept_alive_client(uid: u32, path: &[u8], first: &[u8], second: &[u8], report: i32, go: i32) -> ! {
    unsafe {
        if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
            libc::_exit(10);
        }
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in path.iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
            libc::_exit(11);
        }
        let timeout = libc::timeval { tv_sec: 30, tv_usec: 0 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        for (round, request) in [first, second].into_iter().enumerate() {
            if round == 1 {
                let mut byte = 0u8;
                libc::read(go, &mut byte as *mut u8 as *mut libc::c_void, 1);
            }
            let mut sent = 0;
            while sent < request.len() {
                let n = libc::write(
                    fd,
                    request[sent..].as_ptr() as *const libc::c_void,
                    request.len() - sent,
                );
                if n <= 0 {
                    break;
                }
                sent += n as usize;
            }
            // Read the whole answer: to `ok\n` (a kept-alive /healthz) or
            // to the end of the connection.
            let mut buf = [0u8; 8192];
            let mut got = 0;
            loop {
                let n = libc::read(fd, buf[got..].as_mut_ptr() as *mut libc::c_void, buf.len() - got);
                if n <= 0 {
                    break;
                }
                got += n as usize;
                if buf[..got].ends_with(b"\r\n\r\nok\n") || got == buf.len() {
                    break;
                }
            }
            let verdict: u8 = if buf[..got].starts_with(b"HTTP/1.1 200") { 1 } else { 2 };
            libc::write(report, &verdict as *const u8 as *const libc::c_void, 1);
        }
        libc::_exit(0)
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: pipe fills the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    (fds[0], fds[1])
}

/// What a client running as another user heard: whether each of its two
/// requests on one kept-alive connection was answered 200 (1), answered
/// otherwise or not at all (2), or never made (0, the child's exit code
/// says why: 11 could not connect).
#[derive(Debug, PartialEq, Eq)]
struct OtherUser {
    first: u8,
    second: u8,
    exit: i32,
}

/// Asks `first` and then, after `between` ran, `second` on one connection
/// to `socket`, as `uid` (a forked child).
fn as_other_user(uid: u32, socket: &Path, first: &str, second: &str, between: impl FnOnce()) -> OtherUser {
    use std::os::unix::ffi::OsStrExt;
    let path = socket.as_os_str().as_bytes().to_vec();
    assert!(path.len() < 100, "the socket path fits a sockaddr_un");
    let (first, second) = (first.as_bytes().to_vec(), second.as_bytes().to_vec());
    let (report_read, report_write) = pipe();
    let (go_read, go_write) = pipe();
    // SAFETY: the child makes only async-signal-safe calls, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { kept_alive_client(uid, &path, &first, &second, report_write, go_read) }
    }
    assert!(pid > 0, "fork");
    // SAFETY: closes the child's ends here, so that a child that died is
    // seen as the end of its pipe.
    unsafe {
        libc::close(report_write);
        libc::close(go_read);
    }
    let verdict = || {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a local.
        let n = unsafe { libc::read(report_read, &mut byte as *mut u8 as *mut libc::c_void, 1) };
        if n == 1 {
            byte
        } else {
            0
        }
    };
    let first = verdict();
    if first == 1 {
        between();
    }
    // SAFETY: writes one byte from a local; closes our own descriptors.
    unsafe {
        libc::write(go_write, b"g".as_ptr() as *const libc::c_void, 1);
        libc::close(go_write);
    }
    let second = verdict();
    // SAFETY: closes our own descriptor.
    unsafe { libc::close(report_read) };
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    OtherUser {
        first,
        second,
        exit: libc::WEXITSTATUS(status),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A user other than the daemon's.
const OTHER: u32 = 65534;

const HEALTHZ_KEPT_ALIVE: &str = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
const TOKEN_AND_CLOSE: &str = "GET /v1/profiles/codex/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// A daemon started with `allowed_uids` must let those users reach its
/// socket: the socket was made 0600 at start whatever `allowed_uids` said
/// (only a reload that changed `allowed_uids` made it 0666), so an allowed
/// user could not connect at all.
#[test]
fn a_user_in_allowed_uids_can_connect_to_a_daemon_just_started() {
    use std::os::unix::fs::PermissionsExt;
    let (fx, config, socket) = setup(3600.0, SimConfig::default());
    // The other user must be able to reach the socket's folder.
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (auth, url) = (fx.path("auth.json"), fx.sim.token_url());
    std::fs::write(
        &config,
        config_text(&socket, &auth, &url, &format!("allowed_uids = [{OTHER}]\n")),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, &socket);
    assert_eq!(mode(&socket), 0o666, "the allowed users can open the socket");
    assert_eq!(
        mode(&socket.with_file_name("")),
        0o711,
        "the folder is made traversable"
    );
    if is_root() {
        let heard = as_other_user(OTHER, &socket, HEALTHZ_KEPT_ALIVE, TOKEN_AND_CLOSE, || {});
        assert_eq!(
            heard,
            OtherUser {
                first: 1,
                second: 1,
                exit: 0
            },
            "{}",
            daemon.logs()
        );
    }
    assert_eq!(daemon.stop().code(), Some(0));
}

/// Taking a user out of `allowed_uids` (and sending SIGHUP) must take the
/// daemon away from that user, also on a connection it opened before: the
/// peer check ran only when a connection was accepted, so a kept-alive
/// connection went on getting tokens.
#[test]
fn a_user_taken_out_of_allowed_uids_gets_nothing_more_on_a_kept_alive_connection() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: connecting as another user needs root");
        return;
    }
    let (fx, config, socket) = setup(3600.0, SimConfig::default());
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let (auth, url) = (fx.path("auth.json"), fx.sim.token_url());
    std::fs::write(
        &config,
        config_text(&socket, &auth, &url, &format!("allowed_uids = [{OTHER}]\n")),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config, &socket);
    let heard = as_other_user(OTHER, &socket, HEALTHZ_KEPT_ALIVE, TOKEN_AND_CLOSE, || {
        // The operator takes the user out again.
        reload(&daemon, &config_text(&socket, &auth, &url, ""), 1);
    });
    assert_eq!(heard.first, 1, "the allowed user is served at first: {heard:?}");
    assert_eq!(heard.exit, 0, "{heard:?}");
    assert_ne!(
        heard.second, 1,
        "a user no longer in allowed_uids was handed a token on its kept-alive connection"
    );
    assert_eq!(mode(&socket), 0o600, "the socket is private again");
    assert_eq!(daemon.stop().code(), Some(0));
}

/// A reload that names another socket is not applied (the daemon keeps
/// listening where it does); a later reload that changes `allowed_uids`
/// must then change the mode of the socket it listens on, not of whatever
/// the configuration names now: it made that file 0666 (here a private
/// file, which became writable by everyone) and left the real socket 0600.
#[test]
fn a_reload_after_an_ignored_socket_change_sets_the_mode_of_the_socket_in_use() {
    use std::os::unix::fs::PermissionsExt;
    let (fx, config, socket) = setup(3600.0, SimConfig::default());
    let (auth, url) = (fx.path("auth.json"), fx.sim.token_url());
    let mut daemon = Daemon::start(&config, &socket);
    let precious = fx.path("precious");
    std::fs::write(&precious, "not a socket").unwrap();
    std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o600)).unwrap();

    reload(&daemon, &config_text(&precious, &auth, &url, ""), 1);
    assert!(
        daemon.logs().contains("not applied until a restart"),
        "{}",
        daemon.logs()
    );
    reload(
        &daemon,
        &config_text(&precious, &auth, &url, &format!("allowed_uids = [{OTHER}]\n")),
        2,
    );
    assert_eq!(
        mode(&precious),
        0o600,
        "a file the daemon does not listen on is left alone"
    );
    assert_eq!(mode(&socket), 0o666, "the socket in use opens to the allowed users");
    assert_eq!(get(&socket, "/healthz").0, 200);
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "not a socket");
    assert_eq!(daemon.stop().code(), Some(0));
    assert!(!socket.exists(), "the socket in use is removed at exit");
}

/// `token-broker <args> --config <config>` without the caller's daemon mode.
fn cli_with(config: &Path, args: &[&str]) -> std::process::Output {
    cli_command()
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("TOKEN_BROKER_DAEMON")
        .output()
        .unwrap()
}

/// A profile is asked of the daemon by name, and a name means what the
/// caller's configuration says: when the daemon on that socket serves
/// another credential under the name (it was started from another file, or
/// the file changed and nobody sent SIGHUP), it must not hand out its
/// credential. It did: `token --profile codex` printed the daemon's account's
/// token while this configuration names another file (and with `--daemon
/// auto` a profile the daemon does not know yet was an error instead of
/// being read here).
#[test]
fn the_daemon_never_hands_out_another_credential_than_the_callers_configuration_names() {
    let fx = Fixture::codex();
    let (daemons, mine) = (
        fx.sim.sign_in_as("acct-daemon", 3600.0),
        fx.sim.sign_in_as("acct-mine", 3600.0),
    );
    let (daemon_auth, my_auth) = (fx.path("daemon-auth.json"), fx.path("my-auth.json"));
    std::fs::write(&daemon_auth, codex_auth_json(&daemons)).unwrap();
    std::fs::write(&my_auth, codex_auth_json(&mine)).unwrap();
    let socket = fx.path("run/tb.sock");
    let url = fx.sim.token_url();
    let daemon_config = fx.path("daemon.toml");
    std::fs::write(&daemon_config, config_text(&socket, &daemon_auth, &url, "")).unwrap();
    // The caller's configuration: the same socket, its own `codex`, and a
    // profile the daemon does not serve.
    let my_config = fx.path("mine.toml");
    std::fs::write(
        &my_config,
        format!(
            "{}\n[profiles.extra]\nprovider = \"codex\"\nauth_file = {my_auth:?}\ntoken_url = {url:?}\n",
            config_text(&socket, &my_auth, &url, "")
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&daemon_config, &socket);

    // The daemon's own configuration gets the daemon's credential.
    let out = cli_with(&daemon_config, &["token", "--profile", "codex", "--daemon", "require"]);
    assert_eq!(stdout(&out), format!("{}\n", daemons.access_token), "{}", stderr(&out));

    // Mine gets mine: read here when the daemon serves another one.
    for args in [
        &["token", "--profile", "codex"][..],
        &["token", "--profile", "codex", "--daemon", "auto", "--format", "json"],
        &["token", "--profile", "extra"],
    ] {
        let out = cli_with(&my_config, args);
        assert!(
            !stdout(&out).contains(&daemons.access_token),
            "{args:?}: the daemon's credential was handed out for this configuration's profile"
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).contains(&mine.access_token), "{args:?}: {}", stdout(&out));
    }
    let out = cli_with(&my_config, &["status", "--profile", "codex", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["location"], my_auth.to_str().unwrap(), "{status}");

    // Required, the daemon says no, as a usage error: the two
    // configurations disagree.
    let out = cli_with(
        &my_config,
        &["token", "--profile", "codex", "--daemon", "require", "--json"],
    );
    assert!(!stdout(&out).contains(&daemons.access_token));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let line: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(line["error"]["kind"], "profile_mismatch", "{line}");

    assert_eq!(fx.sim.counts().token_requests, 0, "valid tokens are never refreshed");
    assert_eq!(daemon.stop().code(), Some(0));
}

/// A daemon that accepts connections and never answers (stopped with
/// SIGSTOP, or stuck) is a daemon that does not answer: `--daemon auto`
/// must read the credentials here, and `--daemon require` fail with exit 5
/// (try again later), as for no daemon at all. Both failed with exit 1
/// ("answered badly") once the client's wait ran out.
#[test]
fn a_daemon_that_never_answers_is_no_daemon() {
    use std::os::unix::fs::DirBuilderExt;
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(3600.0);
    let auth = fx.write_codex(&issued);
    let socket = fx.path("run/tb.sock");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(socket.parent().unwrap())
        .unwrap();
    // A short client wait: 2 × (1 s + grace) + 15 s.
    let config = fx.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = {url:?}\nwinner_wait = \"0s\"\ntimeout = \"1s\"\n",
            url = fx.sim.token_url()
        ),
    )
    .unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let asked = |mode: &'static str| {
        let config = config.clone();
        std::thread::spawn(move || cli_with(&config, &["token", "--profile", "codex", "--daemon", mode]))
    };
    let (auto, require) = (asked("auto"), asked("require"));
    let (auto, require) = (auto.join().unwrap(), require.join().unwrap());
    assert_eq!(auto.status.code(), Some(0), "{}", stderr(&auto));
    assert_eq!(stdout(&auto), format!("{}\n", issued.access_token));
    assert_eq!(require.status.code(), Some(5), "{}", stderr(&require));
    assert!(
        stderr(&require).contains("no token-broker daemon answers"),
        "{}",
        stderr(&require)
    );
    assert!(stdout(&require).is_empty());
}

/// Configuration errors never quote a value, in case a secret was pasted
/// where it does not belong; a key that does not look like one is left out
/// too. A profile name that cannot be one (a token pasted as a table name)
/// was quoted whole.
#[test]
fn a_secret_pasted_as_a_profile_name_is_not_quoted_in_the_error() {
    use token_broker::server::config::Config;
    let secret = "sk-proj-SECRETVALUE0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEF";
    let fx = Fixture::codex();
    for text in [
        format!("[profiles.{secret}]\nprovider = \"codex\"\n"),
        format!("[profiles.\"Bearer {secret}\"]\nprovider = \"codex\"\n"),
        format!(
            "[profiles.\"{}\"]\nprovider = \"codex\"\n",
            &secret[..40].replace('-', "+")
        ),
    ] {
        let e = Config::parse(&text, None).unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(shown.contains("profile name"), "{shown}");
        assert!(!shown.contains("SECRETVALUE"), "{shown}");
        // The same through the command line.
        let config = fx.path("config.toml");
        std::fs::write(&config, &text).unwrap();
        for args in [&["serve"][..], &["token", "--profile", "x", "--daemon", "never"]] {
            let out = cli_with(&config, args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            assert!(!stderr(&out).contains("SECRETVALUE"), "{args:?}: {}", stderr(&out));
        }
    }
    // A short bad name is still shown, to be found and fixed.
    let e = Config::parse("[profiles.\"a/b\"]\nprovider = \"codex\"\n", None).unwrap_err();
    assert!(e.to_string().contains("a/b"), "{e}");
}

/// Every error the socket answers is `{"error": code, "message": ...}`, as
/// documented: a profile name that is not UTF-8 once decoded, and a method
/// a route does not take, were answered in plain text or with no body.
#[test]
fn every_error_answer_is_the_documented_json() {
    let (_fx, config, socket) = setup(3600.0, SimConfig::default());
    let mut daemon = Daemon::start(&config, &socket);
    for (request, status, code) in [
        ("GET /v1/profiles/%FF/token HTTP/1.1", 400, "bad_request"),
        ("GET /v1/profiles/%C3%28/status HTTP/1.1", 400, "bad_request"),
        ("POST /v1/profiles/%FF/reject HTTP/1.1", 400, "bad_request"),
        ("OPTIONS /v1/profiles/codex/token HTTP/1.1", 405, "method_not_allowed"),
        ("DELETE /v1/profiles/codex/token HTTP/1.1", 405, "method_not_allowed"),
        ("BREW /healthz HTTP/1.1", 405, "method_not_allowed"),
        ("GET /v1/profiles/codex/reject HTTP/1.1", 405, "method_not_allowed"),
        ("GET /nope HTTP/1.1", 404, "not_found"),
    ] {
        let (got, body) = http(
            &socket,
            &format!("{request}\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(got, status, "{request}: {body}");
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{request}: not JSON: {body:?}"));
        assert_eq!(json["error"], code, "{request}: {json}");
        assert!(
            json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{request}: {json}"
        );
    }
    // The metrics still count these by route template, never by raw path.
    let (_, metrics) = get(&socket, "/metrics");
    assert!(!metrics.contains("%FF") && !metrics.contains("/nope"), "{metrics}");
    assert_eq!(daemon.stop().code(), Some(0));
}

/// Every error is one line on stderr, also when a path in it holds a
/// newline (shown quoted and escaped, as the credentials file's errors
/// are): the configuration's and the socket's paths were printed raw, so
/// that a file name could split or forge a line of output.
#[test]
fn an_error_naming_a_path_with_a_newline_is_one_line() {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fx = Fixture::codex();
    let forged = "a\ntoken-broker: all is well";
    let odd = fx.path(forged);
    std::fs::DirBuilder::new().mode(0o700).create(&odd).unwrap();
    let one_line = |out: &std::process::Output, what: &str| {
        let text = stderr(out);
        assert_ne!(out.status.code(), Some(0), "{what}: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "{what}: {text}");
        assert!(!text.contains("\ntoken-broker: all is well"), "{what}: {text}");
    };
    // A configuration file that is missing, and one that does not parse.
    let config = odd.join("config.toml");
    one_line(
        &cli_with(&config, &["token", "--profile", "x", "--daemon", "never"]),
        "missing config",
    );
    std::fs::write(&config, "[profiles.a]\nprovider = \"codex\"\nrefresh_ahaed = \"1m\"\n").unwrap();
    one_line(&cli_with(&config, &["serve"]), "bad config");
    // A socket in that folder: no daemon answers, and one that cannot
    // start because the folder is open to others.
    let issued = fx.sim.sign_in(3600.0);
    let auth = fx.write_codex(&issued);
    let socket = odd.join("tb.sock");
    let config = fx.path("config.toml");
    std::fs::write(&config, config_text(&socket, &auth, &fx.sim.token_url(), "")).unwrap();
    one_line(
        &cli_with(&config, &["token", "--profile", "codex", "--daemon", "require"]),
        "no daemon",
    );
    std::fs::set_permissions(&odd, std::fs::Permissions::from_mode(0o755)).unwrap();
    one_line(&cli_with(&config, &["serve"]), "open folder");
}

/// Starts a refresh in the daemon (a reject of the token in force, with a
/// slow provider) and waits until the provider has the request.
fn refresh_under_way(fx: &Fixture, socket: &Path) -> (String, std::thread::JoinHandle<(u16, String)>) {
    let before = read_json(&fx.path("auth.json"))["tokens"].clone();
    let access = before["access_token"].as_str().unwrap().to_owned();
    let socket = socket.to_path_buf();
    let body = serde_json::json!({ "access_token": access }).to_string();
    let caller = std::thread::spawn(move || {
        http(
            &socket,
            &format!(
                "POST /v1/profiles/codex/reject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    });
    wait_until(Duration::from_secs(30), "the provider has the refresh", || {
        fx.sim.concurrent_token_requests() >= 1
    });
    (before["refresh_token"].as_str().unwrap().to_owned(), caller)
}

/// The rotated tokens of a refresh under way reach the file.
fn assert_rotated_on_disk(fx: &Fixture, spent: &str) {
    let now = read_json(&fx.path("auth.json"))["tokens"].clone();
    let refresh = now["refresh_token"].as_str().unwrap();
    assert_ne!(refresh, spent, "the rotated refresh token reached the file");
    assert!(fx.sim.is_unspent(refresh), "the file's refresh token is the live one");
    assert!(fx.sim.is_live(now["access_token"].as_str().unwrap()));
    assert_eq!(fx.sim.counts().refreshed, 1, "one refresh");
}

/// SIGTERM while the provider is answering a refresh: the daemon lets it
/// reach the file before it exits 0.
#[test]
fn a_daemon_stopped_during_a_refresh_writes_the_rotated_tokens_and_exits_0() {
    let (fx, config, socket) = setup(
        3600.0,
        SimConfig {
            latency: Duration::from_millis(1500),
            ..SimConfig::default()
        },
    );
    let mut daemon = Daemon::start(&config, &socket);
    let (spent, caller) = refresh_under_way(&fx, &socket);
    let logs = daemon.stderr.clone();
    let status = daemon.stop();
    assert_eq!(status.code(), Some(0), "{}", logs.lock());
    assert_rotated_on_disk(&fx, &spent);
    assert!(!socket.exists());
    let (code, body) = caller.join().unwrap();
    // The caller heard the new token, or to try again; never a spent one.
    assert!(matches!(code, 0 | 200 | 503), "{code} {body}");
}

/// A reload that removes a profile while its refresh is under way stops it
/// only once the rotated tokens are in the file; the daemon serves on.
#[test]
fn a_profile_removed_during_its_refresh_keeps_the_rotated_tokens() {
    let (fx, config, socket) = setup(
        3600.0,
        SimConfig {
            latency: Duration::from_millis(1500),
            ..SimConfig::default()
        },
    );
    let mut daemon = Daemon::start(&config, &socket);
    let (spent, caller) = refresh_under_way(&fx, &socket);
    let other = fx.path("other.json");
    std::fs::write(&other, codex_auth_json(&fx.sim.sign_in_as("acct-other", 3600.0))).unwrap();
    reload(
        &daemon,
        &format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.other]\nprovider = \"codex\"\nauth_file = {other:?}\ntoken_url = {url:?}\n",
            url = fx.sim.token_url()
        ),
        1,
    );
    assert_rotated_on_disk(&fx, &spent);
    let (code, body) = caller.join().unwrap();
    assert!(matches!(code, 200 | 503), "{code} {body}");
    assert_eq!(get(&socket, "/v1/profiles/codex/token").0, 404);
    assert_eq!(get(&socket, "/v1/profiles/other/token").0, 200);
    assert!(!daemon.logs().contains("lost rotated tokens"), "{}", daemon.logs());
    assert_eq!(daemon.stop().code(), Some(0));
}

/// The daemon's log goes to a journal or a file far more often than to a
/// terminal: it must be plain text there. It was coloured with terminal
/// escapes whatever stderr was (`[2m2026-…[0m [32m INFO[0m` in
/// `journalctl`).
#[test]
fn the_daemons_log_to_a_pipe_has_no_terminal_escapes() {
    let (_fx, config, socket) = setup(3600.0, SimConfig::default());
    let mut daemon = Daemon::start_with(&config, &socket, "debug");
    assert_eq!(get(&socket, "/v1/profiles/codex/token").0, 200);
    daemon.signal(libc::SIGHUP);
    wait_until(Duration::from_secs(30), "a reload", || {
        daemon.logs().contains("reloaded the configuration")
    });
    let logs = daemon.logs();
    assert!(!logs.contains('\x1b'), "{logs:?}");
    assert!(logs.contains("unchanged=1"), "{logs}");
    assert_eq!(daemon.stop().code(), Some(0));
}

/// A storm of SIGHUPs with an unchanged configuration restarts nothing:
/// callers asking meanwhile get the same token, never an error; a SIGHUP
/// and a SIGTERM at once still stop the daemon with exit 0.
#[test]
fn a_sighup_storm_changes_nothing_for_callers() {
    let (fx, config, socket) = setup(3600.0, SimConfig::default());
    let mut daemon = Daemon::start(&config, &socket);
    let token = read_json(&fx.path("auth.json"))["tokens"]["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    answers.push(get(&socket, "/v1/profiles/codex/token"));
                }
                answers
            })
        })
        .collect();
    for _ in 0..30 {
        daemon.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_until(Duration::from_secs(30), "a reload", || {
        daemon.logs().contains("reloaded the configuration")
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        for (code, body) in caller.join().unwrap() {
            assert_eq!(code, 200, "{body}");
            assert!(body.contains(&token), "{body}");
        }
    }
    let logs = daemon.logs();
    assert!(logs.contains("unchanged=1"), "{logs}");
    assert!(!logs.contains("restarted=[\"codex\"]"), "{logs}");
    daemon.signal(libc::SIGHUP);
    let logs = daemon.stderr.clone();
    assert_eq!(daemon.stop().code(), Some(0), "{}", logs.lock());
    assert_eq!(fx.sim.counts().token_requests, 0);
}

/// In a forked child running as `uid`: makes the folder `dir` (0711),
/// listens on `socket` in it, says so on `ready`, and answers one
/// connection with `answer`. Only async-signal-safe calls.
///
/// # Safety
///
/// Call only in the child of a `fork`.
unsafe fn posing_daemon(uid: u32, dir: &[u8], socket: &[u8], answer: &[u8], ready: i32) -> ! {
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
            libc::_exit(10);
        }
        libc::mkdir(dir.as_ptr() as *const libc::c_char, 0o711);
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in socket.iter().take_while(|b| **b != 0).enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 || libc::listen(fd, 8) != 0 {
            libc::_exit(11);
        }
        libc::chmod(socket.as_ptr() as *const libc::c_char, 0o666);
        libc::write(ready, b"r".as_ptr() as *const libc::c_void, 1);
        let client = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
        let mut buf = [0u8; 4096];
        let mut got = 0;
        while got < buf.len() {
            let n = libc::read(client, buf[got..].as_mut_ptr() as *mut libc::c_void, buf.len() - got);
            if n <= 0 {
                break;
            }
            got += n as usize;
            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        libc::write(client, answer.as_ptr() as *const libc::c_void, answer.len());
        libc::close(client);
        libc::_exit(0)
    }
}

/// The client trusts whatever listens on the configured socket: another
/// user who makes the socket's folder first (here in a folder everyone may
/// write, as `/tmp` is) can pose as the daemon and hand out a token of its
/// choosing (and would be told the tokens a caller rejects). The daemon's
/// user (or root, or the owner of a folder nobody else could have made) is
/// the only one to ask; anyone else is no daemon.
#[test]
fn a_socket_served_by_another_user_in_a_shared_folder_is_not_asked() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("skipped: posing as another user needs root");
        return;
    }
    let fx = Fixture::codex();
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let issued = fx.sim.sign_in(3600.0);
    let auth = fx.write_codex(&issued);
    let shared = fx.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let dir = shared.join("tb");
    let socket = dir.join("tb.sock");
    let config = fx.path("config.toml");
    std::fs::write(&config, config_text(&socket, &auth, &fx.sim.token_url(), "")).unwrap();

    let body = r#"{"access_token":"posed-token","token_type":"Bearer","expires_at":null,"account_id":null}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let nul = |p: &Path| {
        let mut bytes = p.as_os_str().as_bytes().to_vec();
        bytes.push(0);
        bytes
    };
    let (dir_c, socket_c) = (nul(&dir), nul(&socket));
    assert!(socket_c.len() < 100);
    let (ready_read, ready_write) = pipe();
    // SAFETY: the child makes only async-signal-safe calls, then _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe { posing_daemon(OTHER, &dir_c, &socket_c, &answer, ready_write) }
    }
    assert!(pid > 0, "fork");
    let mut byte = 0u8;
    // SAFETY: our own descriptors and a local byte.
    unsafe {
        libc::close(ready_write);
        assert_eq!(
            libc::read(ready_read, &mut byte as *mut u8 as *mut libc::c_void, 1),
            1,
            "the poser listens"
        );
    }
    let out = cli_with(&config, &["token", "--profile", "codex"]);
    // SAFETY: stops and reaps our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    assert!(
        !stdout(&out).contains("posed-token"),
        "the poser's token was handed out"
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}\n", issued.access_token));
}

/// `client_secret_env` names the variable holding the client secret; a
/// tired operator pastes the secret itself there. It must then never be
/// shown: the error that the variable is unset quoted it, in the CLI's
/// error, the daemon's log and its API answers to every caller.
#[test]
fn a_secret_pasted_as_client_secret_env_is_never_shown() {
    let (fx, _, socket) = setup(3600.0, SimConfig::default());
    let config = fx.path("corp.toml");
    for pasted in [
        "sk-live-SECRETVALUE-0123456789abcdef",
        "SECRETVALUE9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c",
        "secretvalue_0123456789",
    ] {
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = {socket:?}\n\n[profiles.corp]\nprovider = \"oauth2\"\nauth_file = {auth:?}\ntoken_url = {url:?}\nclient_id = \"c\"\nclient_auth = \"basic\"\nclient_secret_env = {pasted:?}\n",
                auth = fx.path("oauth.json"),
                url = fx.sim.token_url(),
            ),
        )
        .unwrap();
        let out = cli_with(&config, &["token", "--profile", "corp", "--daemon", "never"]);
        assert_ne!(out.status.code(), Some(0));
        let shown = stderr(&out);
        assert!(shown.contains("client_secret_env"), "{pasted}: {shown}");
        assert!(!shown.to_lowercase().contains("secretvalue"), "{pasted}: {shown}");
        // Served by a daemon: its log and its answers.
        let mut child = cli_command()
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let answers = if first.contains("listening on") {
            let answer = get(&socket, "/v1/profiles/corp/token");
            let cli = cli_with(&config, &["token", "--profile", "corp", "--daemon", "require"]);
            format!("{answer:?} {}", stderr(&cli))
        } else {
            String::new()
        };
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let log = stderr(&out);
        assert!(!answers.to_lowercase().contains("secretvalue"), "{pasted}: {answers}");
        assert!(!log.to_lowercase().contains("secretvalue"), "{pasted}: {log}");
    }
}

/// A token URL carrying a user name and password (a client secret put
/// where it does not belong) would be shown in every error naming the
/// endpoint: the daemon's log, `status`, and its answers to every caller.
/// It is refused, without quoting it.
#[test]
fn a_token_url_carrying_a_password_is_refused_without_showing_it() {
    let (fx, _, socket) = setup(3600.0, SimConfig::default());
    let config = fx.path("leaky.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\nprovider = \"codex\"\nauth_file = {auth:?}\ntoken_url = \"http://client:sk-SECRETVALUE@127.0.0.1:9/oauth/token\"\n",
            auth = fx.path("auth.json"),
        ),
    )
    .unwrap();
    let mut child = cli_command()
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let mut answers = String::new();
    if first.contains("listening on") {
        // A caller reports the token rejected: the refresh fails, and the
        // answer names the endpoint.
        let access = read_json(&fx.path("auth.json"))["tokens"]["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let body = serde_json::json!({ "access_token": access }).to_string();
        let (_, answer) = http(
            &socket,
            &format!(
                "POST /v1/profiles/codex/reject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        answers.push_str(&answer);
        answers.push_str(&get(&socket, "/v1/profiles/codex/status").1);
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(!answers.contains("SECRETVALUE"), "{answers}");
    assert!(!log.contains("SECRETVALUE"), "{log}");
    assert_eq!(out.status.code(), Some(2), "refused at start: {first}{log}");
    assert!(log.contains("token_url"), "{log}");
}

/// What may lie at the socket's path: a second daemon is refused (exit 1,
/// the first one untouched); a symlink, a plain file or a symlinked lock
/// file is never followed nor replaced; a dead daemon's socket is.
#[test]
fn the_socket_path_cannot_be_taken_over() {
    let (fx, config, socket) = setup(3600.0, SimConfig::default());
    let mut daemon = Daemon::start(&config, &socket);
    let out = cli_with(&config, &["serve"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already listens"), "{}", stderr(&out));
    assert_eq!(get(&socket, "/healthz").0, 200, "the first daemon serves on");
    assert_eq!(daemon.stop().code(), Some(0));

    let target = fx.path("target");
    std::fs::write(&target, "keep").unwrap();
    let lock = socket.with_file_name("tb.sock.lock");
    for (what, make) in [
        (
            "a symlink",
            Box::new(|| std::os::unix::fs::symlink(&target, &socket).unwrap()) as Box<dyn Fn()>,
        ),
        ("a plain file", Box::new(|| std::fs::write(&socket, "keep").unwrap())),
        (
            "a symlinked lock file",
            Box::new(|| {
                std::fs::remove_file(&lock).unwrap();
                std::os::unix::fs::symlink(&target, &lock).unwrap()
            }),
        ),
    ] {
        make();
        let out = cli_with(&config, &["serve"]);
        assert_ne!(out.status.code(), Some(0), "{what}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{what}: {}", stderr(&out));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep", "{what}");
        let _ = std::fs::remove_file(&socket);
    }
    std::fs::remove_file(&lock).unwrap();
    // A dead daemon's socket (bound, nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut daemon = Daemon::start(&config, &socket);
    assert_eq!(get(&socket, "/healthz").0, 200);
    assert_eq!(daemon.stop().code(), Some(0));
}
