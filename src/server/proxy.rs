//! An auth-injecting reverse proxy: any HTTP client (an OpenAI SDK, curl, a
//! gateway configured with a base URL and an API key) uses a profile
//! without knowing OAuth.
//!
//! For every request the proxy drops the client's `Authorization` (and, for
//! a codex profile, `ChatGPT-Account-Id`), sets `Authorization: Bearer
//! <the profile's token>` (and the account id), drops hop-by-hop headers,
//! and forwards the rest to the upstream, the request's path appended to
//! the upstream's. Bodies stream both ways without buffering; a client
//! that disconnects cancels the upstream request. When the upstream answers
//! 401, the token that was sent is rejected (one refresh however many
//! requests got the 401) and a request whose body was small enough to keep
//! is sent once more with the new token.
//!
//! Clients authenticate with the client key (`Authorization: Bearer <key>`,
//! that is, the key is their API key), generated on first start into
//! [`ClientKey::default_path`].
//!
//! ```no_run
//! use token_broker::server::config::ProxyConfig;
//! use token_broker::server::proxy::{ClientKey, Proxy};
//! use token_broker::TokenBroker;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = TokenBroker::codex().keep_fresh(true).build()?;
//! let config = ProxyConfig::new(
//!     "codex",
//!     "127.0.0.1:8788".parse()?,
//!     "https://chatgpt.com/backend-api/codex",
//! );
//! let key = ClientKey::load_or_create(&ClientKey::default_path().ok_or("no HOME")?)?;
//! let proxy = Proxy::bind("codex", config, broker.clone(), Some(key)).await?;
//! println!("listening on http://{}", proxy.local_addr());
//! proxy.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! broker.finish().await?;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt, TryStream};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::watch;

use super::config::ProxyConfig;
use super::daemon::Shared;
use super::h1pool::H1Pool;
use super::metrics::{Metrics, ProxyMetrics};
use super::TokenReply;
use crate::credentials::{AccessToken, Secret};
use crate::{BrokerError, Dialect, TokenBroker};
use prometheus_client::metrics::counter::Counter;

/// The header a codex upstream reads the account from.
const ACCOUNT_HEADER: HeaderName = HeaderName::from_static("chatgpt-account-id");

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A setting is wrong.
    #[error("proxy {name}: {message}")]
    Config {
        /// The proxy.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Its address could not be bound.
    #[error("proxy {name}: could not listen on {addr}: {source}")]
    Listen {
        /// The proxy.
        name: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The client key could not be read or made.
    #[error("the proxies' client key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The key clients of the proxies send as their API key.
#[derive(Clone)]
pub struct ClientKey {
    key: Secret,
    path: PathBuf,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// `$XDG_STATE_HOME/token-broker/client-key`, else
    /// `~/.local/state/token-broker/client-key`.
    pub fn default_path() -> Option<PathBuf> {
        Some(super::config::state_dir()?.join("client-key"))
    }

    /// Reads the key at `path`, or makes one there (32 random bytes,
    /// base64url, in a 0600 file; the folder made 0700). A key file that
    /// other users may read is refused.
    pub fn load_or_create(path: &Path) -> Result<ClientKey, ProxyError> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
        let fail = |message: String| ProxyError::Key {
            path: path.to_path_buf(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("could not create its folder: {e}")))?;
        }
        if std::fs::symlink_metadata(path).is_err() {
            // Made whole in a temporary file and linked into place, so that
            // a proxy starting at the same moment never reads it half
            // written: the first link wins, the others read its key.
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut temp = tempfile::Builder::new()
                .prefix(".client-key.")
                .permissions(std::fs::Permissions::from_mode(0o600))
                .tempfile_in(dir)
                .map_err(|e| fail(format!("could not create it: {e}")))?;
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| fail(format!("no randomness for a new key: {e}")))?;
            let key = {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
            };
            temp.write_all(format!("{key}\n").as_bytes())
                .and_then(|()| temp.as_file().sync_all())
                .map_err(|e| fail(format!("could not write it: {e}")))?;
            match std::fs::hard_link(temp.path(), path) {
                Ok(()) => {
                    return Ok(ClientKey {
                        key: Secret::new(key),
                        path: path.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(fail(format!("could not create it: {e}"))),
            }
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| fail(format!("could not open it: {e}")))?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != me || meta.mode() & 0o077 != 0 {
            return Err(fail(format!(
                "must be a file owned by uid {me} that only its owner can read (`chmod 600` it); it is {:04o} owned by uid {}",
                meta.mode() & 0o7777,
                meta.uid()
            )));
        }
        let mut text = String::new();
        use std::io::Read;
        file.take(4096)
            .read_to_string(&mut text)
            .map_err(|e| fail(format!("could not read it: {e}")))?;
        let key = text.trim();
        if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(fail(
                "does not hold a key (at least 16 printable characters); delete it to have a new one made".into(),
            ));
        }
        Ok(ClientKey {
            key: Secret::new(key),
            path: path.to_path_buf(),
        })
    }

    /// A key given directly (tests, embedders).
    pub fn new(key: impl Into<std::sync::Arc<str>>, path: impl Into<PathBuf>) -> Self {
        ClientKey {
            key: Secret::new(key),
            path: path.into(),
        }
    }

    /// Where the key is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key, for a client's configuration.
    pub fn expose(&self) -> &str {
        self.key.expose()
    }

    /// Whether `headers` carry the key as a bearer token (in constant time).
    /// On the header's bytes: the key is base64url, so a value that is not
    /// visible ASCII cannot match it anyway, and checking that first (as
    /// `to_str` does) doubled the cost of the check on every request.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(sent) = headers.get(header::AUTHORIZATION).and_then(|v| bearer(v.as_bytes())) else {
            return false;
        };
        same_in_constant_time(sent, self.key.expose().as_bytes())
    }
}

/// `a == b`, in a time that depends on their lengths alone (never on
/// where they first differ): the XOR of each 8-byte word is gathered
/// behind an optimisation barrier (`black_box`) so that the compiler
/// cannot stop at the first difference. A word at a time, not a byte at
/// a time as `subtle` does: its barrier for each of the key's 43 bytes
/// cost more than the rest of the check.
fn same_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let mut differ = 0u64;
    for (x, y) in a_words.iter().zip(b_words) {
        differ = std::hint::black_box(differ | (u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y)));
    }
    for (x, y) in a_rest.iter().zip(b_rest) {
        differ = std::hint::black_box(differ | u64::from(x ^ y));
    }
    differ == 0
}

