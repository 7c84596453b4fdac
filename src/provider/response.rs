//! Parsing token-endpoint response bodies. Pure functions over bytes, so
//! they can be property-tested; none of them panics on any input.

use std::time::Duration;

use serde_json::Value;

use super::Refreshed;
use crate::credentials::{AccessToken, IdToken, RefreshToken};

/// The error code and description from an error body, in either dialect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ErrorBody {
    /// `refresh_token_reused`, `invalid_grant`...
    pub(crate) code: String,
    /// The human-readable description, when given.
    pub(crate) description: Option<String>,
}

/// Reads an error body shaped either as OpenAI's
/// `{"error":{"message","type","code"}}` or as RFC 6749's
/// `{"error":"invalid_grant","error_description":"..."}`.
pub(crate) fn parse_error_body(body: &[u8]) -> Option<ErrorBody> {
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
pub(crate) fn parse_success_body(body: &[u8]) -> Result<Refreshed, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_either_dialect() {
        let openai = br#"{"error":{"message":"used","type":"invalid_request_error","code":"refresh_token_reused"}}"#;
        assert_eq!(parse_error_body(openai).unwrap().code, "refresh_token_reused");
        let rfc = br#"{"error":"invalid_grant","error_description":"expired"}"#;
        assert_eq!(parse_error_body(rfc).unwrap().code, "invalid_grant");
        assert!(parse_error_body(b"<html>").is_none());
    }

    #[test]
    fn success_bodies_may_leave_tokens_out() {
        let r = parse_success_body(br#"{"access_token":"a","expires_in":3600}"#).unwrap();
        assert!(r.refresh_token.is_none());
        assert!(parse_success_body(b"<html>oops</html>").is_err());
    }
}

/// Property tests of the body parsers (moved here from
/// `tests/properties.rs` when the parsers became crate-internal): arbitrary
/// input never panics; valid input round-trips. 256 cases per property by
/// default; `PROPTEST_CASES=1000000 cargo test --release --lib body_properties`
/// runs the long mode.
#[cfg(test)]
mod body_properties {
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    use super::*;

    /// Arbitrary JSON values, a few levels deep (as in `tests/properties.rs`).
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,24}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("tokens".to_owned()),
                            Just("access_token".to_owned()),
                            Just("refresh_token".to_owned()),
                            Just("exp".to_owned()),
                            Just("expires_at".to_owned()),
                            Just("error".to_owned()),
                            ".{0,8}".prop_map(String::from)
                        ],
                        inner
                    ),
                    0..6
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    /// Token text as providers issue it: printable, no whitespace.
    fn token_text() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.~+/=-]{1,200}"
    }

    proptest! {
        #[test]
        fn body_parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_error_body(&bytes);
            let _ = parse_success_body(&bytes);
        }

        #[test]
        fn body_parsers_never_panic_on_json(value in json_value()) {
            let bytes = value.to_string().into_bytes();
            let _ = parse_error_body(&bytes);
            let _ = parse_success_body(&bytes);
            let wrapped = json!({"error": value}).to_string().into_bytes();
            let _ = parse_error_body(&wrapped);
        }

        #[test]
        fn error_bodies_round_trip(code in "[a-z_]{1,30}", description in ".{0,80}") {
            let rfc = json!({"error": code, "error_description": description});
            let parsed = parse_error_body(rfc.to_string().as_bytes()).unwrap();
            prop_assert_eq!(&parsed.code, &code);
            prop_assert_eq!(parsed.description.as_deref(), Some(description.as_str()));
            let openai = json!({"error": {"message": description, "type": "invalid_request_error", "code": code}});
            let parsed = parse_error_body(openai.to_string().as_bytes()).unwrap();
            prop_assert_eq!(&parsed.code, &code);
            prop_assert_eq!(parsed.description.as_deref(), Some(description.as_str()));
        }

        #[test]
        fn success_bodies_round_trip(access in token_text(), refresh in prop::option::of(token_text()), id in prop::option::of(token_text()), expires_in in prop::option::of(0u64..100_000_000)) {
            let body = json!({"access_token": access, "refresh_token": refresh, "id_token": id, "expires_in": expires_in, "token_type": "Bearer"});
            let parsed = parse_success_body(body.to_string().as_bytes()).unwrap();
            prop_assert_eq!(parsed.access_token.expose(), access.as_str());
            prop_assert_eq!(parsed.refresh_token.as_ref().map(|t| t.expose().to_owned()), refresh);
            prop_assert_eq!(parsed.id_token.as_ref().map(|t| t.expose().to_owned()), id);
            prop_assert_eq!(parsed.expires_in, expires_in.map(Duration::from_secs));
        }
    }
}
