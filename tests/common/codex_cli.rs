//! Runs the real Codex CLI (npm `@openai/codex`, pinned below) beside
//! token-broker, on loopback only.
//!
//! A test starts with [`enter`]:
//!
//! ```ignore
//! #[test]
//! fn my_test() {
//!     let Some(codex) = codex_cli::enter("my_test") else { return };
//!     // Here we are inside a network namespace that has only loopback.
//! }
//! ```
//!
//! In the test process `enter` finds (or installs) the binary, then runs
//! this same test again in a new network namespace with only `lo`
//! (`unshare -rn`), checks that it passed, and returns `None`. In that
//! re-run it returns the binary and the test body runs: the simulated
//! provider, the model API and codex all live in that namespace, so
//! nothing codex does can leave the machine.
//!
//! Environment:
//! - `TOKEN_BROKER_CODEX_BIN`: use this codex binary instead of the one
//!   `.ci/install-codex-cli` installs into `.codex-cli/`.
//! - `TOKEN_BROKER_SKIP_CODEX_CLI=1`: when codex cannot be had, print a
//!   SKIPPED line and pass instead of failing (never with `CI=true`).
//!
//! Helpers never print a token: output shown on failure has every token the
//! simulated provider issued replaced by its fingerprint.
//!
//! Mount it from an integration test with
//! `#[path = "common/codex_cli.rs"] mod codex_cli;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use token_broker::credentials::Secret;
use token_broker::sim::{codex_auth_json, Issued, ProviderServer};