/// The credentials of an `Authorization: Bearer <credentials>` value (the
/// scheme in any case), without the blanks around them.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    (scheme.eq_ignore_ascii_case(b"bearer") && rest.first() == Some(&b' ')).then(|| rest.trim_ascii())
}

/// Where a proxy gets its tokens.
pub(crate) enum Source {
    /// A profile of the daemon, looked up at every request (so that a
    /// reload's restarted broker is used).
    Daemon { shared: Arc<Shared>, profile: String },
    /// A broker of its own (`token-broker proxy`).
    Broker {
        broker: TokenBroker,
        meta: Mutex<Option<TokenReply>>,
    },
}

/// A token to send, and whether its profile speaks the Codex dialect (its
/// upstream then gets the account id too).
struct Sending {
    reply: TokenReply,
    codex: bool,
}

impl Source {
    async fn token(&self) -> Result<Sending, BrokerError> {
        match self {
            Source::Daemon { shared, profile } => {
                let slot = shared.slot(profile).ok_or_else(|| gone(profile))?;
                Ok(Sending {
                    reply: shared.serve_token(&slot).await?,
                    codex: slot.profile.provider == Dialect::Codex,
                })
            }
            Source::Broker { broker, meta } => {
                let token = broker.token().await?;
                Ok(Sending {
                    reply: super::reply_cached(meta, broker, token).await,
                    codex: broker.dialect() == Dialect::Codex,
                })
            }
        }
    }

    async fn reject(&self, sent: &AccessToken) -> Result<Sending, BrokerError> {
        match self {
            Source::Daemon { shared, profile } => {
                let slot = shared.slot(profile).ok_or_else(|| gone(profile))?;
                Ok(Sending {
                    reply: shared.serve_reject(&slot, sent).await?,
                    codex: slot.profile.provider == Dialect::Codex,
                })
            }
            Source::Broker { broker, meta } => {
                let token = broker.reject(sent).await?;
                Ok(Sending {
                    reply: super::reply_cached(meta, broker, token).await,
                    codex: broker.dialect() == Dialect::Codex,
                })
            }
        }
    }
}

fn gone(profile: &str) -> BrokerError {
    BrokerError::Config(format!(
        "the profile {profile:?} is no longer in the daemon's configuration"
    ))
}

/// One proxy's shared state.
struct Inner {
    name: String,
    config: ProxyConfig,
    upstream: Upstream,
    source: Source,
    key: Option<ClientKey>,
    /// The client to an `https://` upstream (HTTP/1.1 or HTTP/2 through
    /// ALPN).
    client: Client,
    /// The connections to a plain `http://` upstream (always HTTP/1.1):
    /// hyper-util's pool costs more than the rest of the client.
    pool: Option<Arc<H1Pool<Up>>>,
    metrics: ProxyMetrics,
    /// A token fetched because of a 401 that the upstream refused at once
    /// too (on the retry), and when.
    refused_fresh: Mutex<Option<(AccessToken, Instant)>>,
    /// The headers made for the last token sent.
    headers: Mutex<Option<(TokenReply, HeaderValue, Option<HeaderValue>)>>,
    /// The last request target (its path and query as the client sent
    /// them) and the upstream URI made of it: clients mostly ask the same
    /// path, and a clone of the URI made once is a reference count where
    /// making it is an allocation, a parse and, at its first clone,
    /// another allocation.
    last_target: Mutex<Option<(Box<str>, Uri)>>,
}

/// The client to the upstream.
type Client = hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Up>;

/// The upstream URL split once: a request's URI is its parts and the
/// request's path and query.
struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// Its path without a trailing `/`.
    base: String,
    /// The `Host` header of a plain `http://` upstream (always HTTP/1.1),
    /// made once: the client would format it for every request when the
    /// port is not the default. None for `https://`, where the connection
    /// may be HTTP/2 (no `Host`, the authority goes in `:authority`): the
    /// client then sets it on HTTP/1.1 connections.
    host: Option<HeaderValue>,
}

impl Upstream {
    fn new(url: &reqwest::Url) -> Option<Upstream> {
        let scheme = Scheme::try_from(url.scheme()).ok()?;
        let authority = Authority::try_from(url.authority()).ok()?;
        // As the client makes it: the host, and the port unless it is the
        // scheme's default (the URL parser dropped a default port already).
        let host = (scheme == Scheme::HTTP)
            .then(|| {
                let host = authority.host();
                let value = match authority.port_u16() {
                    Some(port) if port != 80 => format!("{host}:{port}"),
                    _ => host.to_owned(),
                };
                HeaderValue::from_str(&value).ok()
            })
            .flatten();
        Some(Upstream {
            scheme,
            authority,
            base: url.path().trim_end_matches('/').to_owned(),
            host,
        })
    }

    /// The upstream's path joined with the request's path, and its query:
    /// in origin form (the path and query alone) for a plain `http://`
    /// upstream, whose requests go through [`H1Pool`] straight to a
    /// connection; with the scheme and authority for the client otherwise.
    fn target(&self, uri: &Uri, origin: bool) -> Option<Uri> {
        let path = uri.path();
        let query = uri.query();
        let mut joined = String::with_capacity(self.base.len() + path.len() + query.map_or(0, |q| q.len() + 1));
        joined.push_str(&self.base);
        if path != "/" || self.base.is_empty() {
            joined.push_str(path);
        }
        if joined.is_empty() {
            joined.push('/');
        }
        if let Some(query) = query {
            joined.push('?');
            joined.push_str(query);
        }
        let mut parts = hyper::http::uri::Parts::default();
        if !origin {
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
        }
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(joined)).ok()?);
        Uri::from_parts(parts).ok()
    }
}

/// How long a token fetched because of a 401, and refused at once too, is
/// not rejected again.
const REFUSED_AGAIN_QUIET: Duration = Duration::from_secs(60);

impl Inner {
    /// Whether a 401 for `token` may make the broker refresh: not when
    /// `token` was fetched because of a 401 and the upstream refused it at
    /// once too, less than a minute ago. An upstream that refuses every
    /// token (a wrong URL, another account) then costs one refresh a
    /// minute, not one per request.
    fn may_reject(&self, token: &AccessToken) -> bool {
        match &*self.refused_fresh.lock() {
            Some((fresh, at)) if fresh == token && at.elapsed() < REFUSED_AGAIN_QUIET => {
                tracing::warn!(
                    proxy = %self.name,
                    upstream = %self.config.upstream,
                    "the upstream refuses a token refreshed for it moments ago; not refreshing again for a minute: check the upstream URL and the profile's account"
                );
                false
            }
            _ => true,
        }
    }

