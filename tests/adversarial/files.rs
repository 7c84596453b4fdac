//! See `tests/adversarial.rs`: the credentials file and its neighbours are
//! tampered with.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use token_broker::credentials::RefreshToken;
use token_broker::sim::SimConfig;

use crate::common::*;

fn token_cmd(fx: &Fixture, path: &Path) -> Command {
    let mut cmd = cli_command();
    cmd.args(["token", "--auth-file", path.to_str().unwrap()])
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd`, killing it if it has not ended within `within` (a hang is a
/// failure, not a stuck test run).
fn run_bounded(cmd: &mut Command, within: Duration) -> std::process::Output {
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("hung for over {within:?}: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Finding 2: `rm auth.json.broker.lock` while a broker holds it and its
/// request is in flight. A second broker that gets a fresh lock file must
/// still not spend the same refresh token.
#[test]
fn a_lock_file_deleted_while_held_lets_nobody_spend_twice() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(1500),
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let first = token_cmd(&fx, &path).spawn().unwrap();
    wait_until(Duration::from_secs(10), "the first request is in flight", || {
        fx.sim.token_requests() == 1
    });
    std::fs::remove_file(path.with_file_name("auth.json.broker.lock")).unwrap();
    let second = token_cmd(&fx, &path)
        .env("TOKEN_BROKER_WINNER_WAIT", "5s")
        .output()
        .unwrap();
    let first = first.wait_with_output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let counts = fx.sim.counts();
    assert_eq!(counts.reused, 0, "the refresh token was spent twice: {counts:?}");
    assert_eq!(counts.token_requests, 1, "{counts:?}");
    assert_eq!(stdout(&first), stdout(&second), "both print the one new token");
}

/// Finding 3: the file is a single-file bind mount (`docker run -v
/// ~/.codex/auth.json:/root/.codex/auth.json`): a rename over it fails with
/// EBUSY after the token was spent. The broker writes it in place instead,
/// and the file outside the mount holds the new tokens.
#[test]
fn a_bind_mounted_file_is_written_in_place() {
    if !is_root() {
        eprintln!("SKIPPED a_bind_mounted_file_is_written_in_place: needs root for a mount namespace");
        return;
    }
    let fx = Fixture::codex();
    let host = fx.write_codex(&fx.sim.sign_in(-1.0));
    let inside = tempfile::tempdir_in("/dev/shm").unwrap();
    let mount_point = inside.path().join("auth.json");
    std::fs::write(&mount_point, b"").unwrap();
    let script = r#"mount --bind "$1" "$2" && exec "$0" token --auth-file "$2""#;
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", script, CLI])
        .arg(&host)
        .arg(&mount_point)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .env("TOKEN_BROKER_WINNER_WAIT", "300ms")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let on_host = read_json(&host);
    assert_eq!(on_host["tokens"]["access_token"], stdout(&out).trim());
    assert!(fx.sim.is_unspent(on_host["tokens"]["refresh_token"].as_str().unwrap()));
    assert_eq!(fx.sim.token_requests(), 1);
}

/// Finding 3's sibling: two hard links to one file. A rename would split
/// them, leaving the other name with a spent refresh token; the broker
/// writes in place, so both names hold the new tokens.
#[test]
fn a_hard_linked_file_stays_one_file() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let other = fx.path("auth-link.json");
    std::fs::hard_link(&path, &other).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_json(&other), read_json(&path), "both names hold the new tokens");
    assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 2);
    assert!(fx
        .sim
        .is_unspent(read_json(&other)["tokens"]["refresh_token"].as_str().unwrap()));
}

/// Finding 5: a writer rewrites the file in place (truncate, write) just as
/// the refresh answer arrives. The broker's write must wait for it to
/// settle, not fail with "not valid JSON" (exit 3 promises nothing was
/// spent).
#[test]
fn an_in_place_rewrite_during_the_refresh_is_waited_out() {
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(1000),
        ..SimConfig::default()
    });
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let content = std::fs::read(&path).unwrap();
    let child = token_cmd(&fx, &path).spawn().unwrap();
    wait_until(Duration::from_secs(10), "the request is in flight", || {
        fx.sim.token_requests() == 1
    });
    let sent = Instant::now();
    // Torn from 50 ms before the answer to 100 ms after it.
    std::thread::sleep(Duration::from_millis(950).saturating_sub(sent.elapsed()));
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(&content[..content.len() / 2]).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        file.write_all(&content[content.len() / 2..]).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let on_disk = read_json(&path);
    assert_eq!(on_disk["tokens"]["access_token"], stdout(&out).trim());
    assert!(fx.sim.is_unspent(on_disk["tokens"]["refresh_token"].as_str().unwrap()));
}

