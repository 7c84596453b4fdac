//! What the fleet's tests share: a strict simulated provider, one "host"
//! (a daemon's configuration, socket and spool), etcd profiles, and the
//! CLI's `fleet` commands.
//!
//! Mount it with `#[path = "common/fleet.rs"] mod fleet;` next to `mod
//! common;`, `#[path = "common/daemon.rs"] mod daemon;` and
//! `#[path = "common/etcd.rs"] mod etcd;`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::common::{cli_command, stdout, Fixture};
use super::daemon::{socket_get, Daemon};
use super::etcd::Cluster;
use token_broker::sim::{codex_auth_json, Issued, SimConfig};

/// A provider like the real one: single-use refresh tokens, and a reuse
/// revokes the whole family.
pub fn strict(lifetime: Duration) -> SimConfig {
    SimConfig {
        access_lifetime: lifetime,
        revoke_family_on_reuse: true,
        ..SimConfig::default()
    }
}

/// One "host": a folder with its configuration, socket and spool.
pub struct Host {
    pub config: PathBuf,
    pub socket: PathBuf,
}

impl Host {
    pub fn new(root: &Path, name: &str, profile: &str) -> Host {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("run").join("tb.sock");
        let config = dir.join("config.toml");
        let text = format!(
            "[daemon]\nsocket = {socket:?}\n\n[profiles.codex]\n{profile}spool_dir = {:?}\n",
            dir.join("spool")
        );
        std::fs::write(&config, text).unwrap();
        Host { config, socket }
    }

    /// `n` hosts, `h0` to `h{n-1}`, with the same profile.
    pub fn many(root: &Path, n: usize, profile: &str) -> Vec<Host> {
        (0..n).map(|i| Host::new(root, &format!("h{i}"), profile)).collect()
    }

    pub fn start_env(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_env(&self.config, &self.socket, "info,token_broker=info", env)
    }

    pub fn start(&self) -> Daemon {
        self.start_env(&[])
    }

    /// `token-broker <args> --config <config>` with `env`.
    pub fn cli(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        cli_command()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

/// The profile lines of an etcd profile against `fx`'s provider.
pub fn etcd_profile(fx: &Fixture, cluster: &Cluster, prefix: &str, extra: &str) -> String {
    etcd_profile_at(fx, &cluster.toml_endpoints(), prefix, extra)
}

/// Like [`etcd_profile`], reaching etcd at `endpoints` (a TOML array).
pub fn etcd_profile_at(fx: &Fixture, endpoints: &str, prefix: &str, extra: &str) -> String {
    format!(
        "provider = \"codex\"\nstore = \"etcd\"\netcd_endpoints = {endpoints}\netcd_prefix = {prefix:?}\n\
         token_url = {:?}\nwinner_wait = \"2s\"\ntimeout = \"3s\"\nlease_ttl = \"10s\"\n{extra}",
        fx.sim.token_url()
    )
}

/// Seeds etcd with `issued` through `fleet import`, with `env`.
pub fn import_env(
    fx: &Fixture,
    host: &Host,
    issued: &Issued,
    force: bool,
    env: &[(&str, &str)],
) -> std::process::Output {
    let file = fx.path(&format!("import-{}.json", fastrand::u32(..)));
    std::fs::write(&file, codex_auth_json(issued)).unwrap();
    let mut args = vec![
        "fleet",
        "import",
        "--profile",
        "codex",
        "--from",
        file.to_str().unwrap(),
    ];
    if force {
        args.push("--force");
    }
    host.cli(&args, env)
}

/// Seeds etcd with `issued` through `fleet import`.
pub fn import(fx: &Fixture, host: &Host, issued: &Issued, force: bool) -> std::process::Output {
    import_env(fx, host, issued, force, &[])
}

/// `fleet status`'s text, which must succeed.
pub fn fleet_status(host: &Host) -> String {
    let out = host.cli(&["fleet", "status", "--profile", "codex"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stdout(&out)
}

/// The access token of a token answer's JSON body.
pub fn token_of(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    json["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {body}"))
        .to_owned()
}

/// Waits (at most `within`) until the daemon on `socket` serves a token
/// other than `old`, and returns it; on time out, fails with `logs()`.
pub fn wait_new_token(socket: &Path, old: &str, within: Duration, logs: &dyn Fn() -> String) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (status, body) = socket_get(socket, "/v1/profiles/codex/token");
        if status == 200 && token_of(&body) != old {
            return token_of(&body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new token within {within:?}: {status} {body}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fails if any secret the provider issued appears in `text`.
pub fn no_secret_in(fx: &Fixture, text: &str) {
    for secret in fx.sim.issued_secrets() {
        assert!(!text.contains(&secret), "a secret leaked:\n{text}");
    }
}

/// The provider saw exactly one token request so far, and no refresh
/// token spent twice (`logs`: the daemons' logs, for the failure message).
#[track_caller]
pub fn one_refresh(fx: &Fixture, logs: &str) {
    let counts = fx.sim.counts();
    assert_eq!((counts.token_requests, counts.reused), (1, 0), "{counts:?}\n{logs}");
}