    /// The `Authorization` value for `sending`'s token and, for a codex
    /// profile, its `ChatGPT-Account-Id`: made once per token, then cloned
    /// (a reference count).
    fn token_headers(&self, sending: &Sending) -> Result<(HeaderValue, Option<HeaderValue>), Refusal> {
        let token = &sending.reply;
        if let Some((cached, bearer, account)) = &*self.headers.lock() {
            if cached.access_token.expose() == token.access_token.expose()
                && cached.account_id == token.account_id
                && account.is_some() == (sending.codex && token.account_id.is_some())
            {
                return Ok((bearer.clone(), account.clone()));
            }
        }
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.access_token.expose())).map_err(|_| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "bad_token",
                "the profile's access token cannot be sent in a header",
            )
        })?;
        bearer.set_sensitive(true);
        let account = match token.account_id.as_deref() {
            // Never sent without it: the upstream would pick its default
            // account.
            Some(account) if sending.codex => Some(HeaderValue::from_str(account).map_err(|_| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "bad_account",
                    "the profile's account id cannot be sent in a header; check the credentials file",
                )
            })?),
            _ => None,
        };
        *self.headers.lock() = Some((token.clone(), bearer.clone(), account.clone()));
        Ok((bearer, account))
    }

    /// The upstream URI for the client's `uri`: the last one again when
    /// the client asks the same path and query.
    fn target(&self, uri: &Uri) -> Option<Uri> {
        let Some(asked) = uri.path_and_query() else {
            return self.upstream.target(uri, self.pool.is_some());
        };
        if let Some((last, url)) = &*self.last_target.lock() {
            if **last == *asked.as_str() {
                return Some(url.clone());
            }
        }
        let url = self.upstream.target(uri, self.pool.is_some())?;
        // Cloned once here, so that its bytes are shared from now on (and
        // the key copied: the request's bytes are its connection's buffer).
        *self.last_target.lock() = Some((asked.as_str().into(), url.clone()));
        Some(url)
    }

    fn refused_at_once(&self, fresh: &AccessToken) {
        *self.refused_fresh.lock() = Some((fresh.clone(), Instant::now()));
    }
}

/// A proxy bound to its address.
pub struct Proxy {
    listener: tokio::net::TcpListener,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("name", &self.inner.name)
            .field("listen", &self.local_addr())
            .field("upstream", &self.inner.config.upstream)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy of its own broker (as `token-broker proxy` runs): checks the
    /// settings and binds the address. `key` is required unless
    /// `config.require_client_key` is off. Call inside a tokio runtime.
    pub async fn bind(
        name: &str,
        config: ProxyConfig,
        broker: TokenBroker,
        key: Option<ClientKey>,
    ) -> Result<Proxy, ProxyError> {
        let source = Source::Broker {
            broker,
            meta: Mutex::new(None),
        };
        Proxy::bind_with(name, config, source, key, &Metrics::new()).await
    }

    pub(crate) async fn bind_with(
        name: &str,
        config: ProxyConfig,
        source: Source,
        key: Option<ClientKey>,
        metrics: &Metrics,
    ) -> Result<Proxy, ProxyError> {
        let fail = |message: String| ProxyError::Config {
            name: name.to_owned(),
            message,
        };
        config.check().map_err(fail)?;
        if config.require_client_key && key.is_none() {
            return Err(fail("require_client_key is on but no client key was given".into()));
        }
        let upstream = reqwest::Url::parse(&config.upstream)
            .ok()
            .as_ref()
            .and_then(Upstream::new)
            .ok_or_else(|| fail("upstream is not a URL".into()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let pool = (upstream.scheme == Scheme::HTTP)
            .then(|| {
                let target = Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(upstream.authority.clone())
                    .path_and_query("/")
                    .build()
                    .ok()?;
                let mut builder = hyper::client::conn::http1::Builder::new();
                if let Some(cap) = header_cap(&config) {
                    builder.max_headers(cap);
                }
                Some(H1Pool::new(http.clone(), target, builder, config.max_connections))
            })
            .flatten();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut client = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
        client
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new());
        if let Some(cap) = header_cap(&config) {
            client.http1_max_headers(cap);
        }
        let client = client.build(https);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ProxyError::Listen {
                name: name.to_owned(),
                addr: config.listen,
                source,
            })?;
        Ok(Proxy {
            listener,
            inner: Arc::new(Inner {
                name: name.to_owned(),
                metrics: metrics.for_proxy(name),
                config,
                upstream,
                source,
                key,
                client,
                pool,
                refused_fresh: Mutex::new(None),
                headers: Mutex::new(None),
                last_target: Mutex::new(None),
            }),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its upstream.
    pub fn upstream(&self) -> &str {
        &self.inner.config.upstream
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.inner.config.listen)
    }

    /// Serves until `stop` completes, then lets the requests under way end
    /// (a stream still flowing is cut after 10 s).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let (stopping, stopped) = watch::channel(false);
        self.serve(stopped, stop).await;
        let _ = stopping.send(true);
    }

    /// The accept loop; `stopped` is the daemon's stop signal for the
    /// connections.
    pub(crate) async fn serve(self, stopped: watch::Receiver<bool>, stop: impl std::future::Future<Output = ()>) {
        let Proxy { listener, inner } = self;
        let limit = Arc::new(tokio::sync::Semaphore::new(inner.config.max_connections));
        let (alive, mut open) = tokio::sync::mpsc::channel::<()>(1);
        let service = {
            let inner = inner.clone();
            hyper::service::service_fn(move |request| {
                let inner = inner.clone();
                async move { Ok::<_, std::convert::Infallible>(forward(&inner, request).await) }
            })
        };
        let mut stop = std::pin::pin!(stop);
        loop {
            // At most max_connections at once: the others wait in the
            // kernel's backlog.
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = &mut stop => break,
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stop => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(proxy = %inner.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (service, stopped, alive) = (service.clone(), stopped.clone(), alive.clone());
            tokio::spawn(async move {
                super::daemon::serve_http1(stream, service, stopped, alive).await;
                drop(permit);
            });
        }
        drop(listener);
        drop(alive);
        // Wait for the connections once the caller signals the stop.
        let _ = tokio::time::timeout(super::daemon::HEADER_TIMEOUT + Duration::from_secs(1), async {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
            open.recv().await
        })
        .await;
    }
}

/// An error the proxy answers itself, in OpenAI's error shape so that SDKs
/// print the message.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<BrokerError> for Refusal {
    fn from(e: BrokerError) -> Self {
        let api = super::api::ApiError::from(e);
        Refusal {
            status: api.status,
            code: api.code,
            message: api.message,
            retry_after: api.retry_after,
        }
    }
}

impl Refusal {
    fn into_response(self) -> Response<Out> {
        let body = json!({
            "error": {"type": "token_broker", "code": self.code, "message": self.message}
        });
        let mut response = Response::new(Out::full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(after) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, super::api::retry_after(after));
        }
        response
    }
}

