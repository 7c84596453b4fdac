//! A stand-in for OpenAI's model API on 127.0.0.1, for running the real
//! Codex CLI in tests: `POST /v1/responses` (the Responses API, streamed as
//! server-sent events) checks the bearer token against the simulated
//! provider and answers a short assistant message; a token that is not live
//! gets a 401 with OpenAI's error body.
//!
//! Codex also calls the ChatGPT backend (`chatgpt_base_url`, pointed here at
//! `/backend-api`) and `GET /v1/models`; those get a harmless answer and are
//! counted as `other`.
//!
//! Mount it from an integration test with
//! `#[path = "common/model_api.rs"] mod model_api;`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};
use token_broker::credentials::{decode_claims, Secret};
use token_broker::sim::ProviderServer;
use tokio::sync::oneshot;

/// What the simulated model answers to every prompt.
pub const ANSWER: &str = "PONG from the simulated model API";

/// Requests seen by the model API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiCounts {
    /// `POST /v1/responses`, whatever the answer.
    pub responses: u64,
    /// `POST /v1/responses` answered 200 with a streamed answer.
    pub answered: u64,
    /// `POST /v1/responses` answered 401 (no bearer, a token that is not
    /// live, or a `ChatGPT-Account-Id` that does not match the token).
    pub unauthorized: u64,
    /// Of those, the ones whose `ChatGPT-Account-Id` did not match.
    pub account_mismatch: u64,
    /// Anything else (`/v1/models`, the ChatGPT backend).
    pub other: u64,
}

struct Shared {
    sim: Arc<ProviderServer>,
    answer: String,
    responses: AtomicU64,
    answered: AtomicU64,
    unauthorized: AtomicU64,
    account_mismatch: AtomicU64,
    other: AtomicU64,
    /// Fingerprints of the bearer tokens of `/v1/responses`, in order.
    bearers: Mutex<Vec<String>>,
    /// `METHOD path` of the requests counted as `other`.
    other_paths: Mutex<Vec<String>>,
}

/// A running model API; stops when dropped.
pub struct ModelApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ModelApi {
    /// Starts on an ephemeral port of 127.0.0.1, on its own thread and
    /// runtime, accepting the access tokens `sim` says are live.
    pub fn start(sim: Arc<ProviderServer>) -> Self {
        Self::start_with_answer(sim, ANSWER)
    }

    /// Like [`start`](Self::start), answering `answer` to every prompt.
    pub fn start_with_answer(sim: Arc<ProviderServer>, answer: &str) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the model API");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("model API address");
        let shared = Arc::new(Shared {
            sim,
            answer: answer.to_owned(),
            responses: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            account_mismatch: AtomicU64::new(0),
            other: AtomicU64::new(0),
            bearers: Mutex::new(Vec::new()),
            other_paths: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/responses", post(responses))
            .route("/v1/models", get(models))
            .fallback(other)
            .with_state(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("model-api")
            .enable_all()
            .build()
            .expect("model API runtime");
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("model-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("model API listener");
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = serve.await {
                        eprintln!("model API stopped: {e}");
                    }
                });
            })
            .expect("model API thread");
        ModelApi {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the model API is under `/v1`, the ChatGPT
    /// backend under `/backend-api`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Responses API base URL (`model_providers.<id>.base_url`).
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin())
    }

    /// The ChatGPT backend base URL (`chatgpt_base_url`).
    pub fn chatgpt_base_url(&self) -> String {
        format!("{}/backend-api", self.origin())
    }

    /// The counts so far.
    pub fn counts(&self) -> ApiCounts {
        let s = &self.shared;
        ApiCounts {
            responses: s.responses.load(Ordering::SeqCst),
            answered: s.answered.load(Ordering::SeqCst),
            unauthorized: s.unauthorized.load(Ordering::SeqCst),
            account_mismatch: s.account_mismatch.load(Ordering::SeqCst),
            other: s.other.load(Ordering::SeqCst),
        }
    }

    /// Fingerprints (never the text) of the bearer tokens sent to
    /// `/v1/responses`, in order.
    pub fn bearer_fingerprints(&self) -> Vec<String> {
        self.shared.bearers.lock().clone()
    }

    /// `METHOD path` of every request counted as `other`.
    pub fn other_paths(&self) -> Vec<String> {
        self.shared.other_paths.lock().clone()
    }
}

