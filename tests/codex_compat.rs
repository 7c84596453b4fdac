//! Files written by token-broker still load in the Codex CLI: same schema,
//! only the owned fields changed, every other key (known or not) kept in
//! place. One round trip per `auth.json` variant the Codex CLI writes.

mod common;

use common::*;
use serde::Deserialize;
use serde_json::{json, Value};
use token_broker::sim::Issued;

/// The Codex CLI's `auth.json` schema, as its Rust types read it.
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct AuthDotJson {
    #[serde(rename = "OPENAI_API_KEY")]
    openai_api_key: Option<String>,
    tokens: Option<TokenData>,
    last_refresh: Option<String>,
    auth_mode: Option<AuthMode>,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize)]
struct TokenData {
    id_token: Option<String>,
    access_token: String,
    refresh_token: String,
    account_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AuthMode {
    #[serde(rename = "apikey")]
    ApiKey,
    #[serde(rename = "chatgpt")]
    ChatGpt,
}

const OWNED_TOKENS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

fn base(issued: &Issued) -> Value {
    json!({
        "auth_mode": "chatgpt",
        "OPENAI_API_KEY": null,
        "tokens": {
            "id_token": issued.id_token,
            "access_token": issued.access_token,
            "refresh_token": issued.refresh_token,
            "account_id": issued.account_id,
        },
        "last_refresh": "2026-11-01T10:00:00.123456Z",
    })
}

type Edit = fn(&mut Value);

fn variants() -> Vec<(&'static str, Edit)> {
    vec![
        ("as written today", |_| {}),
        ("no auth_mode", |v| {
            v.as_object_mut().unwrap().remove("auth_mode");
        }),
        ("OPENAI_API_KEY absent", |v| {
            v.as_object_mut().unwrap().remove("OPENAI_API_KEY");
        }),
        ("OPENAI_API_KEY a string", |v| {
            v["OPENAI_API_KEY"] = "sk-proj-kept".into()
        }),
        ("id_token missing", |v| {
            v["tokens"].as_object_mut().unwrap().remove("id_token");
        }),
        ("account_id missing", |v| {
            v["tokens"].as_object_mut().unwrap().remove("account_id");
        }),
        ("unknown keys", |v| {
            v["agent_identity"] = json!({"id": 7, "labels": ["a", "b"]});
            v["tokens"]["future"] = json!(true);
        }),
        ("no last_refresh", |v| {
            v.as_object_mut().unwrap().remove("last_refresh");
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_codex_variant_round_trips() {
    for (name, edit) in variants() {
        let fx = Fixture::codex();
        let issued = fx.sim.sign_in(-1.0);
        let mut original = base(&issued);
        edit(&mut original);
        let path = fx.path("auth.json");
        std::fs::write(&path, serde_json::to_string_pretty(&original).unwrap()).unwrap();
        // Codex itself reads the original.
        serde_json::from_value::<AuthDotJson>(original.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));

        let broker = fx.codex_broker(&path).build().unwrap();
        let token = broker.token().await.unwrap_or_else(|e| panic!("{name}: {e}"));
        broker.shutdown().await;
        assert_eq!(fx.sim.token_requests(), 1, "{name}");

        let text = std::fs::read_to_string(&path).unwrap();
        let written: Value = serde_json::from_str(&text).unwrap();
        let codex: AuthDotJson =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: Codex cannot read it: {e}"));
        let tokens = codex.tokens.expect("tokens");
        assert_eq!(tokens.access_token, token.expose(), "{name}");
        assert!(fx.sim.is_unspent(&tokens.refresh_token), "{name}");
        let last_refresh = codex.last_refresh.expect("last_refresh is written");
        assert!(
            token_broker::credentials::parse_rfc3339(&last_refresh).is_some(),
            "{name}"
        );
        assert!(last_refresh.ends_with('Z'), "{name}: UTC");

        // Everything but the owned fields is exactly as it was, in order.
        let (orig, new) = (original.as_object().unwrap(), written.as_object().unwrap());
        let orig_keys: Vec<_> = orig.keys().filter(|k| *k != "last_refresh").collect();
        let new_keys: Vec<_> = new.keys().filter(|k| *k != "last_refresh").collect();
        assert_eq!(orig_keys, new_keys, "{name}: top-level keys");
        for (key, value) in orig {
            if key != "tokens" && key != "last_refresh" {
                assert_eq!(&new[key], value, "{name}: {key}");
            }
        }
        let (orig_t, new_t) = (orig["tokens"].as_object().unwrap(), new["tokens"].as_object().unwrap());
        for (key, value) in orig_t {
            if !OWNED_TOKENS.contains(&key.as_str()) {
                assert_eq!(&new_t[key], value, "{name}: tokens.{key}");
            }
        }
        for key in new_t.keys() {
            assert!(
                orig_t.contains_key(key) || key == "id_token",
                "{name}: added tokens.{key}"
            );
        }
        assert_eq!(mode(&path), 0o600, "{name}");
    }
}
