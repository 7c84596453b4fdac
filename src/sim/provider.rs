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
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::provider::Dialect;

/// The client authentication a [`Dialect::OAuth2`] simulated endpoint
/// requires.
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
    /// The dialect it speaks.
    pub dialect: Dialect,
    /// The client authentication it requires, in the OAuth2 dialect.
    pub client_auth: SimClientAuth,
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
    /// Seeds the draw that picks which token requests fail (`fault_rate`):
    /// with a seed, the n-th token request fails or not the same way in
    /// every run. `None` seeds it at random.
    pub fault_seed: Option<u64>,
    /// How long a spent refresh token is accepted again, answered with the
    /// same new tokens (zero: never, every reuse is `refresh_token_reused`).
    pub reuse_grace: Duration,
    /// Revoke the whole token family (every refresh and access token since
    /// the sign-in) when a spent refresh token is reused, as some providers
    /// do.
    pub revoke_family_on_reuse: bool,
    /// Issue access tokens whose `exp` and `iat` claims are whole seconds,
    /// as real providers' are. By default they carry milliseconds, which
    /// some clients (the Codex CLI reads `exp` as an integer) cannot parse.
    pub whole_second_exp: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            dialect: Dialect::Codex,
            client_auth: SimClientAuth::None,
            client_id: crate::provider::CODEX_CLIENT_ID.to_owned(),
            access_lifetime: Duration::from_secs(3600),
            latency: Duration::ZERO,
            omit_id_token: false,
            account_id: "acct-sim-0001".to_owned(),
            fault_rate: 0.0,
            fault_seed: None,
            reuse_grace: Duration::ZERO,
            revoke_family_on_reuse: false,
            whole_second_exp: false,
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
    /// Spent refresh tokens accepted again within the reuse grace period.
    pub replayed: u64,
}

/// What the provider knows about one refresh token.
#[derive(Default)]
struct RefreshState {
    /// When it was spent, and the answer it got.
    spent: Option<(std::time::Instant, Value)>,
}

#[derive(Default)]
struct Ledger {
    /// Refresh token -> its state.
    refresh: HashMap<String, RefreshState>,
    /// Access token -> expiry.
    access: HashMap<String, SystemTime>,
    /// Access token -> the refresh token issued with it.
    pairs: HashMap<String, String>,
    /// Every token issued, for leak checks.
    issued: Vec<String>,
    /// Access or refresh token -> its family (one sign-in and its rotations).
    family: HashMap<String, u64>,
    /// Families revoked because one of their refresh tokens was reused.
    revoked: std::collections::HashSet<u64>,
    serial: u64,
}

struct Shared {
    config: Mutex<SimConfig>,
    ledger: Mutex<Ledger>,
    token_requests: AtomicU64,
    refreshed: AtomicU64,
    reused: AtomicU64,
    invalid: AtomicU64,
    faults_served: AtomicU64,
    replayed: AtomicU64,
    /// Token requests being answered now, and the most at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    faults: Mutex<std::collections::VecDeque<Fault>>,
    /// Draws which token requests fail at `fault_rate`, in arrival order.
    fault_draw: Mutex<fastrand::Rng>,
    /// Who asked (the `User-Agent`) and how each spend ended.
    spends: Mutex<Vec<SpendRecord>>,
    /// When each token request arrived, in order.
    arrivals: Mutex<Vec<std::time::Instant>>,
}

