//! A real etcd v3 cluster on loopback for tests: each member its own
//! process and data folder, stopped (and its folder removed) on drop.
//! Needs Debian's `etcd-server` (`/usr/bin/etcd`) and `etcdctl`, which
//! `.ci/run` installs.
//!
//! Mount it with `#[path = "common/etcd.rs"] mod etcd;`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data: PathBuf,
    pub child: Option<Child>,
}

/// Serialises the tests that start clusters within one test binary.
static ONE_AT_A_TIME: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// A cluster of members on 127.0.0.1.
pub struct Cluster {
    pub members: Vec<Member>,
    _turn: parking_lot::MutexGuard<'static, ()>,
    initial: String,
    token: String,
    /// More flags for every member (`--auth-token-ttl=3`).
    extra: Vec<String>,
    /// `http`, or `https` when the members serve clients with TLS.
    scheme: &'static str,
    /// etcdctl's TLS flags (`--cacert`, `--cert`, `--key`).
    ctl_tls: Vec<String>,
    _dir: tempfile::TempDir,
}

/// A CA, a server certificate for `localhost` and 127.0.0.1, and a client
/// certificate, made with openssl in `dir`: the paths of `ca.pem`,
/// `server.pem`, `server.key`, `client.pem`, `client.key`.
pub struct Certs {
    pub ca: std::path::PathBuf,
    pub server: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

impl Certs {
    pub fn make(dir: &std::path::Path) -> Certs {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(&[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=token-broker test CA",
            ],
        ]
        .concat());
        for (name, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth")] {
            run(&[
                &["req"][..],
                &key,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat());
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
            )
            .unwrap();
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Certs {
            ca: dir.join("ca.pem"),
            server: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The etcd binary, or a loud failure naming what installs it.
fn etcd_binary() -> &'static str {
    for candidate in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(candidate).exists() {
            return candidate;
        }
    }
    panic!("etcd is not installed: `apt-get install etcd-server etcd-client` (as .ci/run does)");
}

impl Cluster {
    /// Starts `n` members and waits until the cluster has a leader. Tests
    /// that start clusters run one at a time (a cluster, its daemons and
    /// their timing are a machine's worth on two cores): hold the guard.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// Like [`start`](Self::start), with more flags for every member.
    pub fn start_with(n: usize, extra: &[&str]) -> Cluster {
        Cluster::start_inner(n, extra, None)
    }

    /// Like [`start`](Self::start), the members serving clients over TLS
    /// with `certs` and requiring a client certificate.
    pub fn start_tls(n: usize, certs: &Certs) -> Cluster {
        Cluster::start_inner(n, &[], Some(certs))
    }

    fn start_inner(n: usize, extra: &[&str], tls: Option<&Certs>) -> Cluster {
        // A test that panicked still passes the turn on.
        let turn = ONE_AT_A_TIME.lock();
        let dir = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data: dir.path().join(format!("m{i}")),
                child: None,
            });
        }
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            members,
            _turn: turn,
            initial,
            token: format!("tb-{}-{}", std::process::id(), fastrand::u64(..)),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            scheme: if tls.is_some() { "https" } else { "http" },
            ctl_tls: Vec::new(),
            _dir: dir,
        };
        if let Some(certs) = tls {
            let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
            cluster.extra.extend([
                format!("--cert-file={}", path(&certs.server)),
                format!("--key-file={}", path(&certs.server_key)),
                format!("--trusted-ca-file={}", path(&certs.ca)),
                "--client-cert-auth=true".to_owned(),
            ]);
            cluster.ctl_tls = vec![
                format!("--cacert={}", path(&certs.ca)),
                format!("--cert={}", path(&certs.client)),
                format!("--key={}", path(&certs.client_key)),
            ];
        }
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .arg(format!(
                "--listen-client-urls={}://127.0.0.1:{}",
                self.scheme, m.client_port
            ))
            .arg(format!(
                "--advertise-client-urls={}://127.0.0.1:{}",
                self.scheme, m.client_port
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer_port))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.peer_port
            ))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--initial-cluster-state=new")
            .args(["--heartbeat-interval=100", "--election-timeout=1000"])
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=error"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// `http(s)://127.0.0.1:PORT` of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme, m.client_port))
            .collect()
    }

    /// The endpoints as a TOML array.
    pub fn toml_endpoints(&self) -> String {
        format!(
            "[{}]",
            self.endpoints()
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// `etcdctl` against the running members.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme, m.client_port))
            .collect();
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", running.join(",")))
            .args(&self.ctl_tls)
            .args(["--command-timeout=3s", "--dial-timeout=2s"])
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// The value of `key` (empty when absent).
    pub fn get(&self, key: &str) -> String {
        let out = self.etcdctl(&["get", "--print-value-only", key]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until a write goes through (the cluster has a leader and quorum).
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let out = self.etcdctl(&["put", "/health-check", "ok"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster never became healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index of the current leader.
    pub fn leader(&self) -> usize {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}://127.0.0.1:{}", self.scheme, m.client_port))
                .args(&self.ctl_tls)
                .args(["endpoint", "status", "--write-out=json"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let status = &json[0]["Status"];
            if status["leader"].as_u64().is_some() && status["leader"] == status["header"]["member_id"] {
                return i;
            }
        }
        panic!("no leader");
    }

    /// Sends `signal` to member `i`.
    pub fn signal(&self, i: usize, signal: i32) {
        if let Some(child) = &self.members[i].child {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data folder.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                // SAFETY: kill on our own child's pid (a stopped member
                // must be continued to die cleanly).
                unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
