//! A hostile review of the etcd fleet (issue 13): each test shows a problem
//! found in review against a real etcd (one member is enough for these)
//! and the simulated provider with revoke-on-reuse on.

#![cfg(feature = "etcd")]

mod common;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/fleet.rs"]
mod fleet;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use daemon::socket_get;
use etcd::Cluster;
use fleet::*;

fn key_file(fx: &Fixture, name: &str, byte: u8) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let key = fx.path(name);
    std::fs::write(&key, [byte; 32]).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key
}

/// etcd's auth tokens expire (`--auth-token-ttl`, 5 min by default, and
/// every simple token is gone when the cluster restarts). A daemon that
/// authenticated once at its first request and never again is cut off
/// from etcd for good after that: coordination_unavailable forever, and no
/// refresh ever again. It must authenticate again and recover by itself.
#[test]
fn an_expired_etcd_auth_token_is_renewed() {
    let cluster = Cluster::start_with(1, &["--auth-token-ttl=2"]);
    let root = "--user=root:rootpw";
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "tb"],
        &[
            "role",
            "grant-permission",
            "tb",
            "--prefix=true",
            "readwrite",
            "/tb/auth/",
        ],
        &["user", "add", "tb:tbpw"],
        &["user", "grant-role", "tb", "tb"],
        &["auth", "enable"],
    ] {
        let mut with_root = vec![root];
        with_root.extend_from_slice(args);
        let out = cluster.etcdctl(if args[0] == "user" && args[1] == "add" && args[2] == "root:rootpw" {
            args
        } else {
            &with_root
        });
        assert!(out.status.success(), "etcdctl {args:?}: {}", stderr(&out));
    }
    let env = [("TB_ETCD_PASSWORD", "tbpw")];
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let host = Host::new(
        fx.dir.path(),
        "a",
        &etcd_profile(
            &fx,
            &cluster,
            "/tb/auth",
            "etcd_user = \"tb\"\netcd_password_env = \"TB_ETCD_PASSWORD\"\nrefresh_ahead = \"14s\"\n",
        ),
    );
    // Valid for 20 s, due (refreshed ahead) after 6 s: long after the
    // daemon's auth token (2 s without use) has expired.
    let issued = fx.sim.sign_in(20.0);
    let out = import_env(&fx, &host, &issued, false, &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = host.start_env(&env);
    let (status, body) = socket_get(&host.socket, "/v1/profiles/codex/token");
    assert_eq!((status, token_of(&body)), (200, issued.access_token.clone()));

    wait_new_token(&host.socket, &issued.access_token, Duration::from_secs(40), &|| {
        d.logs()
    });
    one_refresh(&fx, &d.logs());
}

