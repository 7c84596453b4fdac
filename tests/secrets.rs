//! No secret ever escapes: all tracing output at TRACE (ours and every
//! dependency's) over a full refresh cycle, every provider fault and every
//! error path, every error's `Display` and `Debug`, and the CLI's stderr on
//! every error path must hold no access, refresh or id token, nor any
//! 16-character piece of one.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use token_broker::sim::{codex_auth_json, Fault, SimConfig};
use token_broker::TokenBroker;

/// A tracing writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

const WINDOW: usize = 16;

/// Every 16-byte piece of the secret parts of `tokens` (a JWT's header is
/// public boilerplate shared by all tokens, so it is left out).
fn secret_windows(tokens: &[String]) -> HashSet<Vec<u8>> {
    let mut windows = HashSet::new();
    for token in tokens {
        let secret = match token.split_once('.') {
            Some((_header, rest)) if token.matches('.').count() == 2 => rest,
            _ => token.as_str(),
        };
        for w in secret.as_bytes().windows(WINDOW) {
            windows.insert(w.to_vec());
        }
    }
    windows
}

fn assert_clean(what: &str, haystack: &[u8], windows: &HashSet<Vec<u8>>) {
    for (i, w) in haystack.windows(WINDOW).enumerate() {
        if windows.contains(w) {
            let start = i.saturating_sub(80);
            let context = String::from_utf8_lossy(&haystack[start..(i + WINDOW + 20).min(haystack.len())]);
            panic!("{what}: a piece of a token leaked at byte {i}: …{context}…");
        }
    }
}

