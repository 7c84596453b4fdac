//! Token types, expiry, unverified JWT claim decoding and secret redaction.
//!
//! Every token lives in a type whose `Debug` and `Display` print only a
//! redacted form (`<redacted len=1234 sha256:0a1b2c3d>`): enough to tell two
//! tokens apart in a log line, never enough to use one. The text itself is
//! reached only through an explicitly named `expose()` call.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// The earliest `exp` accepted: 2001-09-09 (Unix time 1,000,000,000). An
/// earlier one is not an expired token but a malformed one.
pub const MIN_EXPIRY_UNIX: u64 = 1_000_000_000;

/// The latest expiry accepted from a JWT `exp` claim or a stored `expires_at`:
/// 1 January 3000. Anything later is treated as a malformed value.
pub const MAX_EXPIRY_UNIX: u64 = 32_503_680_000;

/// A secret string whose `Debug` and `Display` never show its text.
///
/// Cloning is cheap (a reference-count increment).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(text: impl Into<Arc<str>>) -> Self {
        Secret(text.into())
    }

    /// The secret text. Call this only where the text leaves the process on
    /// purpose (an HTTP header, the credentials file, the CLI's stdout).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The length of the secret in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, stable, non-reversible fingerprint: the first 8 hex digits
    /// of the SHA-256 of the text. Safe to log; tells two tokens apart.
    pub fn fingerprint(&self) -> String {
        let mut hex = self.sha256_hex();
        hex.truncate(8);
        hex
    }

    /// The full SHA-256 of the text, in hex: a stable identity that can be
    /// stored (for example in a refresh-in-progress record) without the text.
    pub fn sha256_hex(&self) -> String {
        Sha256::digest(self.0.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted len={} sha256:{}>", self.len(), self.fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

macro_rules! secret_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub struct $name(Secret);

        impl $name {
            /// Wraps the token text.
            pub fn new(text: impl Into<Arc<str>>) -> Self {
                $name(Secret::new(text))
            }

            /// The token text. Call this only where it leaves the process on
            /// purpose (an HTTP header, the credentials file, stdout).
            pub fn expose(&self) -> &str {
                self.0.expose()
            }

            /// A short fingerprint that is safe to log (see [`Secret::fingerprint`]).
            pub fn fingerprint(&self) -> String {
                self.0.fingerprint()
            }

            /// The full SHA-256 of the text in hex (see [`Secret::sha256_hex`]).
            pub fn sha256_hex(&self) -> String {
                self.0.sha256_hex()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

secret_newtype!(
    /// An OAuth access token: what callers put in `Authorization: Bearer`.
    AccessToken
);
secret_newtype!(
    /// An OAuth refresh token. Only the `TokenActor` ever spends one.
    RefreshToken
);
secret_newtype!(
    /// An OpenID Connect id token (a JWT describing the signed-in account).
    IdToken
);

/// Where a credential's expiry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpirySource {
    /// The access token's JWT `exp` claim.
    JwtExp,
    /// A stored `expires_at` next to the token.
    Stored,
}

/// When an access token expires, and how long it lived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The instant the token stops working.
    pub at: SystemTime,
    /// The whole lifetime, when known (JWT `iat` to `exp`).
    pub lifetime: Option<Duration>,
    /// Where `at` came from.
    pub source: ExpirySource,
}

/// One credential's token set, as read from a store or returned by a refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSet {
    /// The access token handed to callers.
    pub access_token: AccessToken,
    /// The single-use refresh token, if the credential has one.
    pub refresh_token: Option<RefreshToken>,
    /// The id token, if any.
    pub id_token: Option<IdToken>,
    /// The account the tokens belong to, when known.
    pub account_id: Option<String>,
    /// The access token's expiry, when known.
    pub expiry: Option<Expiry>,
    /// When these tokens were last refreshed, when recorded.
    pub last_refresh: Option<SystemTime>,
}

impl TokenSet {
    /// Builds a token set from an access token (expiry taken from its JWT
    /// `exp` claim when it is a JWT) and an optional refresh token.
    ///
    /// ```
    /// use token_broker::credentials::TokenSet;
    /// let set = TokenSet::new("opaque-access", Some("refresh-1")).unwrap();
    /// assert!(set.expiry.is_none());
    /// assert!(!format!("{set:?}").contains("opaque-access"));
    /// ```
    pub fn new(access_token: &str, refresh_token: Option<&str>) -> Result<Self, JwtError> {
        let expiry = expiry_of(access_token, None)?;
        Ok(TokenSet {
            access_token: AccessToken::new(access_token),
            refresh_token: refresh_token.map(RefreshToken::new),
            id_token: None,
            account_id: None,
            expiry,
            last_refresh: None,
        })
    }

    /// Whether `other` holds different tokens (access or refresh) than `self`.
    pub fn differs_from(&self, other: &TokenSet) -> bool {
        self.access_token != other.access_token || self.refresh_token != other.refresh_token
    }
}

/// The expiry of an access token: its JWT `exp` claim when the token is a
/// JWT, else `stored` (an `expires_at` kept beside it), else unknown.
///
/// A token shaped like a JWT (three dot-separated parts) must decode; a
/// malformed one is an error rather than a silently unknown expiry.
pub fn expiry_of(access_token: &str, stored: Option<SystemTime>) -> Result<Option<Expiry>, JwtError> {
    if looks_like_jwt(access_token) {
        let claims = decode_claims(access_token)?;
        if let Some(exp) = claims.exp()? {
            let lifetime = match claims.iat()? {
                Some(iat) => exp.duration_since(iat).ok(),
                None => None,
            };
            return Ok(Some(Expiry {
                at: exp,
                lifetime,
                source: ExpirySource::JwtExp,
            }));
        }
    }
    Ok(stored.map(|at| Expiry {
        at,
        lifetime: None,
        source: ExpirySource::Stored,
    }))
}

/// Whether a token has the shape of a compact JWS: three non-empty,
/// dot-separated base64url parts.
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let shape = (parts.next(), parts.next(), parts.next(), parts.next());
    matches!(shape, (Some(h), Some(p), Some(_), None) if !h.is_empty() && !p.is_empty())
}

