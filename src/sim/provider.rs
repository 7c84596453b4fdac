//! A provider test server: real HTTP on 127.0.0.1 that behaves like the real
//! token endpoints. Refresh tokens are single-use and rotate on every
//! refresh; spending one twice gets the dialect's real error body. Access
//! tokens are JWTs with `exp` and `iat`. Every token request is counted.
//!
//! It also serves `GET /v1/me`, a stand-in for the upstream API: 200 for a
//! live access token, 401 otherwise.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// How the simulated token endpoint expects refresh requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimDialect {
    /// OpenAI's JSON dialect, as the Codex CLI speaks it.
    OpenAi,
    /// RFC 6749 section 6 with the given client authentication.
    Rfc6749(SimClientAuth),
}

/// The client authentication an RFC 6749 simulated endpoint requires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimClientAuth {
    /// A public client: `client_id` in the form.
    None,
    /// `client_secret_basic` with this secret.
    Basic(String),
    /// `client_secret_post` with this secret.
    Post(String),
}

/// How the simulated provider behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The wire dialect.
    pub dialect: SimDialect,
    /// The client id it accepts.
    pub client_id: String,
    /// The lifetime of the access tokens it issues.
    pub access_lifetime: Duration,
    /// How long it takes to answer a token request.
    pub latency: Duration,
    /// Leave `id_token` out of refresh responses.
    pub omit_id_token: bool,
    /// The account the tokens belong to.
    pub account_id: String,
    /// The fraction of token requests answered 503 before any token is spent.
    pub fault_rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            dialect: SimDialect::OpenAi,
            client_id: crate::provider::CODEX_CLIENT_ID.to_owned(),
            access_lifetime: Duration::from_secs(3600),
            latency: Duration::ZERO,
            omit_id_token: false,
            account_id: "acct-sim-0001".to_owned(),
            fault_rate: 0.0,
        }
    }
}

/// A token set as the simulated provider issued it (plain strings: this is
/// test tooling that writes them into credentials files).
#[derive(Clone, Debug)]
pub struct Issued {
    /// The access token (a JWT).
    pub access_token: String,
    /// The refresh token (single-use).
    pub refresh_token: String,
    /// The id token (a JWT naming the account).
    pub id_token: String,
    /// The account id.
    pub account_id: String,
}

/// Counts kept by the simulated provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounts {
    /// All requests to the token endpoint.
    pub token_requests: u64,
    /// Refreshes that succeeded.
    pub refreshed: u64,
    /// Requests that spent an already-spent refresh token.
    pub reused: u64,
    /// Requests with an unknown refresh token or bad client credentials.
    pub invalid: u64,
    /// Requests answered with an injected fault.
    pub faults: u64,
}

#[derive(Default)]
struct Ledger {
    /// Refresh token -> spent?
    refresh: HashMap<String, bool>,
    /// Access token -> expiry.
    access: HashMap<String, SystemTime>,
    /// Access token -> the refresh token issued with it.
    pairs: HashMap<String, String>,
    serial: u64,
}

struct Shared {
    config: Mutex<SimConfig>,
    ledger: Mutex<Ledger>,
    token_requests: AtomicU64,
    refreshed: AtomicU64,
    reused: AtomicU64,
    invalid: AtomicU64,
    faults: AtomicU64,
}