/// The Codex CLI release the tests run.
pub const CODEX_VERSION: &str = "0.171.0";
/// Overrides the codex binary.
pub const BIN_ENV: &str = "TOKEN_BROKER_CODEX_BIN";
/// `1`: skip (loudly) instead of failing when codex cannot be had.
pub const SKIP_ENV: &str = "TOKEN_BROKER_SKIP_CODEX_CLI";
/// Set in the re-run inside the network namespace.
const NETNS_ENV: &str = "TOKEN_BROKER_CODEX_NETNS";
/// How long the re-run of one test in the namespace may take.
const NETNS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one `codex exec` may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.ci/install-codex-cli`.
pub fn install_script() -> PathBuf {
    repo_root().join(".ci").join("install-codex-cli")
}

/// The folder `.ci/install-codex-cli` installs into (git-ignored).
pub fn install_dir() -> PathBuf {
    repo_root().join(".codex-cli")
}

/// The Codex CLI binary the tests run.
#[derive(Clone, Debug)]
pub struct Codex {
    pub bin: PathBuf,
}

fn loud(lines: &[&str]) -> String {
    let bar = "=".repeat(78);
    format!("\n{bar}\n{}\n{bar}\n", lines.join("\n"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The version line `bin --version` prints, if it runs.
fn version_of(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").stdin(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The binary `.ci/install-codex-cli` recorded, if it is there and is the
/// pinned version.
fn installed_binary() -> Option<PathBuf> {
    let recorded = std::fs::read_to_string(install_dir().join("bin-path")).ok()?;
    let bin = PathBuf::from(recorded.trim());
    let version = version_of(&bin)?;
    version.contains(CODEX_VERSION).then_some(bin)
}

/// Runs `.ci/install-codex-cli` once per process, under a file lock so
/// that parallel test processes do not install at the same time.
fn install() -> Result<PathBuf, String> {
    let dir = install_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let lock_path = dir.join(".install.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    // Another process may have installed it while we waited.
    if let Some(bin) = installed_binary() {
        return Ok(bin);
    }
    let _ = writeln!(
        std::io::stderr(),
        "codex_cli: installing @openai/codex@{CODEX_VERSION} with {}",
        install_script().display()
    );
    let out = Command::new("bash")
        .arg(install_script())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", install_script().display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            install_script().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    installed_binary().ok_or_else(|| {
        format!(
            "{} succeeded but {} does not name a codex {CODEX_VERSION} binary",
            install_script().display(),
            dir.join("bin-path").display()
        )
    })
}

/// Finds the codex binary: `$TOKEN_BROKER_CODEX_BIN`, else the one in
/// `.codex-cli/`, installing it there (once per process) when missing.
pub fn locate() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(bin) = std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()) {
                let bin = PathBuf::from(bin);
                return match version_of(&bin) {
                    Some(v) => {
                        if !v.contains(CODEX_VERSION) {
                            eprintln!(
                                "codex_cli: NOTE {BIN_ENV}={} is `{v}`, not the pinned {CODEX_VERSION}",
                                bin.display()
                            );
                        }
                        Ok(bin)
                    }
                    None => Err(format!("{BIN_ENV}={} does not run `--version`", bin.display())),
                };
            }
            installed_binary().map(Ok).unwrap_or_else(install)
        })
        .clone()
}

/// The codex binary, or `None` after printing a loud SKIPPED line when it
/// cannot be had and `TOKEN_BROKER_SKIP_CODEX_CLI=1` (never in CI). Panics
/// with instructions otherwise.
pub fn require(test: &str) -> Option<Codex> {
    let why = match locate() {
        Ok(bin) => return Some(Codex { bin }),
        Err(why) => why,
    };
    let how = [
        "Install it (needs node and npm; about 400 MB, into the git-ignored .codex-cli/):",
        "    .ci/install-codex-cli",
        "or point TOKEN_BROKER_CODEX_BIN at a codex binary,",
        "or set TOKEN_BROKER_SKIP_CODEX_CLI=1 to skip these tests (not honoured when CI=true).",
    ];
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    if skip && !in_ci() {
        let mut lines = vec![
            format!("SKIPPED {test}: the Codex CLI {CODEX_VERSION} is not available ({SKIP_ENV}=1)."),
            format!("Reason: {why}"),
        ];
        lines.extend(how.iter().map(|s| s.to_string()));
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        // Straight to the process's stderr: the test harness captures
        // `eprintln!`, and a skip must be seen.
        let _ = writeln!(std::io::stderr(), "{}", loud(&lines));
        return None;
    }
    let mut lines = vec![
        format!("{test} needs the real Codex CLI {CODEX_VERSION} and it is not available."),
        format!("Reason: {why}"),
    ];
    lines.extend(how.iter().map(|s| s.to_string()));
    if in_ci() {
        lines.push("CI=true: these tests are never skipped in CI.".to_owned());
    }
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    panic!("{}", loud(&lines));
}

/// The interfaces of the current network namespace (`/proc/self/net/dev`,
/// which, unlike `/sys/class/net`, follows the namespace).
pub fn interfaces() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(|name| name.trim().to_owned())
        .collect()
}

fn check_tool(tool: &str, args: &[&str], package: &str) {
    let ok = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{}",
        loud(&[
            &format!("`{tool}` is needed to run codex in a loopback-only network namespace and it does not run here."),
            &format!("Install it: apt-get install -y {package}"),
        ])
    );
}

/// Whether this process is the re-run inside the loopback-only network
/// namespace. When it is not, re-runs the test `test_name` of this test
/// binary there (`unshare -rn`, `lo` up, `--exact --nocapture
/// --test-threads=1`), with `extra_env` set, checks that exactly that test
/// ran and passed, and returns `false`: the caller then returns.
pub fn in_netns_with_env(test_name: &str, extra_env: &[(&str, &str)]) -> bool {
    if std::env::var_os(NETNS_ENV).is_some() {
        let interfaces = interfaces();
        assert_eq!(
            interfaces,
            vec!["lo".to_owned()],
            "the re-run of {test_name} should be in a network namespace with only loopback"
        );
        return true;
    }
    check_tool("unshare", &["--version"], "util-linux");
    check_tool("ip", &["-V"], "iproute2");
    let exe = std::env::current_exe().expect("the current test binary");
    let mut cmd = Command::new("unshare");
    cmd.args(["-rn", "sh", "-c", r#"ip link set lo up && exec "$0" "$@""#])
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .stdin(Stdio::null());
    for (key, value) in extra_env {
        cmd.env(key, value);
    }
    let run = run_with_timeout(&mut cmd, NETNS_TIMEOUT);
    // Shown by the test harness when the test fails (or with --nocapture).
    println!(
        "----- {test_name} in a loopback-only network namespace: {} -----",
        run.describe()
    );
    println!("{}", run.stdout);
    eprintln!("{}", run.stderr);
    if run.stderr.contains("unshare: ") {
        panic!(
            "{}",
            loud(&[
                "`unshare -rn` could not create a network namespace here.",
                "Run the tests as root, or enable unprivileged user namespaces",
                "(sysctl kernel.unprivileged_userns_clone=1).",
            ])
        );
    }
    assert!(
        run.succeeded(),
        "{test_name} failed in its loopback-only network namespace ({}); its output is above",
        run.describe()
    );
    assert!(
        run.stdout.contains("test result: ok. 1 passed"),
        "the re-run in the network namespace did not run exactly `{test_name}` (wrong test name?); its output is above"
    );
    false
}

/// [`in_netns_with_env`] with no extra environment.
pub fn in_netns(test_name: &str) -> bool {
    in_netns_with_env(test_name, &[])
}

/// Where a Codex test starts: `Some(codex)` inside the loopback-only
/// network namespace (run the body), `None` in the test process (the
/// body already ran, and passed, in the namespace) or when skipped.
pub fn enter(test_name: &str) -> Option<Codex> {
    if std::env::var_os(NETNS_ENV).is_some() {
        let bin = std::env::var_os(BIN_ENV).expect("the outer test process passes the codex binary");
        assert!(in_netns(test_name));
        return Some(Codex { bin: bin.into() });
    }
    // Install (if needed) out here: the namespace has no network.
    let codex = require(test_name)?;
    let bin = codex.bin.to_string_lossy().into_owned();
    let entered = in_netns_with_env(test_name, &[(BIN_ENV, &bin)]);
    assert!(!entered);
    None
}

/// A finished (or killed) child process.
#[derive(Debug)]
pub struct Finished {
    /// `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    pub fn describe(&self) -> String {
        match self.status {
            Some(status) => format!("{status} after {:.1?}", self.elapsed),
            None => format!("killed at the timeout after {:.1?}", self.elapsed),
        }
    }
}

/// Runs `cmd` in its own process group, capturing its output; kills the
/// whole group if it is still running after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let status = loop {
        match child.try_wait().expect("wait for the child") {
            Some(status) => break Some(status),
            None if start.elapsed() >= timeout => {
                // The group we created above: the child and what it started.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Replaces every occurrence of each secret in `text` by its fingerprint.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= 8) {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), &format!("{:?}", Secret::new(secret.as_str())));
        }
    }
    text
}