/// Every request: checked, given the token, forwarded, streamed back.
async fn forward(inner: &Inner, request: Request<Incoming>) -> Response<Out> {
    let response = match proxy(inner, request).await {
        Ok(response) => response,
        Err(refusal) => refusal.into_response(),
    };
    inner.metrics.request(response.status().as_u16());
    response
}

async fn proxy(inner: &Inner, request: Request<Incoming>) -> Result<Response<Out>, Refusal> {
    if let Some(key) = &inner.key {
        if !key.admits(request.headers()) {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "invalid_client_key",
                format!(
                    "this proxy needs its client key as the API key (Authorization: Bearer <key>); the key is in {}",
                    key.path().display()
                ),
            ));
        }
    }
    let (parts, body) = request.into_parts();
    if matches!(parts.method, hyper::Method::CONNECT | hyper::Method::TRACE) {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this proxy does not forward {}", parts.method),
        ));
    }
    if !plain_path(parts.uri.path()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request's path must be a plain absolute path: no `.` or `..` segments (even percent-encoded), no backslash",
        ));
    }
    let url = inner.target(&parts.uri).ok_or_else(|| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request's path cannot be forwarded",
        )
    })?;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let headers = forwarded(parts.headers);
    let body = Kept::read(body, declared, inner.config.retry_body_limit, &inner.metrics).await?;
    let sent = inner.source.token().await?;
    // A kept body can be sent again after a 401, with the same headers.
    let (first_body, kept) = match body {
        Kept::Whole(bytes) => (Up::Whole(Some(bytes.clone())), Some((bytes, headers.clone()))),
        Kept::Streamed(body) => (body, None),
    };
    let (first, back) = send(inner, &parts.method, &url, headers, first_body, &sent).await?;
    if first.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The client's Upgrade is never forwarded: an upgrade nobody asked
        // for would leave the client's connection dead.
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            "upstream_upgrade",
            "the upstream switched protocols unasked; this proxy forwards HTTP requests only",
        ));
    }
    if first.status() != StatusCode::UNAUTHORIZED {
        return Ok(stream_back(inner, first, back).await);
    }
    if !inner.may_reject(&sent.reply.access_token) {
        // The token a 401 just made us fetch is refused too: the upstream's
        // doing (a wrong URL or account), which another refresh would not
        // mend. The client sees the 401.
        return Ok(stream_back(inner, first, back).await);
    }
    let Some((bytes, headers)) = kept else {
        // Too large to send again: the client sees the 401, once the
        // token is refreshed, so that its retry goes with the new one.
        let _ = inner.source.reject(&sent.reply.access_token).await;
        return Ok(stream_back(inner, first, back).await);
    };
    // Its body unread: the connection is closed, not given back.
    drop((first, back));
    let fresh = inner.source.reject(&sent.reply.access_token).await?;
    inner.metrics.retry();
    let (second, back) = send(inner, &parts.method, &url, headers, Up::Whole(Some(bytes)), &fresh).await?;
    if second.status() == StatusCode::UNAUTHORIZED {
        inner.refused_at_once(&fresh.reply.access_token);
    }
    Ok(stream_back(inner, second, back).await)
}

/// Whether `path` stays under the upstream's base path wherever it is
/// resolved: it starts with `/` and has no `.` or `..` segment (`%2e` counts
/// as a dot) and no backslash.
fn plain_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    // Mostly there is nothing to look at: no dot, percent sign or
    // backslash (one pass over the bytes instead of one per segment).
    if !rest.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    rest.split('/').all(|segment| {
        let b = segment.as_bytes();
        // Dots, each written `.` or `%2e`: one or two of them alone make a
        // segment that climbs.
        let (mut dots, mut i, mut only_dots) = (0, 0, true);
        while i < b.len() {
            match b[i] {
                b'\\' => return false,
                b'%' if b.len() >= i + 3 && b[i + 1] == b'5' && b[i + 2].eq_ignore_ascii_case(&b'c') => return false,
                b'%' if b.len() >= i + 3 && b[i + 1] == b'2' && b[i + 2].eq_ignore_ascii_case(&b'e') => {
                    dots += 1;
                    i += 3;
                    continue;
                }
                b'.' => dots += 1,
                _ => only_dots = false,
            }
            i += 1;
        }
        !(only_dots && (dots == 1 || dots == 2))
    })
}

/// The cap on an upstream answer's header fields to give hyper's HTTP/1
/// client: none at the default of 100, which is hyper's own. hyper parses
/// an answer's head into two arrays of that many slots: at its default
/// they sit on the stack untouched, while any cap it is given, even 100,
/// is two vectors filled slot by slot and, above 100, allocated and freed
/// at every answer (at 256, about 2,500 instructions and 16 KB written an
/// answer, a twelfth of the proxy's work on a small one).
fn header_cap(config: &ProxyConfig) -> Option<usize> {
    (config.max_upstream_headers != crate::server::config::DEFAULT_MAX_UPSTREAM_HEADERS)
        .then_some(config.max_upstream_headers)
}

/// Whether `name` is a hop-by-hop header (RFC 9110 section 7.6.1): a
/// match on its text, for the loops over every header of every request
/// and answer (`contains` on a `const` array of the names makes and drops
/// the array at each call: about 400 instructions a request; on a `static`
/// one it compares each name in full: more).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Removes the hop-by-hop headers from `headers`, and those its
/// `Connection` header names.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    // Mostly there is none: one pass over the names instead of a lookup
    // of each of the nine.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Those there (mostly `Transfer-Encoding` alone), not a lookup of
    // each of the nine.
    let mut named = connection_named(headers);
    named.extend(headers.keys().filter(|name| is_hop_by_hop(name)).cloned());
    for name in &named {
        headers.remove(name);
    }
}

