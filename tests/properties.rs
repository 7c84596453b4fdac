//! Property tests over the parsers that see outside input: the JWT decoder
//! and the credentials files. Arbitrary input never panics; valid input
//! round-trips. The token-endpoint body parsers are crate-internal; their
//! properties are unit tests (`body_properties` in
//! `src/provider/response.rs`).
//!
//! 256 cases per property by default. The long mode runs a million:
//! `PROPTEST_CASES=1000000 cargo test --release --test properties` (and
//! `--lib body_properties` for the bodies).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use token_broker::credentials::{
    decode_claims, expiry_of, format_rfc3339, parse_rfc3339, AccessToken, Expiry, ExpirySource, IdToken, RefreshToken,
    TokenSet,
};
use token_broker::store::{CodexAuthFile, CodexFormat, FileFormat, OAuth2File, OAuth2Format};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Arbitrary JSON values, a few levels deep.
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

fn account() -> impl Strategy<Value = String> {
    "[a-z0-9-]{1,40}"
}

/// Whole milliseconds between 2001 and 2999.
fn instant() -> impl Strategy<Value = SystemTime> {
    (1_000_000_000_000u64..32_000_000_000_000).prop_map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn jwt(claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"none"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"sig")
    )
}

proptest! {
    #[test]
    fn jwt_decoding_never_panics(text in ".{0,300}") {
        let _ = decode_claims(&text);
        let _ = expiry_of(&text, None);
    }

    #[test]
    fn jwt_decoding_of_dotted_garbage_never_panics(a in "[A-Za-z0-9_=-]{0,60}", p in prop::collection::vec(any::<u8>(), 0..200)) {
        let token = format!("{a}.{}.{a}", b64(&p));
        let _ = decode_claims(&token);
        let _ = expiry_of(&token, Some(UNIX_EPOCH));
    }

    #[test]
    fn jwt_claims_round_trip(exp in instant(), life in 1u64..10_000_000, acct in account()) {
        let iat = exp - Duration::from_secs(life);
        let token = jwt(&json!({
            "exp": secs(exp), "iat": secs(iat),
            "https://api.openai.com/auth": {"chatgpt_account_id": acct},
        }));
        let claims = decode_claims(&token).unwrap();
        let got = claims.exp().unwrap().unwrap();
        prop_assert!(got.duration_since(exp).unwrap_or_else(|e| e.duration()) < Duration::from_millis(1));
        prop_assert_eq!(claims.chatgpt_account_id(), Some(acct));
        let expiry = expiry_of(&token, None).unwrap().unwrap();
        prop_assert_eq!(expiry.source, ExpirySource::JwtExp);
    }

    #[test]
    fn file_parsers_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = CodexAuthFile::parse(Path::new("auth.json"), &bytes);
        let _ = OAuth2File::parse(Path::new("creds.json"), &bytes);
    }

    #[test]
    fn file_parsers_never_panic_on_json(value in json_value()) {
        let bytes = value.to_string().into_bytes();
        let _ = CodexAuthFile::parse(Path::new("auth.json"), &bytes);
        let _ = OAuth2File::parse(Path::new("creds.json"), &bytes);
        let wrapped = json!({"tokens": value}).to_string().into_bytes();
        let _ = CodexAuthFile::parse(Path::new("auth.json"), &wrapped);
    }

    #[test]
    fn timestamps_never_panic(text in ".{0,40}") {
        let _ = parse_rfc3339(&text);
    }

    #[test]
    fn timestamps_round_trip(at in instant()) {
        prop_assert_eq!(parse_rfc3339(&format_rfc3339(at)), Some(at));
    }

    #[test]
    fn codex_files_round_trip(
        exp in instant(), refresh in token_text(), acct in account(), id_acct in account(),
        api_key in prop::option::of("sk-[a-z0-9]{1,20}"), extra in json_value(),
        new_access_exp in instant(), new_refresh in token_text(), refreshed_at in instant(),
    ) {
        let access = jwt(&json!({"exp": secs(exp)}));
        let id_token = jwt(&json!({"https://api.openai.com/auth": {"chatgpt_account_id": id_acct}}));
        let original = json!({
            "OPENAI_API_KEY": api_key,
            "tokens": {"id_token": id_token, "access_token": access, "refresh_token": refresh, "account_id": acct},
            "extra": extra,
        });
        let path = Path::new("auth.json");
        let read = CodexAuthFile::parse(path, original.to_string().as_bytes()).unwrap();
        prop_assert_eq!(read.access_token.expose(), access.as_str());
        prop_assert_eq!(read.refresh_token.as_ref().unwrap().expose(), refresh.as_str());
        prop_assert_eq!(read.account_id.as_deref(), Some(acct.as_str()));

        let new_access = jwt(&json!({"exp": secs(new_access_exp)}));
        let mut updated = read.clone();
        updated.access_token = AccessToken::new(new_access.as_str());
        updated.refresh_token = Some(RefreshToken::new(new_refresh.as_str()));
        updated.last_refresh = Some(refreshed_at);
        let mut root = original.as_object().unwrap().clone();
        CodexFormat::patch(path, &mut root, &updated).unwrap();
        let again = CodexFormat::read(path, &root).unwrap();
        prop_assert_eq!(again.access_token, updated.access_token);
        prop_assert_eq!(again.refresh_token, updated.refresh_token);
        prop_assert_eq!(again.id_token, read.id_token);
        prop_assert_eq!(again.last_refresh, Some(refreshed_at));
        prop_assert_eq!(&root["OPENAI_API_KEY"], &original["OPENAI_API_KEY"]);
        prop_assert_eq!(&root["extra"], &original["extra"]);
        prop_assert_eq!(&root["tokens"]["account_id"], &original["tokens"]["account_id"]);
    }

    #[test]
    fn oauth2_files_round_trip(access in token_text(), refresh in token_text(), id in prop::option::of(token_text()), expires in prop::option::of(instant())) {
        // Opaque tokens (no dots) take their expiry from `expires_at`.
        let access = access.replace('.', "_");
        let set = TokenSet {
            access_token: AccessToken::new(access.as_str()),
            refresh_token: Some(RefreshToken::new(refresh.as_str())),
            id_token: id.as_deref().map(IdToken::new),
            account_id: None,
            expiry: expires.map(|at| Expiry { at, lifetime: None, source: ExpirySource::Stored }),
            last_refresh: None,
        };
        let path = Path::new("creds.json");
        let mut root = Map::new();
        root.insert("scope".into(), json!("read"));
        OAuth2Format::patch(path, &mut root, &set).unwrap();
        let text = Value::Object(root).to_string();
        let back = OAuth2File::parse(path, text.as_bytes()).unwrap();
        prop_assert_eq!(back, set);
    }
}
