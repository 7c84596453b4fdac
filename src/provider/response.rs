//! Parsing token-endpoint response bodies. Pure functions over bytes, so
//! they can be property-tested; none of them panics on any input.

use std::time::Duration;

use serde_json::Value;

use super::Refreshed;
use crate::credentials::{AccessToken, IdToken, RefreshToken};

/// The error code and description from an error body, in either dialect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    /// `refresh_token_reused`, `invalid_grant`...
    pub code: String,
    /// The human-readable description, when given.
    pub description: Option<String>,
}

/// Reads an error body shaped either as OpenAI's
/// `{"error":{"message","type","code"}}` or as RFC 6749's
/// `{"error":"invalid_grant","error_description":"..."}`.
///
/// ```
/// use token_broker::provider::parse_error_body;
/// let openai = br#"{"error":{"message":"used","type":"invalid_request_error","code":"refresh_token_reused"}}"#;
/// assert_eq!(parse_error_body(openai).unwrap().code, "refresh_token_reused");
/// let rfc = br#"{"error":"invalid_grant","error_description":"expired"}"#;
/// assert_eq!(parse_error_body(rfc).unwrap().code, "invalid_grant");
/// assert!(parse_error_body(b"<html>").is_none());
/// ```
pub fn parse_error_body(body: &[u8]) -> Option<ErrorBody> {
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    match root.get("error")? {
        Value::String(code) => Some(ErrorBody {
            code: code.clone(),
            description: text(root.get("error_description")),
        }),
        Value::Object(err) => Some(ErrorBody {
            code: text(err.get("code"))
                .or_else(|| text(err.get("type")))
                .unwrap_or_else(|| "unknown".to_owned()),
            description: text(err.get("message")),
        }),
        _ => None,
    }
}

/// Reads a successful token response. `refresh_token` and `id_token` may be
/// absent (keep the old ones); `expires_in` may be a number or a numeric
/// string.
///
/// ```
/// use token_broker::provider::parse_success_body;
/// let r = parse_success_body(br#"{"access_token":"a","expires_in":3600}"#).unwrap();
/// assert!(r.refresh_token.is_none());
/// assert!(parse_success_body(b"<html>oops</html>").is_err());
/// ```
pub fn parse_success_body(body: &[u8]) -> Result<Refreshed, String> {
    let root = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(root)) => root,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("not valid JSON ({e})")),
    };
    let string = |key: &str| -> Result<Option<&str>, String> {
        match root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("`{key}` is not a string")),
        }
    };
    let access = string("access_token")?.ok_or("no `access_token`")?;
    let refresh = string("refresh_token")?;
    let id_token = string("id_token")?;
    let expires_in = match root.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    }
    // Ten years is already absurd for an access token; cap to keep
    // arithmetic on instants safe.
    .map(|secs| Duration::from_secs(secs.min(10 * 365 * 24 * 3600)));
    Ok(Refreshed {
        access_token: AccessToken::new(access),
        refresh_token: refresh.map(RefreshToken::new),
        id_token: id_token.map(IdToken::new),
        expires_in,
    })
}
