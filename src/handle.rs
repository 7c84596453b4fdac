//! The public [`TokenBroker`] handle and its [`BrokerBuilder`].
//!
//! A handle is cheap to clone, `Send + Sync`, and works from any async
//! runtime: a plain `#[tokio::main]` program that never set up an actix
//! System, or code already inside one. Every broker of the process runs its
//! [`TokenActor`] on one shared runtime (a small pool of actix arbiters,
//! one thread per core), never on a thread of its own.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix::prelude::*;

use crate::actor::{Config, GetStatus, Park as ParkMsg, Published, Reject, Reload, Rules, Shutdown, TokenActor};
use crate::clock::{Clock, Jitter};
use crate::credentials::AccessToken;
use crate::defaults::{
    default_lock_timeout, DEFAULT_HTTP_TIMEOUT, DEFAULT_REFRESH_AHEAD, DEFAULT_WATCH_INTERVAL, DEFAULT_WINNER_WAIT,
};
use crate::error::BrokerError;
use crate::policy::{RefreshPolicy, CODEX_REFRESH_MARK};
use crate::provider::{ClientAuth, Dialect, Provider, CODEX_CLIENT_ID, CODEX_TOKEN_URL, CODEX_TOKEN_URL_ENV};
use crate::snapshot::{Park, Place};
use crate::status::Status;
use crate::store::{CodexAuthFile, OAuth2File, Store};

/// A cloneable handle to one credential's [`TokenActor`].
///
/// With the Codex CLI's credentials (`$CODEX_HOME/auth.json`):
///
/// ```no_run
/// # async fn demo() -> Result<(), token_broker::BrokerError> {
/// use token_broker::TokenBroker;
///
/// let broker = TokenBroker::codex().build()?;
/// let token = broker.token().await?;
/// // ... send `Authorization: Bearer {token.expose()}` ...
/// // on a 401 from the API:
/// let retry_with = broker.reject(&token).await?;
/// # let _ = retry_with;
/// broker.shutdown().await;
/// # Ok(())
/// # }
/// ```
///
/// A complete run against the simulated provider on 127.0.0.1: an expired
/// token, a thousand concurrent callers, one refresh.
///
/// ```
/// # // Needs the `sim` feature (on by default).
/// # #[cfg(feature = "sim")]
/// # mod example {
/// use token_broker::sim::{codex_auth_json, ProviderServer, SimConfig};
/// use token_broker::TokenBroker;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let provider = ProviderServer::start(SimConfig::default())?;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("auth.json");
/// std::fs::write(&path, codex_auth_json(&provider.sign_in(-1.0)))?; // expired
///
/// let broker = TokenBroker::codex()
///     .credentials_path(&path)
///     .token_url(provider.token_url())
///     .build()?;
/// let callers: Vec<_> = (0..1000)
///     .map(|_| {
///         let broker = broker.clone();
///         tokio::spawn(async move { broker.token().await })
///     })
///     .collect();
/// for caller in callers {
///     assert!(provider.is_live(caller.await??.expose()));
/// }
/// assert_eq!(provider.token_requests(), 1);
/// broker.shutdown().await;
/// # Ok(())
/// # }
/// # }
/// # fn main() {
/// #     #[cfg(feature = "sim")]
/// #     example::main().unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct TokenBroker {
    inner: Arc<Inner>,
}

struct Inner {
    addr: Addr<TokenActor>,
    published: Published,
    /// The actor's settings (for the location), shared rather than copied.
    cfg: Arc<Config>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The actor finishes a refresh in flight before it stops.
        self.addr.do_send(Shutdown);
    }
}

impl std::fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBroker")
            .field("location", &self.location())
            .finish_non_exhaustive()
    }
}

impl TokenBroker {
    /// A builder for the Codex CLI's credentials: `$CODEX_HOME/auth.json`
    /// (else `~/.codex/auth.json`), OpenAI's token endpoint (overridden by
    /// `CODEX_REFRESH_TOKEN_URL_OVERRIDE`) and the Codex client id.
    pub fn codex() -> BrokerBuilder {
        BrokerBuilder::new(Dialect::Codex)
    }

    /// A builder for any RFC 6749 provider. Set the credentials file with
    /// [`BrokerBuilder::credentials_path`] or a store with
    /// [`BrokerBuilder::store`].
    pub fn oauth2(token_url: impl Into<String>, client_id: impl Into<String>) -> BrokerBuilder {
        BrokerBuilder::new(Dialect::OAuth2)
            .token_url(token_url)
            .client_id(client_id)
    }

