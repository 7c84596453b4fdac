//! The daemon: every profile of a [`Config`] served to the processes of
//! this host over a Unix socket.
//!
//! One [`TokenActor`](crate::actor::TokenActor) per profile, in one
//! [`Brokers`] registry, so that every process on the host shares one
//! refresh per expiry; the credentials file and its lock stay the meeting
//! place with programs that do not ask the daemon (the Codex CLI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::config::{Config, Profile};
use super::metrics::{Metrics, ProfileMetrics};
use super::proxy::ClientKey;
use super::socket::OwnedSocket;
use super::TokenReply;
use crate::credentials::AccessToken;
use crate::store::display_path;
use crate::{BrokerError, Brokers, TokenBroker};

/// How long a client may take to send a request's head (and how long an
/// idle kept-alive connection stays open).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head or body accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long a profile whose broker could not start waits before the next
/// request tries again.
const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Why the daemon could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon serves this socket.
    #[error("another token-broker daemon already listens on {}; stop it first (or choose another socket)", display_path(.path))]
    AlreadyRunning {
        /// The socket.
        path: PathBuf,
    },
    /// The socket could not be made.
    #[error("socket {}: {message}", display_path(.path))]
    Socket {
        /// The socket.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// Rotated tokens could not be written when the daemon stopped.
    #[error("stopping: {0}")]
    Lost(BrokerError),
    /// A proxy could not start.
    #[error(transparent)]
    Proxy(#[from] super::proxy::ProxyError),
    /// Refreshes in flight did not end within this bound.
    #[error("stopping: a refresh was still in flight after {}; its rotated tokens may be lost", humantime::format_duration(*.0))]
    Unfinished(Duration),
}

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Profiles new in the configuration, started.
    pub started: Vec<String>,
    /// Profiles gone from it, stopped.
    pub stopped: Vec<String>,
    /// Profiles whose settings changed, restarted.
    pub restarted: Vec<String>,
    /// Profiles left as they were (their actor and token kept).
    pub unchanged: Vec<String>,
    /// Profiles whose broker could not start (name, why); requests retry.
    pub failed: Vec<(String, String)>,
    /// Settings that only a restart applies (the socket).
    pub ignored: Vec<String>,
}

/// A profile being served.
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) profile: Profile,
    /// [`Profile::credential_id`] as this daemon resolves it.
    pub(crate) credential_id: String,
    /// Serializes starts, and marks a slot replaced by a reload.
    start: tokio::sync::Mutex<SlotState>,
    /// The last start's failure, and when.
    failure: Mutex<Option<(BrokerError, Instant)>>,
    /// The last token served and what is known of it.
    meta: Mutex<Option<TokenReply>>,
    pub(crate) metrics: ProfileMetrics,
}

#[derive(Default)]
struct SlotState {
    retired: bool,
}

