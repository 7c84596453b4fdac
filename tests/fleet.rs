//! A fleet of daemons sharing one credential on a real 3-member etcd
//! cluster (Debian's `etcd-server`, started on loopback by each test),
//! against the simulated provider with single-use refresh tokens and
//! revoke-on-reuse on.

#![cfg(feature = "etcd")]

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/fleet.rs"]
mod fleet;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use daemon::{socket_get, Daemon};
use etcd::Cluster;
use fleet::*;
use token_broker::sim::{Issued, SimConfig};

#[test]
fn import_status_and_sealed_tokens_at_rest() {
    let cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let key = fx.path("etcd.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let extra = format!("encryption_key_file = {key:?}\n");
    let host = Host::new(fx.dir.path(), "a", &etcd_profile(&fx, &cluster, "/tb/sealed", &extra));

    // Nothing yet.
    assert!(fleet_status(&host).contains("none"));
    let first = fx.sim.sign_in(3000.0);
    let out = import(&fx, &host, &first, false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("imported"), "{}", stdout(&out));

    // At rest: sealed, no token text in etcd.
    let raw = cluster.get("/tb/sealed/tokens");
    assert!(raw.contains("XChaCha20-Poly1305"), "{raw}");
    no_secret_in(&fx, &raw);

    let status = fleet_status(&host);
    assert!(
        status.contains("generation:     1") && status.contains("sealed"),
        "{status}"
    );
    assert!(status.contains("lock:           free"), "{status}");
    no_secret_in(&fx, &status);

    // The same tokens again: nothing changes.
    let out = import(&fx, &host, &first, false);
    assert!(
        out.status.success() && stdout(&out).contains("already holds"),
        "{}",
        stdout(&out)
    );

    // Older tokens (they expire sooner) are refused without --force, and
    // nothing is written.
    let older = fx.sim.sign_in(60.0);
    let out = import(&fx, &host, &older, false);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    no_secret_in(&fx, &stderr(&out));
    assert!(fleet_status(&host).contains("generation:     1"));
    let out = import(&fx, &host, &older, true);
    assert!(
        out.status.success() && stdout(&out).contains("replaced"),
        "{}",
        stdout(&out)
    );
    assert!(fleet_status(&host).contains("generation:     2"));

    // A one-shot CLI reads it straight from etcd (no daemon).
    let out = cli_command()
        .args(["token", "--profile", "codex", "--daemon", "never", "--config"])
        .arg(&host.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), older.access_token);

    // A profile without the key cannot open the sealed tokens: a typed
    // error that quotes nothing.
    let keyless = Host::new(fx.dir.path(), "b", &etcd_profile(&fx, &cluster, "/tb/sealed", ""));
    let out = cli_command()
        .args(["token", "--profile", "codex", "--daemon", "never", "--config"])
        .arg(&keyless.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("encryption_key_file"), "{}", stderr(&out));
    no_secret_in(&fx, &stderr(&out));
}