    /// A valid access token. Served from the published snapshot without a
    /// message round trip while the token is fresh; otherwise the caller
    /// parks on the snapshot until the actor publishes the outcome (of the
    /// one refresh in flight, if one is needed). However many callers park
    /// at once, one message reaches the actor.
    ///
    /// Fails only when no valid access token is left and the refresh failed.
    /// A caller that drops the future never cancels the refresh.
    pub fn token(&self) -> TokenFuture {
        match self.fresh_token() {
            Some(token) => TokenFuture::ready(token),
            None => TokenFuture(Pending::Parked {
                inner: self.inner.clone(),
                place: Place::NEW,
            }),
        }
    }

    /// The published token if it is fresh, without waiting or messaging.
    /// `None` means "call [`token`](Self::token)".
    #[inline]
    pub fn fresh_token(&self) -> Option<AccessToken> {
        self.inner.published.read()
    }

    /// Reports that the upstream API answered 401 for `token`, and returns a
    /// token to retry with. If `token` is still the current one it is
    /// refreshed once, however many callers reject it at the same time; an
    /// older token is ignored and the current one returned.
    pub async fn reject(&self, token: &AccessToken) -> Result<AccessToken, BrokerError> {
        self.ask(Reject { token: token.clone() }).await
    }

    /// Re-reads the credentials now and adopts what changed. Never spends a
    /// refresh token.
    pub async fn reload(&self) -> Result<(), BrokerError> {
        self.ask(Reload).await
    }

    /// The credential's state, without secrets.
    pub async fn status(&self) -> Result<Status, BrokerError> {
        self.inner.addr.send(GetStatus).await.map_err(|_| self.stopped())
    }

    /// The actor's address, for actix code that sends messages directly.
    pub fn addr(&self) -> &Addr<TokenActor> {
        &self.inner.addr
    }

    /// The provider's dialect (Codex or generic OAuth2).
    pub fn dialect(&self) -> Dialect {
        self.inner.cfg.provider.dialect()
    }

    /// Where the credentials live.
    pub fn location(&self) -> &str {
        &self.inner.cfg.rules.location
    }

    /// Stops the actor once any refresh in flight has written its tokens,
    /// and waits for it. Call before a process exits. Use
    /// [`finish`](Self::finish) to learn whether every rotated token reached
    /// the store.
    pub async fn shutdown(&self) {
        let _ = self.finish().await;
    }

    /// Like [`shutdown`](Self::shutdown), and reports whether every token a
    /// refresh returned reached the store: `Err` when new tokens could not
    /// be written even on a last attempt, so the rotated refresh token dies
    /// with this process. A command line must not exit 0 then.
    pub async fn finish(&self) -> Result<(), BrokerError> {
        let outcome = self.inner.addr.send(Shutdown).await.unwrap_or(Ok(()));
        self.inner.published.wait_done().await;
        outcome
    }

    async fn ask<M, T>(&self, msg: M) -> Result<T, BrokerError>
    where
        M: Message<Result = Result<T, BrokerError>> + Send + 'static,
        T: Send + 'static,
        TokenActor: Handler<M>,
    {
        self.inner.addr.send(msg).await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> BrokerError {
        stopped(&self.inner)
    }

    /// Waits until the actor has stopped and been dropped.
    pub(crate) async fn wait_stopped(&self) {
        self.inner.published.wait_done().await;
    }
}

fn stopped(inner: &Inner) -> BrokerError {
    BrokerError::Stopped {
        location: inner.cfg.rules.location.clone(),
    }
}

/// The future returned by [`TokenBroker::token`]: already complete when the
/// token is fresh (no allocation, no message), otherwise parked on the
/// published snapshot until the actor publishes the outcome (no allocation
/// of its own either; the first caller of a round sends the actor one
/// message for everyone).
#[must_use = "futures do nothing unless awaited"]
pub struct TokenFuture(Pending);

enum Pending {
    Ready(Option<AccessToken>),
    Parked { inner: Arc<Inner>, place: Place },
    Done,
}

impl TokenFuture {
    fn ready(token: AccessToken) -> Self {
        TokenFuture(Pending::Ready(Some(token)))
    }
}

impl std::fmt::Debug for TokenFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Pending::Ready(_) => "TokenFuture::Ready",
            Pending::Parked { .. } => "TokenFuture::Parked",
            Pending::Done => "TokenFuture::Done",
        })
    }
}