/// What the request handlers share.
pub(crate) struct Shared {
    pub(crate) slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    pub(crate) brokers: Brokers,
    pub(crate) metrics: Metrics,
    allowed_uids: RwLock<Vec<u32>>,
    config: Mutex<Config>,
    /// Serializes reloads.
    reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    pub(crate) fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots.read().get(name).cloned()
    }

    /// The profile's broker, started if it is not running (a failed start
    /// is retried at most every second).
    pub(crate) async fn broker(&self, slot: &Slot) -> Result<TokenBroker, BrokerError> {
        if let Some(b) = self.brokers.get(&slot.name) {
            return Ok(b);
        }
        if let Some((e, at)) = &*slot.failure.lock() {
            if at.elapsed() < RESTART_AFTER {
                return Err(e.clone());
            }
        }
        let state = slot.start.lock().await;
        if state.retired {
            return Err(BrokerError::Stopped {
                location: format!("profile {}", slot.name),
            });
        }
        if let Some(b) = self.brokers.get(&slot.name) {
            return Ok(b);
        }
        if let Some((e, at)) = &*slot.failure.lock() {
            if at.elapsed() < RESTART_AFTER {
                return Err(e.clone());
            }
        }
        let brokers = self.brokers.clone();
        let (name, profile) = (slot.name.clone(), slot.profile.clone());
        // Building reads the credentials file: off the server's threads.
        let built = tokio::task::spawn_blocking(move || brokers.insert(name, profile.builder()?))
            .await
            .unwrap_or_else(|_| Err(BrokerError::Config("starting the profile's broker panicked".into())));
        drop(state);
        match built {
            Ok(b) => {
                *slot.failure.lock() = None;
                Ok(b)
            }
            Err(e) => {
                tracing::warn!(profile = %slot.name, error = %e, "the profile's broker could not start");
                *slot.failure.lock() = Some((e.clone(), Instant::now()));
                Err(e)
            }
        }
    }

    /// A valid token of `slot`'s profile, with its expiry and account, as
    /// the token endpoint and the proxies hand it out (counted as served;
    /// a caller that has to wait is counted as waiting meanwhile).
    pub(crate) async fn serve_token(&self, slot: &Slot) -> Result<TokenReply, BrokerError> {
        let broker = self.broker(slot).await?;
        let token = match broker.fresh_token() {
            Some(token) => token,
            None => {
                let _waiting = slot.metrics.waiting();
                broker.token().await?
            }
        };
        slot.metrics.served();
        Ok(super::reply_cached(&slot.meta, &broker, token).await)
    }

    /// Like [`serve_token`](Self::serve_token) after the upstream API
    /// answered 401 for `rejected`.
    pub(crate) async fn serve_reject(&self, slot: &Slot, rejected: &AccessToken) -> Result<TokenReply, BrokerError> {
        let broker = self.broker(slot).await?;
        let token = {
            let _waiting = slot.metrics.waiting();
            broker.reject(rejected).await?
        };
        slot.metrics.served();
        Ok(super::reply_cached(&slot.meta, &broker, token).await)
    }

    pub(crate) fn allows(&self, uid: u32) -> bool {
        uid == effective_uid() || self.allowed_uids.read().contains(&uid)
    }
}

pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A daemon bound to its socket, with its profiles started.
///
/// ```no_run
/// use token_broker::server::{config::Config, daemon::Daemon};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let daemon = Daemon::bind(Config::load(None)?).await?;
/// println!("listening on {}", daemon.socket().display());
/// let control = daemon.control();
/// // SIGHUP: control.reload(Config::load(None)?).await
/// daemon.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(())
/// # }
/// ```
pub struct Daemon {
    listener: tokio::net::UnixListener,
    socket: OwnedSocket,
    shared: Arc<Shared>,
    proxies: Vec<super::proxy::Proxy>,
    client_key: Option<PathBuf>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", &self.socket.path())
            .finish_non_exhaustive()
    }
}

/// Reloads a running daemon's configuration (cheap to clone).
#[derive(Clone)]
pub struct DaemonControl {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DaemonControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonControl").finish_non_exhaustive()
    }
}

