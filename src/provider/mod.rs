//! How a refresh is sent to a token endpoint and how its answer is read.
//!
//! Two dialects:
//! - [`Dialect::Codex`]: OpenAI's JSON body
//!   `{"client_id","grant_type","refresh_token"}` as the Codex CLI sends
//!   it; errors shaped
//!   `{"error":{"message","type","code":"refresh_token_reused"}}`.
//! - [`Dialect::OAuth2`]: RFC 6749 section 6, a form-encoded body with
//!   client authentication ([`ClientAuth`]) `none`, `client_secret_basic`
//!   or `client_secret_post`; errors shaped `{"error":"invalid_grant"}`.
//!
//! Every failure is classified as [`RefreshError::Rejected`] (permanent:
//! the credential needs a new sign-in) or [`RefreshError::Transient`]
//! (retry later). Error text never carries a token.

mod code;
pub mod limit;
mod response;

use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use tracing::{debug, warn};

pub use code::ErrorCode;
pub(crate) use response::{parse_error_body, parse_success_body, ErrorBody};

use crate::credentials::{
    decode_claims, expiry_of, AccessToken, Expiry, ExpirySource, IdToken, RefreshToken, Secret, TokenSet,
};
use crate::defaults::{DEFAULT_HTTP_TIMEOUT, MAX_RESPONSE_BYTES, TIMEOUT_GRACE};

/// The Codex CLI's token endpoint.
pub const CODEX_TOKEN_URL: &str = "https://auth.openai.com/oauth/token";
/// The Codex CLI's OAuth client id.
pub const CODEX_CLIENT_ID: &str = "app_EMoamEEZ73f0CkXaXp7hrann";
/// The environment variable that overrides the Codex token endpoint, as in
/// the Codex CLI.
pub const CODEX_TOKEN_URL_ENV: &str = "CODEX_REFRESH_TOKEN_URL_OVERRIDE";

/// How an RFC 6749 client authenticates to the token endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A public client: `client_id` in the form, no secret.
    None,
    /// `client_secret_basic`: HTTP Basic with the form-encoded id and secret.
    Basic(Secret),
    /// `client_secret_post`: `client_id` and `client_secret` in the form.
    Post(Secret),
}

/// Which kind of provider a credential belongs to. One choice decides the
/// credentials file's layout, the refresh request's wire format and the
/// defaults ([`TokenBroker::codex`](crate::TokenBroker::codex) or
/// [`TokenBroker::oauth2`](crate::TokenBroker::oauth2); the CLI's
/// `--provider codex|oauth2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// The Codex CLI's `auth.json`, refreshed in OpenAI's JSON dialect at
    /// OpenAI's token endpoint, as the Codex CLI does it.
    Codex,
    /// A generic OAuth2 credentials file, refreshed per RFC 6749 section 6
    /// (form-encoded, with [`ClientAuth`]) at any token endpoint.
    OAuth2,
}

impl Dialect {
    /// The dialect's name as the command line and configuration spell it:
    /// `codex` or `oauth2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Codex => "codex",
            Dialect::OAuth2 => "oauth2",
        }
    }
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a successful refresh returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refreshed {
    /// The new access token.
    pub(crate) access_token: AccessToken,
    /// The rotated refresh token; `None` means "keep the old one".
    pub(crate) refresh_token: Option<RefreshToken>,
    /// A new id token; `None` means "keep the old one".
    pub(crate) id_token: Option<IdToken>,
    /// The access token's lifetime, when the server said (`expires_in`).
    pub(crate) expires_in: Option<Duration>,
}