impl Future for TokenFuture {
    type Output = Result<AccessToken, BrokerError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.0 {
            Pending::Ready(token) => match token.take() {
                Some(token) => Poll::Ready(Ok(token)),
                None => panic!("TokenFuture polled after completion"),
            },
            Pending::Parked { .. } => this.poll_parked(cx),
            Pending::Done => panic!("TokenFuture polled after completion"),
        }
    }
}

impl TokenFuture {
    /// The slow path, kept out of line so that the fresh path stays small.
    #[cold]
    #[inline(never)]
    fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<Result<AccessToken, BrokerError>> {
        let Pending::Parked { inner, place } = &mut self.0 else {
            panic!("TokenFuture polled after completion")
        };
        let outcome = match inner.published.park(place, cx.waker()) {
            Park::Wait => return Poll::Pending,
            Park::Ask if inner.addr.connected() => {
                // One message for everyone parked in this round; answered
                // through the snapshot, never through this future, so
                // dropping it cancels nothing.
                inner.addr.do_send(ParkMsg);
                return Poll::Pending;
            }
            Park::Ask | Park::Closed => Err(stopped(inner)),
            Park::Ready(outcome) => outcome,
        };
        self.0 = Pending::Done;
        Poll::Ready(outcome)
    }
}

/// Configures and starts a [`TokenBroker`].
#[derive(Debug)]
pub struct BrokerBuilder {
    dialect: Dialect,
    path: Option<PathBuf>,
    store: Option<Arc<dyn Store>>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_auth: ClientAuth,
    refresh_ahead: Duration,
    http_timeout: Duration,
    lock_timeout: Option<Duration>,
    watch_interval: Duration,
    winner_wait: Duration,
    keep_fresh: Option<bool>,
    clock: Option<Arc<dyn Clock>>,
    jitter: Option<Arc<dyn Jitter>>,
    endpoint_limit: Option<usize>,
}

impl BrokerBuilder {
    fn new(dialect: Dialect) -> Self {
        BrokerBuilder {
            dialect,
            path: None,
            store: None,
            token_url: None,
            client_id: None,
            client_auth: ClientAuth::None,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
            lock_timeout: None,
            watch_interval: DEFAULT_WATCH_INTERVAL,
            winner_wait: DEFAULT_WINNER_WAIT,
            keep_fresh: None,
            clock: None,
            jitter: None,
            endpoint_limit: None,
        }
    }

    /// The credentials file (a Codex `auth.json` or an OAuth2 credentials
    /// file, by dialect).
    pub fn credentials_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Any store, instead of a file (for example a [`MemoryStore`](crate::store::MemoryStore)).
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The token endpoint, overriding the dialect's default and
    /// `CODEX_REFRESH_TOKEN_URL_OVERRIDE`.
    pub fn token_url(mut self, url: impl Into<String>) -> Self {
        self.token_url = Some(url.into());
        self
    }

    /// The OAuth client id, overriding the dialect's default.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// How an RFC 6749 client authenticates (default: none, a public
    /// client). Ignored by the Codex dialect.
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// How long before expiry a token is refreshed (default 10 minutes; at
    /// half-life for tokens that live less than twice this). On a Codex file
    /// the refresh always comes before the Codex CLI's own 5-minute mark
    /// when the token lives long enough, whatever this says.
    pub fn refresh_ahead(mut self, window: Duration) -> Self {
        self.refresh_ahead = window;
        self
    }

    /// The timeout of one token request (default 30 s).
    pub fn http_timeout(mut self, timeout: Duration) -> Self {
        self.http_timeout = timeout;
        self
    }

    /// How long a refresh waits for another broker's lock. The default is
    /// as long as a legitimate holder can need: two token requests (an
    /// unknown outcome is retried once), the wait for a winner's tokens and
    /// a margin of 10 s (78 s with the default 30 s request timeout).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// How often the broker checks the credentials file for changes made by
    /// someone else (another process, `codex login`) and adopts them
    /// (default 1 s; zero turns the check off). A check is one `stat` call.
    pub fn watch_interval(mut self, interval: Duration) -> Self {
        self.watch_interval = interval;
        self
    }