impl Daemon {
    /// Takes the configured socket (see the module docs of
    /// [`server`](crate::server)) and starts every profile's broker. A
    /// profile whose credentials cannot be read yet does not stop the
    /// daemon: its requests fail with the reason, and start it once the
    /// file is there. Call inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Daemon, DaemonError> {
        let (listener, socket) = super::socket::bind(&config.daemon.socket, !config.daemon.allowed_uids.is_empty())?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| DaemonError::Socket {
            path: config.daemon.socket.clone(),
            message: e.to_string(),
        })?;
        let metrics = Metrics::new();
        let slots = config
            .profiles
            .iter()
            .map(|(name, profile)| (name.clone(), Arc::new(Slot::new(name, profile, &metrics))))
            .collect();
        let shared = Arc::new(Shared {
            slots: RwLock::new(slots),
            brokers: Brokers::new(),
            metrics,
            allowed_uids: RwLock::new(config.daemon.allowed_uids.clone()),
            config: Mutex::new(config),
            reloading: tokio::sync::Mutex::new(()),
        });
        let all: Vec<Arc<Slot>> = shared.slots.read().values().cloned().collect();
        for slot in all {
            if let Err(e) = shared.broker(&slot).await {
                tracing::warn!(profile = %slot.name, error = %e, "serving the profile's errors until it can start");
            }
        }
        let proxy_configs = shared.config.lock().proxies.clone();
        let key = if proxy_configs.values().any(|p| p.require_client_key) {
            let path = ClientKey::default_path().ok_or_else(|| {
                DaemonError::Proxy(super::proxy::ProxyError::Key {
                    path: PathBuf::from("$XDG_STATE_HOME/token-broker/client-key"),
                    message: "neither XDG_STATE_HOME nor HOME is set".into(),
                })
            })?;
            Some(ClientKey::load_or_create(&path)?)
        } else {
            None
        };
        let mut proxies = Vec::with_capacity(proxy_configs.len());
        for (name, proxy) in proxy_configs {
            let source = super::proxy::Source::Daemon {
                shared: shared.clone(),
                profile: proxy.profile.clone(),
            };
            let key = key.clone().filter(|_| proxy.require_client_key);
            proxies.push(super::proxy::Proxy::bind_with(&name, proxy, source, key, &shared.metrics).await?);
        }
        Ok(Daemon {
            listener,
            socket,
            shared,
            proxies,
            client_key: key.map(|k| k.path().to_path_buf()),
        })
    }

    /// The proxies it runs: name, address, upstream.
    pub fn proxies(&self) -> Vec<(String, std::net::SocketAddr, String)> {
        self.proxies
            .iter()
            .map(|p| (p.name().to_owned(), p.local_addr(), p.upstream().to_owned()))
            .collect()
    }

    /// The file holding the proxies' client key, when one is required.
    pub fn client_key(&self) -> Option<&Path> {
        self.client_key.as_deref()
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        self.socket.path()
    }

    /// The profiles it serves, sorted.
    pub fn profiles(&self) -> Vec<String> {
        self.shared.slots.read().keys().cloned().collect()
    }

    /// A handle to reload the configuration while it runs.
    pub fn control(&self) -> DaemonControl {
        DaemonControl {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `stop` completes; then stops accepting, lets requests
    /// under way end, and stops every broker once a refresh in flight has
    /// reached the store (bounded: twice the longest token-request timeout,
    /// plus the longest winner wait, plus 45 s for the writes). Removes the
    /// socket.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), DaemonError> {
        let Daemon {
            listener,
            socket,
            shared,
            proxies,
            client_key: _,
        } = self;
        let router = super::api::router(shared.clone());
        let (stopping, stopped) = watch::channel(false);
        let proxies: Vec<_> = proxies
            .into_iter()
            .map(|proxy| {
                let mut stop = stopped.clone();
                tokio::spawn(proxy.serve(stopped.clone(), async move {
                    let _ = stop.wait_for(|s| *s).await;
                }))
            })
            .collect();
        // Every connection holds a clone until it ends: `recv` on `open`
        // answers `None` once all have ended.
        let (connection_alive, mut open) = tokio::sync::mpsc::channel::<()>(1);
        let mut stop = std::pin::pin!(stop);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stop => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (10,000 idle clients): the others
                    // are served meanwhile; try again shortly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let uid = match stream.peer_cred() {
                Ok(cred) if shared.allows(cred.uid()) => cred.uid(),
                Ok(cred) => {
                    shared.metrics.refused.inc();
                    tracing::warn!(
                        uid = cred.uid(),
                        pid = cred.pid(),
                        "refused a connection from another user (not in [daemon] allowed_uids)"
                    );
                    continue;
                }
                Err(e) => {
                    shared.metrics.refused.inc();
                    tracing::warn!(error = %e, "refused a connection whose peer is unknown");
                    continue;
                }
            };
            tokio::spawn(serve_connection(
                stream,
                router.clone(),
                Some(Peer {
                    uid,
                    shared: shared.clone(),
                }),
                stopped.clone(),
                connection_alive.clone(),
            ));
        }
        // No new clients; the lock stays held until every broker has
        // stopped, so that no second daemon starts beside this one.
        drop(listener);
        socket.remove();
        let _ = stopping.send(true);
        drop(connection_alive);
        tracing::info!("stopping: letting refreshes in flight reach the store");
        let bound = {
            let config = shared.config.lock();
            let longest = |f: fn(&Profile) -> Duration| config.profiles.values().map(f).max().unwrap_or_default();
            crate::defaults::finish_bound(longest(|p| p.timeout), longest(|p| p.winner_wait))
        };
        let finished = tokio::time::timeout(bound, shared.brokers.finish());
        // Callers waiting for that refresh get their answers before the
        // process exits (a connection closes within HEADER_TIMEOUT of the
        // stop, answered or not).
        let answered = tokio::time::timeout(HEADER_TIMEOUT + Duration::from_secs(1), open.recv());
        let proxied = futures_util::future::join_all(proxies);
        let (finished, _, _) = tokio::join!(finished, answered, proxied);
        let outcome = match finished {
            Ok(Ok(())) => Ok(()),
            Ok(Err(lost)) => Err(DaemonError::Lost(lost)),
            Err(_) => Err(DaemonError::Unfinished(bound)),
        };
        drop(socket);
        outcome
    }
}

