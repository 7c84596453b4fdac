//! The Codex CLI's `auth.json`.
//!
//! ```json
//! {
//!   "auth_mode": "chatgpt",
//!   "OPENAI_API_KEY": null,
//!   "tokens": {
//!     "id_token": "<jwt>",
//!     "access_token": "<jwt>",
//!     "refresh_token": "<opaque>",
//!     "account_id": "<uuid>"
//!   },
//!   "last_refresh": "2026-11-28T07:29:02.123456Z"
//! }
//! ```
//!
//! Every variant the Codex CLI writes is read: with or without `auth_mode`,
//! `OPENAI_API_KEY` null, absent or a string, `id_token` or `account_id`
//! missing (the account id then comes from the id token's
//! `https://api.openai.com/auth` claim). A write changes only
//! `tokens.access_token`, `tokens.refresh_token`, `tokens.id_token` and
//! `last_refresh`; every other key stays exactly as it was.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::file::{optional_string, required_string};
use super::json_file::{FileFormat, JsonFileStore};
use super::StoreError;
use crate::credentials::{
    decode_claims, expiry_of, format_rfc3339, parse_rfc3339, AccessToken, Expiry, ExpirySource, IdToken, RefreshToken,
    TokenSet,
};

/// The layout of the Codex CLI's `auth.json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CodexFormat;

/// The Codex CLI's `auth.json`.
pub type CodexAuthFile = JsonFileStore<CodexFormat>;

impl CodexAuthFile {
    /// The default location: `$CODEX_HOME/auth.json`, else
    /// `~/.codex/auth.json`. `None` when neither variable is set.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(home) = std::env::var_os("CODEX_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(home).join("auth.json"));
        }
        let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
        Some(PathBuf::from(home).join(".codex").join("auth.json"))
    }
}

impl FileFormat for CodexFormat {
    const NAME: &'static str = "CodexAuthFile";

    fn read(path: &Path, root: &Map<String, Value>) -> Result<TokenSet, StoreError> {
        read_codex(path, root)
    }

    /// The Codex CLI commits a refresh under `flock($CODEX_HOME/auth.lock)`
    /// (blocking), then `flock(auth.json.lock)` (polled for up to 5 s), and
    /// throws its new tokens away if it cannot get the second in time.
    /// The paths are those the Codex CLI uses: beside the path it was
    /// given (`$CODEX_HOME/auth.json`), even when that is a symbolic link to
    /// a file elsewhere.
    fn commit_lock_paths(path: &Path) -> Vec<PathBuf> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        vec![dir.join("auth.lock"), dir.join(name)]
    }

    fn patch(path: &Path, root: &mut Map<String, Value>, tokens: &TokenSet) -> Result<(), StoreError> {
        let Some(Value::Object(tokens_obj)) = root.get_mut("tokens") else {
            return Err(StoreError::invalid(path, "`tokens` is not an object"));
        };
        tokens_obj.insert(
            "access_token".into(),
            Value::String(tokens.access_token.expose().to_owned()),
        );
        if let Some(refresh) = &tokens.refresh_token {
            tokens_obj.insert("refresh_token".into(), Value::String(refresh.expose().to_owned()));
        }
        if let Some(id) = &tokens.id_token {
            tokens_obj.insert("id_token".into(), Value::String(id.expose().to_owned()));
        }
        if let Some(at) = tokens.last_refresh {
            root.insert("last_refresh".into(), Value::String(format_rfc3339(at)));
        }
        // An access token whose own `exp` cannot be trusted (none, unreadable,
        // implausible, or past on arrival by our clock): record what the
        // provider's `expires_in` said, for this very token, so that the file
        // we write is one we can load. The Codex CLI ignores the key and drops
        // it when it rewrites the file.
        if tokens.expiry.is_some_and(|e| e.source == ExpirySource::JwtExp) {
            root.remove(RECORD_KEY);
        } else {
            root.insert(
                RECORD_KEY.into(),
                serde_json::json!({
                    "access_token_sha256": tokens.access_token.sha256_hex(),
                    "expires_at": tokens.expiry.map(|e| format_rfc3339(e.at)),
                }),
            );
        }
        Ok(())
    }
}

/// The key under which the broker records what it knows of an access token
/// whose own `exp` it could not use.
const RECORD_KEY: &str = "token_broker";

/// The expiry the broker recorded for `access` (`Some(None)`: recorded as
/// unknown), if the record names this very token.
fn broker_record(root: &Map<String, Value>, access: &AccessToken) -> Option<Option<std::time::SystemTime>> {
    let record = root.get(RECORD_KEY)?.as_object()?;
    if record.get("access_token_sha256")?.as_str()? != access.sha256_hex() {
        return None;
    }
    match record.get("expires_at") {
        Some(Value::String(at)) => Some(Some(parse_rfc3339(at)?)),
        _ => Some(None),
    }
}