    /// How long a broker whose refresh token the provider refused (spent by
    /// another program, such as the Codex CLI, a moment earlier) watches the
    /// store for the winner's tokens before it reports that a sign-in is
    /// needed (default 8 s, longer than the Codex CLI's 5 s commit budget).
    /// No lock is held meanwhile.
    pub fn winner_wait(mut self, wait: Duration) -> Self {
        self.winner_wait = wait;
        self
    }

    /// Refresh as soon as the refresh-ahead window opens, even when nobody
    /// asks for a token, so that another program on the same credentials
    /// (the Codex CLI) always finds a fresh token and never spends the
    /// refresh token itself. Default: on for Codex files, off otherwise.
    /// Turn it off for one-shot uses (printing a status).
    pub fn keep_fresh(mut self, on: bool) -> Self {
        self.keep_fresh = Some(on);
        self
    }

    /// At most `limit` token requests in flight to this broker's token
    /// endpoint, shared by every broker of the process that uses the same
    /// token URL (default
    /// [`DEFAULT_ENDPOINT_LIMIT`](crate::provider::limit::DEFAULT_ENDPOINT_LIMIT);
    /// zero counts as one). The last limit set for an endpoint applies to
    /// all of its brokers; see [`provider::limit`](crate::provider::limit).
    pub fn endpoint_limit(mut self, limit: usize) -> Self {
        self.endpoint_limit = Some(limit);
        self
    }

    /// The registry's endpoint limit, unless this builder set its own.
    pub(crate) fn default_endpoint_limit(mut self, limit: usize) -> Self {
        self.endpoint_limit.get_or_insert(limit);
        self
    }

    /// Where the broker gets the time (default: the system's wall clock).
    /// Every decision (fresh, due, expired, backoff ended, an endpoint's
    /// `Retry-After` over) is taken at the time this clock says; timers
    /// sleep for the difference. With a clock other than the system's,
    /// nothing is published for the lock-free fast path (it compares
    /// deadlines with the system's wall clock): every
    /// [`token`](TokenBroker::token) asks the actor. Brokers of one token
    /// endpoint share its pause after a 429, kept in the time of the broker
    /// that was told to wait: give them the same clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Where the broker gets its randomness (default: uniform). Refreshes
    /// are spread over up to half of the refresh-ahead window (never past
    /// the Codex CLI's mark on a Codex file), so that thousands of
    /// credentials that fall due in the same minute do not refresh at once;
    /// backoff after failures is jittered too.
    /// [`FixedJitter(0.0)`](crate::clock::FixedJitter) refreshes every
    /// token at the start of its window and backs off by the minimum.
    pub fn jitter(mut self, jitter: Arc<dyn Jitter>) -> Self {
        self.jitter = Some(jitter);
        self
    }