impl Refreshed {
    /// The token set after this refresh of `old`, received at `now`: the
    /// new tokens, keeping the old refresh and id tokens where none came.
    ///
    /// Expiry comes from the new access token's JWT `exp`, else from
    /// `expires_in`; when the JWT says it is already expired while
    /// `expires_in` says otherwise, the clocks disagree and `expires_in` wins.
    pub(crate) fn into_token_set(self, old: &TokenSet, now: SystemTime) -> TokenSet {
        let new = self;
        let id_token = new.id_token.or_else(|| old.id_token.clone());
        // A refresh never changes the account: the one the credentials
        // already name stays (even if the new id token's claim spells it
        // differently); the claim only fills in a missing one.
        let account_id = old.account_id.clone().or_else(|| {
            id_token
                .as_ref()
                .and_then(|t| decode_claims(t.expose()).ok())
                .and_then(|c| c.chatgpt_account_id())
        });
        let from_expires_in = new.expires_in.map(|life| Expiry {
            at: crate::policy::later(now, life),
            lifetime: Some(life),
            source: ExpirySource::Stored,
        });
        let expiry = match expiry_of(new.access_token.expose(), None) {
            // A JWT already expired on arrival while the server says it lives on:
            // the clocks disagree, so trust the server's relative lifetime.
            Ok(Some(jwt)) if jwt.at <= now && from_expires_in.is_some_and(|e| e.at > now) => {
                warn!(
                    "the new access token's `exp` is already past by the local clock; using expires_in (clock skew?)"
                );
                from_expires_in
            }
            Ok(Some(jwt)) => Some(jwt),
            Ok(None) => from_expires_in,
            Err(e) => {
                warn!(error = %e, "the new access token's claims are unreadable; using expires_in");
                from_expires_in
            }
        };
        TokenSet {
            access_token: new.access_token,
            refresh_token: new.refresh_token.or_else(|| old.refresh_token.clone()),
            id_token,
            account_id,
            expiry,
            last_refresh: Some(now),
        }
    }
}

/// Why a refresh failed, classified. Never carries token text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The token endpoint refused this refresh token for good (reused,
    /// expired, invalidated, `invalid_grant`, any 401): a new sign-in is
    /// needed unless someone else already stored newer tokens.
    #[error("the token endpoint {endpoint} rejected the refresh token (HTTP {status}, {code}): {description}")]
    Rejected {
        /// The token endpoint.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// The error code (`refresh_token_reused`, `invalid_grant`...).
        code: ErrorCode,
        /// The server's description, shortened; withheld entirely when it
        /// quotes any secret the request carried, in any encoding.
        description: String,
    },
    /// The refresh may work if tried again later.
    #[error("the token endpoint {endpoint} failed: {kind}")]
    Transient {
        /// The token endpoint.
        endpoint: String,
        /// What went wrong.
        kind: Failure,
        /// How long the server asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
}