/// Why a JWT's claims could not be read. Never carries token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three dot-separated parts.
    #[error("the token is not a JWT (expected three dot-separated parts)")]
    NotAJwt,
    /// The payload is not valid base64url.
    #[error("the JWT payload is not valid base64url")]
    Base64,
    /// The payload is not a JSON object.
    #[error("the JWT payload is not a JSON object")]
    Json,
    /// A time claim is not a non-negative number within range.
    #[error("the JWT `{claim}` claim is not a valid time ({why})")]
    BadTime {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// The claims of a JWT, decoded without checking its signature.
///
/// token-broker never trusts these for authorisation: it reads `exp`, `iat`
/// and the account id only to decide when to refresh.
#[derive(Clone, Debug, PartialEq)]
pub struct Claims(serde_json::Map<String, serde_json::Value>);

/// Decodes a JWT's payload (base64url, padded or not) into its claims,
/// without checking the signature.
///
/// ```
/// use token_broker::credentials::decode_claims;
/// // header {"alg":"none"}, payload {"exp":2000000000}
/// let jwt = "eyJhbGciOiJub25lIn0.eyJleHAiOjIwMDAwMDAwMDB9.sig";
/// let claims = decode_claims(jwt).unwrap();
/// assert!(claims.exp().unwrap().is_some());
/// ```
pub fn decode_claims(token: &str) -> Result<Claims, JwtError> {
    if !looks_like_jwt(token) {
        return Err(JwtError::NotAJwt);
    }
    let payload = token.split('.').nth(1).ok_or(JwtError::NotAJwt)?;
    let payload = payload.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JwtError::Base64)?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(Claims(map)),
        _ => Err(JwtError::Json),
    }
}

impl Claims {
    /// The `exp` claim as an instant, if present.
    pub fn exp(&self) -> Result<Option<SystemTime>, JwtError> {
        self.time("exp")
    }

    /// The `iat` claim as an instant, if present.
    pub fn iat(&self) -> Result<Option<SystemTime>, JwtError> {
        self.time("iat")
    }