/// Four daemons (four "hosts") with eight client loops each, for
/// `FLEET_SECONDS` (default 30 s) of 2 s tokens: one token request per
/// expiry fleet-wide, none reused, every call served.
#[test]
fn four_daemons_refresh_once_per_expiry() {
    let cluster = Cluster::start(3);
    let lifetime = Duration::from_secs(2);
    let fx = Fixture::new(strict(lifetime));
    let seconds: u64 = std::env::var("FLEET_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let profile = etcd_profile(&fx, &cluster, "/tb/fleet", "refresh_ahead = \"1s\"\n");
    let hosts = Host::many(fx.dir.path(), 4, &profile);
    let seeded = fx.sim.sign_in(2.0);
    let out = import(&fx, &hosts[0], &seeded, false);
    assert!(out.status.success(), "{}", stderr(&out));
    let daemons: Vec<Daemon> = hosts.iter().map(Host::start).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let mut loops = Vec::new();
    for host in &hosts {
        for _ in 0..8 {
            let (socket, stop, served, failed) = (host.socket.clone(), stop.clone(), served.clone(), failed.clone());
            loops.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (status, body) = socket_get(&socket, "/v1/profiles/codex/token");
                    if status == 200 {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.lock().push(format!("{status} {body}"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
    }
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().unwrap();
    }
    let counts = fx.sim.counts();
    let logs: String = daemons.iter().map(Daemon::logs).collect();
    no_secret_in(&fx, &logs);
    assert_eq!(counts.reused, 0, "a refresh token was spent twice:\n{logs}");
    assert_eq!(counts.invalid, 0, "{counts:?}");
    assert!(
        failed.lock().is_empty(),
        "failed calls: {:?}",
        &failed.lock()[..failed.lock().len().min(5)]
    );
    assert!(
        served.load(Ordering::Relaxed) > 1000,
        "{}",
        served.load(Ordering::Relaxed)
    );
    // Each token is refreshed 1 s before its 2 s expiry: one token request
    // per second of run, fleet-wide, whatever the number of daemons.
    let expiries = seconds;
    assert!(
        counts.token_requests >= expiries / 2 && counts.token_requests <= expiries + 2,
        "{} token requests in {seconds} s of 2 s tokens (about {expiries} expected): {counts:?}",
        counts.token_requests
    );
    assert_eq!(counts.token_requests, counts.refreshed, "{counts:?}");
    // Daemons that did not refresh adopted the others' tokens through the
    // watch: every daemon served many generations.
    for (i, d) in daemons.iter().enumerate() {
        let (status, body) = socket_get(&d.socket, "/v1/profiles/codex/status");
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let counters = &json["counters"];
        let generations = counters["refreshes"].as_u64().unwrap() + counters["adoptions"].as_u64().unwrap();
        assert!(
            generations >= expiries / 4,
            "daemon {i} saw only {generations} generations: {body}"
        );
    }
}

/// With every etcd member frozen: the valid token is still served, nothing
/// is spent, status and metrics say `coordination_unavailable`; once etcd
/// returns, the broker recovers by itself.
#[test]
fn etcd_away_serves_valid_tokens_and_spends_nothing() {
    let cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let host = Host::new(
        fx.dir.path(),
        "a",
        &etcd_profile(&fx, &cluster, "/tb/away", "refresh_ahead = \"9s\"\n"),
    );
    // Valid for 12 s; due (refreshed ahead) after 3 s.
    let issued = fx.sim.sign_in(12.0);
    assert!(import(&fx, &host, &issued, false).status.success());
    let d = host.start();
    let (status, body) = socket_get(&host.socket, "/v1/profiles/codex/token");
    assert_eq!((status, token_of(&body)), (200, issued.access_token.clone()));

    for i in 0..3 {
        cluster.signal(i, libc::SIGSTOP);
    }
    // The refresh ahead fails on etcd, not on the provider.
    wait_until(
        Duration::from_secs(20),
        "status reports coordination_unavailable",
        || {
            let (_, body) = socket_get(&host.socket, "/v1/profiles/codex/status");
            body.contains("\"coordination_unavailable\":true")
        },
    );
    let (status, body) = socket_get(&host.socket, "/v1/profiles/codex/token");
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_of(&body), issued.access_token, "the valid token is served");
    let (_, metrics) = socket_get(&host.socket, "/metrics");
    assert!(
        metrics.contains("coordination_unavailable{profile=\"codex\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("coordination"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(fx.sim.token_requests(), 0, "nothing is spent without coordination");

    for i in 0..3 {
        cluster.signal(i, libc::SIGCONT);
    }
    wait_new_token(&host.socket, &issued.access_token, Duration::from_secs(30), &|| {
        d.logs()
    });
    wait_until(Duration::from_secs(10), "coordination available again", || {
        let (_, body) = socket_get(&host.socket, "/v1/profiles/codex/status");
        body.contains("\"coordination_unavailable\":false")
    });
    one_refresh(&fx, &d.logs());
}

/// The holder is killed (SIGKILL) after the provider rotated the token and
/// before anything reached etcd: the survivor never spends the old token
/// while the access token is valid (takeover = "wait"), and reports the
/// interrupted refresh.
#[test]
fn a_holder_killed_mid_request_is_never_spent_again() {
    let cluster = Cluster::start(3);
    let config = SimConfig {
        latency: Duration::from_secs(2),
        ..strict(Duration::from_secs(3600))
    };
    let fx = Fixture::new(config);
    let profile = etcd_profile(&fx, &cluster, "/tb/killed", "refresh_ahead = \"10m\"\n");
    let hosts = Host::many(fx.dir.path(), 2, &profile);
    // Valid for two minutes of an hour's lifetime: due at once.
    let issued = fx.sim.sign_in(120.0);
    assert!(import(&fx, &hosts[0], &issued, false).status.success());
    let mut daemons: Vec<Daemon> = hosts.iter().map(Host::start).collect();

    // The refresh ahead is under way at the provider; past the spend (half
    // the latency), kill its holder.
    wait_until(Duration::from_secs(20), "a token request", || {
        fx.sim.token_requests() == 1
    });
    std::thread::sleep(Duration::from_millis(1300));
    let status = fleet_status(&hosts[0]);
    let holder = daemons
        .iter()
        .position(|d| status.contains(&format!("pid {} ", d.pid())))
        .unwrap_or_else(|| panic!("no daemon holds the lock:\n{status}"));
    assert!(status.contains("refreshing:     by"), "{status}");
    daemons[holder].signal(libc::SIGKILL);
    daemons[holder].wait();
    let survivor = &daemons[1 - holder];

    // Lease (10 s) and quarantine pass; the survivor sees the interrupted
    // refresh and, the access token being valid, spends nothing.
    wait_until(
        Duration::from_secs(90),
        "the survivor reports the interrupted refresh",
        || survivor.logs().contains("was interrupted"),
    );
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = socket_get(&hosts[1 - holder].socket, "/v1/profiles/codex/token");
    assert_eq!(status, 200, "{body}");
    assert_eq!(token_of(&body), issued.access_token);
    let counts = fx.sim.counts();
    assert_eq!(
        counts.token_requests,
        1,
        "the old refresh token was sent again: {counts:?}\n{}",
        survivor.logs()
    );
    assert_eq!(counts.reused, 0, "{counts:?}");
    let (_, body) = socket_get(&hosts[1 - holder].socket, "/v1/profiles/codex/status");
    assert!(body.contains("interrupted"), "the status reports it: {body}");
    no_secret_in(&fx, &survivor.logs());
}

/// Rotated tokens that reached a host but not etcd are spooled (0600) and
/// written when etcd returns, over exactly the revision they replace.
#[test]
fn the_spool_lands_a_rotation_that_did_not_reach_etcd() {
    use token_broker::store::{EtcdSettings, EtcdStore, Store};
    let cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let spool = fx.path("spool");
    let settings = EtcdSettings::new(cluster.endpoints(), "/tb/spool")
        .unwrap()
        .spool_dir(&spool)
        .request_timeout(Duration::from_secs(2));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = EtcdStore::new(settings.clone());
        let first = token_broker::credentials::TokenSet::new("access-0", Some("refresh-0")).unwrap();
        store.import(&first, false).await.unwrap();
        let loaded = store.load().await.unwrap();
        let rotated = token_broker::credentials::TokenSet::new("access-1", Some("refresh-1")).unwrap();

        // etcd freezes after the provider answered: the write fails...
        for i in 0..3 {
            cluster.signal(i, libc::SIGSTOP);
        }
        let err = store.save(&rotated, &loaded.version).await.unwrap_err();
        assert!(err.to_string().contains("coordination_unavailable"), "{err}");
        assert!(!err.to_string().contains("access-1"), "{err}");
        let files: Vec<_> = std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(mode(&files[0]), 0o600);
        assert_eq!(mode(&spool), 0o700);

        // ...and a new process on this host (a restart) lands it once etcd
        // is back.
        for i in 0..3 {
            cluster.signal(i, libc::SIGCONT);
        }
        cluster.wait_healthy(Duration::from_secs(20));
        let restarted = EtcdStore::new(settings.clone());
        let now = restarted.load().await.unwrap();
        assert_eq!(now.tokens.access_token.expose(), "access-1");
        assert!(std::fs::read_dir(&spool).unwrap().next().is_none(), "the spool is gone");

        // A spooled write whose revision was overtaken by someone else's
        // never lands over theirs.
        let stale = now.version.clone();
        for i in 0..3 {
            cluster.signal(i, libc::SIGSTOP);
        }
        let lost = token_broker::credentials::TokenSet::new("access-2", Some("refresh-2")).unwrap();
        assert!(restarted.save(&lost, &stale).await.is_err());
        for i in 0..3 {
            cluster.signal(i, libc::SIGCONT);
        }
        cluster.wait_healthy(Duration::from_secs(20));
        let theirs = token_broker::credentials::TokenSet::new("access-3", Some("refresh-3")).unwrap();
        EtcdStore::new(EtcdSettings::new(cluster.endpoints(), "/tb/spool").unwrap())
            .import(&theirs, true)
            .await
            .unwrap();
        let after = EtcdStore::new(settings).load().await.unwrap();
        assert_eq!(after.tokens.access_token.expose(), "access-3");
        assert!(std::fs::read_dir(&spool).unwrap().next().is_none());
    });
}

/// Killing the etcd leader mid-run, then freezing the next one: the fleet
/// goes on (a new leader is elected each time), nothing is spent twice.
#[test]
fn losing_the_etcd_leader_mid_refresh_spends_nothing_twice() {
    let mut cluster = Cluster::start(3);
    let config = SimConfig {
        latency: Duration::from_millis(800),
        ..strict(Duration::from_secs(3))
    };
    let fx = Fixture::new(config);
    let profile = etcd_profile(&fx, &cluster, "/tb/leader", "refresh_ahead = \"1500ms\"\n");
    let hosts = Host::many(fx.dir.path(), 2, &profile);
    let issued = fx.sim.sign_in(3.0);
    assert!(import(&fx, &hosts[0], &issued, false).status.success());
    let daemons: Vec<Daemon> = hosts.iter().map(Host::start).collect();
    wait_until(Duration::from_secs(20), "a token request", || {
        fx.sim.token_requests() >= 1
    });
    let leader = cluster.leader();
    cluster.kill(leader);
    std::thread::sleep(Duration::from_secs(6));
    cluster.restart(leader);
    cluster.wait_healthy(Duration::from_secs(30));
    // Then the new leader freezes (SIGSTOP) mid-run, and thaws.
    let before = fx.sim.counts().refreshed;
    wait_until(Duration::from_secs(20), "a refresh under the new leader", || {
        fx.sim.counts().refreshed > before
    });
    let leader = cluster.leader();
    cluster.signal(leader, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(6));
    cluster.signal(leader, libc::SIGCONT);
    cluster.wait_healthy(Duration::from_secs(30));
    // The fleet keeps refreshing after the election.
    let before = fx.sim.counts().refreshed;
    wait_until(Duration::from_secs(20), "refreshes after the election", || {
        fx.sim.counts().refreshed >= before + 2
    });
    let counts = fx.sim.counts();
    let logs: String = daemons.iter().map(Daemon::logs).collect();
    assert_eq!(counts.reused, 0, "{counts:?}\n{logs}");
    for host in &hosts {
        let (status, body) = socket_get(&host.socket, "/v1/profiles/codex/token");
        assert_eq!(status, 200, "{body}");
        assert!(fx.sim.is_live(&token_of(&body)));
    }
}

/// Two hosts on one credential that is valid for two minutes and due at once;
/// the first daemon freezes itself (SIGSTOP) at the failpoint `point` of
/// its refresh, before the second starts.
#[cfg(feature = "failpoints")]
struct Frozen {
    cluster: Cluster,
    fx: Fixture,
    hosts: Vec<Host>,
    a: Daemon,
    issued: Issued,
}

#[cfg(feature = "failpoints")]
fn frozen_at(point: &str, prefix: &str) -> Frozen {
    let cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let profile = etcd_profile(&fx, &cluster, prefix, "refresh_ahead = \"10m\"\n");
    let hosts = Host::many(fx.dir.path(), 2, &profile);
    // Valid for two minutes of an hour's lifetime: due at once.
    let issued = fx.sim.sign_in(120.0);
    assert!(import(&fx, &hosts[0], &issued, false).status.success());
    let a = Daemon::start_env(
        &hosts[0].config,
        &hosts[0].socket,
        "info",
        &[("TOKEN_BROKER_FAILPOINTS", point)],
    );
    a.wait_for_log("stopping at a failpoint");
    std::thread::sleep(Duration::from_millis(200));
    Frozen {
        cluster,
        fx,
        hosts,
        a,
        issued,
    }
}

#[cfg(feature = "failpoints")]
impl Frozen {
    fn kill_a(&mut self) {
        self.a.signal(libc::SIGKILL);
        self.a.wait();
    }

    fn start_b(&self) -> Daemon {
        self.hosts[1].start()
    }

    fn token_at(&self, host: usize) -> String {
        let (status, body) = socket_get(&self.hosts[host].socket, "/v1/profiles/codex/token");
        assert_eq!(status, 200, "{body}");
        token_of(&body)
    }

    /// Waits until host `host` serves a token other than the first.
    fn wait_new_token(&self, host: usize, logs: &dyn Fn() -> String) -> String {
        wait_new_token(
            &self.hosts[host].socket,
            &self.issued.access_token,
            Duration::from_secs(60),
            logs,
        )
    }

    fn wait_interrupted(&self, b: &Daemon) {
        wait_until(
            Duration::from_secs(90),
            "the survivor reports the interrupted refresh",
            || b.logs().contains("was interrupted"),
        );
    }
}

/// Killed holding the lock, before anything was recorded: its lease
/// lapses, the survivor refreshes normally.
#[cfg(feature = "failpoints")]
#[test]
fn killed_before_the_record() {
    let mut f = frozen_at("refresh-before-record", "/tb/k1");
    f.kill_a();
    let b = f.start_b();
    let new = f.wait_new_token(1, &|| b.logs());
    one_refresh(&f.fx, "");
    assert!(f.fx.sim.is_live(&new));
}

/// Killed after the record, before sending: the survivor cannot know the
/// token was not sent; it reports the interrupted refresh and, the access
/// token being valid, spends nothing (takeover = "wait").
#[cfg(feature = "failpoints")]
#[test]
fn killed_after_the_record() {
    let mut f = frozen_at("refresh-after-record", "/tb/k2");
    f.kill_a();
    let b = f.start_b();
    f.wait_interrupted(&b);
    assert_eq!(f.token_at(1), f.issued.access_token);
    assert_eq!(f.fx.sim.counts().token_requests, 0);
    // The status says so once the cycle that logged it has ended.
    wait_until(
        Duration::from_secs(20),
        "the status reports the interrupted refresh",
        || {
            let (_, status) = socket_get(&f.hosts[1].socket, "/v1/profiles/codex/status");
            status.contains("was interrupted")
        },
    );
}

/// Killed after the provider rotated the token, before any write: the
/// rotation is lost, and reported; the old token is never sent again while
/// the access token works.
#[cfg(feature = "failpoints")]
#[test]
fn killed_after_the_response() {
    let mut f = frozen_at("refresh-after-response", "/tb/k3");
    f.kill_a();
    let b = f.start_b();
    f.wait_interrupted(&b);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(f.token_at(1), f.issued.access_token);
    one_refresh(&f.fx, &b.logs());
    no_secret_in(&f.fx, &b.logs());
}

/// Killed after the new tokens reached the local spool, before etcd: the
/// restarted daemon lands them, and the fleet adopts them; nothing is
/// spent twice.
#[cfg(feature = "failpoints")]
#[test]
fn killed_after_the_spool_and_restarted() {
    let mut f = frozen_at("etcd-after-spool", "/tb/k4");
    f.kill_a();
    f.a = f.hosts[0].start();
    let new = f.wait_new_token(0, &|| f.a.logs());
    assert!(f.a.logs().contains("spooled by an earlier attempt"), "{}", f.a.logs());
    let b = f.start_b();
    assert_eq!(f.token_at(1), new);
    one_refresh(&f.fx, &b.logs());
    assert!(f.fx.sim.is_live(&new));
}

/// Killed after the write, before releasing: the survivor adopts the new
/// tokens and clears the stale record; nothing is spent again.
#[cfg(feature = "failpoints")]
#[test]
fn killed_after_the_write() {
    let mut f = frozen_at("refresh-after-write", "/tb/k5");
    f.kill_a();
    let b = f.start_b();
    let new = f.wait_new_token(1, &|| b.logs());
    std::thread::sleep(Duration::from_secs(1));
    one_refresh(&f.fx, "");
    assert!(f.fx.sim.is_live(&new));
    assert!(!f.cluster.get("/tb/k5/tokens").is_empty());
}

/// Frozen (SIGSTOP) after the provider answered, for longer than its lease
/// and the quarantine: the survivor spends nothing; thawed (SIGCONT), the
/// holder's write still lands over the revision it read, and the fleet
/// adopts it.
#[cfg(feature = "failpoints")]
#[test]
fn frozen_past_the_lease_then_thawed() {
    let f = frozen_at("refresh-after-response", "/tb/k6");
    let b = f.start_b();
    f.wait_interrupted(&b);
    assert_eq!(f.fx.sim.counts().token_requests, 1);
    f.a.signal(libc::SIGCONT);
    let new = f.wait_new_token(1, &|| format!("{}\n---\n{}", f.a.logs(), b.logs()));
    assert_eq!(f.token_at(0), new);
    one_refresh(&f.fx, "");
}

/// A TCP forwarder in front of an etcd member that can black-hole the
/// traffic (stop moving bytes both ways, connections left open, as a
/// partition does) and heal.
struct Forwarder {
    port: u16,
    blackhole: Arc<AtomicBool>,
}

impl Forwarder {
    fn start(target: u16) -> Forwarder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let hole = blackhole.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let hole = hole.clone();
                std::thread::spawn(move || {
                    while hole.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                        return;
                    };
                    let pump = |from: std::net::TcpStream, to: std::net::TcpStream, hole: Arc<AtomicBool>| {
                        move || {
                            use std::io::{Read, Write};
                            let (mut from, mut to) = (from, to);
                            let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
                            let mut buf = [0u8; 16 * 1024];
                            loop {
                                if hole.load(Ordering::SeqCst) {
                                    std::thread::sleep(Duration::from_millis(10));
                                    continue;
                                }
                                match from.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => break,
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        }
                    };
                    let up = std::thread::spawn(pump(
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        hole.clone(),
                    ));
                    pump(server, client, hole)();
                    let _ = up.join();
                });
            }
        });
        Forwarder { port, blackhole }
    }
}