/// The header names `headers`' `Connection` header lists (hop-by-hop
/// too); none, and nothing allocated, without a `Connection` header.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    if !headers.keys().any(|name| name == header::CONNECTION) {
        return Vec::new();
    }
    // On the bytes: a value with a byte that is not ASCII (obs-text, which
    // HTTP/1.1 parsers accept) still names the others.
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .collect()
}

/// The client's headers the upstream never gets: the hop-by-hop ones,
/// `Expect` (the proxy reads the body itself) and [`ACCOUNT_HEADER`] (a
/// codex profile's own is set). Its `Host` and `Authorization` are
/// replaced in [`send`].
fn dropped(name: &HeaderName) -> bool {
    is_hop_by_hop(name) || matches!(name.as_str(), "expect" | "chatgpt-account-id")
}

/// The client's headers as the upstream gets them (before [`send`] sets
/// the token, the account and the `Host`): changed in place, since mostly
/// there is nothing to remove (a new map cost a hash and an append for
/// each header that stays).
fn forwarded(mut headers: HeaderMap) -> HeaderMap {
    let (mut some_dropped, mut agent, mut accept) = (false, false, false);
    for name in headers.keys() {
        some_dropped |= dropped(name);
        agent |= name == header::USER_AGENT;
        accept |= name == header::ACCEPT;
    }
    if some_dropped {
        let mut named = connection_named(&headers);
        named.extend(headers.keys().filter(|name| dropped(name)).cloned());
        for name in &named {
            headers.remove(name);
        }
        // `Connection` may have named either.
        agent = headers.contains_key(header::USER_AGENT);
        accept = headers.contains_key(header::ACCEPT);
    }
    // What the upstream's client set when the client's request had none.
    if !agent {
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("token-broker/", env!("CARGO_PKG_VERSION"))),
        );
    }
    if !accept {
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    }
    headers
}

/// A request body: kept whole when it is small enough to send twice, else
/// streamed through.
enum Kept {
    Whole(Bytes),
    Streamed(Up),
}

impl Kept {
    async fn read(
        body: Incoming,
        declared: Option<u64>,
        limit: usize,
        metrics: &ProxyMetrics,
    ) -> Result<Kept, Refusal> {
        if declared.is_some_and(|n| n > limit as u64) {
            return Ok(Kept::Streamed(Up::streamed(None, body, metrics)));
        }
        let mut body = body;
        // A body that came in one frame is kept as it came, not copied.
        let mut kept = Held::Nothing;
        loop {
            if body.is_end_stream() {
                // Known to have ended (its length reached): no wait for
                // the end.
                metrics.bytes_up(kept.len());
                return Ok(Kept::Whole(kept.take().unwrap_or_default()));
            }
            let Ok(frame) = tokio::time::timeout(BODY_IDLE, body.frame()).await else {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body stalled for {}",
                        crate::status::human_duration(BODY_IDLE)
                    ),
                ));
            };
            match frame {
                None => {
                    metrics.bytes_up(kept.len());
                    return Ok(Kept::Whole(kept.take().unwrap_or_default()));
                }
                Some(Err(_)) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "the request body broke off",
                    ))
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    kept.push(data);
                    if kept.len() > limit {
                        metrics.bytes_up(kept.len());
                        return Ok(Kept::Streamed(Up::streamed(kept.take(), body, metrics)));
                    }
                }
            }
        }
    }
}

/// A request body as the upstream gets it.
enum Up {
    /// Kept whole (taken when sent).
    Whole(Option<Bytes>),
    /// Streamed from the client (boxed: a request and its body are moved
    /// a dozen times on their way through the client, and most bodies are
    /// kept ones).
    Streamed(Box<Upload>),
}

/// A request body streamed from the client: what was read already, then
/// the rest.
struct Upload {
    head: Option<Bytes>,
    rest: Incoming,
    /// The bytes sent up.
    up: Counter,
    /// Ends the upload when the client sends nothing this long (made
    /// at the first wait: the token fetch and the connection come
    /// before).
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Told when the body has been sent whole (or dropped).
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How long a client may send nothing in the middle of a request body.
const BODY_IDLE: Duration = Duration::from_secs(20);

/// A request body that stalled for [`BODY_IDLE`].
#[derive(Debug)]
struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body stalled for {}",
            crate::status::human_duration(BODY_IDLE)
        )
    }
}

impl std::error::Error for Stalled {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Up {
    fn streamed(head: Option<Bytes>, rest: Incoming, metrics: &ProxyMetrics) -> Up {
        Up::Streamed(Box::new(Upload {
            head,
            rest,
            up: metrics.up(),
            idle: None,
            sent: None,
        }))
    }

    /// A receiver told once the body has been sent whole; none for a kept
    /// body (it goes in one write, with the head).
    fn when_sent(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        match self {
            Up::Whole(_) => None,
            Up::Streamed(upload) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                upload.sent = Some(tx);
                Some(rx)
            }
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Up::Streamed(upload) = self {
            if let Some(sent) = upload.sent.take() {
                let _ = sent.send(());
            }
        }
    }
}

impl Body for Up {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Up::Whole(bytes) => Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            Up::Streamed(upload) => {
                let Upload {
                    head,
                    rest,
                    up,
                    idle,
                    sent,
                } = &mut **upload;
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                match Pin::new(rest).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            up.inc_by(data.len() as u64);
                        }
                        if let Some(idle) = idle {
                            idle.as_mut().reset(tokio::time::Instant::now() + BODY_IDLE);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(None) => {
                        if let Some(sent) = sent.take() {
                            let _ = sent.send(());
                        }
                        Poll::Ready(None)
                    }
                    Poll::Pending => match std::future::Future::poll(
                        idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(BODY_IDLE)))
                            .as_mut(),
                        cx,
                    ) {
                        Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled)))),
                        Poll::Pending => Poll::Pending,
                    },
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Up::Whole(bytes) => bytes.as_ref().is_none_or(|b| b.is_empty()),
            Up::Streamed(upload) => upload.head.is_none() && upload.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Up::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Up::Streamed(upload) => {
                let Upload { head, rest, .. } = &**upload;
                let before = head.as_ref().map_or(0, |b| b.len() as u64);
                let rest = rest.size_hint();
                match rest.exact() {
                    Some(n) => SizeHint::with_exact(n + before),
                    None => {
                        let mut hint = SizeHint::new();
                        hint.set_lower(rest.lower() + before);
                        hint
                    }
                }
            }
        }
    }
}