/// What went wrong with a refresh that may work later.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No connection could be made: the request was never sent.
    #[error("could not connect ({0})")]
    Connect(String),
    /// No complete answer within the timeout: the provider may have spent
    /// the refresh token.
    #[error("no answer within {}", crate::status::human_duration(*.0))]
    Timeout(Duration),
    /// The connection broke after the request was sent: the provider may
    /// have spent the refresh token.
    #[error("the connection broke before the answer was complete ({0})")]
    Interrupted(String),
    /// The HTTP client could not be set up.
    #[error("{0}")]
    Client(String),
    /// A 5xx or 408 answer.
    #[error("HTTP {status}{}", .code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        /// The HTTP status.
        status: u16,
        /// The error code in the body, if any.
        code: Option<ErrorCode>,
    },
    /// A 429 answer.
    #[error("rate limited (HTTP 429)")]
    RateLimited,
    /// Nothing was sent: the endpoint asked every client of this process
    /// to wait (a 429 or 503 with `Retry-After`), or the broker is stopping
    /// (see [`limit`]).
    #[error("not sent: {0}")]
    NotSent(String),
    /// A success status with a body that holds no usable tokens: the
    /// provider has probably spent the refresh token.
    #[error("HTTP {status} with an unusable body: {why}")]
    Malformed {
        /// The HTTP status.
        status: u16,
        /// What is wrong with the body (never its text).
        why: String,
    },
    /// Refresh cycles kept ending without a usable token.
    #[error("no usable token after {0} refresh cycles")]
    NoUsableToken(u32),
    /// A refresh succeeded, but its access token was already expired (or
    /// about to expire) on arrival: a provider or clock fault. The tokens
    /// are kept; the next refresh waits for the backoff.
    #[error("the provider's new access token was already expired on arrival (clock skew or a broken provider)")]
    ExpiredOnArrival,
    /// Another running broker (this process id) spent the refresh token and
    /// has not written the new tokens yet; spending it again would burn the
    /// credential.
    #[error("another running token-broker (pid {0}) refreshed this credential and has not written the new tokens yet")]
    UnsavedElsewhere(u32),
    /// The lock file was deleted or replaced while held, so another broker
    /// could have entered: nothing was spent.
    #[error("the lock file was deleted or replaced while held; nothing was spent")]
    LockLost,
    /// An earlier refresh of this refresh token was interrupted (its holder
    /// died or was cut off before writing a result), and the store's
    /// takeover policy is [`Takeover::Wait`](crate::store::Takeover::Wait):
    /// nothing is spent while the access token is still valid.
    #[error(
        "an earlier refresh of this refresh token was interrupted before its result was saved; \
         spending nothing while the access token is still valid (takeover = wait): the holder's late \
         write is adopted if it comes, else the token is spent once when the access token expires"
    )]
    InterruptedElsewhere,
    /// A body larger than [`MAX_RESPONSE_BYTES`].
    #[error("HTTP {status} with a body over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge {
        /// The HTTP status.
        status: u16,
    },
    /// A 3xx answer. Redirects from the token endpoint are never followed:
    /// following one would send the refresh token (and any client secret)
    /// to another origin, and save whatever that origin answers.
    #[error(
        "HTTP {status} redirect to {}; redirects from the token endpoint are never followed",
        .origin.as_deref().unwrap_or("an unusable location")
    )]
    Redirect {
        /// The HTTP status.
        status: u16,
        /// The origin (`scheme://host:port`, never a path or query) the
        /// `Location` header points to, when it names one.
        origin: Option<String>,
    },
}

impl Failure {
    /// Whether the provider may have spent the refresh token although we
    /// got no usable answer (a timeout or broken connection after sending,
    /// or a success status with an unusable body).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Failure::Timeout(_) | Failure::Interrupted(_) => true,
            Failure::Malformed { status, .. } | Failure::TooLarge { status } => (200..300).contains(status),
            Failure::Connect(_)
            | Failure::Client(_)
            | Failure::Status { .. }
            | Failure::RateLimited
            | Failure::NotSent(_)
            | Failure::NoUsableToken(_)
            | Failure::ExpiredOnArrival
            | Failure::UnsavedElsewhere(_)
            | Failure::LockLost
            | Failure::InterruptedElsewhere
            | Failure::Redirect { .. } => false,
        }
    }
}

impl RefreshError {
    /// Whether the failure is permanent for this refresh token.
    pub fn is_permanent(&self) -> bool {
        matches!(self, RefreshError::Rejected { .. })
    }

    /// Whether the provider refused the refresh token itself (spent,
    /// expired, revoked): someone else may have spent it and be about to
    /// write newer tokens. A rejected client or request is not this.
    pub fn refuses_refresh_token(&self) -> bool {
        self.code().is_some_and(ErrorCode::refuses_refresh_token)
    }

    /// Whether the provider may have spent the refresh token without our
    /// hearing the result (see [`Failure::outcome_unknown`]).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, RefreshError::Transient { kind, .. } if kind.outcome_unknown())
    }

    /// The error code the server gave, for a rejection.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            RefreshError::Rejected { code, .. } => Some(code),
            RefreshError::Transient { .. } => None,
        }
    }
}

/// A token endpoint and how to talk to it.
///
/// The HTTP client (and its TLS configuration) is built on the first
/// refresh, so handing out a still-valid token never pays for it.
#[derive(Debug)]
pub(crate) struct Provider {
    /// Shared with the brokers' rules (for messages), not copied.
    token_url: std::sync::Arc<str>,
    client_id: String,
    dialect: Dialect,
    /// Used by [`Dialect::OAuth2`] only.
    client_auth: ClientAuth,
    timeout: Duration,
    http: OnceLock<Result<reqwest::Client, String>>,
    /// What the brokers of this token URL share (their limit, pause and
    /// HTTP client): set for brokers' providers, see [`limit`].
    endpoint: Option<std::sync::Arc<limit::Endpoint>>,
}