/// A running simulated provider; stops when dropped.
pub struct ProviderServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ProviderServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ProviderServer {
    /// Starts a server on an ephemeral port of 127.0.0.1, on its own thread
    /// and runtime (so a test may block its own thread meanwhile).
    pub fn start(config: SimConfig) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            ledger: Mutex::new(Ledger::default()),
            token_requests: AtomicU64::new(0),
            refreshed: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        });
        let (tx, rx) = oneshot::channel::<()>();
        let app = Router::new()
            .route("/oauth/token", post(token_endpoint))
            .route("/v1/me", get(api_endpoint))
            .with_state(shared.clone());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sim-provider")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new().name("sim-provider".into()).spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "simulated provider could not listen");
                        return;
                    }
                };
                let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "simulated provider stopped");
                }
            });
        })?;
        Ok(ProviderServer {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The token endpoint's URL.
    pub fn token_url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// The stand-in upstream API's URL (`GET` with a bearer token).
    pub fn api_url(&self) -> String {
        format!("http://{}/v1/me", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Issues a new token family, as a sign-in would, whose access token
    /// expires `expires_in` seconds from now (negative: already expired).
    /// Its `iat` is one configured access lifetime before its `exp`.
    pub fn sign_in(&self, expires_in: f64) -> Issued {
        let config = self.shared.config.lock().clone();
        self.shared
            .issue(&config.account_id, expires_in, config.access_lifetime)
    }

    /// Like [`sign_in`](Self::sign_in) for another account.
    pub fn sign_in_as(&self, account_id: &str, expires_in: f64) -> Issued {
        let lifetime = self.shared.config.lock().access_lifetime;
        self.shared.issue(account_id, expires_in, lifetime)
    }

    /// Marks a refresh token spent, as if another process had refreshed.
    pub fn spend(&self, refresh_token: &str) {
        self.shared.ledger.lock().refresh.insert(refresh_token.to_owned(), true);
    }

    /// Whether `access_token` was issued here and has not expired.
    pub fn is_live(&self, access_token: &str) -> bool {
        self.shared.is_live(access_token)
    }

    /// Whether `access_token` and `refresh_token` were issued together, in
    /// one sign-in or one refresh response (a torn or mixed file fails this).
    pub fn issued_together(&self, access_token: &str, refresh_token: &str) -> bool {
        self.shared.ledger.lock().pairs.get(access_token).map(String::as_str) == Some(refresh_token)
    }

    /// Whether `refresh_token` was issued here and is still unspent.
    pub fn is_unspent(&self, refresh_token: &str) -> bool {
        self.shared.ledger.lock().refresh.get(refresh_token) == Some(&false)
    }

    /// The counts so far.
    pub fn counts(&self) -> SimCounts {
        let s = &self.shared;
        SimCounts {
            token_requests: s.token_requests.load(Ordering::SeqCst),
            refreshed: s.refreshed.load(Ordering::SeqCst),
            reused: s.reused.load(Ordering::SeqCst),
            invalid: s.invalid.load(Ordering::SeqCst),
            faults: s.faults.load(Ordering::SeqCst),
        }
    }

    /// Requests made to the token endpoint so far.
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Changes the behaviour of later requests.
    pub fn reconfigure(&self, f: impl FnOnce(&mut SimConfig)) {
        f(&mut self.shared.config.lock());
    }
}

impl Drop for ProviderServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unix(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn jwt(claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"simulated-signature")
    )
}

impl Shared {
    /// Issues a token family whose access token expires `expires_in`
    /// seconds from now and was issued `lifetime` before that (or now).
    fn issue(&self, account: &str, expires_in: f64, lifetime: Duration) -> Issued {
        let now = SystemTime::now();
        let exp = if expires_in >= 0.0 {
            now + Duration::from_secs_f64(expires_in)
        } else {
            now - Duration::from_secs_f64(-expires_in)
        };
        let iat = exp.checked_sub(lifetime).unwrap_or(UNIX_EPOCH).min(now);
        let mut ledger = self.ledger.lock();
        ledger.serial += 1;
        let serial = ledger.serial;
        let nonce = fastrand::u64(..);
        let auth_claim = json!({ "chatgpt_account_id": account, "chatgpt_plan_type": "pro" });
        let access = jwt(&json!({
            "iss": "https://token-broker.sim",
            "sub": account,
            "iat": (unix(iat) * 1000.0).round() / 1000.0,
            "exp": (unix(exp) * 1000.0).round() / 1000.0,
            "jti": format!("{serial}-{nonce:016x}"),
            "https://api.openai.com/auth": auth_claim,
        }));
        let id_token = jwt(&json!({
            "iss": "https://token-broker.sim",
            "sub": account,
            "email": "sim@example.invalid",
            "iat": unix(now).floor(),
            "exp": unix(now).floor() + 3600.0,
            "https://api.openai.com/auth": auth_claim,
        }));
        let refresh = format!("rt_sim_{serial}_{:016x}{:016x}", nonce, fastrand::u64(..));
        ledger.refresh.insert(refresh.clone(), false);
        ledger.access.insert(access.clone(), exp);
        ledger.pairs.insert(access.clone(), refresh.clone());
        Issued {
            access_token: access,
            refresh_token: refresh,
            id_token,
            account_id: account.to_owned(),
        }
    }

    fn is_live(&self, access: &str) -> bool {
        matches!(self.ledger.lock().access.get(access), Some(exp) if SystemTime::now() < *exp)
    }
}

/// The outcome of looking up a refresh token.
enum Spend {
    Ok,
    Reused,
    Unknown,
}

impl Shared {
    fn spend(&self, refresh: &str) -> Spend {
        let mut ledger = self.ledger.lock();
        match ledger.refresh.get_mut(refresh) {
            Some(spent @ false) => {
                *spent = true;
                Spend::Ok
            }
            Some(true) => Spend::Reused,
            None => Spend::Unknown,
        }
    }
}

async fn token_endpoint(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    let config = shared.config.lock().clone();
    // Half the latency before the token is spent, half after: a client that
    // gives up (or dies) late in a request may have spent its token without
    // hearing back, as with a real provider.
    let half = config.latency / 2;
    if !half.is_zero() {
        tokio::time::sleep(half).await;
    }
    if config.fault_rate > 0.0 && fastrand::f64() < config.fault_rate {
        shared.faults.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html><body>503 Service Unavailable</body></html>",
        )
            .into_response();
    }
    let request = match &config.dialect {
        SimDialect::OpenAi => parse_openai(&body, &config),
        SimDialect::Rfc6749(auth) => parse_rfc6749(&headers, &body, &config, auth),
    };
    let refresh = match request {
        Ok(refresh) => refresh,
        Err((status, body)) => {
            shared.invalid.fetch_add(1, Ordering::SeqCst);
            return (status, Json(body)).into_response();
        }
    };
    match shared.spend(&refresh) {
        Spend::Ok => {}
        Spend::Reused => {
            shared.reused.fetch_add(1, Ordering::SeqCst);
            return rejection(&config.dialect, Rejection::Reused);
        }
        Spend::Unknown => {
            shared.invalid.fetch_add(1, Ordering::SeqCst);
            return rejection(&config.dialect, Rejection::Unknown);
        }
    }
    let lifetime = config.access_lifetime;
    let issued = shared.issue(&config.account_id, lifetime.as_secs_f64(), lifetime);
    shared.refreshed.fetch_add(1, Ordering::SeqCst);
    if !half.is_zero() {
        tokio::time::sleep(half).await;
    }
    let mut body = json!({
        "access_token": issued.access_token,
        "refresh_token": issued.refresh_token,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs().max(1),
        "scope": "openid profile email offline_access",
    });
    if !config.omit_id_token {
        body["id_token"] = Value::String(issued.id_token);
    }
    (StatusCode::OK, Json(body)).into_response()
}

/// A refused request: the status and JSON body to answer with.
type Refusal = (StatusCode, Value);

fn parse_openai(body: &[u8], config: &SimConfig) -> Result<String, Refusal> {
    let bad = |message: &str| {
        (
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "invalid_request"}}),
        )
    };
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return Err(bad("The request body must be JSON."));
    };
    if req.get("grant_type").and_then(Value::as_str) != Some("refresh_token") {
        return Err(bad("Unsupported grant_type."));
    }
    if req.get("client_id").and_then(Value::as_str) != Some(config.client_id.as_str()) {
        return Err((
            StatusCode::UNAUTHORIZED,
            json!({"error": {"message": "Unknown client.", "type": "invalid_request_error", "param": null, "code": "invalid_client"}}),
        ));
    }
    req.get("refresh_token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad("Missing refresh_token."))
}