/// An answer's body as the client gets it: what was there already when
/// its head was, then the rest.
struct Out {
    first: Option<Result<Bytes, hyper::Error>>,
    ended: bool,
    rest: Rest,
}

impl Out {
    fn full(bytes: Bytes) -> Out {
        Out {
            first: None,
            ended: false,
            rest: Rest::Full(Some(bytes)),
        }
    }

    /// `rest` with what it has already (within [`AHEAD_TURNS`] turns of the
    /// scheduler) taken ahead, so that it leaves with the head: the server
    /// writes the head at once when the body is not ready at its first
    /// poll, a write of its own (and a wake-up and a read for the client).
    async fn ahead(mut rest: Rest) -> Out {
        let mut turns = 0;
        // Some(frame) when one came (or the end, or an error), None when
        // nothing is there yet.
        let first = std::future::poll_fn(|cx| match Pin::new(&mut rest).poll_frame(cx) {
            Poll::Ready(polled) => Poll::Ready(Some(polled)),
            Poll::Pending if turns < AHEAD_TURNS => {
                turns += 1;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        let (first, ended) = match first {
            Some(None) => (None, true),
            Some(Some(Ok(frame))) => (frame.into_data().ok().map(Ok), false),
            Some(Some(Err(e))) => (Some(Err(e)), false),
            None => (None, false),
        };
        Out { first, ended, rest }
    }
}

/// The most turns of the scheduler [`Out::ahead`] waits for the first
/// bytes of an answer.
const AHEAD_TURNS: u8 = 64;

impl Body for Out {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first.map(Frame::data)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.ended || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let first = match &self.first {
            Some(Ok(b)) => b.len() as u64,
            _ => 0,
        };
        if self.ended {
            return SizeHint::with_exact(first);
        }
        let rest = self.rest.size_hint();
        match rest.exact() {
            Some(n) => SizeHint::with_exact(n + first),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + first);
                hint
            }
        }
    }
}

/// An answer's body after its first bytes.
enum Rest {
    /// The proxy's own answer.
    Full(Option<Bytes>),
    /// The upstream's, of a known length: as it comes.
    Sized {
        body: Incoming,
        down: Counter,
        back: Option<Back>,
    },
    /// The upstream's, streamed (SSE): coalesced.
    Streamed {
        body: Coalesce<http_body_util::BodyDataStream<Incoming>>,
        down: Counter,
        back: Option<Back>,
    },
}

/// The pooled connection an answer came on, given back when its body has
/// been read to the end (else dropped, and the connection closed).
struct Back {
    pool: Arc<H1Pool<Up>>,
    sender: hyper::client::conn::http1::SendRequest<Up>,
}

impl Rest {
    /// Gives the connection back once the body has ended.
    fn give_back_at_end(&mut self) {
        let back = match self {
            Rest::Sized { body, back, .. } if body.is_end_stream() => back.take(),
            Rest::Streamed { body, back, .. } if body.is_ended() => back.take(),
            _ => None,
        };
        if let Some(Back { pool, sender }) = back {
            pool.put(sender);
        }
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self {
            Rest::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Rest::Sized { body, down, .. } => loop {
                // The upstream's trailers are not passed on.
                match std::task::ready!(Pin::new(&mut *body).poll_frame(cx)) {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            down.inc_by(data.len() as u64);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Err(_) => continue,
                    },
                    other => return Poll::Ready(other),
                }
            },
            Rest::Streamed { body, down, .. } => {
                let polled = std::task::ready!(body.poll_next_unpin(cx));
                Poll::Ready(polled.map(|chunk| {
                    chunk.map(|data| {
                        down.inc_by(data.len() as u64);
                        Frame::data(data)
                    })
                }))
            }
        }
    }
}

impl Body for Rest {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_body(cx);
        // The server polls no more once the body says it has ended (after
        // the last frame of a known length), so that is checked at each
        // frame, not at the end only.
        if let Poll::Ready(None | Some(Ok(_))) = &polled {
            this.give_back_at_end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Rest::Full(bytes) => bytes.is_none(),
            Rest::Sized { body, .. } => body.is_end_stream(),
            Rest::Streamed { body, .. } => body.is_ended(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Rest::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Rest::Sized { body, .. } => body.size_hint(),
            Rest::Streamed { .. } => SizeHint::default(),
        }
    }
}

async fn send(
    inner: &Inner,
    method: &hyper::Method,
    url: &Uri,
    mut headers: HeaderMap,
    body: Up,
    sending: &Sending,
) -> Result<(Response<Incoming>, Option<Back>), Refusal> {
    let (bearer, account) = inner.token_headers(sending)?;
    match &inner.upstream.host {
        Some(host) => headers.insert(header::HOST, host.clone()),
        // The client sets the upstream's.
        None => headers.remove(header::HOST),
    };
    headers.insert(header::AUTHORIZATION, bearer);
    if let Some(account) = account {
        headers.insert(ACCOUNT_HEADER, account);
    }
    let mut body = body;
    let uploaded = body.when_sent();
    // A streamed upload's connection is not given back: the answer may
    // end before the upload does, and the next request would wait for it.
    let whole = uploaded.is_none();
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = url.clone();
    *request.headers_mut() = headers;
    let request = async {
        match &inner.pool {
            Some(pool) => pool.send(request).await.map(|(response, sender)| {
                let back = whole.then(|| Back {
                    pool: pool.clone(),
                    sender,
                });
                (response, back)
            }),
            None => inner
                .client
                .request(request)
                .await
                .map(|response| (response, None))
                .map_err(BoxError::from),
        }
    };
    let started = Instant::now();
    let timeout = inner.config.response_timeout;
    // The wait for the answer's head starts once the body is sent: a slow
    // upload in flight is never cut.
    let deadline = async {
        if let Some(uploaded) = uploaded {
            let _ = uploaded.await;
        }
        tokio::time::sleep(timeout).await;
    };
    let answered = tokio::select! {
        // No random pick between the two at every poll.
        biased;
        answered = request => Ok(answered),
        () = deadline => Err(()),
    };
    let response = match answered {
        Ok(Ok(response)) => response,
        Ok(Err(e)) if stalled(&*e) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                Stalled.to_string(),
            ))
        }
        Ok(Err(e)) if timed_out(&*e) => return Err(upstream_timeout(inner, "connecting")),
        Ok(Err(e)) if head_too_large(&*e) => {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_head_too_large",
                format!(
                    "the upstream {} answered with a head this proxy will not read: more than {} header fields \
                     (raise max_upstream_headers, or --max-upstream-headers, if that upstream is trusted) \
                     or too many bytes",
                    inner.config.upstream, inner.config.max_upstream_headers
                ),
            ))
        }
        Ok(Err(e)) => {
            return Err(Refusal::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!(
                    "the upstream {} could not be reached: {}",
                    inner.config.upstream,
                    error_chain(&*e)
                ),
            ))
        }
        Err(_) => return Err(upstream_timeout(inner, "waiting for its response")),
    };
    inner.metrics.upstream_latency(started.elapsed());
    Ok(response)
}