/// A lock key without a lease (written by an operator's `etcdctl put`, a
/// restored backup, another tool) never goes away by itself: every host
/// waits for it forever, and the credential dies at its expiry. Our locks
/// always live under a lease, so such a key is nobody's lock.
#[test]
fn a_lock_key_without_a_lease_does_not_block_refreshes_forever() {
    let cluster = Cluster::start(1);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let host = Host::new(
        fx.dir.path(),
        "a",
        &etcd_profile(&fx, &cluster, "/tb/stale", "refresh_ahead = \"9s\"\n"),
    );
    let issued = fx.sim.sign_in(12.0);
    assert!(import(&fx, &host, &issued, false).status.success());
    let out = cluster.etcdctl(&["put", "/tb/stale/lock", "left behind by an old tool"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let d = host.start();
    wait_new_token(&host.socket, &issued.access_token, Duration::from_secs(40), &|| {
        d.logs()
    });
    one_refresh(&fx, &d.logs());
    assert_ne!(cluster.get("/tb/stale/lock"), "left behind by an old tool");
}

/// `fleet import --force` is the documented way to replace what etcd
/// holds, yet it refused whenever it could not read the stored value: a
/// damaged value, or tokens sealed with the previous key after a key
/// rotation. Without `--force` nothing is written.
#[test]
fn import_force_replaces_a_value_it_cannot_read() {
    let cluster = Cluster::start(1);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let old_key = key_file(&fx, "old.key", 1);
    let new_key = key_file(&fx, "new.key", 2);
    let old = Host::new(
        fx.dir.path(),
        "old",
        &etcd_profile(
            &fx,
            &cluster,
            "/tb/rotate",
            &format!("encryption_key_file = {old_key:?}\n"),
        ),
    );
    let new = Host::new(
        fx.dir.path(),
        "new",
        &etcd_profile(
            &fx,
            &cluster,
            "/tb/rotate",
            &format!("encryption_key_file = {new_key:?}\n"),
        ),
    );
    let first = fx.sim.sign_in(3000.0);
    assert!(import(&fx, &old, &first, false).status.success());
    let sealed_by_old = cluster.get("/tb/rotate/tokens");

    // The key rotation: without --force, refused, nothing written.
    let second = fx.sim.sign_in(3000.0);
    let out = import(&fx, &new, &second, false);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(cluster.get("/tb/rotate/tokens"), sealed_by_old);
    // With --force: replaced, and readable with the new key.
    let out = import(&fx, &new, &second, true);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = new.cli(&["token", "--profile", "codex", "--daemon", "never"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), second.access_token);

    // A damaged value: the same.
    assert!(cluster
        .etcdctl(&["put", "/tb/rotate/tokens", "{\"damaged"])
        .status
        .success());
    let third = fx.sim.sign_in(3000.0);
    let out = import(&fx, &new, &third, false);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert_eq!(cluster.get("/tb/rotate/tokens"), "{\"damaged");
    let out = import(&fx, &new, &third, true);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = new.cli(&["token", "--profile", "codex", "--daemon", "never"], &[]);
    assert_eq!(stdout(&out).trim(), third.access_token, "{}", stderr(&out));
}

/// `fleet status` is what an operator runs when things go wrong: it must
/// still show the lock and the refresh in progress when the tokens cannot
/// be read, and never copy a terminal escape or a newline from a value in
/// etcd onto the terminal.
#[test]
fn fleet_status_shows_the_lock_when_tokens_are_unreadable_and_prints_no_escapes() {
    let cluster = Cluster::start(1);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    let host = Host::new(fx.dir.path(), "a", &etcd_profile(&fx, &cluster, "/tb/status", ""));
    let issued = fx.sim.sign_in(3000.0);
    assert!(import(&fx, &host, &issued, false).status.success());
    let lock = r#"{"holder":{"host":"h","pid":1,"tag":"t"},"lease":0,"since":"\u001b]0;owned\u0007\u001b[2J"}"#;
    let record = r#"{"holder":{"host":"h","pid":1,"tag":"t"},"lease":0,"revision":1,
        "refresh_token_sha256":"00","started":"\u001b[31mred","deadline":"x\nforged: line"}"#;
    assert!(cluster.etcdctl(&["put", "/tb/status/lock", lock]).status.success());
    assert!(cluster
        .etcdctl(&["put", "/tb/status/refreshing", record])
        .status
        .success());

    let status = |what: &str| {
        for json in [false, true] {
            let mut args = vec!["fleet", "status", "--profile", "codex"];
            if json {
                args.push("--json");
            }
            let out = host.cli(&args, &[]);
            assert!(out.status.success(), "{what}: {}", stderr(&out));
            let text = stdout(&out);
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains("\nforged"),
                "{what}: {text:?}"
            );
            if !json {
                assert!(
                    text.contains("lock:           h pid 1") && text.contains("refreshing:     by h pid 1"),
                    "{what}: {text}"
                );
            }
        }
    };
    status("readable tokens");

    assert!(cluster
        .etcdctl(&["put", "/tb/status/tokens", "not json at all"])
        .status
        .success());
    status("unreadable tokens");
}

/// The TLS settings' `Debug` printed the client certificate's private key
/// (as bytes) for anyone who logs a configuration with `{:?}`.
#[test]
fn tls_settings_never_print_the_private_key() {
    use token_broker::store::EtcdTls;
    let private =
        b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n".to_vec();
    let tls = EtcdTls {
        ca_pem: b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".to_vec(),
        identity_pem: Some((b"cert".to_vec(), private.clone())),
        domain: Some("etcd.internal".into()),
    };
    let shown = format!("{tls:?} {tls:#?}");
    let as_bytes = format!("{private:?}");
    let inner = as_bytes.trim_start_matches('[').trim_end_matches(']');
    let as_text = String::from_utf8_lossy(&private);
    assert!(
        !shown.contains(inner)
            && !shown.contains(as_text.as_ref())
            && !shown.contains("MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"),
        "{shown}"
    );
    assert!(shown.contains("etcd.internal"), "{shown}");
}

/// The library's own defaults (the module documentation's example): an
/// `EtcdStore` with a 30 s lease under a broker with its default 30 s
/// request timeout. The cycle spends only while the lease outlives the
/// request plus a second (31 s), which a 30 s lease never does: such a
/// broker never refreshed at all ("the lock is no longer held").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_defaults_can_refresh() {
    use std::sync::Arc;
    use token_broker::store::{CodexAuthFile, EtcdSettings, EtcdStore};
    let cluster = Cluster::start(1);
    let fx = Fixture::new(strict(Duration::from_secs(3600)));
    // Valid for two minutes: due at once (the default refresh ahead is 10 min).
    let issued = fx.sim.sign_in(120.0);
    let file = fx.write_codex(&issued);
    let settings = EtcdSettings::new(cluster.endpoints(), "/tb/lib")
        .unwrap()
        .spool_dir(fx.path("spool"));
    let store = EtcdStore::new(settings);
    let loaded = CodexAuthFile::new(&file).load_blocking().unwrap();
    store.import(&loaded.tokens, false).await.unwrap();
    let broker = token_broker::TokenBroker::codex()
        .store(Arc::new(store))
        .token_url(fx.sim.token_url())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let token = broker.token().await.unwrap();
        if token.expose() != issued.access_token {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refresh within 20 s: {:?}",
            broker.status().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    one_refresh(&fx, "");
    broker.shutdown().await;
}