/// The `config.toml` that points codex at the loopback model API
/// (`origin` is `http://127.0.0.1:PORT`, serving `/v1` and `/backend-api`)
/// and turns off what would reach out elsewhere.
pub fn config_toml(origin: &str) -> String {
    format!(
        r#"# Written by tests/common/codex_cli.rs: everything on loopback.
model = "gpt-sim"
model_provider = "sim"
# The ChatGPT backend (account checks, plugins, analytics) on loopback too.
chatgpt_base_url = "{origin}/backend-api"
approval_policy = "never"
sandbox_mode = "read-only"
cli_auth_credentials_store = "file"
check_for_update_on_startup = false
web_search = "disabled"

[model_providers.sim]
name = "token-broker simulated model API"
base_url = "{origin}/v1"
wire_api = "responses"
# Use the ChatGPT tokens in auth.json (and refresh them like OpenAI's).
requires_openai_auth = true
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 30000

[analytics]
enabled = false

[feedback]
enabled = false

[history]
persistence = "none"

[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"

[features]
apps = false
plugins = false
remote_models = false
"#
    )
}

/// A temporary `CODEX_HOME` (with `auth.json` and `config.toml`), `HOME`
/// and working folder for one codex run.
pub struct CodexHome {
    root: tempfile::TempDir,
    origin: String,
}

impl CodexHome {
    /// A `CODEX_HOME` signed in with `issued` (as `codex login` writes it)
    /// whose model API is at `origin` (`http://127.0.0.1:PORT`).
    pub fn new(origin: &str, issued: &Issued) -> Self {
        let home = Self::empty(origin);
        home.write_auth_json(&codex_auth_json(issued));
        home
    }

    /// A `CODEX_HOME` with `config.toml` and no `auth.json`.
    pub fn empty(origin: &str) -> Self {
        let root = tempfile::Builder::new()
            .prefix("codex-cli-test-")
            .tempdir()
            .expect("temp dir");
        let home = CodexHome {
            root,
            origin: origin.to_owned(),
        };
        for dir in [home.codex_home(), home.home(), home.work()] {
            std::fs::create_dir_all(dir).expect("create a test folder");
        }
        std::fs::write(home.codex_home().join("config.toml"), config_toml(origin)).expect("write config.toml");
        home
    }

    /// `$CODEX_HOME`.
    pub fn codex_home(&self) -> PathBuf {
        self.root.path().join("codex-home")
    }

    /// `$HOME` for the run (so nothing of the real `~` is read).
    pub fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }

    /// The working folder (not a git repository).
    pub fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }

    /// `$CODEX_HOME/auth.json`.
    pub fn auth_path(&self) -> PathBuf {
        self.codex_home().join("auth.json")
    }

    /// Replaces `auth.json` (mode 0600, as codex writes it).
    pub fn write_auth_json(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.auth_path();
        std::fs::write(&path, text).expect("write auth.json");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod auth.json");
    }

    /// `auth.json` as JSON.
    pub fn auth_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.auth_path()).expect("read auth.json")).expect("auth.json is JSON")
    }

    /// The command line of a non-interactive run of `prompt`.
    pub fn exec_command(&self, codex: &Codex, token_url: &str, prompt: &str) -> Command {
        let mut cmd = Command::new(&codex.bin);
        cmd.args([
            "exec",
            "--skip-git-repo-check",
            "--ephemeral",
            "--sandbox",
            "read-only",
            "--color",
            "never",
            "--cd",
        ])
        .arg(self.work())
        .arg(prompt)
        .current_dir(self.work())
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", self.home())
        .env("CODEX_HOME", self.codex_home())
        .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", token_url)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
        cmd
    }

    /// Runs `codex exec prompt` against `sim`'s token endpoint, killed
    /// after [`EXEC_TIMEOUT`]. Its output has every token `sim` issued
    /// replaced by a fingerprint.
    pub fn exec(&self, codex: &Codex, sim: &ProviderServer, prompt: &str) -> CodexRun {
        self.exec_with_timeout(codex, sim, prompt, EXEC_TIMEOUT)
    }

    /// [`exec`](Self::exec) with another timeout.
    pub fn exec_with_timeout(&self, codex: &Codex, sim: &ProviderServer, prompt: &str, timeout: Duration) -> CodexRun {
        let mut cmd = self.exec_command(codex, &sim.token_url(), prompt);
        let finished = run_with_timeout(&mut cmd, timeout);
        let secrets = sim.issued_secrets();
        CodexRun {
            status: finished.status,
            stdout: redact(&finished.stdout, &secrets),
            stderr: redact(&finished.stderr, &secrets),
            elapsed: finished.elapsed,
        }
    }
}

/// The outcome of one `codex exec` (output already redacted).
#[derive(Debug)]
pub struct CodexRun {
    /// `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl CodexRun {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Exit status, output and time, for assertion messages.
    pub fn report(&self) -> String {
        let status = match self.status {
            Some(status) => status.to_string(),
            None => "killed at the timeout".to_owned(),
        };
        format!(
            "codex exec: {status} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.elapsed, self.stdout, self.stderr
        )
    }

    /// Panics with the report unless codex exited 0.
    pub fn assert_success(&self) {
        assert!(self.succeeded(), "codex exec failed\n{}", self.report());
    }
}