/// `e` and its causes, outermost first.
fn causes<'a>(e: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// Whether `e` is a client's request body that stalled.
fn stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|e| e.is::<Stalled>())
}

/// Whether `e` is an upstream answer whose head hyper refused to read:
/// more header fields than the cap, or more bytes than its buffer.
fn head_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
    })
}

/// Whether `e` is the connect timeout.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// `e` and its causes, each once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    for cause in causes(e).skip(1) {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
    }
    text
}

fn upstream_timeout(inner: &Inner, doing: &str) -> Refusal {
    Refusal::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_timeout",
        format!("the upstream {} timed out ({doing})", inner.config.upstream),
    )
}

/// The upstream's answer, streamed to the client as it comes.
async fn stream_back(inner: &Inner, upstream: Response<Incoming>, back: Option<Back>) -> Response<Out> {
    let (parts, body) = upstream.into_parts();
    let mut headers = parts.headers;
    // Framed by its transfer coding: a Content-Length beside it is stale
    // (RFC 9112 section 6.3) and would cut the body short.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    drop_hop_by_hop(&mut headers);
    let down = inner.metrics.down();
    // A body of a known length leaves as the upstream sends it (the
    // server ends it by its length, without waiting); a streamed one
    // (SSE) is coalesced.
    let body = if headers.contains_key(header::CONTENT_LENGTH) {
        Rest::Sized { body, down, back }
    } else {
        Rest::Streamed {
            body: Coalesce::new(body.into_data_stream()),
            down,
            back,
        }
    };
    let mut response = Response::new(Out::ahead(body).await);
    *response.status_mut() = parts.status;
    *response.headers_mut() = headers;
    response
}

/// The most bytes [`Coalesce`] holds before it passes them on.
const COALESCE_LIMIT: usize = 64 * 1024;

/// The turns of the scheduler [`Coalesce`] waits for a next chunk. The
/// upstream's connection task takes two to hand over the next chunk it
/// has read already (seen on the current-thread runtime of `token-broker
/// proxy`: with one, every chunk still left alone).
const COALESCE_TURNS: u8 = 2;

/// Passes on the chunks of a streamed body that are there already as one.
///
/// The upstream's client hands its answer over one chunk at a time (its
/// connection task runs between two chunks), and the server writes out
/// what it has whenever the body is not ready: an SSE answer of 17 events
/// that arrived in one read left in 17 writes, each a wake-up and a read
/// for the client (5x nginx's CPU a request, in `benches/proxy.rs`).
/// Holding the bytes for up to [`COALESCE_TURNS`] turns of the scheduler
/// lets the connection task hand over the chunks it has read already;
/// whatever came goes on together, and when nothing more comes (the next
/// event is not there yet) the held bytes go on after those turns, which
/// cost no system call.
struct Coalesce<S: TryStream> {
    inner: Pin<Box<S>>,
    held: Held,
    /// The turns yielded since the last chunk came.
    yielded: u8,
    /// An error that came after held bytes: passed on after them.
    failed: Option<S::Error>,
    /// Whether the body has ended (its end may come after held bytes).
    ended: bool,
}

/// Bytes held: none, one chunk as it came (not copied), or several copied
/// into one.
enum Held {
    Nothing,
    One(Bytes),
    Many(Vec<u8>),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Nothing => 0,
            Held::One(b) => b.len(),
            Held::Many(v) => v.len(),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => Held::One(chunk),
            Held::One(first) => {
                let mut many = Vec::with_capacity(first.len() + chunk.len());
                many.extend_from_slice(&first);
                many.extend_from_slice(&chunk);
                Held::Many(many)
            }
            Held::Many(mut many) => {
                many.extend_from_slice(&chunk);
                Held::Many(many)
            }
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::replace(self, Held::Nothing) {
            Held::Nothing => None,
            Held::One(b) => Some(b),
            Held::Many(v) => Some(Bytes::from(v)),
        }
    }
}

// Its stream is boxed, and nothing else of it is pinned.
impl<S: TryStream> Unpin for Coalesce<S> {}

impl<S: TryStream> Coalesce<S> {
    /// Whether the stream has ended and everything it held is passed on:
    /// the server then writes the last bytes and the end together.
    fn is_ended(&self) -> bool {
        self.ended && self.held.len() == 0 && self.failed.is_none()
    }

    fn new(inner: S) -> Self {
        Coalesce {
            inner: Box::pin(inner),
            held: Held::Nothing,
            yielded: 0,
            failed: None,
            ended: false,
        }
    }
}