/// A connection's peer user, checked again at every request: a reload may
/// have taken it out of `allowed_uids` since the connection was accepted.
pub(crate) struct Peer {
    uid: u32,
    shared: Arc<Shared>,
}

/// Why a request was not answered: its user is no longer allowed.
#[derive(Debug)]
struct NotAllowed;

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the peer user is no longer allowed")
    }
}

impl std::error::Error for NotAllowed {}

/// Serves one connection until it ends or the daemon stops (then lets the
/// request under way end, within [`HEADER_TIMEOUT`]). With `peer`, every
/// request's user is checked again first.
pub(crate) async fn serve_connection<I>(
    stream: I,
    router: axum::Router,
    peer: Option<Peer>,
    stopping: watch::Receiver<bool>,
    alive: tokio::sync::mpsc::Sender<()>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = hyper_util::service::TowerToHyperService::new(router);
    // A user taken out of allowed_uids gets nothing more: the connection is
    // closed unanswered, as at accept.
    let service = hyper::service::service_fn(move |request| {
        let allowed = peer.as_ref().is_none_or(|peer| peer.shared.allows(peer.uid));
        if let (false, Some(peer)) = (allowed, &peer) {
            peer.shared.metrics.refused.inc();
            tracing::warn!(
                uid = peer.uid,
                "refused a request from a user no longer in [daemon] allowed_uids; closing its connection"
            );
        }
        let answer = allowed.then(|| hyper::service::Service::call(&router, request));
        async move {
            match answer {
                Some(answer) => answer.await.map_err(|never| match never {}),
                None => Err(NotAllowed),
            }
        }
    });
    serve_http1(stream, service, stopping, alive).await;
}

/// Serves one connection with `service` (HTTP/1.1, kept alive, the head
/// read within [`HEADER_TIMEOUT`] and at most [`MAX_REQUEST_BYTES`]) until
/// it ends or the daemon stops (then lets the request under way end,
/// within [`HEADER_TIMEOUT`]).
pub(crate) async fn serve_http1<I, S, B>(
    stream: I,
    service: S,
    mut stopping: watch::Receiver<bool>,
    _alive: tokio::sync::mpsc::Sender<()>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        // The read buffer may take in more than max_buf_size at once (its
        // allocation rounds up), and a head that arrives whole is then
        // parsed: bound the head itself.
        .max_header_size(MAX_REQUEST_BYTES)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let stop = WokenOnly::new(Box::pin(async move {
        let _ = stopping.wait_for(|s| *s).await;
    }));
    tokio::select! {
        biased;
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended");
            }
        }
        () = stop => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
        }
    }
}