impl Provider {
    /// A provider at `token_url` for the OAuth client `client_id`.
    ///
    /// The URL is kept as the URL parser writes it (the form requests go
    /// to): tabs and newlines removed, other control characters
    /// percent-encoded, so that messages naming it stay on one line.
    pub(crate) fn new(token_url: impl Into<String>, client_id: impl Into<String>, dialect: Dialect) -> Self {
        let token_url = token_url.into();
        let token_url: std::sync::Arc<str> = match reqwest::Url::parse(&token_url) {
            Ok(url) => String::from(url).into(),
            Err(_) => token_url.chars().filter(|c| !c.is_control()).collect::<String>().into(),
        };
        Provider {
            token_url,
            client_id: client_id.into(),
            dialect,
            client_auth: ClientAuth::None,
            timeout: DEFAULT_HTTP_TIMEOUT,
            http: OnceLock::new(),
            endpoint: None,
        }
    }

    /// Sets how an [`Dialect::OAuth2`] client authenticates (default: a
    /// public client). The Codex dialect sends no client secret.
    pub(crate) fn with_client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// How the client authenticates: always [`ClientAuth::None`] for the
    /// Codex dialect.
    fn client_auth(&self) -> &ClientAuth {
        match self.dialect {
            Dialect::Codex => &ClientAuth::None,
            Dialect::OAuth2 => &self.client_auth,
        }
    }

    /// Joins the process's shared state for this token URL (see [`limit`]),
    /// setting its limit when `limit` is given.
    pub(crate) fn shared_endpoint(mut self, limit: Option<usize>) -> Self {
        self.endpoint = Some(limit::endpoint(&self.token_url, limit));
        self
    }