fn read_codex(path: &Path, root: &Map<String, Value>) -> Result<TokenSet, StoreError> {
    let tokens = match root.get("tokens") {
        Some(Value::Object(map)) => map,
        None | Some(Value::Null) => {
            return Err(StoreError::invalid(
                path,
                "no ChatGPT tokens (`tokens` is missing); sign in with `codex login`",
            ))
        }
        Some(_) => return Err(StoreError::invalid(path, "`tokens` is not an object")),
    };
    let access = required_string(path, tokens, "access_token")?;
    let refresh = optional_string(path, tokens, "refresh_token")?;
    let id_token = optional_string(path, tokens, "id_token")?;
    let last_refresh = match root.get("last_refresh") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            parse_rfc3339(s).ok_or_else(|| StoreError::invalid(path, "`last_refresh` is not an RFC 3339 timestamp"))?,
        ),
        Some(_) => return Err(StoreError::invalid(path, "`last_refresh` is not a string")),
    };
    let access_token = AccessToken::new(access);
    let expiry = match broker_record(root, &access_token) {
        // What the broker learnt from the provider when it wrote this very
        // token (a stored expiry, or "unknown": use it until rejected).
        Some(stored) => stored.map(|at| Expiry {
            at,
            lifetime: None,
            source: ExpirySource::Stored,
        }),
        None => {
            let expiry =
                expiry_of(access, None).map_err(|e| StoreError::invalid(path, format!("tokens.access_token: {e}")))?;
            // Codex access tokens are JWTs with `exp`: without one there is
            // no way to tell a valid token from a dead one.
            if expiry.is_none() {
                return Err(StoreError::invalid(
                    path,
                    "tokens.access_token has no expiry (it is not a JWT with an `exp` claim)",
                ));
            }
            expiry
        }
    };
    let account_id = match optional_string(path, tokens, "account_id")? {
        Some(id) => Some(id.to_owned()),
        None => id_token
            .and_then(|t| decode_claims(t).ok())
            .and_then(|c| c.chatgpt_account_id())
            .or_else(|| decode_claims(access).ok().and_then(|c| c.chatgpt_account_id())),
    };
    Ok(TokenSet {
        access_token,
        refresh_token: refresh.map(RefreshToken::new),
        id_token: id_token.map(IdToken::new),
        account_id,
        expiry,
        last_refresh,
    })
}

// These build their files with the simulator's helpers.
#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::sim::{codex_auth_json, Issued};
    use crate::store::Store;

    fn issued() -> Issued {
        let jwt = crate::sim::unsigned_jwt;
        Issued {
            access_token: jwt(r#"{"exp":4000000000,"iat":3999996400}"#),
            refresh_token: "rt_1234567890".into(),
            id_token: jwt(r#"{"https://api.openai.com/auth":{"chatgpt_account_id":"acct-from-id"}}"#),
            account_id: "acct-explicit".into(),
        }
    }

    fn variant(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_str(&codex_auth_json(&issued())).unwrap();
        edit(&mut v);
        v.to_string().into_bytes()
    }

    #[test]
    fn reads_every_codex_variant() {
        let p = Path::new("auth.json");
        let variants = [
            variant(|_| {}),
            variant(|v| drop(v.as_object_mut().unwrap().remove("auth_mode"))),
            variant(|v| drop(v.as_object_mut().unwrap().remove("OPENAI_API_KEY"))),
            variant(|v| v["OPENAI_API_KEY"] = "sk-abc".into()),
            variant(|v| drop(v.as_object_mut().unwrap().remove("last_refresh"))),
        ];
        for bytes in &variants {
            let set = CodexAuthFile::parse(p, bytes).unwrap();
            assert_eq!(set.account_id.as_deref(), Some("acct-explicit"));
            assert!(set.expiry.is_some());
        }
        // account_id missing: taken from the id token's claim.
        let set = CodexAuthFile::parse(
            p,
            &variant(|v| drop(v["tokens"].as_object_mut().unwrap().remove("account_id"))),
        )
        .unwrap();
        assert_eq!(set.account_id.as_deref(), Some("acct-from-id"));
        // id_token missing.
        let set = CodexAuthFile::parse(
            p,
            &variant(|v| drop(v["tokens"].as_object_mut().unwrap().remove("id_token"))),
        )
        .unwrap();
        assert!(set.id_token.is_none());
        assert_eq!(set.account_id.as_deref(), Some("acct-explicit"));
    }

    #[test]
    fn an_api_key_only_file_is_a_clear_error() {
        let err =
            CodexAuthFile::parse(Path::new("auth.json"), br#"{"OPENAI_API_KEY":"sk-x","tokens":null}"#).unwrap_err();
        assert!(err.to_string().contains("codex login"), "{err}");
        assert!(!err.to_string().contains("sk-x"));
    }

    #[tokio::test]
    async fn save_changes_only_owned_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        let original = variant(|v| {
            v["OPENAI_API_KEY"] = "sk-keep".into();
            v["tokens"]["extra"] = 7.into();
            v["unknown"] = serde_json::json!({"a": [1]});
        });
        std::fs::write(&path, &original).unwrap();
        let store = CodexAuthFile::new(&path);
        let mut set = store.load().await.unwrap().tokens;
        set.access_token = AccessToken::new("new-access");
        set.refresh_token = Some(RefreshToken::new("new-refresh"));
        set.last_refresh = Some(std::time::SystemTime::now());
        let old = store.load().await.unwrap();
        store.save(&set, &old.version).await.unwrap();
        let before: serde_json::Value = serde_json::from_slice(&original).unwrap();
        let after: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut expected = before.clone();
        expected["tokens"]["access_token"] = "new-access".into();
        expected["tokens"]["refresh_token"] = "new-refresh".into();
        expected["last_refresh"] = after["last_refresh"].clone();
        assert_eq!(after, expected);
        assert_ne!(after["last_refresh"], before["last_refresh"]);
    }
}