    /// Reads the credentials and starts the broker's actor.
    ///
    /// Blocks briefly: it reads the credentials file and starts the actor's
    /// thread. Fails with [`BrokerError::Store`] when the credentials are
    /// missing or invalid and [`BrokerError::Config`] for unusable settings.
    pub fn build(self) -> Result<TokenBroker, BrokerError> {
        if self.http_timeout.is_zero() {
            return Err(BrokerError::Config("the HTTP timeout must be more than zero".into()));
        }
        let (token_url, client_id, login_hint) = match self.dialect {
            Dialect::Codex => (
                self.token_url
                    .clone()
                    .or_else(|| std::env::var(CODEX_TOKEN_URL_ENV).ok().filter(|v| !v.is_empty()))
                    .unwrap_or_else(|| CODEX_TOKEN_URL.to_owned()),
                self.client_id.clone().unwrap_or_else(|| CODEX_CLIENT_ID.to_owned()),
                Some("sign in again with `codex login`"),
            ),
            // `TokenBroker::oauth2` always sets both.
            Dialect::OAuth2 => (
                self.token_url.clone().unwrap_or_default(),
                self.client_id.clone().unwrap_or_default(),
                // Said with the location when needed (not kept per broker).
                None,
            ),
        };
        crate::provider::check_token_url(&token_url).map_err(|why| {
            // Only a Codex broker without an explicit URL reads the variable.
            let from_env = self.dialect == Dialect::Codex && self.token_url.is_none();
            BrokerError::Config(if from_env {
                format!("{why} (from {CODEX_TOKEN_URL_ENV})")
            } else {
                why
            })
        })?;
        let store: Arc<dyn Store> = match (self.store, self.path, self.dialect) {
            (Some(store), _, _) => store,
            (None, Some(path), Dialect::Codex) => Arc::new(CodexAuthFile::new(path)),
            (None, None, Dialect::Codex) => {
                Arc::new(CodexAuthFile::new(CodexAuthFile::default_path().ok_or_else(|| {
                    BrokerError::Config("neither CODEX_HOME nor HOME is set: pass the auth.json path".into())
                })?))
            }
            (None, Some(path), Dialect::OAuth2) => Arc::new(OAuth2File::new(path)),
            (None, None, Dialect::OAuth2) => {
                return Err(BrokerError::Config(
                    "an oauth2 broker needs a credentials file path".into(),
                ))
            }
        };
        let location = store.location().to_owned();
        let codex = self.dialect == Dialect::Codex;
        let mut policy = RefreshPolicy::new(self.refresh_ahead);
        if codex && store.codex_cli_may_refresh() {
            policy = policy.before_neighbour(CODEX_REFRESH_MARK);
            if policy.window_after_mark() {
                tracing::warn!(
                    refresh_ahead = ?self.refresh_ahead,
                    "the refresh-ahead window is shorter than the Codex CLI's 5-minute mark; \
                     refreshing 5m30s before expiry instead, so the Codex CLI never has to refresh"
                );
            }
        }
        let provider = shared_provider(
            token_url,
            client_id,
            self.dialect,
            self.client_auth.clone(),
            self.http_timeout,
            self.endpoint_limit,
        );
        let rules = Rules {
            policy,
            keep_fresh: self.keep_fresh.unwrap_or(codex),
            location,
            login_hint,
            token_url: provider.token_url_shared(),
        };
        let cfg = Arc::new(Config {
            store,
            provider,
            rules,
            wall_clock: self.clock.is_none(),
            clock: self.clock.unwrap_or_else(crate::clock::system),
            jitter: self.jitter.unwrap_or_else(crate::clock::random),
            winner_wait: self.winner_wait,
            stopping: Default::default(),
            requests: Default::default(),
            lock_timeout: self
                .lock_timeout
                .unwrap_or_else(|| default_lock_timeout(self.http_timeout, self.winner_wait)),
            watch_interval: self.watch_interval,
        });
        let published: Published = crate::snapshot::Snapshot::new();
        let addr = crate::runtime::shared()?.open(cfg.clone(), published.clone())?;
        Ok(TokenBroker {
            inner: Arc::new(Inner { addr, published, cfg }),
        })
    }
}

/// The providers of the process's brokers, shared by every broker with the
/// same endpoint, client, dialect, client authentication and timeout (a `Provider` holds no
/// per-credential state): one per distinct setting, not one per credential.
type Providers = std::collections::HashMap<(String, String, Duration), Vec<std::sync::Weak<Provider>>>;

fn shared_provider(
    token_url: String,
    client_id: String,
    dialect: Dialect,
    client_auth: ClientAuth,
    timeout: Duration,
    limit: Option<usize>,
) -> Arc<Provider> {
    static PROVIDERS: std::sync::OnceLock<parking_lot::Mutex<Providers>> = std::sync::OnceLock::new();
    let mut providers = PROVIDERS.get_or_init(Default::default).lock();
    let key = (token_url, client_id, timeout);
    if let Some(same) = providers.get_mut(&key) {
        same.retain(|weak| weak.strong_count() > 0);
        if let Some(found) = same
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .find(|p| p.dialect() == dialect && *p.configured_client_auth() == client_auth)
        {
            if let Some(limit) = limit {
                crate::provider::limit::endpoint(found.token_url(), Some(limit));
            }
            return found;
        }
    }
    let (token_url, client_id, timeout) = key;
    let provider = Arc::new(
        Provider::new(token_url.clone(), client_id.clone(), dialect)
            .with_client_auth(client_auth)
            .with_timeout(timeout)
            .shared_endpoint(limit),
    );
    if providers.len() >= 64 && providers.len().is_power_of_two() {
        // Forget settings no broker uses any more (amortised).
        providers.retain(|_, same| same.iter().any(|weak| weak.strong_count() > 0));
    }
    providers
        .entry((token_url, client_id, timeout))
        .or_default()
        .push(Arc::downgrade(&provider));
    provider
}