    /// Sets the timeout of one token request (connect, send and read).
    pub(crate) fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The OAuth client id.
    pub(crate) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The dialect.
    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The client authentication as configured (see `client_auth` for what
    /// is sent).
    pub(crate) fn configured_client_auth(&self) -> &ClientAuth {
        &self.client_auth
    }

    /// The timeout of one token request.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The token endpoint.
    pub(crate) fn token_url(&self) -> &str {
        &self.token_url
    }

    /// The token endpoint, shared (as the parser wrote it: one line).
    pub(crate) fn token_url_shared(&self) -> std::sync::Arc<str> {
        self.token_url.clone()
    }

    /// Waits for a permit to send one token request to this endpoint (see
    /// [`limit`]): at most so many in flight per endpoint, none while it
    /// asked every client of the process to wait. Ends as soon as `stop` is
    /// set. `None`: this provider has no shared endpoint (no limit).
    pub(crate) async fn permit(
        &self,
        stop: Option<&AtomicBool>,
        clock: &dyn crate::clock::Clock,
    ) -> Result<Option<limit::Permit>, RefreshError> {
        match &self.endpoint {
            Some(endpoint) => match endpoint.acquire(stop, clock).await {
                Ok(permit) => Ok(Some(permit)),
                Err(refused) => Err(not_sent(&self.token_url, refused)),
            },
            None => Ok(None),
        }
    }

    /// Spends `refresh_token` once, after waiting for the endpoint's permit.
    /// Call only from the simulator's naive jobs, which show what goes wrong
    /// without a broker; the actor's cycle takes the permit itself (before
    /// its last check of the lock) and calls [`send`](Self::send).
    #[cfg(feature = "sim")]
    pub(crate) async fn refresh(&self, refresh_token: &RefreshToken) -> Result<Refreshed, RefreshError> {
        let clock = crate::clock::SystemClock;
        let _permit = self.permit(None, &clock).await?;
        self.send(refresh_token, &clock).await
    }

    /// Spends `refresh_token` once: the request itself, under a permit the
    /// caller holds. Call only from the actor's refresh cycle.
    /// A 429 or 503 with `Retry-After` pauses the endpoint from the time
    /// `clock` says.
    pub(crate) async fn send(
        &self,
        refresh_token: &RefreshToken,
        clock: &dyn crate::clock::Clock,
    ) -> Result<Refreshed, RefreshError> {
        let fail = |kind: Failure| RefreshError::Transient {
            endpoint: self.token_url.to_string(),
            kind,
            retry_after: None,
        };
        let http = self.client().map_err(|e| fail(Failure::Client(e)))?;
        let request = self.build_request(http, refresh_token);
        let Answer {
            status,
            location,
            retry_after,
            body,
        } = within(self.timeout, self.exchange(request)).await.map_err(fail)?;
        if let (Some(endpoint), Some(wait), 429 | 503) = (&self.endpoint, retry_after, status) {
            endpoint.pause(wait, clock.now());
        }
        let sent = SentSecrets::new(refresh_token, &self.client_id, self.client_auth());
        if (300..400).contains(&status) {
            let origin =
                redirect_origin(&self.token_url, location.as_ref()).map(|origin| sent.scrub(&origin, "<withheld>"));
            return Err(fail(Failure::Redirect { status, origin }));
        }
        let scrub_code = |text: &str| ErrorCode::from_scrubbed(sent.scrub(text, "<withheld>"));
        let describe = |text: &str| sent.scrub(text, WITHHELD);
        if (200..300).contains(&status) {
            return parse_success_body(&body).map_err(|why| fail(Failure::Malformed { status, why }));
        }
        let parsed = parse_error_body(&body);
        let permanent = matches!(status, 400..=499) && status != 408 && status != 429;
        if permanent {
            let (code, description) = match parsed {
                Some(ErrorBody { code, description }) => (code, description.unwrap_or_default()),
                None => ("unknown".to_owned(), String::new()),
            };
            return Err(RefreshError::Rejected {
                endpoint: self.token_url.to_string(),
                status,
                code: scrub_code(&code),
                description: describe(&description),
            });
        }
        let kind = match status {
            429 => Failure::RateLimited,
            _ => Failure::Status {
                status,
                code: parsed.map(|b| scrub_code(&b.code)),
            },
        };
        Err(RefreshError::Transient {
            endpoint: self.token_url.to_string(),
            kind,
            retry_after,
        })
    }

    /// Sends the request and reads the whole answer (no body for a 3xx).
    async fn exchange(&self, request: reqwest::RequestBuilder) -> Result<Answer, Failure> {
        let mut response = request.send().await.map_err(|e| self.classify(&e, false))?;
        let status = response.status().as_u16();
        let location = response.headers().get(reqwest::header::LOCATION).cloned();
        let retry_after = retry_after(response.headers());
        let mut body = Vec::new();
        if !(300..400).contains(&status) {
            while let Some(chunk) = response.chunk().await.map_err(|e| self.classify(&e, true))? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(Failure::TooLarge { status });
                }
                body.extend_from_slice(&chunk);
            }
        }
        Ok(Answer {
            status,
            location,
            retry_after,
            body,
        })
    }

    /// Classifies a client error. `answered`: the status line had arrived.
    fn classify(&self, e: &reqwest::Error, answered: bool) -> Failure {
        if e.is_timeout() {
            return Failure::Timeout(self.timeout);
        }
        if e.is_connect() && !answered {
            return Failure::Connect(error_chain(e));
        }
        if e.is_builder() {
            return Failure::Client(error_chain(e));
        }
        // Anything else happened after the request may have been sent.
        Failure::Interrupted(error_chain(e))
    }

    fn client(&self) -> Result<&reqwest::Client, String> {
        let build = || {
            // No overall reqwest timeout: `within` applies it, so that an
            // answer that arrived while the process was stopped is read.
            let builder = reqwest::Client::builder()
                .connect_timeout(self.timeout.min(Duration::from_secs(10)))
                .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
                // A redirect would re-send the refresh token and client
                // secret to wherever it points.
                .redirect(reqwest::redirect::Policy::none());
            // A proxy from the environment would get a loopback
            // endpoint's plain-http request, secrets and all (and no
            // proxy can reach our loopback anyway).
            let loopback = reqwest::Url::parse(&self.token_url).is_ok_and(|url| is_loopback(&url));
            let builder = if loopback { builder.no_proxy() } else { builder };
            builder
                .build()
                .map_err(|e| format!("could not build the HTTP client: {e}"))
        };
        match &self.endpoint {
            // One client per endpoint (its settings are the first broker's).
            Some(endpoint) => endpoint.client(build),
            None => self.http.get_or_init(build).as_ref().map_err(Clone::clone),
        }
    }

    fn build_request(&self, http: &reqwest::Client, refresh_token: &RefreshToken) -> reqwest::RequestBuilder {
        let request = http
            .post(&*self.token_url)
            .header(reqwest::header::ACCEPT, "application/json");
        match self.dialect {
            Dialect::Codex => request.json(&serde_json::json!({
                "client_id": self.client_id,
                "grant_type": "refresh_token",
                "refresh_token": refresh_token.expose(),
            })),
            Dialect::OAuth2 => {
                let mut form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token.expose()),
                ];
                let request = match self.client_auth() {
                    ClientAuth::None => {
                        form.push(("client_id", &self.client_id));
                        request
                    }
                    ClientAuth::Post(secret) => {
                        form.push(("client_id", &self.client_id));
                        form.push(("client_secret", secret.expose()));
                        request
                    }
                    ClientAuth::Basic(secret) => request.header(
                        reqwest::header::AUTHORIZATION,
                        basic_authorization(&self.client_id, secret.expose()),
                    ),
                };
                request.form(&form)
            }
        }
    }
}

