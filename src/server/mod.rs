//! The host-wide daemon (`token-broker serve`): named profiles from a TOML
//! [`config`], served to every local process over a Unix socket by the
//! [`daemon`], and the [`client`] that asks it.
//!
//! # The socket API
//!
//! HTTP/1.1 over a Unix socket (default
//! `$XDG_RUNTIME_DIR/token-broker.sock`, else
//! `~/.local/state/token-broker/token-broker.sock`) in a folder that is
//! mode 0700 and owned by the daemon's user; the socket is mode 0600 and
//! every connection's peer user (`SO_PEERCRED`) must be the daemon's or be
//! listed in `[daemon] allowed_uids` (checked again at every request, so
//! that a reload that takes a user out applies to its open connections). When `allowed_uids` names other users
//! they must be able to reach the socket: the folder may then be 0711
//! (never writable by others) and the socket is 0666, and the peer check
//! alone keeps everyone else out. Bodies are JSON.
//!
//! | Request | Answer |
//! |---|---|
//! | `GET /v1/profiles` | `{"profiles":[{"name","state","expires_at"}]}` |
//! | `GET /v1/profiles/{name}/token` | `{"access_token","token_type":"Bearer","expires_at","account_id"}` |
//! | `POST /v1/profiles/{name}/reject` `{"access_token"}` | the token to retry with, same shape |
//! | `GET /v1/profiles/{name}/status` | `token-broker status --json` (`Accept: text/plain`: its text) |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | `ok` |
//!
//! A request for a profile may carry [`CREDENTIAL_HEADER`], the caller's
//! [`Profile::credential_id`](config::Profile::credential_id) of it: the
//! daemon then answers only when its profile of that name is the same
//! credential (else `profile_mismatch`), so that one name never stands for
//! two credentials.
//!
//! Errors are `{"error": code, "message": what to do}`; the message never
//! quotes a token. The codes and their statuses:
//!
//! | Code | Status | CLI exit |
//! |---|---|---|
//! | `unknown_profile` | 404 | 2 |
//! | `login_required` | 401 | 4 |
//! | `provider_unavailable` (with `Retry-After`) | 503 | 5 |
//! | `store_busy`, `coordination_unavailable`, `stopping` (with `Retry-After`) | 503 | 5 |
//! | `bad_credentials_file` | 500 | 3 |
//! | `write_failed`, `bad_profile` | 500 | 1 |
//! | `account_changed` | 409 | 1 |
//! | `profile_mismatch` | 409 | 2 (`--daemon auto`: read here) |
//! | `bad_request` | 400 | 1 |
//! | `payload_too_large` | 413 | 1 |
//! | `not_found` (no such route), `method_not_allowed` | 404, 405 | 1 |

use std::time::SystemTime;

use serde_json::json;

use crate::credentials::{format_rfc3339, parse_rfc3339, AccessToken};
use crate::status::Status;

/// The request header carrying the credential the caller expects of the
/// profile it names (see [`config::Profile::credential_id`]).
pub const CREDENTIAL_HEADER: &str = "token-broker-credential";

mod api;
pub mod client;
pub mod config;
pub mod daemon;
mod h1pool;
mod metrics;
pub mod proxy;
mod socket;

/// A token as the daemon's token endpoint answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenReply {
    /// The access token.
    pub access_token: AccessToken,
    /// When it expires, when known.
    pub expires_at: Option<SystemTime>,
    /// The account it belongs to, when known.
    pub account_id: Option<String>,
}

impl TokenReply {
    /// `token` with the expiry and account of `status`, when `status`
    /// describes that very token (else the expiry of its JWT `exp` claim).
    pub fn with_status(token: AccessToken, status: &Status) -> Self {
        if status.access_token_fingerprint == token.fingerprint() {
            return TokenReply {
                access_token: token,
                expires_at: status.expires_at,
                account_id: status.account_id.clone(),
            };
        }
        TokenReply {
            account_id: status.account_id.clone(),
            ..TokenReply::from_token(token)
        }
    }

    /// `token` with the expiry of its JWT `exp` claim, if it has one.
    pub fn from_token(token: AccessToken) -> Self {
        let expires_at = crate::credentials::expiry_of(token.expose(), None)
            .ok()
            .flatten()
            .map(|e| e.at);
        TokenReply {
            access_token: token,
            expires_at,
            account_id: None,
        }
    }

    /// The token endpoint's JSON.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "access_token": self.access_token.expose(),
            "token_type": "Bearer",
            "expires_at": self.expires_at.map(format_rfc3339),
            "account_id": self.account_id,
        })
    }

    /// Parses the token endpoint's JSON.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        let token = value.get("access_token")?.as_str().filter(|t| !t.is_empty())?;
        let expires_at = match value.get("expires_at") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(parse_rfc3339(v.as_str()?)?),
        };
        let account_id = match value.get("account_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_str()?.to_owned()),
        };
        Some(TokenReply {
            access_token: AccessToken::new(token),
            expires_at,
            account_id,
        })
    }

    /// A Kubernetes `client.authentication.k8s.io/v1` `ExecCredential`
    /// carrying the token, for kubectl's and client-go's exec plugins.
    pub fn to_exec_credential(&self) -> serde_json::Value {
        let mut status = json!({ "token": self.access_token.expose() });
        if let Some(at) = self.expires_at {
            status["expirationTimestamp"] = json!(rfc3339_seconds(at));
        }
        json!({
            "apiVersion": "client.authentication.k8s.io/v1",
            "kind": "ExecCredential",
            "status": status,
        })
    }
}

/// RFC 3339 in whole seconds (Kubernetes' `metav1.Time`).
fn rfc3339_seconds(at: SystemTime) -> String {
    let text = format_rfc3339(at);
    // "2026-11-28T07:29:02.123456Z" -> "2026-11-28T07:29:02Z"
    match text.find('.') {
        Some(dot) => format!("{}Z", &text[..dot]),
        None => text,
    }
}

/// `token` with its expiry and account, from `cache` when it holds the
/// same token, else from `broker`'s status (then cached).
pub(crate) async fn reply_cached(
    cache: &parking_lot::Mutex<Option<TokenReply>>,
    broker: &crate::TokenBroker,
    token: AccessToken,
) -> TokenReply {
    if let Some(cached) = &*cache.lock() {
        if cached.access_token.expose() == token.expose() {
            return cached.clone();
        }
    }
    let reply = match broker.status().await {
        Ok(status) => TokenReply::with_status(token, &status),
        Err(_) => TokenReply::from_token(token),
    };
    *cache.lock() = Some(reply.clone());
    reply
}
