//! A stand-in for OpenAI's Chat Completions API on 127.0.0.1, the upstream
//! of the proxy's tests.
//!
//! `POST /v1/chat/completions` reads the whole request body (counting its
//! bytes), checks the bearer token against the simulated provider (and a
//! `ChatGPT-Account-Id`, when sent, against the token's account), answers
//! 401 in OpenAI's error shape for a token that is not live, and otherwise
//! answers a chat completion: with `"stream": true`, as OpenAI streams it,
//! `chat.completion.chunk` server-sent events ending `data: [DONE]`, one
//! event every [`ChatApi::set_pause`], each one's sending time recorded.
//!
//! `POST /v1/sink` reads and counts a body of any size (without keeping
//! it), then checks the token the same way: for bodies too big for JSON.
//!
//! A stream can be held open after its first events
//! ([`ChatApi::hold_streams_after`]) or held until many streams are open at
//! once ([`ChatApi::gate_streams_at`]), and an answer can be held before its
//! head ([`ChatApi::hold_answers`]); how every stream ended (sent to the
//! end, or dropped because the client went away) is recorded.
//!
//! Mount it from an integration test with
//! `#[path = "common/chat_api.rs"] mod chat_api;`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use token_broker::credentials::{decode_claims, Secret};
use token_broker::sim::ProviderServer;
use tokio::sync::{oneshot, watch};

/// The pieces of the streamed answer (one `chat.completion.chunk` each),
/// unless [`ChatApi::set_answer`] says otherwise.
pub const ANSWER: [&str; 4] = ["PONG", " from", " the simulated", " chat API"];

/// Request bodies up to this size are kept to be parsed as JSON; bigger
/// ones are only counted.
const KEEP_LIMIT: usize = 4 * 1024 * 1024;

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the
/// machine (Python's `time.clock_gettime_ns(time.CLOCK_MONOTONIC)`), so
/// that times taken here and in a client can be compared.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How a streamed answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Every event, `[DONE]` included, was handed to the connection.
    Completed,
    /// The response body was dropped before its end: the client (or the
    /// proxy in front) went away. At this `monotonic_ns`.
    Cancelled { at_ns: u64 },
}

/// One streamed answer.
#[derive(Clone, Debug)]
pub struct StreamRecord {
    /// The `id` of its chunks (`chatcmpl-...`).
    pub id: String,
    /// The fingerprint of the bearer token it was answered for.
    pub token: String,
    /// When each `data:` event was handed to the connection
    /// (`monotonic_ns`), the final `[DONE]` included.
    pub sent_ns: Vec<u64>,
    /// `None` while it is still open.
    pub end: Option<StreamEnd>,
}

/// Requests seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChatCounts {
    /// Every request, whatever the path and the answer.
    pub requests: u64,
    /// Answered 200.
    pub answered: u64,
    /// Answered 401 (no bearer, a token that is not live, or an account
    /// that does not match the token).
    pub unauthorized: u64,
    /// Of those, the ones whose `ChatGPT-Account-Id` did not match.
    pub account_mismatch: u64,
    /// Answered 400 (a body that is not JSON).
    pub bad_request: u64,
    /// Streams started.
    pub streams: u64,
}

#[derive(Clone)]
struct Settings {
    answer: Vec<String>,
    pause: Duration,
    hold_after: Option<usize>,
    hold_answers: bool,
    gate: Option<u64>,
}

struct Shared {
    sim: Arc<ProviderServer>,
    settings: Mutex<Settings>,
    requests: AtomicU64,
    answered: AtomicU64,
    unauthorized: AtomicU64,
    account_mismatch: AtomicU64,
    bad_request: AtomicU64,
    /// Streams started (sends the count to the gate's waiters).
    started: watch::Sender<u64>,
    open: AtomicU64,
    peak_open: AtomicU64,
    serial: AtomicU64,
    /// The body size of every request, in order of arrival of its end.
    bodies: Mutex<Vec<u64>>,
    /// `(path, fingerprint of the bearer or "")` of every request.
    bearers: Mutex<Vec<(String, String)>>,
    /// Answers 200 by token fingerprint.
    answered_by_token: Mutex<HashMap<String, u64>>,
    streams: Mutex<Vec<StreamRecord>>,
    /// Headers of the last request (the tests look for what the proxy
    /// dropped or set).
    last_headers: Mutex<Option<HeaderMap>>,
}

