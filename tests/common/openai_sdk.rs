//! Runs the official OpenAI Python SDK (PyPI `openai`, pinned below) as a
//! client: `tests/common/openai_client.py` with the python of the
//! virtualenv `.ci/install-openai-sdk` makes in `.ci/openai-venv/`.
//!
//! ```ignore
//! #[test]
//! fn my_test() {
//!     let Some(sdk) = openai_sdk::require("my_test") else { return };
//!     // `--api-key=KEY`, with `=`: a key may start with a dash.
//!     let run = sdk.run(&["stream", &format!("--base-url={url}"), &format!("--api-key={key}")]);
//!     run.assert_success();
//! }
//! ```
//!
//! Environment:
//! - `TOKEN_BROKER_OPENAI_PYTHON`: a python that can `import openai`, used
//!   instead of the virtualenv's.
//! - `TOKEN_BROKER_SKIP_OPENAI_SDK=1`: when the SDK cannot be had, print a
//!   SKIPPED line and pass instead of failing (never with `CI=true`).
//!
//! Mount it from an integration test with
//! `#[path = "common/openai_sdk.rs"] mod openai_sdk;`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `openai` release the tests run.
pub const OPENAI_VERSION: &str = "3.57.0";
/// Overrides the python.
pub const PYTHON_ENV: &str = "TOKEN_BROKER_OPENAI_PYTHON";
/// `1`: skip (loudly) instead of failing when the SDK cannot be had.
pub const SKIP_ENV: &str = "TOKEN_BROKER_SKIP_OPENAI_SDK";
/// How long one run of the client may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `.ci/install-openai-sdk`.
pub fn install_script() -> PathBuf {
    repo_root().join(".ci").join("install-openai-sdk")
}

/// The virtualenv `.ci/install-openai-sdk` makes (git-ignored).
pub fn venv_dir() -> PathBuf {
    repo_root().join(".ci").join("openai-venv")
}

/// The client script.
pub fn client_script() -> PathBuf {
    repo_root().join("tests").join("common").join("openai_client.py")
}