impl<S> Stream for Coalesce<S>
where
    S: TryStream<Ok = Bytes>,
{
    type Item = Result<Bytes, S::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match this.inner.as_mut().try_poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.held.push(chunk);
                    this.yielded = 0;
                    if this.held.len() >= COALESCE_LIMIT {
                        return Poll::Ready(this.held.take().map(Ok));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    return match this.held.take() {
                        Some(bytes) => {
                            this.failed = Some(e);
                            Poll::Ready(Some(Ok(bytes)))
                        }
                        None => Poll::Ready(Some(Err(e))),
                    };
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(this.held.take().map(Ok));
                }
                Poll::Pending if this.held.len() == 0 => return Poll::Pending,
                Poll::Pending if this.yielded < COALESCE_TURNS => {
                    // A turn for the connection task to hand over what it
                    // has read already.
                    this.yielded += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => {
                    this.yielded = 0;
                    return Poll::Ready(this.held.take().map(Ok));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_compared_whole() {
        let key = b"Zm9vYmFyYmF6cXV4cXV1eHF1dXpxdXV6cXV1enF1dXo";
        assert!(super::same_in_constant_time(key, key));
        assert!(super::same_in_constant_time(b"", b""));
        for i in 0..key.len() {
            let mut other = *key;
            other[i] ^= 1;
            assert!(!super::same_in_constant_time(key, &other), "byte {i}");
        }
        assert!(!super::same_in_constant_time(key, &key[..42]));
        assert!(!super::same_in_constant_time(&key[..42], key));
    }

    #[test]
    fn the_bearer_credentials_are_read_as_clients_write_them() {
        for (value, credentials) in [
            (&b"Bearer abc"[..], Some(&b"abc"[..])),
            (b"bearer abc", Some(b"abc")),
            (b"BEARER  abc ", Some(b"abc")),
            (b" Bearer abc\t", Some(b"abc")),
            (b"Bearer ", None),
            (b"Bearer", None),
            (b"Bearerabc", None),
            (b"Bearer\tabc", None),
            (b"Basic abc", None),
            (b"Bearer\xffabc", None),
            (b"", None),
            (b"B\xc3\xa9arer abc", None),
        ] {
            assert_eq!(super::bearer(value), credentials, "{}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn only_plain_paths_are_forwarded() {
        for good in [
            "/",
            "/v1/chat/completions",
            "/a//b",
            "/a..b",
            "/.../x",
            "/.well-known",
            "/%2e%2ex",
        ] {
            assert!(super::plain_path(good), "{good}");
        }
        for bad in [
            "",
            "*",
            "v1",
            "/.",
            "/..",
            "/a/./b",
            "/a/../b",
            "/%2e%2E/x",
            "/.%2e/x",
            "/%2E/x",
            "/a\\b",
            "/a%5Cb",
            "/a%5cb",
        ] {
            assert!(!super::plain_path(bad), "{bad}");
        }
    }

    use super::*;

    /// The hop-by-hop headers (RFC 9110 section 7.6.1).
    const HOP_BY_HOP: [HeaderName; 9] = [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ];

    #[test]
    fn the_header_predicates_match_their_lists() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name) && dropped(name), "{name}");
        }
        for name in [header::EXPECT, ACCOUNT_HEADER] {
            assert!(dropped(&name) && !is_hop_by_hop(&name), "{name}");
        }
        for name in [
            header::CONTENT_TYPE,
            header::USER_AGENT,
            header::HOST,
            header::AUTHORIZATION,
            header::PROXY_AUTHENTICATE.clone(),
            HeaderName::from_static("x-te"),
            HeaderName::from_static("hosts"),
        ] {
            let hop = HOP_BY_HOP.contains(&name);
            assert_eq!(is_hop_by_hop(&name), hop, "{name}");
            assert_eq!(dropped(&name), hop, "{name}");
        }
    }

    #[test]
    fn a_requests_headers_lose_what_the_upstream_must_not_get() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "127.0.0.1:8788"),
            ("authorization", "Bearer client-key"),
            ("content-type", "application/json"),
            ("connection", "keep-alive, x-private, user-agent"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("user-agent", "sdk/1"),
            ("expect", "100-continue"),
            ("chatgpt-account-id", "someone-else"),
            ("x-kept", "a"),
            ("x-kept", "b"),
        ] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        let out = forwarded(headers);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        for gone in ["connection", "keep-alive", "x-private", "expect", "chatgpt-account-id"] {
            assert!(!names.contains(&gone), "{gone} in {names:?}");
        }
        // Named by Connection: the proxy's own user agent instead.
        assert!(out[header::USER_AGENT].to_str().unwrap().starts_with("token-broker/"));
        assert_eq!(out[header::ACCEPT], "*/*");
        assert_eq!(out.get_all("x-kept").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
        // Replaced by `send`: the upstream's Host and the profile's token.
        assert!(out.contains_key(header::HOST) && out.contains_key(header::AUTHORIZATION));

        let mut plain = HeaderMap::new();
        plain.insert(header::USER_AGENT, HeaderValue::from_static("sdk/1"));
        plain.insert(header::ACCEPT, HeaderValue::from_static("text/event-stream"));
        let out = forwarded(plain.clone());
        assert_eq!(out, plain);
    }

    #[test]
    fn an_answers_hop_by_hop_headers_and_those_its_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("transfer-encoding", "chunked"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("x-request-id", "r"),
            ("x-request-id", "s"),
        ] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        drop_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(
            left,
            [
                ("content-type", "text/event-stream"),
                ("x-request-id", "r"),
                ("x-request-id", "s")
            ]
        );
    }

    #[test]
    fn a_connection_value_with_obs_text_still_names_its_headers() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-private, caf\xc3\xa9").unwrap(),
        );
        headers.append(HeaderName::from_static("x-private"), HeaderValue::from_static("1"));
        headers.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let mut answer = headers.clone();
        drop_hop_by_hop(&mut answer);
        assert_eq!(answer.keys().collect::<Vec<_>>(), [header::CONTENT_TYPE]);
        let request = forwarded(headers);
        assert!(!request.contains_key("x-private") && !request.contains_key(header::CONNECTION));
    }

    fn events(range: std::ops::Range<usize>) -> Vec<Result<Bytes, reqwest::Error>> {
        range.map(|i| Ok(Bytes::from(format!("data: {i}\n\n")))).collect()
    }

    #[tokio::test]
    async fn coalesce_joins_the_chunks_that_are_there_and_keeps_their_order() {
        let out: Vec<Bytes> = Coalesce::new(futures_util::stream::iter(events(0..17)))
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(out.len(), 1);
        let expected: String = (0..17).map(|i| format!("data: {i}\n\n")).collect();
        assert_eq!(out[0], expected.as_bytes());
    }

    #[tokio::test]
    async fn coalesce_passes_on_what_it_holds_when_the_next_chunk_is_late() {
        let first = futures_util::stream::iter(events(0..1));
        let late = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(Bytes::from_static(b"data: late\n\n"))
        });
        let mut stream = Coalesce::new(first.chain(late));
        let started = Instant::now();
        assert_eq!(stream.next().await.unwrap().unwrap(), "data: 0\n\n".as_bytes());
        assert!(
            started.elapsed() < Duration::from_millis(40),
            "the first event waited for the late one"
        );
        assert_eq!(stream.next().await.unwrap().unwrap(), "data: late\n\n".as_bytes());
        assert!(stream.next().await.is_none());
        assert!(stream.next().await.is_none());
    }
}
