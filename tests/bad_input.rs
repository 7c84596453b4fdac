//! Bad credentials files and paths: each gives a clear typed error (CLI exit
//! 3 and one line naming the file and the problem), never a panic, never a
//! write, never a token request.

mod common;

use std::path::Path;

use common::*;
use token_broker::sim::{codex_auth_json, unsigned_jwt};
use token_broker::store::StoreError;
use token_broker::BrokerError;

/// A Codex file whose access token is `access`.
fn codex_with_access(access: &str) -> String {
    serde_json::json!({
        "OPENAI_API_KEY": null,
        "tokens": {"access_token": access, "refresh_token": "rt_live_1234567890", "account_id": "a"},
        "last_refresh": "2026-11-01T00:00:00Z"
    })
    .to_string()
}

/// Checks one bad file through the library and the CLI.
fn assert_rejected(fx: &Fixture, path: &Path, expect: &str, case: &str) {
    let before = std::fs::read(path).ok();
    let listing = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let files_before = listing(fx.dir.path());

    let err = fx.codex_broker(path).build().unwrap_err();
    assert!(matches!(err, BrokerError::Store(_)), "{case}: {err:?}");
    // The CLI's exit 3 (checked below): missing, unreadable or invalid.
    assert!(
        matches!(
            err,
            BrokerError::Store(
                StoreError::NotFound { .. }
                    | StoreError::Unreadable { .. }
                    | StoreError::Invalid { .. }
                    | StoreError::TooLarge { .. }
            )
        ),
        "{case}: {err}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{case}: {text}");
    assert!(text.contains(expect), "{case}: expected {expect:?} in {text}");

    let out = fx.cli(&["token", "--auth-file", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{case}: {}", stderr(&out));
    assert_eq!(stdout(&out), "", "{case}");
    let err_line = stderr(&out);
    assert_eq!(err_line.lines().count(), 1, "{case}: {err_line}");
    assert!(err_line.contains(&path.display().to_string()), "{case}: {err_line}");
    assert!(err_line.contains(expect), "{case}: {err_line}");
    assert!(!err_line.contains("panicked"), "{case}");

    assert_eq!(std::fs::read(path).ok(), before, "{case}: the file changed");
    assert_eq!(listing(fx.dir.path()), files_before, "{case}: files were created");
    assert_eq!(fx.sim.token_requests(), 0, "{case}");
}

#[test]
fn bad_codex_files_are_clear_errors() {
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "the file is empty"),
        ("whitespace", "  \n".into(), "the file is empty"),
        ("not JSON", "token=abc".into(), "not valid JSON"),
        (
            "truncated JSON",
            r#"{"tokens": {"access_token": "#.into(),
            "not valid JSON",
        ),
        ("array", "[1,2,3]".into(), "expected a JSON object"),
        (
            "tokens missing",
            r#"{"OPENAI_API_KEY":"sk-x"}"#.into(),
            "`tokens` is missing",
        ),
        (
            "tokens not an object",
            r#"{"tokens":"abc"}"#.into(),
            "`tokens` is not an object",
        ),
        (
            "access token missing",
            r#"{"tokens":{"refresh_token":"rt_1234567890"}}"#.into(),
            "`access_token` is missing",
        ),
        (
            "access token a number",
            r#"{"tokens":{"access_token":5}}"#.into(),
            "`access_token` is not a string",
        ),
        (
            "non-JWT access token",
            codex_with_access("opaque-access-token-text"),
            "no expiry",
        ),
        (
            "JWT with bad base64",
            codex_with_access("eyJhbGciOiJub25lIn0.!!!not-base64!!!.c2ln"),
            "base64url",
        ),
        (
            "JWT with bad JSON",
            codex_with_access(&unsigned_jwt("{\"exp\": ")),
            "not a JSON object",
        ),
        (
            "JWT exp not a number",
            codex_with_access(&unsigned_jwt(r#"{"exp":"tomorrow"}"#)),
            "`exp`",
        ),
        (
            "JWT exp negative",
            codex_with_access(&unsigned_jwt(r#"{"exp":-5}"#)),
            "negative",
        ),
        (
            "JWT exp absurdly late",
            codex_with_access(&unsigned_jwt(r#"{"exp":99999999999999}"#)),
            "3000",
        ),
        (
            "JWT exp absurdly early",
            codex_with_access(&unsigned_jwt(r#"{"exp":1}"#)),
            "before 2001",
        ),
        (
            "last_refresh not a time",
            r#"{"tokens":{"access_token":"x"},"last_refresh":"yesterday"}"#.into(),
            "`last_refresh`",
        ),
    ];
    for (case, text, expect) in cases {
        let fx = Fixture::codex();
        let path = fx.path("auth.json");
        std::fs::write(&path, &text).unwrap();
        assert_rejected(&fx, &path, expect, case);
    }
}

#[test]
fn an_error_never_quotes_the_file() {
    // A token-like value in the wrong place must not be echoed back.
    let fx = Fixture::codex();
    let path = fx.path("auth.json");
    std::fs::write(&path, r#"{"tokens":{"access_token":["secret-value-do-not-echo"]}}"#).unwrap();
    assert_rejected(&fx, &path, "not a string", "array token");
    let err = fx.codex_broker(&path).build().unwrap_err();
    assert!(!err.to_string().contains("secret-value"));
    assert!(!format!("{err:?}").contains("secret-value"));
}

#[test]
fn bad_paths_are_clear_errors() {
    let fx = Fixture::codex();
    let dir = fx.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    assert_rejected(&fx, &dir, "it is a directory", "directory");

    let fx = Fixture::codex();
    let link = fx.path("auth.json");
    std::os::unix::fs::symlink(fx.path("gone.json"), &link).unwrap();
    assert_rejected(
        &fx,
        &link,
        "symbolic link to a file that does not exist",
        "dangling symlink",
    );

    let fx = Fixture::codex();
    let missing = fx.path("auth.json");
    assert_rejected(&fx, &missing, "does not exist", "missing");

    let fx = Fixture::codex();
    let huge = fx.path("auth.json");
    let file = std::fs::File::create(&huge).unwrap();
    file.set_len(100 * 1024 * 1024).unwrap(); // 100 MB (sparse)
    drop(file);
    assert_rejected(&fx, &huge, "too large", "100 MB file");
}

/// A file the process may not read. Root reads anything, so as root the CLI
/// runs as `nobody`.
#[test]
fn an_unreadable_file_is_a_clear_error() {
    let fx = Fixture::codex();
    let path = fx.path("auth.json");
    std::fs::write(&path, codex_auth_json(&fx.sim.sign_in(3600.0))).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| stdout(&o).trim() == "0");
    let mut cmd = if is_root.unwrap_or(false) {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", CLI]);
        c
    } else {
        cli_command()
    };
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let out = cmd.args(["token", "--auth-file"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));
    assert!(stderr(&out).contains(path.to_str().unwrap()));
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), before);
    assert_eq!(fx.sim.token_requests(), 0);
}

#[test]
fn bad_oauth2_files_are_clear_errors() {
    let fx = Fixture::codex();
    let path = fx.path("creds.json");
    for (text, expect) in [
        (r#"{"refresh_token":"r"}"#, "`access_token` is missing"),
        (
            r#"{"access_token":"a","expires_at":"soon"}"#,
            "`expires_at` is not an RFC 3339 timestamp",
        ),
        (
            r#"{"access_token":"a","expires_at":"9999-01-01T00:00:00Z"}"#,
            "`expires_at`",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = token_broker::TokenBroker::oauth2(fx.sim.token_url(), "c")
            .credentials_path(&path)
            .build()
            .unwrap_err();
        assert!(matches!(err, BrokerError::Store(StoreError::Invalid { .. })), "{err:?}");
        assert!(err.to_string().contains(expect), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}

/// An opaque access token without `expires_at` is valid input for a
/// generic OAuth2 provider: used until the upstream API rejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opaque_oauth2_token_without_expiry_is_used_until_rejected() {
    let fx = Fixture::codex();
    let path = fx.path("creds.json");
    std::fs::write(&path, r#"{"access_token":"opaque-access","refresh_token":"r"}"#).unwrap();
    let broker = token_broker::TokenBroker::oauth2(fx.sim.token_url(), "c")
        .credentials_path(&path)
        .build()
        .unwrap();
    let token = broker.token().await.unwrap();
    assert_eq!(token.expose(), "opaque-access");
    assert_eq!(broker.status().await.unwrap().state, token_broker::State::Valid);
    assert_eq!(fx.sim.token_requests(), 0);
    // The upstream API refuses it: now, and only now, it is refreshed.
    let err = broker.reject(&token).await.unwrap_err();
    assert!(matches!(err, BrokerError::LoginRequired { .. }), "{err}");
    broker.shutdown().await;
    assert_eq!(fx.sim.token_requests(), 1, "one refresh attempt for the rejected token");
}