    /// A claim by name.
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.0.get(name)
    }

    /// The ChatGPT account id that OpenAI puts in its id tokens, under the
    /// `https://api.openai.com/auth` claim.
    pub fn chatgpt_account_id(&self) -> Option<String> {
        self.0
            .get("https://api.openai.com/auth")?
            .get("chatgpt_account_id")?
            .as_str()
            .map(str::to_owned)
    }

    fn time(&self, claim: &'static str) -> Result<Option<SystemTime>, JwtError> {
        let Some(value) = self.0.get(claim) else {
            return Ok(None);
        };
        let secs = value.as_f64().ok_or(JwtError::BadTime {
            claim,
            why: "not a number",
        })?;
        if !secs.is_finite() || secs < 0.0 {
            return Err(JwtError::BadTime { claim, why: "negative" });
        }
        if secs > MAX_EXPIRY_UNIX as f64 {
            return Err(JwtError::BadTime {
                claim,
                why: "after the year 3000",
            });
        }
        if claim == "exp" && secs < MIN_EXPIRY_UNIX as f64 {
            return Err(JwtError::BadTime {
                claim,
                why: "before 2001",
            });
        }
        Ok(Some(UNIX_EPOCH + Duration::from_secs_f64(secs)))
    }
}

/// Formats an instant as RFC 3339 UTC with microseconds, as the Codex CLI
/// writes `last_refresh` (for example `2026-11-28T07:29:02.123456Z`).
pub fn format_rfc3339(at: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(at);
    let micros = dt.microsecond();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        micros
    )
}

/// Parses an RFC 3339 timestamp (any offset).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let dt = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    let at = SystemTime::from(dt);
    let max = UNIX_EPOCH + Duration::from_secs(MAX_EXPIRY_UNIX);
    (at >= UNIX_EPOCH && at <= max).then_some(at)
}

/// An unsigned JWT (`"alg":"none"`) whose claims are `payload`, taken as
/// is. For tests and the simulator (`sim::unsigned_jwt`); the
/// broker itself never makes tokens.
#[cfg(any(test, feature = "sim"))]
pub(crate) fn unsigned_jwt(payload: &str) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(payload.as_bytes()),
        b64(b"simulated-signature")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::unsigned_jwt as jwt;

    #[test]
    fn secrets_redact_in_debug_and_display() {
        let t = AccessToken::new("super-secret-token-text");
        let shown = format!("{t:?} {t}");
        assert!(!shown.contains("super-secret"), "{shown}");
        assert!(shown.contains("len=23"));
        assert_eq!(t.fingerprint().len(), 8);
    }

    #[test]
    fn expiry_from_exp_and_iat() {
        let token = jwt(r#"{"exp":2000000000,"iat":1999996400}"#);
        let e = expiry_of(&token, None).unwrap().unwrap();
        assert_eq!(e.at, UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        assert_eq!(e.lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(e.source, ExpirySource::JwtExp);
    }

    #[test]
    fn exp_wins_over_stored() {
        let stored = UNIX_EPOCH + Duration::from_secs(5);
        let e = expiry_of(&jwt(r#"{"exp":2000000000}"#), Some(stored)).unwrap().unwrap();
        assert_eq!(e.source, ExpirySource::JwtExp);
        let e = expiry_of("opaque", Some(stored)).unwrap().unwrap();
        assert_eq!((e.at, e.source), (stored, ExpirySource::Stored));
        assert_eq!(expiry_of("opaque", None).unwrap(), None);
    }

    #[test]
    fn malformed_jwts_are_typed_errors() {
        assert_eq!(decode_claims("a.!!!.c"), Err(JwtError::Base64));
        assert_eq!(decode_claims(&jwt("[1,2]")), Err(JwtError::Json));
        assert!(matches!(
            expiry_of(&jwt(r#"{"exp":"soon"}"#), None),
            Err(JwtError::BadTime { .. })
        ));
        assert!(matches!(
            expiry_of(&jwt(r#"{"exp":-1}"#), None),
            Err(JwtError::BadTime { .. })
        ));
        assert!(matches!(
            expiry_of(&jwt(r#"{"exp":1e300}"#), None),
            Err(JwtError::BadTime { .. })
        ));
    }

    #[test]
    fn account_id_claim() {
        let c = decode_claims(&jwt(
            r#"{"https://api.openai.com/auth":{"chatgpt_account_id":"acc-1"}}"#,
        ))
        .unwrap();
        assert_eq!(c.chatgpt_account_id().as_deref(), Some("acc-1"));
    }

    #[test]
    fn rfc3339_round_trip() {
        let at = UNIX_EPOCH + Duration::from_micros(1_764_315_000_123_456);
        let text = format_rfc3339(at);
        assert!(text.ends_with('Z'), "{text}");
        assert_eq!(parse_rfc3339(&text), Some(at));
        assert!(parse_rfc3339("2026-01-01T00:00:00+02:00").is_some());
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
