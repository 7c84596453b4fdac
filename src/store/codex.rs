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
use std::time::Duration;

use serde_json::{Map, Value};

use super::file::{self, optional_string, parse_object, read_bounded, required_string, write_atomic};
use super::{Store, StoreError, StoreLock, StoreVersion};
use crate::credentials::{
    decode_claims, expiry_of, format_rfc3339, parse_rfc3339, AccessToken, IdToken, RefreshToken, TokenSet,
};

/// The Codex CLI's `auth.json`.
#[derive(Debug, Clone)]
pub struct CodexAuthFile {
    path: PathBuf,
    location: String,
}

impl CodexAuthFile {
    /// A store over the `auth.json` at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let location = path.display().to_string();
        CodexAuthFile { path, location }
    }

    /// The default location: `$CODEX_HOME/auth.json`, else
    /// `~/.codex/auth.json`. `None` when neither variable is set.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(home) = std::env::var_os("CODEX_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(home).join("auth.json"));
        }
        let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
        Some(PathBuf::from(home).join(".codex").join("auth.json"))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for CodexAuthFile {
    fn location(&self) -> &str {
        &self.location
    }

    fn load(&self) -> Result<TokenSet, StoreError> {
        let bytes = read_bounded(&self.path)?;
        parse(&self.path, &bytes)
    }

    fn save(&self, tokens: &TokenSet) -> Result<(), StoreError> {
        // Patch the file as it is now, so keys we do not own survive even if
        // someone added them since we loaded it. A file we cannot parse is
        // never overwritten.
        let bytes = read_bounded(&self.path)?;
        let mut root = parse_object(&self.path, &bytes)?;
        let tokens_obj = match root.get_mut("tokens") {
            Some(Value::Object(map)) => map,
            _ => return Err(StoreError::invalid(&self.path, "`tokens` is not an object")),
        };
        patch(tokens_obj, tokens);
        if let Some(at) = tokens.last_refresh {
            root.insert("last_refresh".into(), Value::String(format_rfc3339(at)));
        }
        let mut text = serde_json::to_string_pretty(&Value::Object(root))
            .map_err(|e| StoreError::invalid(&self.path, format!("could not serialise: {e}")))?;
        text.push('\n');
        write_atomic(&self.path, text.as_bytes())
    }

    fn version(&self) -> Option<StoreVersion> {
        file::version_of(&self.path)
    }

    fn lock(&self, timeout: Duration) -> Result<StoreLock, StoreError> {
        file::lock(&self.path, timeout)
    }
}

fn patch(tokens_obj: &mut Map<String, Value>, tokens: &TokenSet) {
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
}

/// Parses the contents of an `auth.json`.
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<TokenSet, StoreError> {
    let root = parse_object(path, bytes)?;
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
            parse_rfc3339(s)
                .ok_or_else(|| StoreError::invalid(path, "`last_refresh` is not an RFC 3339 timestamp"))?,
        ),
        Some(_) => return Err(StoreError::invalid(path, "`last_refresh` is not a string")),
    };
    let expiry = expiry_of(access, None)
        .map_err(|e| StoreError::invalid(path, format!("tokens.access_token: {e}")))?;
    let account_id = match optional_string(path, tokens, "account_id")? {
        Some(id) => Some(id.to_owned()),
        None => id_token
            .and_then(|t| decode_claims(t).ok())
            .and_then(|c| c.chatgpt_account_id())
            .or_else(|| decode_claims(access).ok().and_then(|c| c.chatgpt_account_id())),
    };
    Ok(TokenSet {
        access_token: AccessToken::new(access),
        refresh_token: refresh.map(RefreshToken::new),
        id_token: id_token.map(IdToken::new),
        account_id,
        expiry,
        last_refresh,
    })
}