/// One token request that reached the ledger: who sent it and what became
/// of the refresh token it carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendRecord {
    /// The request's `User-Agent` (empty when it sent none).
    pub user_agent: String,
    /// `refreshed`, `replayed`, `reused` or `unknown` (a revoked or unknown
    /// refresh token).
    pub outcome: &'static str,
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
        let fault_draw = config
            .fault_seed
            .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            ledger: Mutex::new(Ledger::default()),
            token_requests: AtomicU64::new(0),
            refreshed: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            faults_served: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            faults: Mutex::new(Default::default()),
            fault_draw: Mutex::new(fault_draw),
            spends: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
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
            .issue(&config.account_id, expires_in, config.access_lifetime, None)
    }

    /// Like [`sign_in`](Self::sign_in) for another account.
    pub fn sign_in_as(&self, account_id: &str, expires_in: f64) -> Issued {
        let lifetime = self.shared.config.lock().access_lifetime;
        self.shared.issue(account_id, expires_in, lifetime, None)
    }

    /// Marks a refresh token spent, as if another process had refreshed.
    pub fn spend(&self, refresh_token: &str) {
        let spent = (std::time::Instant::now() - Duration::from_secs(3600), json!({}));
        self.shared
            .ledger
            .lock()
            .refresh
            .insert(refresh_token.to_owned(), RefreshState { spent: Some(spent) });
    }

    /// Makes `access_token` dead from now on, though the `exp` in it is
    /// still ahead, as a provider that revoked it (a password change, a
    /// sign-out elsewhere) or whose clock runs ahead would: the stand-in
    /// APIs answer it 401, while a broker reading its `exp` takes it for
    /// live. Its refresh token is untouched.
    ///
    /// ```
    /// use token_broker::sim::{ProviderServer, SimConfig};
    /// let sim = ProviderServer::start(SimConfig::default()).unwrap();
    /// let issued = sim.sign_in(3600.0);
    /// assert!(sim.is_live(&issued.access_token));
    /// sim.revoke_access(&issued.access_token);
    /// assert!(!sim.is_live(&issued.access_token));
    /// assert!(sim.is_unspent(&issued.refresh_token));
    /// ```
    pub fn revoke_access(&self, access_token: &str) {
        if let Some(exp) = self.shared.ledger.lock().access.get_mut(access_token) {
            *exp = UNIX_EPOCH;
        }
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

    /// Every access, refresh and id token issued so far (for leak checks).
    pub fn issued_secrets(&self) -> Vec<String> {
        self.shared.ledger.lock().issued.clone()
    }

    /// Whether `refresh_token` was issued here and is still unspent.
    pub fn is_unspent(&self, refresh_token: &str) -> bool {
        matches!(
            self.shared.ledger.lock().refresh.get(refresh_token),
            Some(RefreshState { spent: None })
        )
    }

    /// The counts so far.
    pub fn counts(&self) -> SimCounts {
        let s = &self.shared;
        SimCounts {
            token_requests: s.token_requests.load(Ordering::SeqCst),
            refreshed: s.refreshed.load(Ordering::SeqCst),
            reused: s.reused.load(Ordering::SeqCst),
            invalid: s.invalid.load(Ordering::SeqCst),
            faults: s.faults_served.load(Ordering::SeqCst),
            replayed: s.replayed.load(Ordering::SeqCst),
        }
    }

    /// Every token request that reached the ledger, in order: who sent it
    /// and how it ended.
    pub fn spends(&self) -> Vec<SpendRecord> {
        self.shared.spends.lock().clone()
    }

    /// The most token requests that were being answered at the same
    /// moment, since the start or the last [`reset_peak`](Self::reset_peak).
    pub fn peak_concurrent_token_requests(&self) -> u64 {
        self.shared.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Token requests being answered right now.
    pub fn concurrent_token_requests(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Starts measuring [`peak_concurrent_token_requests`](Self::peak_concurrent_token_requests) again.
    pub fn reset_peak(&self) {
        let now = self.shared.in_flight.load(Ordering::SeqCst);
        self.shared.peak_in_flight.store(now, Ordering::SeqCst);
    }

    /// Requests made to the token endpoint so far.
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// When each token request so far arrived, in order (for timelines such
    /// as `simulate --plot`'s).
    pub fn token_request_times(&self) -> Vec<std::time::Instant> {
        self.shared.arrivals.lock().clone()
    }

    /// When each access token issued so far expires (or expired), earliest
    /// first; a token made dead by [`revoke_access`](Self::revoke_access)
    /// counts as expiring at the Unix epoch.
    pub fn access_expiries(&self) -> Vec<SystemTime> {
        let mut expiries: Vec<SystemTime> = self.shared.ledger.lock().access.values().copied().collect();
        expiries.sort_unstable();
        expiries
    }

    /// Makes the next token requests misbehave, one fault each, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.lock().extend(faults);
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

fn unix(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn jwt(claims: &Value) -> String {
    super::unsigned_jwt(&claims.to_string())
}

impl Shared {
    /// Issues a token family whose access token expires `expires_in`
    /// seconds from now and was issued `lifetime` before that (or now).
    fn issue(&self, account: &str, expires_in: f64, lifetime: Duration, family: Option<u64>) -> Issued {
        let now = SystemTime::now();
        // Saturating: any f64 (even NaN or infinite) gives some instant.
        let offset = Duration::try_from_secs_f64(expires_in.abs()).unwrap_or(Duration::MAX);
        let exp = if expires_in >= 0.0 {
            crate::policy::later(now, offset)
        } else {
            now.checked_sub(offset).unwrap_or(UNIX_EPOCH)
        };
        let iat = exp.checked_sub(lifetime).unwrap_or(UNIX_EPOCH).min(now);
        let whole_seconds = self.config.lock().whole_second_exp;
        let (exp, iat_claim, exp_claim) = if whole_seconds {
            let exp = UNIX_EPOCH + Duration::from_secs(unix(exp).max(0.0).floor() as u64);
            (exp, json!(unix(iat).max(0.0).floor() as u64), json!(unix(exp) as u64))
        } else {
            let millis = |t: SystemTime| json!((unix(t) * 1000.0).round() / 1000.0);
            (exp, millis(iat), millis(exp))
        };
        let mut ledger = self.ledger.lock();
        ledger.serial += 1;
        let serial = ledger.serial;
        let nonce = fastrand::u64(..);
        let auth_claim = json!({ "chatgpt_account_id": account, "chatgpt_plan_type": "pro" });
        let access = jwt(&json!({
            "iss": "https://token-broker.sim",
            "sub": account,
            "iat": iat_claim,
            "exp": exp_claim,
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
        ledger.refresh.insert(refresh.clone(), RefreshState::default());
        ledger.access.insert(access.clone(), exp);
        ledger.pairs.insert(access.clone(), refresh.clone());
        let family = family.unwrap_or(serial);
        ledger.family.insert(access.clone(), family);
        ledger.family.insert(refresh.clone(), family);
        ledger
            .issued
            .extend([access.clone(), refresh.clone(), id_token.clone()]);
        Issued {
            access_token: access,
            refresh_token: refresh,
            id_token,
            account_id: account.to_owned(),
        }
    }

    fn is_live(&self, access: &str) -> bool {
        let ledger = self.ledger.lock();
        let revoked = ledger.family.get(access).is_some_and(|f| ledger.revoked.contains(f));
        !revoked && matches!(ledger.access.get(access), Some(exp) if SystemTime::now() < *exp)
    }
}

/// The outcome of looking up a refresh token.
enum Spend {
    /// Unspent: now spent; answer with new tokens.
    Fresh,
    /// Spent within the reuse grace period: answer as before.
    Replay(Value),
    /// Spent before.
    Reused,
    /// Its family was revoked after a reuse.
    Revoked,
    /// Never issued here.
    Unknown,
}

impl Shared {
    fn spend(&self, refresh: &str, grace: Duration, revoke_on_reuse: bool) -> Spend {
        let mut ledger = self.ledger.lock();
        let family = ledger.family.get(refresh).copied();
        if family.is_some_and(|f| ledger.revoked.contains(&f)) {
            return Spend::Revoked;
        }
        let outcome = match ledger.refresh.get_mut(refresh) {
            Some(state @ RefreshState { spent: None }) => {
                // Spent now, atomically; `rotate` records the answer.
                state.spent = Some((std::time::Instant::now(), Value::Null));
                Spend::Fresh
            }
            Some(RefreshState {
                spent: Some((at, answer)),
            }) if at.elapsed() < grace && !answer.is_null() => Spend::Replay(answer.clone()),
            Some(_) => Spend::Reused,
            None => Spend::Unknown,
        };
        if let (Spend::Reused, true, Some(family)) = (&outcome, revoke_on_reuse, family) {
            // Some providers treat a reuse as theft and revoke the family.
            ledger.revoked.insert(family);
        }
        outcome
    }

    /// Issues the next token set for `refresh` and records it as spent.
    fn rotate(&self, refresh: &str, config: &SimConfig) -> Value {
        let lifetime = config.access_lifetime;
        let family = self.ledger.lock().family.get(refresh).copied();
        let issued = self.issue(&config.account_id, lifetime.as_secs_f64(), lifetime, family);
        let mut answer = json!({
            "access_token": issued.access_token,
            "refresh_token": issued.refresh_token,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs().max(1),
            "scope": "openid profile email offline_access",
        });
        if !config.omit_id_token {
            answer["id_token"] = Value::String(issued.id_token);
        }
        if let Some(state) = self.ledger.lock().refresh.get_mut(refresh) {
            state.spent = Some((std::time::Instant::now(), answer.clone()));
        }
        self.refreshed.fetch_add(1, Ordering::SeqCst);
        answer
    }
}

/// A misbehaviour to inject into the next token request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status before spending anything (an HTML page for
    /// 5xx, the dialect's error JSON otherwise), with `Retry-After` seconds.
    Status {
        /// The HTTP status.
        status: u16,
        /// The `Retry-After` header, in seconds.
        retry_after: Option<u64>,
    },
    /// Wait this long before spending (a client with a shorter timeout never
    /// reaches the provider's decision... as far as it knows).
    HangBeforeSpend(Duration),
    /// Spend the token, then wait this long before answering.
    HangAfterSpend(Duration),
    /// Spend the token, then break the connection in the middle of the body.
    ResetAfterSpend,
    /// Spend the token, then answer 200 with an HTML page.
    Html200,
    /// Spend the token, then answer 200 with the JSON cut in half.
    Truncated200,
    /// Spend the token, then answer 200 with JSON that lacks `access_token`.
    NoAccessToken200,
    /// Spend the token, then answer 200 with a body this many bytes long.
    Huge200(usize),
}

/// Counts a token request as in flight until dropped (also when the client
/// goes away mid-answer).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn token_endpoint(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let _in_flight = InFlight::new(&shared);
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    shared.arrivals.lock().push(std::time::Instant::now());
    let config = shared.config.lock().clone();
    let fault = shared.faults.lock().pop_front();
    if fault.is_some() {
        shared.faults_served.fetch_add(1, Ordering::SeqCst);
    }
    // Half the latency before the token is spent, half after: a client that
    // gives up (or dies) late in a request may have spent its token without
    // hearing back, as with a real provider.
    let half = config.latency / 2;
    if !half.is_zero() {
        tokio::time::sleep(half).await;
    }
    match &fault {
        Some(Fault::Status { status, retry_after }) => return status_fault(config.dialect, *status, *retry_after),
        Some(Fault::HangBeforeSpend(d)) => tokio::time::sleep(*d).await,
        _ => {}
    }
    if config.fault_rate > 0.0 && shared.fault_draw.lock().f64() < config.fault_rate {
        shared.faults_served.fetch_add(1, Ordering::SeqCst);
        return status_fault(config.dialect, 503, None);
    }
    let request = match config.dialect {
        Dialect::Codex => parse_openai(&body, &config),
        Dialect::OAuth2 => parse_rfc6749(&headers, &body, &config, &config.client_auth),
    };
    let refresh = match request {
        Ok(refresh) => refresh,
        Err((status, body)) => {
            shared.invalid.fetch_add(1, Ordering::SeqCst);
            return (status, Json(body)).into_response();
        }
    };
    let spend = shared.spend(&refresh, config.reuse_grace, config.revoke_family_on_reuse);
    shared.spends.lock().push(SpendRecord {
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        outcome: match spend {
            Spend::Fresh => "refreshed",
            Spend::Replay(_) => "replayed",
            Spend::Reused => "reused",
            Spend::Unknown | Spend::Revoked => "unknown",
        },
    });
    let answer = match spend {
        Spend::Fresh => shared.rotate(&refresh, &config),
        Spend::Replay(answer) => {
            shared.replayed.fetch_add(1, Ordering::SeqCst);
            answer
        }
        Spend::Reused => {
            shared.reused.fetch_add(1, Ordering::SeqCst);
            return rejection(config.dialect, Rejection::Reused);
        }
        Spend::Unknown | Spend::Revoked => {
            shared.invalid.fetch_add(1, Ordering::SeqCst);
            return rejection(config.dialect, Rejection::Unknown);
        }
    };
    if !half.is_zero() {
        tokio::time::sleep(half).await;
    }
    let text = answer.to_string();
    match fault {
        Some(Fault::HangAfterSpend(d)) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, Json(answer)).into_response()
        }
        Some(Fault::ResetAfterSpend) => {
            let head = Bytes::from(text[..text.len() / 2].to_owned());
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(head),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "injected reset",
                )),
            ];
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Some(Fault::Html200) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<html><body><h1>Welcome</h1></body></html>",
        )
            .into_response(),
        Some(Fault::Truncated200) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            text[..text.len() / 2].to_owned(),
        )
            .into_response(),
        Some(Fault::NoAccessToken200) => (
            StatusCode::OK,
            Json(json!({"token_type": "Bearer", "expires_in": 3600})),
        )
            .into_response(),
        Some(Fault::Huge200(n)) => {
            let mut huge = String::with_capacity(n + 32);
            huge.push_str("{\"padding\":\"");
            huge.extend(std::iter::repeat_n('x', n.saturating_sub(16)));
            huge.push_str("\"}");
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], huge).into_response()
        }
        _ => (StatusCode::OK, Json(answer)).into_response(),
    }
}

/// An error status before anything is spent, with the body a real provider
/// (or the proxy in front of it) would send.
fn status_fault(dialect: Dialect, status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = if status >= 500 {
        (
            code,
            [(header::CONTENT_TYPE, "text/html")],
            format!("<html><body><h1>{status}</h1>upstream error</body></html>"),
        )
            .into_response()
    } else {
        let body = match dialect {
            Dialect::Codex => {
                json!({"error": {"message": "Too many requests.", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
            }
            Dialect::OAuth2 => json!({"error": "slow_down", "error_description": "Too many requests."}),
        };
        (code, Json(body)).into_response()
    };
    if let Some(secs) = retry_after {
        if let Ok(value) = header::HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
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

fn rejection(dialect: Dialect, why: Rejection) -> Response {
    match dialect {
        Dialect::Codex => {
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
        Dialect::OAuth2 => (
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