impl Drop for ModelApi {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// OpenAI's error body.
fn error_body(message: &str, kind: &str, code: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

fn unauthorized(shared: &Shared, message: &str, code: &str) -> Response {
    shared.unauthorized.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::UNAUTHORIZED,
        Json(error_body(message, "invalid_request_error", code)),
    )
        .into_response()
}

async fn responses(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    shared.responses.fetch_add(1, Ordering::SeqCst);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = bearer else {
        return unauthorized(
            &shared,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "missing_authorization",
        );
    };
    shared.bearers.lock().push(Secret::new(token).fingerprint());
    if !shared.sim.is_live(token) {
        return unauthorized(
            &shared,
            "Provided authentication token is expired. Please try signing in again.",
            "token_expired",
        );
    }
    if let Some(sent) = headers.get("chatgpt-account-id").and_then(|v| v.to_str().ok()) {
        let claimed = decode_claims(token).ok().and_then(|c| c.chatgpt_account_id());
        if claimed.as_deref() != Some(sent) {
            shared.account_mismatch.fetch_add(1, Ordering::SeqCst);
            return unauthorized(
                &shared,
                "The ChatGPT-Account-Id header does not match the access token.",
                "account_mismatch",
            );
        }
    }
    shared.answered.fetch_add(1, Ordering::SeqCst);
    let body = sse_answer(&shared.answer);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// A streamed Responses API answer holding one assistant message: the
/// events Codex reads (`response.created`, `response.output_item.added`,
/// `response.output_text.delta`, `response.output_item.done`,
/// `response.completed` with `usage`).
pub fn sse_answer(text: &str) -> String {
    let response_id = format!("resp_sim_{:016x}", fastrand::u64(..));
    let item_id = format!("msg_sim_{:016x}", fastrand::u64(..));
    let message = json!({
        "type": "message",
        "id": item_id,
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    });
    let events = [
        json!({
            "type": "response.created",
            "sequence_number": 0,
            "response": {"id": response_id, "object": "response", "status": "in_progress", "output": []},
        }),
        json!({
            "type": "response.output_item.added",
            "sequence_number": 1,
            "output_index": 0,
            "item": {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress", "content": []},
        }),
        json!({
            "type": "response.output_text.delta",
            "sequence_number": 2,
            "output_index": 0,
            "content_index": 0,
            "item_id": item_id,
            "delta": text,
        }),
        json!({
            "type": "response.output_item.done",
            "sequence_number": 3,
            "output_index": 0,
            "item": message,
        }),
        json!({
            "type": "response.completed",
            "sequence_number": 4,
            "response": {
                "id": response_id,
                "object": "response",
                "status": "completed",
                "output": [message],
                "usage": {
                    "input_tokens": 12,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 6,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 18,
                },
            },
        }),
    ];
    let mut body = String::new();
    for event in events {
        let kind = event["type"].as_str().unwrap_or_default();
        body.push_str(&format!("event: {kind}\ndata: {event}\n\n"));
    }
    body
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    shared.other.fetch_add(1, Ordering::SeqCst);
    shared.other_paths.lock().push("GET /v1/models".to_owned());
    (StatusCode::OK, Json(json!({"models": []}))).into_response()
}

async fn other(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    shared.other.fetch_add(1, Ordering::SeqCst);
    shared.other_paths.lock().push(format!("{method} {}", uri.path()));
    (
        StatusCode::NOT_FOUND,
        Json(error_body("Not found.", "invalid_request_error", "not_found")),
    )
        .into_response()
}
