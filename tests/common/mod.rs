//! Helpers shared by the integration tests: a simulated provider on
//! loopback, credentials files in a temporary folder, and the CLI binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use token_broker::sim::{codex_auth_json, Issued, ProviderServer, SimConfig};
use token_broker::store::{Loaded, StoreError, StoreFuture, Version};

pub const CLI: &str = env!("CARGO_BIN_EXE_token-broker");

/// How long brokers in tests that are not about it wait for a winner's
/// tokens after a refusal (the default, 8 s, is tested on its own).
pub const TEST_WINNER_WAIT: Duration = Duration::from_millis(300);

/// The CLI binary, with the short test winner wait.
pub fn cli_command() -> Command {
    let mut cmd = Command::new(CLI);
    cmd.env("TOKEN_BROKER_WINNER_WAIT", "300ms");
    cmd
}

/// A simulated provider and a folder for credentials files.
pub struct Fixture {
    pub sim: ProviderServer,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(config: SimConfig) -> Self {
        Fixture {
            sim: ProviderServer::start(config).expect("start the simulated provider"),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn codex() -> Self {
        Self::new(SimConfig::default())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a Codex auth.json holding `issued` and returns its path.
    pub fn write_codex(&self, issued: &Issued) -> PathBuf {
        let path = self.path("auth.json");
        std::fs::write(&path, codex_auth_json(issued)).unwrap();
        path
    }

    /// A Codex broker over `path` talking to the simulated provider.
    pub fn codex_broker(&self, path: &Path) -> token_broker::BrokerBuilder {
        token_broker::TokenBroker::codex()
            .credentials_path(path)
            .token_url(self.sim.token_url())
            .http_timeout(Duration::from_secs(10))
            .winner_wait(TEST_WINNER_WAIT)
    }

    /// Runs the CLI against the simulated provider.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli_command()
            .args(args)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", self.sim.token_url())
            .env_remove("RUST_LOG")
            .output()
            .expect("run the CLI")
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Waits until `cond` holds, or panics after `within` saying `what`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Holds the brokers' lock on the credentials file at `path` (as a broker
/// in the middle of a refresh would) until the returned file is dropped.
pub fn hold_broker_lock(path: &Path) -> std::fs::File {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.with_file_name(format!("{}.broker.lock", path.file_name().unwrap().to_string_lossy())))
        .unwrap();
    lock.lock().unwrap();
    lock
}

/// A store whose next `failures_left` saves fail, as a full disk would;
/// everything else goes to `inner`.
#[derive(Debug)]
pub struct FailingSaves<S> {
    pub inner: S,
    pub failures_left: std::sync::atomic::AtomicU32,
}

impl<S> FailingSaves<S> {
    pub fn new(inner: S, failures: u32) -> std::sync::Arc<Self> {
        std::sync::Arc::new(FailingSaves {
            inner,
            failures_left: std::sync::atomic::AtomicU32::new(failures),
        })
    }
}

impl<S: token_broker::store::Store> token_broker::store::Store for FailingSaves<S> {
    fn location(&self) -> &str {
        self.inner.location()
    }
    fn load(&self) -> StoreFuture<'_, Result<Loaded, StoreError>> {
        self.inner.load()
    }
    fn save<'a>(
        &'a self,
        tokens: &'a token_broker::TokenSet,
        expected: &'a Version,
    ) -> StoreFuture<'a, Result<Version, StoreError>> {
        use std::sync::atomic::Ordering;
        let fail = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(std::future::ready(Err(StoreError::Write {
                location: token_broker::store::Location::named("failing-store"),
                cause: "no space left on device".into(),
            })));
        }
        self.inner.save(tokens, expected)
    }
    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<token_broker::store::StoreLock, StoreError>> {
        self.inner.lock(timeout)
    }
    fn changes(&self, fallback_poll: Duration) -> token_broker::store::Changes {
        self.inner.changes(fallback_poll)
    }
    fn mark_refreshing<'a>(
        &'a self,
        token: &'a token_broker::credentials::RefreshToken,
    ) -> StoreFuture<'a, Result<(), StoreError>> {
        self.inner.mark_refreshing(token)
    }
    fn clear_refreshing(&self) -> StoreFuture<'_, Result<(), StoreError>> {
        self.inner.clear_refreshing()
    }
    fn interrupted_refresh(&self) -> StoreFuture<'_, Result<Option<token_broker::store::RefreshRecord>, StoreError>> {
        self.inner.interrupted_refresh()
    }
    fn recover_interrupted(&self) -> StoreFuture<'_, Option<token_broker::TokenSet>> {
        self.inner.recover_interrupted()
    }
    fn record_refused<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        self.inner.record_refused(key)
    }
    fn refused_at<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<Option<std::time::SystemTime>, StoreError>> {
        self.inner.refused_at(key)
    }
}
