//! The simulated provider and job scheduler used by the `simulate`
//! command, the tests and the benches.
//!
//! Nothing here is needed to use the broker; it is public so that tests,
//! benches and the binary share one implementation.

mod provider;
pub mod scheduler;

pub use provider::{Fault, Issued, ProviderServer, SimClientAuth, SimConfig, SimCounts, SpendRecord};

use crate::credentials::format_rfc3339;

/// An unsigned JWT (`"alg":"none"`) whose claims are `payload`, taken as
/// is: it need not be valid JSON, so tests can build malformed tokens too.
///
/// ```
/// use token_broker::sim::unsigned_jwt;
/// use token_broker::credentials::decode_claims;
/// let token = unsigned_jwt(r#"{"exp":2000000000}"#);
/// assert!(decode_claims(&token).unwrap().exp().unwrap().is_some());
/// ```
pub fn unsigned_jwt(payload: &str) -> String {
    crate::credentials::unsigned_jwt(payload)
}

/// The serial number the simulated provider gave `access_token`: 1 for the
/// first token it issued, then one more for each token issued after it (by
/// a sign-in or a refresh). With one sign-in, it is the token's generation:
/// 1 for the signed-in token, 2 after the first refresh... `None` for a
/// token not issued by the simulated provider.
///
/// Read from the token's `jti` claim; it tells nothing secret.
///
/// ```
/// use token_broker::sim::{token_serial, ProviderServer, SimConfig};
/// let sim = ProviderServer::start(SimConfig::default()).unwrap();
/// assert_eq!(token_serial(&sim.sign_in(60.0).access_token), Some(1));
/// assert_eq!(token_serial(&sim.sign_in(60.0).access_token), Some(2));
/// assert_eq!(token_serial("not a token"), None);
/// ```
pub fn token_serial(access_token: &str) -> Option<u64> {
    let claims = crate::credentials::decode_claims(access_token).ok()?;
    let jti = claims.get("jti")?.as_str()?;
    jti.split_once('-')?.0.parse().ok()
}

/// The text of a Codex `auth.json` holding `issued`, as the Codex CLI
/// writes it (with `OPENAI_API_KEY: null` and `auth_mode`).
pub fn codex_auth_json(issued: &Issued) -> String {
    let value = serde_json::json!({
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": null,
        "tokens": {
            "id_token": issued.id_token,
            "access_token": issued.access_token,
            "refresh_token": issued.refresh_token,
            "account_id": issued.account_id,
        },
        "last_refresh": format_rfc3339(std::time::SystemTime::now()),
    });
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

/// The text of a generic OAuth2 credentials file holding `issued`.
pub fn oauth2_credentials_json(issued: &Issued) -> String {
    let value = serde_json::json!({
        "access_token": issued.access_token,
        "refresh_token": issued.refresh_token,
        "token_type": "Bearer",
    });
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}