/// The error of a refresh for which no permit was given: nothing was sent.
fn not_sent(token_url: &str, refused: limit::Refused) -> RefreshError {
    let (why, retry_after) = match refused {
        limit::Refused::Paused(left) => (
            "the token endpoint asked every client to wait (HTTP 429 or 503 with Retry-After)",
            Some(left),
        ),
        limit::Refused::Stopping => ("the broker is stopping", None),
    };
    RefreshError::Transient {
        endpoint: token_url.to_owned(),
        kind: Failure::NotSent(why.to_owned()),
        retry_after,
    }
}

/// Checks a token endpoint URL: `https://`, or plain `http://` only to a
/// loopback host (127.0.0.0/8, `::1`, `localhost`), since the request
/// carries the refresh token and any client secret; and no user name or
/// password in it (errors name the endpoint). The error says why.
pub(crate) fn check_token_url(token_url: &str) -> Result<(), String> {
    let url = match reqwest::Url::parse(token_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        _ => return Err(format!("the token URL {token_url:?} is not an http(s) URL")),
    };
    // The endpoint is named in every error: a password in it would be shown
    // (and the URL is not quoted here for that reason).
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the token URL carries a user name or password; put the client secret in an environment \
             variable and name it (client_secret_env, --client-secret-env) instead"
                .into(),
        );
    }
    if url.scheme() == "https" || is_loopback(&url) {
        return Ok(());
    }
    Err(format!(
        "the token URL {token_url:?} is plain http:// to a host that is not loopback; refusing to send \
         refresh tokens and client secrets unencrypted: use https:// (plain http:// is allowed only to \
         127.0.0.0/8, ::1 and localhost)"
    ))
}

/// Whether `url`'s host is a loopback address (127.0.0.0/8, `::1`, an
/// IPv4-mapped loopback) or `localhost`.
#[cfg(feature = "server")]
pub(crate) fn is_loopback_url(url: &reqwest::Url) -> bool {
    is_loopback(url)
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    // The URL parser has already normalised the host: IPv4 in dotted
    // decimal, IPv6 in brackets, domains lowercased.
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
    }
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// The origin (`scheme://host:port`) a redirect's `Location` points to,
/// resolved against the token endpoint. Never its path or query, which may
/// carry anything.
fn redirect_origin(token_url: &str, location: Option<&reqwest::header::HeaderValue>) -> Option<String> {
    let target = reqwest::Url::parse(token_url)
        .ok()?
        .join(location?.to_str().ok()?)
        .ok()?;
    let host = target.host_str()?;
    let port = target.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", target.scheme()))
}