/// A future polled only when its own waker has been woken since its last
/// poll (and at the first), not at every wake-up of the task it shares: a
/// connection's task wakes some 20 times for one SSE answer, and polling
/// the stop signal's watch each time (with `select!`'s random pick) cost
/// about 200 instructions a wake-up (callgrind).
struct WokenOnly<F> {
    future: F,
    flag: Arc<WakeFlag>,
    /// Wakes `flag`, given to `future`.
    waker: std::task::Waker,
}

struct WakeFlag {
    woken: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl<F> WokenOnly<F> {
    fn new(future: F) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        });
        WokenOnly {
            future,
            waker: std::task::Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: std::future::Future + Unpin> std::future::Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = &mut *self;
        // Registered before the flag is read, so that a wake between the
        // two is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut this.future).poll(&mut std::task::Context::from_waker(&this.waker))
    }
}

impl Slot {
    fn new(name: &str, profile: &Profile, metrics: &Metrics) -> Self {
        Slot {
            name: name.to_owned(),
            profile: profile.clone(),
            credential_id: profile.credential_id(),
            start: tokio::sync::Mutex::new(SlotState::default()),
            failure: Mutex::new(None),
            meta: Mutex::new(None),
            metrics: metrics.for_profile(name),
        }
    }
}

impl DaemonControl {
    /// Applies `config`: starts new profiles, stops removed ones (each once
    /// a refresh in flight has reached the store), restarts changed ones,
    /// and leaves unchanged ones untouched, with their actor and published
    /// token. `allowed_uids` applies to new connections; a new socket only
    /// at the next start.
    pub async fn reload(&self, config: Config) -> ReloadReport {
        let shared = &self.shared;
        let _one_at_a_time = shared.reloading.lock().await;
        let mut report = ReloadReport::default();
        let mut config = config;
        if config.proxies != shared.config.lock().proxies {
            report.ignored.push("[proxies] (apply at the next start)".to_owned());
        }
        // The socket in use stays the one in force: what the reload names
        // applies at the next start, and nothing else is done to it.
        let socket = shared.config.lock().daemon.socket.clone();
        if config.daemon.socket != socket {
            report.ignored.push(format!(
                "socket {} (applies at the next start)",
                display_path(&config.daemon.socket)
            ));
            config.daemon.socket = socket.clone();
        }
        let was_shared = !shared.allowed_uids.read().is_empty();
        let is_shared = !config.daemon.allowed_uids.is_empty();
        *shared.allowed_uids.write() = config.daemon.allowed_uids.clone();
        if was_shared != is_shared {
            if let Err(e) = super::socket::set_access(&socket, is_shared) {
                tracing::warn!(socket = %socket.display(), error = %e, "could not change the socket's mode");
            }
        }
        let old: BTreeMap<String, Arc<Slot>> = shared.slots.read().clone();
        // Stop what went or changed.
        for (name, slot) in &old {
            let verdict = match config.profiles.get(name) {
                Some(p) if *p == slot.profile => {
                    report.unchanged.push(name.clone());
                    continue;
                }
                Some(_) => &mut report.restarted,
                None => &mut report.stopped,
            };
            verdict.push(name.clone());
            slot.start.lock().await.retired = true;
            // A restarted profile keeps its place, so that its callers are
            // told to try again (503) rather than that it is unknown.
            if !config.profiles.contains_key(name) {
                shared.slots.write().remove(name);
                shared.metrics.forget(name);
            }
            if let Some(Err(e)) = shared.brokers.remove(name).await {
                tracing::error!(profile = %name, error = %e, "stopping the profile lost rotated tokens");
            }
        }
        // Start what is new or changed.
        for (name, profile) in &config.profiles {
            if report.unchanged.contains(name) {
                continue;
            }
            if !report.restarted.contains(name) {
                report.started.push(name.clone());
            }
            let slot = Arc::new(Slot::new(name, profile, &shared.metrics));
            shared.slots.write().insert(name.clone(), slot.clone());
            if let Err(e) = shared.broker(&slot).await {
                report.failed.push((name.clone(), e.to_string()));
            }
        }
        *shared.config.lock() = config;
        report
    }
}
