//! A `token-broker serve` process for tests: started on a configuration,
//! its logs collected, signalled, asked through the CLI.
//!
//! Mount it from an integration test with
//! `#[path = "common/daemon.rs"] mod daemon;` next to `mod common;`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use super::common::cli_command;

/// A running `token-broker serve` and its folder.
pub struct Daemon {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub stderr: std::sync::Arc<parking_lot::Mutex<String>>,
    /// Reads stderr into `stderr` until the daemon exits.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts `serve --config config` and waits for its "listening" line.
    pub fn start(config: &Path, socket: &Path) -> Daemon {
        Daemon::start_logging(config, socket, "info")
    }

    /// Like [`start_logging`](Self::start_logging).
    pub fn start_with(config: &Path, socket: &Path, level: &str) -> Daemon {
        Daemon::start_logging(config, socket, level)
    }

    /// Like [`start`](Self::start), logging at `level` (`RUST_LOG`).
    pub fn start_logging(config: &Path, socket: &Path, level: &str) -> Daemon {
        Daemon::start_env(config, socket, level, &[])
    }

    /// Like [`start_logging`](Self::start_logging), with more variables.
    pub fn start_env(config: &Path, socket: &Path, level: &str, env: &[(&str, &str)]) -> Daemon {
        let mut child = cli_command()
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let stderr = std::sync::Arc::new(parking_lot::Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.contains("listening on"),
            "the daemon did not start: {first}{}",
            stderr.lock()
        );
        Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            config: config.to_path_buf(),
            stderr,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("the daemon runs").id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// Sends SIGTERM and waits for the exit status (and the last logs).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// Waits for the exit status without sending anything, and for the
    /// last of the logs.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.take().unwrap().wait().unwrap();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        status
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().clone()
    }

    /// Waits until the logs contain `needle`.
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.logs().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon never logged {needle:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGHUP and waits for the reload's `outcome` line to be logged
    /// once more than it was.
    pub fn reload(&self, outcome: &str) {
        let before = self.logs().matches(outcome).count();
        self.signal(libc::SIGHUP);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.logs().matches(outcome).count() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no {outcome:?} after SIGHUP:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `token-broker <args> --config <config>`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli_command()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` on the daemon's socket with a fresh connection: the status
/// and the body (status 0: no answer).
pub fn socket_get(socket: &Path, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes());
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    status_and_body(&raw)
}

/// The status and the body of a raw HTTP/1.1 answer (status 0: none).
pub fn status_and_body(raw: &[u8]) -> (u16, String) {
    let answer = String::from_utf8_lossy(raw);
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