/// Finding 6: a broker killed between writing its temporary file and
/// renaming it. The temporary file holds the live rotated tokens; the next
/// run adopts them instead of spending the old (spent) refresh token and
/// deleting them as an orphan.
#[test]
fn an_orphaned_temp_file_with_the_rotated_tokens_is_adopted() {
    let fx = Fixture::codex();
    let issued = fx.sim.sign_in(-1.0);
    let path = fx.write_codex(&issued);
    let before = std::fs::read(&path).unwrap();
    // A real refresh, whose result we then put back where a killed writer
    // leaves it: in its temporary file, with the old file still in place.
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rotated = std::fs::read(&path).unwrap();
    std::fs::write(&path, &before).unwrap();
    let record = serde_json::json!({
        "pid": 999_999,
        "started_at": "2026-11-29T00:00:00Z",
        "refresh_token_sha256": RefreshToken::new(issued.refresh_token.as_str()).sha256_hex(),
    });
    // In the order a broker writes them: the record before it spends, the
    // temporary file once the answer came.
    std::fs::write(path.with_file_name("auth.json.refreshing"), record.to_string()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(fx.path(".auth.json.tb-Xk3Ra9.tmp"), &rotated).unwrap();

    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rotated: serde_json::Value = serde_json::from_slice(&rotated).unwrap();
    assert_eq!(stdout(&out).trim(), rotated["tokens"]["access_token"]);
    assert_eq!(read_json(&path)["tokens"], rotated["tokens"]);
    assert_eq!(fx.sim.token_requests(), 1, "the spent refresh token was not sent again");
    assert!(!path.with_file_name("auth.json.refreshing").exists());
    assert!(!fx.path(".auth.json.tb-Xk3Ra9.tmp").exists());
}

/// Finding 14: a planted `auth.json.refreshing` symlink must not make the
/// broker overwrite the file it points to (say `~/.bashrc`).
#[test]
fn a_planted_record_symlink_is_replaced_never_followed() {
    for record in ["auth.json.refreshing", "auth.json.refused"] {
        let fx = Fixture::codex();
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let victim = fx.path("bashrc");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_file_name(record)).unwrap();
        let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{record}: {}", stderr(&out));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "{record}");
    }
}

/// Finding 14: a symlinked lock file is refused (a clear error, nothing
/// written through it), not followed.
#[test]
fn a_planted_lock_symlink_is_refused() {
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let victim = fx.path("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, path.with_file_name("auth.json.broker.lock")).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(fx.sim.token_requests(), 0);
}

/// Finding 14: FIFOs where files belong never hang the broker: a FIFO as
/// the record while it holds the lock, and a FIFO as `auth.json` for
/// `status`.
#[test]
fn fifos_never_hang_the_broker() {
    let mkfifo = |p: &Path| assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
    for record in ["auth.json.refreshing", "auth.json.refused"] {
        let fx = Fixture::codex();
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        mkfifo(&path.with_file_name(record));
        let out = run_bounded(&mut token_cmd(&fx, &path), Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(0), "{record}: {}", stderr(&out));
    }
    let fx = Fixture::codex();
    let path = fx.path("auth.json");
    mkfifo(&path);
    let mut status = cli_command();
    status
        .args(["status", "--auth-file", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_bounded(&mut status, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a regular file"), "{}", stderr(&out));
}

/// Finding 15: run as root (cron, sudo) on a user's file, the broker keeps
/// the file the user's: same owner and group, mode 0600, and the lock files
/// and records it creates belong to the user too, so the user (and the
/// Codex CLI) can go on using it.
#[test]
fn root_keeps_a_users_file_the_users() {
    if !is_root() {
        eprintln!("SKIPPED root_keeps_a_users_file_the_users: needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    std::os::unix::fs::chown(fx.dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();

    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for entry in std::fs::read_dir(fx.dir.path()).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (NOBODY, NOBODY),
            "{:?} belongs to the user",
            entry.file_name()
        );
    }
    assert_eq!(mode(&path), 0o600);

    // The user goes on: it reads the refreshed file and can lock it.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            CLI,
            "token",
            "--auth-file",
        ])
        .arg(&path)
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", fx.sim.token_url())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "as the user: {}", stderr(&out));
    assert_eq!(fx.sim.token_requests(), 1);
}

/// A guard for finding 15's fix (which keeps owner and group): the new file
/// a refresh writes is never readable by others, whatever the old one's
/// mode (the Codex CLI writes 0600 too).
#[test]
fn a_world_readable_file_is_rewritten_0600() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::codex();
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(mode(&path), 0o600);
}
