//! A generic OAuth2 credentials file for any RFC 6749 provider.
//!
//! ```json
//! {
//!   "access_token": "<token>",
//!   "refresh_token": "<token>",
//!   "id_token": "<jwt, optional>",
//!   "token_type": "Bearer",
//!   "scope": "read write",
//!   "expires_at": "2026-11-28T08:29:02.000000Z"
//! }
//! ```
//!
//! `expires_at` (RFC 3339) is written from the server's `expires_in`. An
//! access token that is a JWT takes its expiry from its `exp` claim instead.
//! Unknown keys are kept on every write.

use std::path::Path;

use serde_json::{Map, Value};

use super::file::{optional_string, required_string};
use super::json_file::{FileFormat, JsonFileStore};
use super::StoreError;
use crate::credentials::{expiry_of, format_rfc3339, parse_rfc3339, AccessToken, IdToken, RefreshToken, TokenSet};

/// The layout of a generic OAuth2 credentials file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OAuth2Format;

/// A generic OAuth2 credentials file.
pub type OAuth2File = JsonFileStore<OAuth2Format>;

impl FileFormat for OAuth2Format {
    const NAME: &'static str = "OAuth2File";

    fn read(path: &Path, root: &Map<String, Value>) -> Result<TokenSet, StoreError> {
        read_oauth2(path, root)
    }

    fn patch(_path: &Path, root: &mut Map<String, Value>, tokens: &TokenSet) -> Result<(), StoreError> {
        root.insert(
            "access_token".into(),
            Value::String(tokens.access_token.expose().to_owned()),
        );
        if let Some(refresh) = &tokens.refresh_token {
            root.insert("refresh_token".into(), Value::String(refresh.expose().to_owned()));
        }
        if let Some(id) = &tokens.id_token {
            root.insert("id_token".into(), Value::String(id.expose().to_owned()));
        }
        match tokens.expiry {
            Some(expiry) => root.insert("expires_at".into(), Value::String(format_rfc3339(expiry.at))),
            // The old expiry belongs to the old token: never let it describe the new one.
            None => root.remove("expires_at"),
        };
        if let Some(at) = tokens.last_refresh {
            root.insert("last_refresh".into(), Value::String(format_rfc3339(at)));
        }
        Ok(())
    }
}

fn read_oauth2(path: &Path, root: &Map<String, Value>) -> Result<TokenSet, StoreError> {
    let access = required_string(path, root, "access_token")?;
    let refresh = optional_string(path, root, "refresh_token")?;
    let id_token = optional_string(path, root, "id_token")?;
    let time = |key: &str| -> Result<Option<std::time::SystemTime>, StoreError> {
        match optional_string(path, root, key)? {
            None => Ok(None),
            Some(s) => parse_rfc3339(s)
                .map(Some)
                .ok_or_else(|| StoreError::invalid(path, format!("`{key}` is not an RFC 3339 timestamp"))),
        }
    };
    let expires_at = time("expires_at")?;
    let last_refresh = time("last_refresh")?;
    let expiry = expiry_of(access, expires_at).map_err(|e| StoreError::invalid(path, format!("access_token: {e}")))?;
    Ok(TokenSet {
        access_token: AccessToken::new(access),
        refresh_token: refresh.map(RefreshToken::new),
        id_token: id_token.map(IdToken::new),
        account_id: None,
        expiry,
        last_refresh,
    })
}