fn parse_rfc6749(
    headers: &HeaderMap,
    body: &[u8],
    config: &SimConfig,
    auth: &SimClientAuth,
) -> Result<String, Refusal> {
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let error = |status: StatusCode, code: &str, description: &str| {
        (status, json!({"error": code, "error_description": description}))
    };
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only refresh_token is supported",
        ));
    }
    let client_ok = match auth {
        SimClientAuth::None => form.get("client_id") == Some(&config.client_id) && !form.contains_key("client_secret"),
        SimClientAuth::Post(secret) => {
            form.get("client_id") == Some(&config.client_id) && form.get("client_secret") == Some(secret)
        }
        SimClientAuth::Basic(secret) => {
            let expected = crate::provider::basic_authorization(&config.client_id, secret);
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(expected.as_str())
                && !form.contains_key("client_secret")
        }
    };
    if !client_ok {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        ));
    }
    form.get("refresh_token")
        .cloned()
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "invalid_request", "missing refresh_token"))
}

enum Rejection {
    Reused,
    Unknown,
}

fn rejection(dialect: &SimDialect, why: Rejection) -> Response {
    match dialect {
        SimDialect::OpenAi => {
            let (code, message) = match why {
                Rejection::Reused => (
                    "refresh_token_reused",
                    "Your refresh token has already been used to generate a new access token. Please try signing in again.",
                ),
                Rejection::Unknown => (
                    "refresh_token_invalidated",
                    "Your refresh token has been invalidated. Please try signing in again.",
                ),
            };
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}})),
            )
                .into_response()
        }
        SimDialect::Rfc6749(_) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": "The refresh token is invalid, expired or was already used."})),
        )
            .into_response(),
    }
}

async fn api_endpoint(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(token) if shared.is_live(token) => (StatusCode::OK, Json(json!({"ok": true}))).into_response(),
        _ => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "Invalid or expired access token.", "type": "invalid_request_error", "code": "invalid_token"}})),
        )
            .into_response(),
    }
}
