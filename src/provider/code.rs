//! The error codes a token endpoint answers a refused refresh with.

use std::fmt;

/// The error code in a token endpoint's refusal (`{"error":"invalid_grant"}`
/// or OpenAI's `{"error":{"code":"refresh_token_reused"}}`), typed.
///
/// Codes not listed here arrive as [`ErrorCode::Other`], holding the code
/// only after the same scrubbing as the rest of a provider's text: never a
/// piece of any secret the request carried, no control characters, at most
/// 200 characters.
///
/// ```
/// use token_broker::provider::ErrorCode;
/// assert_eq!(ErrorCode::RefreshTokenReused.as_str(), "refresh_token_reused");
/// assert_eq!(ErrorCode::InvalidGrant.to_string(), "invalid_grant");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `invalid_grant` (RFC 6749): the refresh token is invalid, expired,
    /// revoked or was issued to another client.
    InvalidGrant,
    /// `refresh_token_reused` (OpenAI): the refresh token was already spent.
    RefreshTokenReused,
    /// `refresh_token_expired` (OpenAI).
    RefreshTokenExpired,
    /// `refresh_token_invalidated` (OpenAI): revoked, for example after a
    /// reuse or a sign-out.
    RefreshTokenInvalidated,
    /// `token_expired` (OpenAI).
    TokenExpired,
    /// `invalid_client` (RFC 6749): the client authentication failed.
    InvalidClient,
    /// `invalid_request` (RFC 6749): the request was malformed.
    InvalidRequest,
    /// `unauthorized_client` (RFC 6749): the client may not use this grant.
    UnauthorizedClient,
    /// `unsupported_grant_type` (RFC 6749).
    UnsupportedGrantType,
    /// `invalid_scope` (RFC 6749).
    InvalidScope,
    /// Any other code, scrubbed (see the type's documentation); `unknown`
    /// when the answer named none.
    Other(String),
}

impl ErrorCode {
    /// The code as the provider spells it.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::InvalidGrant => "invalid_grant",
            ErrorCode::RefreshTokenReused => "refresh_token_reused",
            ErrorCode::RefreshTokenExpired => "refresh_token_expired",
            ErrorCode::RefreshTokenInvalidated => "refresh_token_invalidated",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnauthorizedClient => "unauthorized_client",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::InvalidScope => "invalid_scope",
            ErrorCode::Other(code) => code,
        }
    }

    /// Whether the code refuses the refresh token itself (spent, expired,
    /// revoked), rather than the client or the request.
    pub fn refuses_refresh_token(&self) -> bool {
        matches!(
            self,
            ErrorCode::RefreshTokenReused
                | ErrorCode::InvalidGrant
                | ErrorCode::RefreshTokenExpired
                | ErrorCode::RefreshTokenInvalidated
                | ErrorCode::TokenExpired
        )
    }

    /// The code for `scrubbed`, text that has already been made safe to
    /// show (see [`ErrorCode::Other`]).
    pub(crate) fn from_scrubbed(scrubbed: String) -> Self {
        match scrubbed.as_str() {
            "invalid_grant" => ErrorCode::InvalidGrant,
            "refresh_token_reused" => ErrorCode::RefreshTokenReused,
            "refresh_token_expired" => ErrorCode::RefreshTokenExpired,
            "refresh_token_invalidated" => ErrorCode::RefreshTokenInvalidated,
            "token_expired" => ErrorCode::TokenExpired,
            "invalid_client" => ErrorCode::InvalidClient,
            "invalid_request" => ErrorCode::InvalidRequest,
            "unauthorized_client" => ErrorCode::UnauthorizedClient,
            "unsupported_grant_type" => ErrorCode::UnsupportedGrantType,
            "invalid_scope" => ErrorCode::InvalidScope,
            _ => ErrorCode::Other(scrubbed),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn known_codes_round_trip_and_others_stay_as_given() {
        for code in [
            ErrorCode::InvalidGrant,
            ErrorCode::RefreshTokenReused,
            ErrorCode::RefreshTokenExpired,
            ErrorCode::RefreshTokenInvalidated,
            ErrorCode::TokenExpired,
            ErrorCode::InvalidClient,
            ErrorCode::InvalidRequest,
            ErrorCode::UnauthorizedClient,
            ErrorCode::UnsupportedGrantType,
            ErrorCode::InvalidScope,
        ] {
            assert_eq!(ErrorCode::from_scrubbed(code.as_str().to_owned()), code);
        }
        let other = ErrorCode::from_scrubbed("slow_down".to_owned());
        assert_eq!(other, ErrorCode::Other("slow_down".to_owned()));
        assert_eq!(other.to_string(), "slow_down");
        assert!(!other.refuses_refresh_token());
        assert!(!ErrorCode::InvalidClient.refuses_refresh_token());
        assert!(ErrorCode::RefreshTokenReused.refuses_refresh_token());
    }
}