/// A running chat API; stops when dropped.
pub struct ChatApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChatApi {
    /// Starts on an ephemeral port of 127.0.0.1, on its own thread and
    /// runtime, accepting the access tokens `sim` says are live. Streams
    /// pause 50 ms between events.
    pub fn start(sim: Arc<ProviderServer>) -> Self {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the chat API");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("chat API address");
        let shared = Arc::new(Shared {
            sim,
            settings: Mutex::new(Settings {
                answer: ANSWER.iter().map(|s| s.to_string()).collect(),
                pause: Duration::from_millis(50),
                hold_after: None,
                hold_answers: false,
                gate: None,
            }),
            requests: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            account_mismatch: AtomicU64::new(0),
            bad_request: AtomicU64::new(0),
            started: watch::Sender::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            serial: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
            bearers: Mutex::new(Vec::new()),
            answered_by_token: Mutex::new(HashMap::new()),
            streams: Mutex::new(Vec::new()),
            last_headers: Mutex::new(None),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/sink", post(sink))
            .fallback(not_found)
            .with_state(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chat-api")
            .enable_all()
            .build()
            .expect("chat API runtime");
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("chat-api".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("chat API listener");
                    // Not a graceful shutdown: it would wait for the
                    // streams held open.
                    tokio::select! {
                        served = axum::serve(listener, app).into_future() => {
                            if let Err(e) = served {
                                eprintln!("chat API stopped: {e}");
                            }
                        }
                        _ = rx => {}
                    }
                });
                // Drops the connections still open.
                runtime.shutdown_background();
            })
            .expect("chat API thread");
        ChatApi {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` (the API is under `/v1`).
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The pause before each streamed event after the first.
    pub fn set_pause(&self, pause: Duration) {
        self.shared.settings.lock().pause = pause;
    }

    /// The content pieces of the streamed answer, one chunk each.
    pub fn set_answer(&self, pieces: &[&str]) {
        self.shared.settings.lock().answer = pieces.iter().map(|s| s.to_string()).collect();
    }

    /// Streams started from now on send `events` events, then hold the
    /// connection open (sending nothing) until the client goes away.
    pub fn hold_streams_after(&self, events: usize) {
        self.shared.settings.lock().hold_after = Some(events);
    }

    /// Requests from now on get no answer at all, not even its head (as a
    /// model that works for minutes on an answer not streamed): each is
    /// recorded as a stream that sends nothing and ends cancelled when the
    /// client goes away.
    pub fn hold_answers(&self) {
        self.shared.settings.lock().hold_answers = true;
    }

    /// Streams send their first event, then wait until `streams` streams
    /// have started (counting from the API's start) before the rest: so
    /// that that many are open at once.
    pub fn gate_streams_at(&self, streams: u64) {
        self.shared.settings.lock().gate = Some(streams);
    }

    /// The counts so far.
    pub fn counts(&self) -> ChatCounts {
        let s = &self.shared;
        ChatCounts {
            requests: s.requests.load(Ordering::SeqCst),
            answered: s.answered.load(Ordering::SeqCst),
            unauthorized: s.unauthorized.load(Ordering::SeqCst),
            account_mismatch: s.account_mismatch.load(Ordering::SeqCst),
            bad_request: s.bad_request.load(Ordering::SeqCst),
            streams: *s.started.borrow(),
        }
    }

    /// The body size of every request so far.
    pub fn body_sizes(&self) -> Vec<u64> {
        self.shared.bodies.lock().clone()
    }

    /// `(path, fingerprint)` of the bearer token of every request (the
    /// fingerprint is empty when there was none).
    pub fn bearers(&self) -> Vec<(String, String)> {
        self.shared.bearers.lock().clone()
    }

    /// Answers 200 by the fingerprint of the token they were given for.
    pub fn answered_by_token(&self) -> HashMap<String, u64> {
        self.shared.answered_by_token.lock().clone()
    }

    /// Every streamed answer so far.
    pub fn streams(&self) -> Vec<StreamRecord> {
        self.shared.streams.lock().clone()
    }

    /// The stream whose chunks have the id `id`.
    pub fn stream(&self, id: &str) -> Option<StreamRecord> {
        self.shared.streams.lock().iter().find(|s| s.id == id).cloned()
    }

    /// Streams open now, and the most open at once.
    pub fn open_streams(&self) -> (u64, u64) {
        (
            self.shared.open.load(Ordering::SeqCst),
            self.shared.peak_open.load(Ordering::SeqCst),
        )
    }

    /// The headers of the last request.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.shared.last_headers.lock().clone()
    }
}

impl Drop for ChatApi {
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
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// Reads the whole body, counting it; keeps it when it is at most
/// [`KEEP_LIMIT`] bytes.
async fn drain(shared: &Shared, body: Body) -> (u64, Option<Vec<u8>>) {
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let mut kept = Some(Vec::new());
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        total += chunk.len() as u64;
        if let Some(k) = kept.as_mut() {
            if k.len() + chunk.len() <= KEEP_LIMIT {
                k.extend_from_slice(&chunk);
            } else {
                kept = None;
            }
        }
    }
    shared.bodies.lock().push(total);
    (total, kept)
}

/// The request's bearer token, checked like OpenAI does: `Ok(token)` or
/// the 401 to answer.
fn authorize<'h>(shared: &Shared, path: &str, headers: &'h HeaderMap) -> Result<&'h str, Box<Response>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let fingerprint = bearer.map(|t| Secret::new(t).fingerprint()).unwrap_or_default();
    shared.bearers.lock().push((path.to_owned(), fingerprint));
    let unauthorized = |message: &str, code: &str| {
        shared.unauthorized.fetch_add(1, Ordering::SeqCst);
        Box::new(
            (
                StatusCode::UNAUTHORIZED,
                Json(error_body(message, "invalid_request_error", Some(code))),
            )
                .into_response(),
        )
    };
    let Some(token) = bearer else {
        return Err(unauthorized(
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "missing_authorization",
        ));
    };
    if !shared.sim.is_live(token) {
        return Err(unauthorized(
            "Provided authentication token is expired. Please try signing in again.",
            "token_expired",
        ));
    }
    if let Some(sent) = headers.get("chatgpt-account-id").and_then(|v| v.to_str().ok()) {
        let claimed = decode_claims(token).ok().and_then(|c| c.chatgpt_account_id());
        if claimed.as_deref() != Some(sent) {
            shared.account_mismatch.fetch_add(1, Ordering::SeqCst);
            return Err(unauthorized(
                "The ChatGPT-Account-Id header does not match the access token.",
                "account_mismatch",
            ));
        }
    }
    Ok(token)
}

fn answered(shared: &Shared, token: &str) {
    shared.answered.fetch_add(1, Ordering::SeqCst);
    *shared
        .answered_by_token
        .lock()
        .entry(Secret::new(token).fingerprint())
        .or_default() += 1;
}

async fn sink(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    *shared.last_headers.lock() = Some(parts.headers.clone());
    let (bytes, _) = drain(&shared, body).await;
    let token = match authorize(&shared, "/v1/sink", &parts.headers) {
        Ok(token) => token,
        Err(refused) => return *refused,
    };
    answered(&shared, token);
    (StatusCode::OK, Json(json!({"object": "sink", "bytes": bytes}))).into_response()
}

async fn chat(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    *shared.last_headers.lock() = Some(parts.headers.clone());
    let (_, kept) = drain(&shared, body).await;
    let token = match authorize(&shared, "/v1/chat/completions", &parts.headers) {
        Ok(token) => token,
        Err(refused) => return *refused,
    };
    let Some(request) = kept.and_then(|k| serde_json::from_slice::<Value>(&k).ok()) else {
        shared.bad_request.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            Json(error_body(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. If you have trouble figuring out how to fix this, please contact us through our help center at help.openai.com.)",
                "invalid_request_error",
                None,
            )),
        )
            .into_response();
    };
    answered(&shared, token);
    let model = request["model"].as_str().unwrap_or("gpt-sim").to_owned();
    let serial = shared.serial.fetch_add(1, Ordering::SeqCst);
    let id = format!("chatcmpl-sim{serial:06}{:012x}", fastrand::u64(..) >> 16);
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let settings = shared.settings.lock().clone();
    if settings.hold_answers {
        // Recorded as a stream that never sends anything.
        let _guard = StreamGuard::open(&shared, &id, token);
        std::future::pending::<()>().await;
    }
    if request["stream"].as_bool() != Some(true) {
        let text: String = settings.answer.concat();
        return (
            StatusCode::OK,
            [("x-request-id", format!("req_{serial:032x}"))],
            Json(json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
                    "logprobs": null,
                    "finish_reason": "stop",
                }],
                "usage": usage(),
                "service_tier": "default",
                "system_fingerprint": "fp_sim",
            })),
        )
            .into_response();
    }
    let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
    let events = chunk_events(&id, created, &model, &settings.answer, include_usage);
    let guard = StreamGuard::open(&shared, &id, token);
    shared.started.send_modify(|n| *n += 1);
    let state = (guard, events.into_iter().enumerate(), settings);
    let stream = futures_util::stream::unfold(state, |(mut guard, mut events, settings)| async move {
        let Some((n, event)) = events.next() else {
            guard.mark_completed();
            return None;
        };
        if n > 0 {
            tokio::time::sleep(settings.pause).await;
        }
        if n == 1 {
            if let Some(gate) = settings.gate {
                let mut started = guard.shared.started.subscribe();
                let _ = started.wait_for(|s| *s >= gate).await;
            }
        }
        if settings.hold_after.is_some_and(|after| n >= after) {
            std::future::pending::<()>().await;
        }
        guard.shared.streams.lock()[guard.index].sent_ns.push(monotonic_ns());
        Some((Ok::<Bytes, Infallible>(Bytes::from(event)), (guard, events, settings)))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream; charset=utf-8".to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
            (
                header::HeaderName::from_static("x-request-id"),
                format!("req_{serial:032x}"),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

fn usage() -> Value {
    json!({
        "prompt_tokens": 12,
        "completion_tokens": 6,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

/// The server-sent events of a streamed chat completion as OpenAI sends
/// them: `data: <chunk>` and a blank line each, the role first, one
/// content piece a chunk, the finish reason, the usage chunk (when asked
/// for), and `data: [DONE]`.
pub fn chunk_events(id: &str, created: u64, model: &str, pieces: &[String], include_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Value| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_sim",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    };
    let mut chunks = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    chunks.extend(pieces.iter().map(|p| chunk(json!({"content": p}), Value::Null)));
    chunks.push(chunk(json!({}), json!("stop")));
    if include_usage {
        chunks.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_sim",
            "choices": [],
            "usage": usage(),
        }));
    }
    let mut events: Vec<String> = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// Records how a stream ended when its body is dropped.
struct StreamGuard {
    shared: Arc<Shared>,
    index: usize,
    completed: bool,
}

impl StreamGuard {
    /// Records a new stream `id` for `token`, open.
    fn open(shared: &Arc<Shared>, id: &str, token: &str) -> StreamGuard {
        let index = {
            let mut streams = shared.streams.lock();
            streams.push(StreamRecord {
                id: id.to_owned(),
                token: Secret::new(token).fingerprint(),
                sent_ns: Vec::new(),
                end: None,
            });
            streams.len() - 1
        };
        let open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_open.fetch_max(open, Ordering::SeqCst);
        StreamGuard {
            shared: shared.clone(),
            index,
            completed: false,
        }
    }

    fn mark_completed(&mut self) {
        self.completed = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let end = if self.completed {
            StreamEnd::Completed
        } else {
            StreamEnd::Cancelled { at_ns: monotonic_ns() }
        };
        self.shared.streams.lock()[self.index].end = Some(end);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn not_found(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let path = request.uri().path().to_owned();
    let _ = drain(&shared, request.into_body()).await;
    (
        StatusCode::NOT_FOUND,
        Json(error_body(
            &format!("Invalid URL (POST {path})"),
            "invalid_request_error",
            None,
        )),
    )
        .into_response()
}