/// A token endpoint's whole answer.
struct Answer {
    status: u16,
    location: Option<reqwest::header::HeaderValue>,
    retry_after: Option<Duration>,
    body: Vec<u8>,
}

/// Runs `exchange` for at most `timeout`; when that passes, polls it for up
/// to [`TIMEOUT_GRACE`] more (never more than `timeout` itself) so that an
/// answer already received is used, and only then reports a timeout.
async fn within<T>(
    timeout: Duration,
    exchange: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let mut exchange = std::pin::pin!(exchange);
    if let Ok(result) = tokio::time::timeout(timeout, exchange.as_mut()).await {
        return result;
    }
    match tokio::time::timeout(TIMEOUT_GRACE.min(timeout), exchange).await {
        Ok(result) => {
            debug!("the answer was complete only after the timeout (was the process stopped?); using it");
            result
        }
        Err(_) => Err(Failure::Timeout(timeout)),
    }
}

/// `client_secret_basic` per RFC 6749 section 2.3.1: id and secret are
/// form-encoded, joined by a colon, then base64-encoded.
pub(crate) fn basic_authorization(client_id: &str, secret: &str) -> String {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(secret));
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    parse_retry_after(
        headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?,
        SystemTime::now(),
    )
}

/// A `Retry-After` value: delay seconds, or an HTTP date (RFC 9110 10.2.3).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The causes of a client error, innermost last, without the URL (which
/// reqwest puts in its own message).
fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        "no detail".to_owned()
    } else {
        parts.join(": ")
    }
}

/// What replaces a provider's description that quotes our request.
const WITHHELD: &str = "(the provider's text quoted the request and is withheld)";

/// The length of the pieces of a secret looked for in a provider's text:
/// an echo cut short still holds pieces this long.
const SECRET_PIECE: usize = 12;

/// Secrets shorter than this are not looked for: matching them would
/// withhold nearly any text, and they protect nothing.
const MIN_SECRET: usize = 4;

/// Every secret one refresh request carried (the refresh token, a client
/// secret), in every encoding it was sent in or may be echoed back in: as
/// is, form-encoded (`+` or `%20` for spaces), JSON-escaped (also with
/// `\uXXXX` for non-ASCII), and the `client_secret_basic` header's base64.
struct SentSecrets {
    forms: Vec<Vec<u8>>,
}

impl SentSecrets {
    fn new(refresh_token: &RefreshToken, client_id: &str, client_auth: &ClientAuth) -> Self {
        let mut forms = Vec::new();
        let mut add_encodings = |secret: &str| {
            let form = form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>();
            let json = serde_json::to_string(secret).unwrap_or_default();
            let json = json.trim_matches('"').to_owned();
            let json_ascii = json
                .chars()
                .map(|c| {
                    if c.is_ascii() {
                        c.to_string()
                    } else {
                        c.encode_utf16(&mut [0; 2])
                            .iter()
                            .map(|u| format!("\\u{u:04x}"))
                            .collect()
                    }
                })
                .collect::<String>();
            forms.extend([secret.to_owned(), form.replace('+', "%20"), form, json, json_ascii]);
        };
        add_encodings(refresh_token.expose());
        if let ClientAuth::Basic(secret) | ClientAuth::Post(secret) = client_auth {
            add_encodings(secret.expose());
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            let header = basic_authorization(client_id, secret.expose());
            forms.push(header.trim_start_matches("Basic ").to_owned());
            forms.push(b64(&format!("{client_id}:{}", secret.expose())));
        }
        let mut forms: Vec<Vec<u8>> = forms
            .into_iter()
            .filter(|f| f.len() >= MIN_SECRET)
            .map(String::into_bytes)
            .collect();
        forms.sort();
        forms.dedup();
        SentSecrets { forms }
    }