fn loud(lines: &[&str]) -> String {
    let bar = "=".repeat(78);
    format!("\n{bar}\n{}\n{bar}\n", lines.join("\n"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The version of `openai` that `python` imports, if it does.
fn version_of(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import openai; print(openai.__version__)"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The python `.ci/install-openai-sdk` recorded, if it is there and
/// imports the pinned version.
fn installed_python() -> Option<PathBuf> {
    let recorded = std::fs::read_to_string(venv_dir().join("python-path")).ok()?;
    let python = PathBuf::from(recorded.trim());
    (version_of(&python)? == OPENAI_VERSION).then_some(python)
}

/// Runs `.ci/install-openai-sdk` under a file lock, so that parallel test
/// processes do not install at the same time.
fn install() -> Result<PathBuf, String> {
    let lock_path = repo_root().join(".ci").join("openai-venv.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    // Another process may have installed it while we waited.
    if let Some(python) = installed_python() {
        return Ok(python);
    }
    let _ = writeln!(
        std::io::stderr(),
        "openai_sdk: installing openai=={OPENAI_VERSION} with {}",
        install_script().display()
    );
    let out = Command::new("bash")
        .arg(install_script())
        .env("OPENAI_SDK_VERSION", OPENAI_VERSION)
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
    installed_python().ok_or_else(|| {
        format!(
            "{} succeeded but {} does not name a python that imports openai {OPENAI_VERSION}",
            install_script().display(),
            venv_dir().join("python-path").display()
        )
    })
}

/// Finds the python: `$TOKEN_BROKER_OPENAI_PYTHON`, else the virtualenv's,
/// installing it (once per process) when missing.
pub fn locate() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(python) = std::env::var_os(PYTHON_ENV).filter(|v| !v.is_empty()) {
                let python = PathBuf::from(python);
                return match version_of(&python) {
                    Some(v) => {
                        if v != OPENAI_VERSION {
                            eprintln!(
                                "openai_sdk: NOTE {PYTHON_ENV}={} imports openai {v}, not the pinned {OPENAI_VERSION}",
                                python.display()
                            );
                        }
                        Ok(python)
                    }
                    None => Err(format!("{PYTHON_ENV}={} cannot `import openai`", python.display())),
                };
            }
            installed_python().map(Ok).unwrap_or_else(install)
        })
        .clone()
}

/// The SDK, or `None` after printing a loud SKIPPED line when it cannot be
/// had and `TOKEN_BROKER_SKIP_OPENAI_SDK=1` (never in CI). Panics with
/// instructions otherwise.
pub fn require(test: &str) -> Option<Sdk> {
    let why = match locate() {
        Ok(python) => return Some(Sdk { python }),
        Err(why) => why,
    };
    let how = [
        "Install it (needs python3 with venv, e.g. apt-get install -y python3-venv; into the git-ignored .ci/openai-venv/):",
        "    .ci/install-openai-sdk",
        "or point TOKEN_BROKER_OPENAI_PYTHON at a python that can `import openai`,",
        "or set TOKEN_BROKER_SKIP_OPENAI_SDK=1 to skip these tests (not honoured when CI=true).",
    ];
    let skip = std::env::var(SKIP_ENV).is_ok_and(|v| v == "1");
    if skip && !in_ci() {
        let mut lines = vec![
            format!("SKIPPED {test}: the OpenAI Python SDK {OPENAI_VERSION} is not available ({SKIP_ENV}=1)."),
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
        format!("{test} needs the OpenAI Python SDK {OPENAI_VERSION} and it is not available."),
        format!("Reason: {why}"),
    ];
    lines.extend(how.iter().map(|s| s.to_string()));
    if in_ci() {
        lines.push("CI=true: these tests are never skipped in CI.".to_owned());
    }
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    panic!("{}", loud(&lines));
}

/// The SDK's python.
#[derive(Clone, Debug)]
pub struct Sdk {
    pub python: PathBuf,
}

impl Sdk {
    /// `python -u openai_client.py <args>` with a clean environment (no
    /// `OPENAI_*`, no HTTP proxies).
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg("-u")
            .arg(client_script())
            .args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("NO_PROXY", "*");
        cmd
    }

    /// Runs the client to its end (killed after [`RUN_TIMEOUT`]).
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> SdkRun {
        let start = Instant::now();
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.python.display()));
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
            match child.try_wait().expect("wait for python") {
                Some(status) => break Some(status),
                None if start.elapsed() >= RUN_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        SdkRun::new(
            status,
            stdout.join().unwrap_or_default(),
            stderr.join().unwrap_or_default(),
        )
    }

    /// Starts the client with piped stdin, to talk to it as it runs.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> SdkChild {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.python.display()));
        let (tx, events) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        });
        SdkChild {
            stdin: child.stdin.take(),
            child,
            events,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }
}

/// The lines a client printed, parsed.
fn parse_events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// A finished run of the client.
#[derive(Debug)]
pub struct SdkRun {
    /// `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub events: Vec<Value>,
}

impl SdkRun {
    fn new(status: Option<ExitStatus>, stdout: String, stderr: String) -> Self {
        let events = parse_events(&stdout);
        SdkRun {
            status,
            stdout,
            stderr,
            events,
        }
    }

    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Exit status and output, for assertion messages.
    pub fn report(&self) -> String {
        let status = match self.status {
            Some(status) => status.to_string(),
            None => "killed at the timeout".to_owned(),
        };
        format!(
            "openai_client.py: {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }

    /// Panics with the report unless it exited 0.
    pub fn assert_success(&self) {
        assert!(self.succeeded(), "the OpenAI SDK client failed\n{}", self.report());
    }

    /// The first event named `name`.
    pub fn event(&self, name: &str) -> Option<&Value> {
        self.events.iter().find(|e| e["event"] == name)
    }

    /// The first event named `name`, or a panic with the report.
    pub fn expect_event(&self, name: &str) -> &Value {
        self.event(name)
            .unwrap_or_else(|| panic!("no {name:?} event\n{}", self.report()))
    }
}

/// A running client.
pub struct SdkChild {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl SdkChild {
    /// The next event named `name` (skipping others), waiting up to
    /// `within`; panics with what it printed if none comes.
    pub fn wait_event(&mut self, name: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Ok(event) = serde_json::from_str::<Value>(&line) {
                        if event["event"] == name {
                            return event;
                        }
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
                    panic!(
                        "no {name:?} event from openai_client.py within {within:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                        self.seen.join("\n"),
                        stderr.unwrap_or_default()
                    );
                }
            }
        }
    }

    /// Writes `line` and a newline to its stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to openai_client.py");
    }

    /// Closes its stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for its exit (killing it after `within`): the exit status, or
    /// `None` when it was killed.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for python") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What it printed on stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for SdkChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