/// "Reached the provider, not etcd": the path from one daemon to etcd
/// black-holes while its token request is under way. The rotated tokens
/// wait in its spool, the other host spends nothing, and when the path
/// heals the write lands and the fleet adopts it.
#[test]
fn a_rotation_that_reached_the_provider_but_not_etcd_lands_when_the_path_heals() {
    let cluster = Cluster::start(3);
    let config = SimConfig {
        latency: Duration::from_secs(2),
        ..strict(Duration::from_secs(3600))
    };
    let fx = Fixture::new(config);
    let forwarders: Vec<Forwarder> = cluster
        .members
        .iter()
        .map(|m| Forwarder::start(m.client_port))
        .collect();
    let through = format!(
        "[{}]",
        forwarders
            .iter()
            .map(|f| format!("\"http://127.0.0.1:{}\"", f.port))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let extra = "refresh_ahead = \"10m\"\n";
    let a = Host::new(fx.dir.path(), "hA", &etcd_profile_at(&fx, &through, "/tb/hole", extra));
    let b = Host::new(fx.dir.path(), "hB", &etcd_profile(&fx, &cluster, "/tb/hole", extra));
    // Valid for two minutes of an hour's lifetime: due at once.
    let issued = fx.sim.sign_in(120.0);
    assert!(import(&fx, &b, &issued, false).status.success());
    let da = a.start();
    wait_until(Duration::from_secs(20), "the token request", || {
        fx.sim.token_requests() == 1
    });
    for f in &forwarders {
        f.blackhole.store(true, Ordering::SeqCst);
    }
    // The provider answers; the tokens reach A's spool, not etcd.
    let spool = fx.dir.path().join("hA").join("spool");
    wait_until(Duration::from_secs(20), "the spooled write", || {
        std::fs::read_dir(&spool).is_ok_and(|mut d| d.next().is_some())
    });
    let db = b.start();
    std::thread::sleep(Duration::from_secs(12));
    // Meanwhile the other host serves the valid token and spends nothing.
    let (status, body) = socket_get(&b.socket, "/v1/profiles/codex/token");
    assert_eq!((status, token_of(&body)), (200, issued.access_token.clone()));
    assert_eq!(fx.sim.token_requests(), 1);
    for f in &forwarders {
        f.blackhole.store(false, Ordering::SeqCst);
    }
    let new = wait_new_token(&b.socket, &issued.access_token, Duration::from_secs(60), &|| {
        format!("the spooled rotation never landed\n{}\n---\n{}", da.logs(), db.logs())
    });
    assert!(fx.sim.is_live(&new));
    // A, which wrote them, serves them too (it may be a moment behind B's
    // watch: it finishes its own cycle after the write).
    let on_a = wait_new_token(&a.socket, &issued.access_token, Duration::from_secs(20), &|| da.logs());
    assert_eq!(on_a, new);
    one_refresh(&fx, "");
    wait_until(Duration::from_secs(10), "the spool is gone", || {
        std::fs::read_dir(&spool).is_ok_and(|mut d| d.next().is_none())
    });
}

/// Losing quorum (two of three members killed), then regaining it: valid
/// tokens are served throughout, nothing is spent without quorum.
#[test]
fn losing_quorum_then_regaining_it() {
    let mut cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let host = Host::new(
        fx.dir.path(),
        "a",
        &etcd_profile(&fx, &cluster, "/tb/quorum", "refresh_ahead = \"9s\"\n"),
    );
    let issued = fx.sim.sign_in(12.0);
    assert!(import(&fx, &host, &issued, false).status.success());
    let d = host.start();
    cluster.kill(1);
    cluster.kill(2);
    wait_until(Duration::from_secs(30), "coordination_unavailable", || {
        let (_, body) = socket_get(&host.socket, "/v1/profiles/codex/status");
        body.contains("\"coordination_unavailable\":true")
    });
    let (status, body) = socket_get(&host.socket, "/v1/profiles/codex/token");
    assert_eq!((status, token_of(&body)), (200, issued.access_token.clone()));
    assert_eq!(fx.sim.token_requests(), 0);
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_healthy(Duration::from_secs(30));
    wait_new_token(&host.socket, &issued.access_token, Duration::from_secs(40), &|| {
        d.logs()
    });
    one_refresh(&fx, "");
}

/// etcd with authentication on: a user whose role reaches only the
/// profile's prefix is all a daemon needs, its password comes from a
/// variable, and a wrong password is a clear error that never quotes it.
#[test]
fn a_user_limited_to_the_prefix_is_enough() {
    let cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let root = "root-pw-Zq81";
    let secret = "tb-pw-Xu27";
    for args in [
        &["user", "add", &format!("root:{root}")][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "tb-auth"],
        &[
            "role",
            "grant-permission",
            "tb-auth",
            "--prefix=true",
            "readwrite",
            "/tb/auth/",
        ],
        &["user", "add", &format!("tb:{secret}")],
        &["user", "grant-role", "tb", "tb-auth"],
        &["auth", "enable"],
    ] {
        let out = cluster.etcdctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let profile = |user: &str, prefix: &str| {
        etcd_profile(
            &fx,
            &cluster,
            prefix,
            &format!("etcd_user = {user:?}\netcd_password_env = \"TB_ETCD_PW\"\n"),
        )
    };
    let host = Host::new(fx.dir.path(), "a", &profile("tb", "/tb/auth"));
    let issued = fx.sim.sign_in(3600.0);
    let run = |host: &Host, password: &str, args: &[&str]| host.cli(args, &[("TB_ETCD_PW", password)]);
    let out = import_env(&fx, &host, &issued, false, &[("TB_ETCD_PW", secret)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&host, secret, &["token", "--profile", "codex", "--daemon", "never"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), issued.access_token);

    // A wrong password: refused, and never shown.
    let out = run(
        &host,
        "wrong-pw-Ab12",
        &["token", "--profile", "codex", "--daemon", "never"],
    );
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("wrong-pw-Ab12"), "{}", stderr(&out));
    // Outside the role's prefix: refused by etcd, nothing written.
    let outside = Host::new(fx.dir.path(), "b", &profile("tb", "/tb/elsewhere"));
    let out = import_env(&fx, &outside, &issued, false, &[("TB_ETCD_PW", secret)]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(!stderr(&out).contains(secret), "{}", stderr(&out));
    // The password is in no output.
    for text in [stdout(&out), stderr(&out)] {
        assert!(!text.contains(secret));
    }
    let out = cluster.etcdctl(&["--user", &format!("root:{root}"), "auth", "disable"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// With an encryption key, unsealed tokens are not trusted (anyone who can
/// write etcd could plant them); `fleet seal` seals a credential imported
/// before the key, once.
#[test]
fn with_a_key_unsealed_tokens_are_refused_until_sealed() {
    let cluster = Cluster::start(3);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let key = fx.path("etcd.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let plain = Host::new(fx.dir.path(), "plain", &etcd_profile(&fx, &cluster, "/tb/seal", ""));
    let sealed = Host::new(
        fx.dir.path(),
        "sealed",
        &etcd_profile(&fx, &cluster, "/tb/seal", &format!("encryption_key_file = {key:?}\n")),
    );
    let issued = fx.sim.sign_in(3600.0);
    assert!(import(&fx, &plain, &issued, false).status.success());
    let token = |host: &Host| {
        cli_command()
            .args(["token", "--profile", "codex", "--daemon", "never", "--config"])
            .arg(&host.config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = token(&sealed);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("fleet seal"), "{}", stderr(&out));
    no_secret_in(&fx, &stderr(&out));

    let seal = |host: &Host| {
        cli_command()
            .args(["fleet", "seal", "--profile", "codex", "--config"])
            .arg(&host.config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = seal(&sealed);
    assert!(
        out.status.success() && stdout(&out).contains("sealed the stored tokens"),
        "{}",
        stderr(&out)
    );
    let raw = cluster.get("/tb/seal/tokens");
    no_secret_in(&fx, &raw);
    let out = token(&sealed);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), issued.access_token);
    let out = seal(&sealed);
    assert!(stdout(&out).contains("sealed already"), "{}", stdout(&out));
    // Without the key, the sealed tokens are a typed error.
    assert_eq!(token(&plain).status.code(), Some(3));
}

/// etcd over TLS with client certificates: the profile's CA, certificate,
/// key and server name are all it needs; without the client certificate,
/// etcd refuses and nothing is written.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = etcd::Certs::make(certs_dir.path());
    let cluster = Cluster::start_tls(3, &certs);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let tls = format!(
        "etcd_ca_file = {:?}\netcd_cert_file = {:?}\netcd_key_file = {:?}\netcd_tls_domain = \"localhost\"\n",
        certs.ca, certs.client, certs.client_key
    );
    let host = Host::new(fx.dir.path(), "a", &etcd_profile(&fx, &cluster, "/tb/tls", &tls));
    let issued = fx.sim.sign_in(3600.0);
    let out = import(&fx, &host, &issued, false);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cluster.get("/tb/tls/tokens").contains("token-broker-etcd/1"));
    let d = host.start();
    let (status, body) = socket_get(&host.socket, "/v1/profiles/codex/token");
    assert_eq!(status, 200, "{body}\n{}", d.logs());
    assert_eq!(token_of(&body), issued.access_token);

    // Only the CA: etcd wants a client certificate.
    let ca_only = format!("etcd_ca_file = {:?}\netcd_tls_domain = \"localhost\"\n", certs.ca);
    let other = Host::new(fx.dir.path(), "b", &etcd_profile(&fx, &cluster, "/tb/tls-b", &ca_only));
    let out = import(&fx, &other, &issued, false);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(cluster.get("/tb/tls-b/tokens").is_empty());
    no_secret_in(&fx, &stderr(&out));
}