#[test]
fn no_token_ever_reaches_logs_errors_or_stderr() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(capture.clone())
        .with_ansi(false)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fx = Fixture::new(SimConfig {
        latency: Duration::from_millis(2),
        ..SimConfig::default()
    });
    let mut shown = String::new();

    rt.block_on(async {
        // A full refresh cycle, a reject, a status.
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let broker = fx
            .codex_broker(&path)
            .http_timeout(Duration::from_millis(400))
            .build()
            .unwrap();
        let token = broker.token().await.unwrap();
        let next = broker.reject(&token).await.unwrap();
        shown += &format!("{token:?} {token} {next:?} {broker:?}\n");
        shown += &format!("{:?}\n", broker.status().await.unwrap());
        shown += &format!("{:?}\n", token_broker::store::CodexAuthFile::new(&path));
        shown += &format!("{:?}\n", {
            token_broker::store::CodexAuthFile::new(&path)
                .load_blocking()
                .unwrap()
                .tokens
        });
        broker.shutdown().await;

        // Every provider fault, each from an expired token.
        let faults = [
            Fault::Status {
                status: 500,
                retry_after: None,
            },
            Fault::Status {
                status: 502,
                retry_after: None,
            },
            Fault::Status {
                status: 503,
                retry_after: None,
            },
            Fault::Status {
                status: 429,
                retry_after: Some(1),
            },
            Fault::ResetAfterSpend,
            Fault::HangAfterSpend(Duration::from_secs(2)),
            Fault::HangBeforeSpend(Duration::from_secs(2)),
            Fault::Html200,
            Fault::Truncated200,
            Fault::NoAccessToken200,
            Fault::Huge200(1 << 20),
        ];
        for fault in faults {
            let path = fx.write_codex(&fx.sim.sign_in(-1.0));
            fx.sim.inject([fault]);
            let broker = fx
                .codex_broker(&path)
                .http_timeout(Duration::from_millis(400))
                .build()
                .unwrap();
            let result = broker.token().await;
            shown += &format!("{result:?}\n");
            if let Err(e) = &result {
                shown += &format!("{e}\n");
            }
            shown += &format!("{:?}\n", broker.status().await.unwrap());
            broker.shutdown().await;
        }

        // Connection refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/oauth/token", closed.local_addr().unwrap());
        drop(closed);
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        let broker = fx.codex_broker(&path).token_url(&url).build().unwrap();
        let err = broker.token().await.unwrap_err();
        shown += &format!("{err} {err:?}\n");
        broker.shutdown().await;

        // A spent refresh token, and an account switch.
        let dead = fx.sim.sign_in(-1.0);
        fx.sim.spend(&dead.refresh_token);
        let path = fx.write_codex(&dead);
        let broker = fx.codex_broker(&path).build().unwrap();
        let err = broker.token().await.unwrap_err();
        shown += &format!("{err} {err:?}\n");
        std::fs::write(&path, codex_auth_json(&fx.sim.sign_in_as("acct-other", -1.0))).unwrap();
        let err = broker.reload().await.unwrap_err();
        shown += &format!("{err} {err:?}\n");
        broker.shutdown().await;

        // An RFC 6749 client with a secret, rejected.
        let creds = fx.path("creds.json");
        std::fs::write(
            &creds,
            token_broker::sim::oauth2_credentials_json(&fx.sim.sign_in(-1.0)),
        )
        .unwrap();
        let broker = TokenBroker::oauth2(fx.sim.token_url(), "wrong-client")
            .client_auth(token_broker::provider::ClientAuth::Basic(
                token_broker::credentials::Secret::new("client-secret-value-never-shown"),
            ))
            .credentials_path(&creds)
            .build()
            .unwrap();
        let err = broker.token().await.unwrap_err();
        shown += &format!("{err} {err:?} {broker:?}\n");
        broker.shutdown().await;
    });

    // Bad files.
    for text in ["", "{", r#"{"tokens":{"access_token":"not.a.jwt"}}"#] {
        let path = fx.path("auth.json");
        std::fs::write(&path, text).unwrap();
        if let Err(e) = fx.codex_broker(&path).build() {
            shown += &format!("{e} {e:?}\n");
        }
    }

    // The CLI, at TRACE, on every error path and on a refresh.
    let mut stderrs = Vec::new();
    let cli = |path: &std::path::Path, url: &str| {
        cli_command()
            .args(["token", "--auth-file"])
            .arg(path)
            .env("CODEX_REFRESH_TOKEN_URL_OVERRIDE", url)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap()
    };
    let path = fx.write_codex(&fx.sim.sign_in(-1.0));
    let out = cli(&path, &fx.sim.token_url());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!out.stderr.is_empty(), "RUST_LOG=trace produced logs");
    stderrs.push(out.stderr);
    let dead = fx.sim.sign_in(-1.0);
    fx.sim.spend(&dead.refresh_token);
    let path = fx.write_codex(&dead);
    let out = cli(&path, &fx.sim.token_url());
    assert_eq!(out.status.code(), Some(4));
    assert!(out.stdout.is_empty());
    stderrs.push(out.stderr);
    for fault in [
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        Fault::Html200,
    ] {
        let path = fx.write_codex(&fx.sim.sign_in(-1.0));
        fx.sim.inject([fault]);
        let out = cli(&path, &fx.sim.token_url());
        assert!(out.stdout.is_empty() || out.status.success());
        stderrs.push(out.stderr);
    }
    std::fs::write(&path, r#"{"tokens":{"access_token":"eyJ.bad"}}"#).unwrap();
    let out = cli(&path, &fx.sim.token_url());
    assert_eq!(out.status.code(), Some(3));
    stderrs.push(out.stderr);
    let out = cli_command()
        .args([
            "token",
            "--provider",
            "oauth2",
            "--token-url",
            &fx.sim.token_url(),
            "--client-id",
            "c",
        ])
        .args([
            "--client-auth",
            "post",
            "--client-secret-env",
            "TB_SECRET",
            "--auth-file",
        ])
        .arg(fx.path("creds.json"))
        .env("TB_SECRET", "client-secret-value-never-shown")
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    stderrs.push(out.stderr);

    let mut secrets = fx.sim.issued_secrets();
    secrets.push("client-secret-value-never-shown".into());
    let windows = secret_windows(&secrets);
    let logs = capture.0.lock().unwrap().clone();
    assert!(logs.len() > 10_000, "TRACE output was captured ({} bytes)", logs.len());
    assert!(String::from_utf8_lossy(&logs).contains("spending the refresh token"));
    assert_clean("tracing output", &logs, &windows);
    assert_clean("Debug and Display output", shown.as_bytes(), &windows);
    for (i, err) in stderrs.iter().enumerate() {
        assert_clean(&format!("CLI stderr #{i}"), err, &windows);
    }
}