    /// Whether `text` holds one of the forms, or a piece of one.
    fn found_in(&self, text: &str) -> bool {
        let text = text.as_bytes();
        let mut pieces = std::collections::HashSet::new();
        for form in &self.forms {
            if form.len() <= SECRET_PIECE {
                if text.windows(form.len()).any(|w| w == form.as_slice()) {
                    return true;
                }
            } else {
                pieces.extend(form.windows(SECRET_PIECE));
            }
        }
        text.windows(SECRET_PIECE).any(|w| pieces.contains(w))
    }

    /// Server-provided text made safe to show: `withheld` when it quotes
    /// anything secret we sent, else without control characters and cut to
    /// 200 characters.
    fn scrub(&self, text: &str, withheld: &str) -> String {
        if self.found_in(text) {
            return withheld.to_owned();
        }
        let mut out: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
        if text.chars().filter(|c| !c.is_control()).count() > 200 {
            out.push('…');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_authorization_form_encodes() {
        // "a b:c/d" -> "a+b:c%2Fd"
        let header = basic_authorization("a b", "c/d");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(header.trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(decoded, b"a+b:c%2Fd");
    }

    use crate::credentials::unsigned_jwt as jwt;

    #[test]
    fn a_refresh_keeps_what_the_provider_left_out() {
        let mut old = TokenSet::new("old-access", Some("old-refresh")).unwrap();
        old.id_token = Some(IdToken::new("old-id"));
        old.account_id = Some("acct".into());
        let now = SystemTime::now();
        let new = Refreshed {
            access_token: AccessToken::new("new-access"),
            refresh_token: None,
            id_token: None,
            expires_in: Some(Duration::from_secs(60)),
        }
        .into_token_set(&old, now);
        assert_eq!(new.refresh_token, old.refresh_token);
        assert_eq!(new.id_token, old.id_token);
        assert_eq!(new.account_id, old.account_id);
        assert_eq!(new.expiry.unwrap().at, now + Duration::from_secs(60));
        assert_eq!(new.last_refresh, Some(now));
    }

    #[test]
    fn a_jwt_expired_on_arrival_defers_to_expires_in() {
        let old = TokenSet::new("old", Some("r")).unwrap();
        let now = SystemTime::now();
        let past = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 10;
        let refreshed = |expires_in| Refreshed {
            access_token: AccessToken::new(jwt(&format!(r#"{{"exp":{past}}}"#))),
            refresh_token: Some(RefreshToken::new("r2")),
            id_token: None,
            expires_in,
        };
        let skewed = refreshed(Some(Duration::from_secs(3600))).into_token_set(&old, now);
        assert_eq!(skewed.expiry.unwrap().at, now + Duration::from_secs(3600));
        let expired = refreshed(None).into_token_set(&old, now);
        assert!(expired.expiry.unwrap().at < now);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        let earlier = now - Duration::from_secs(30);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", earlier),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn scrub_withholds_any_encoding_of_a_secret_and_caps() {
        let refresh = RefreshToken::new("rt/1234 5678+9\"ü\"");
        let basic = ClientAuth::Basic(Secret::new("client secret/value"));
        let sent = SentSecrets::new(&refresh, "client", &basic);
        let scrub = |text: &str| sent.scrub(text, WITHHELD);
        assert_eq!(scrub("the refresh token is invalid"), "the refresh token is invalid");
        for echo in [
            "bad token rt/1234 5678+9\"ü\"",
            "refresh_token=rt%2F1234+5678%2B9%22%C3%BC%22",
            "refresh_token=rt%2F1234%205678%2B9",
            r#"{"refresh_token":"rt/1234 5678+9\"ü\""}"#,
            r#"{"refresh_token":"rt/1234 5678+9\"\u00fc\""}"#,
            "client_secret=client+secret%2Fvalue",
            "Authorization: Basic Y2xpZW50OmNsaWVudCtzZWNyZXQlMkZ2YWx1ZQ==",
            // A quote cut short still holds a piece.
            "...t/1234 5678+9",
        ] {
            assert_eq!(scrub(echo), WITHHELD, "{echo}");
        }
        assert_eq!(scrub(&"x".repeat(500)).chars().count(), 201);
        assert_eq!(scrub("two\nlines"), "twolines");
    }
}
