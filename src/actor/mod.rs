//! The [`TokenActor`]: one per credential, the only code that decides to
//! refresh and the only code that spends the credential's refresh token.
//!
//! Callers reach it through [`TokenBroker`](crate::TokenBroker) or by
//! sending the messages below to its [`Addr`]. A still-valid
//! token is published into a shared snapshot so that the handle can serve it
//! without a round trip; everything else comes here.
//!
//! At most one refresh cycle (`cycle.rs`: lock, re-read, spend, write) runs at a time. Callers that need a
//! new token while one runs wait for its outcome; callers that arrive while
//! the current token is still usable get it at once.

mod cycle;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::dev::MessageResponse;
use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, info, info_span, warn, Instrument};

pub use cycle::DEFAULT_WINNER_WAIT;

use crate::credentials::{AccessToken, RefreshToken, TokenSet};
use crate::error::BrokerError;
use crate::policy::{backoff, freshness, Freshness, RefreshPolicy};
use crate::provider::Provider;
use crate::status::{Counters, State, Status};
use crate::store::{Store, StoreVersion};
use cycle::{CycleInput, CycleOutcome, Unsaved};

/// The token handed to callers, as published for the handle's fast path.
pub(crate) type Published = Arc<crate::snapshot::Snapshot>;

/// Everything a [`TokenActor`] needs that does not change.
#[derive(Debug)]
pub(crate) struct Config {
    pub store: Arc<dyn Store>,
    pub provider: Arc<Provider>,
    pub policy: RefreshPolicy,
    pub lock_timeout: Duration,
    /// How long a broker whose refresh token was refused waits for the
    /// winner's tokens before it reports that a sign-in is needed.
    pub winner_wait: Duration,
    /// Refresh when the refresh-ahead window opens even when nobody asks.
    pub keep_fresh: bool,
    /// Set when a shutdown is asked for: a cycle that has not spent the
    /// refresh token yet spends nothing.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// How often to check the store for outside changes (zero: never).
    pub watch_interval: Duration,
    pub location: String,
    /// What a person should do when a new sign-in is needed.
    pub login_hint: String,
}

/// Ask for a valid access token. Answers at once when the current token is
/// usable (starting one background refresh inside the refresh-ahead window);
/// otherwise waits for the one refresh in flight.
#[derive(Debug, Message)]
#[rtype(result = "Result<AccessToken, BrokerError>")]
pub struct GetToken;

/// The upstream API answered 401 for `token`. If it is still the current
/// token, it is refreshed once however many callers reject it; a stale token
/// is ignored. Answers with a token to retry with.
#[derive(Debug, Message)]
#[rtype(result = "Result<AccessToken, BrokerError>")]
pub struct Reject {
    /// The access token the upstream API refused.
    pub token: AccessToken,
}

/// Re-read the store now and adopt what changed. Never spends a refresh
/// token.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), BrokerError>")]
pub struct Reload;

/// A snapshot of the credential's state, without secrets.
#[derive(Debug, Message)]
#[rtype(result = "Status")]
pub struct GetStatus;

/// Stop once no refresh is in flight, after one last attempt to write
/// refreshed tokens that could not be written before. Answers when the
/// actor has stopped, so that a process can exit without cutting a refresh
/// between spending the old refresh token and writing the new one; `Err`
/// when rotated tokens are lost because they still could not be written.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), BrokerError>")]
pub struct Shutdown;

/// A refreshed access token with less than this left on arrival counts as
/// a provider fault (with backoff) rather than a success to build on.
const MIN_USEFUL_LIFETIME: Duration = Duration::from_millis(100);

/// The reply channel of a message waiting for a token.
type Waiter = oneshot::Sender<Result<AccessToken, BrokerError>>;

/// The waiting callers. Shared with the [`TokenReply`]s that add to it; the
/// actor and its replies live on one thread.
type Waiters = Rc<RefCell<Vec<Waiter>>>;

/// The actor's answer to [`GetToken`] or [`Reject`]: a result now, or a place
/// in the line for the refresh in flight.
pub enum TokenReply {
    /// Answered at once.
    Ready(Result<AccessToken, BrokerError>),
    /// Answered when the refresh in flight ends.
    Wait(Waiters),
}

impl std::fmt::Debug for TokenReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenReply::Ready(result) => f.debug_tuple("Ready").field(result).finish(),
            TokenReply::Wait(_) => f.write_str("Wait"),
        }
    }
}

impl<M> MessageResponse<TokenActor, M> for TokenReply
where
    M: Message<Result = Result<AccessToken, BrokerError>>,
{
    fn handle(self, _ctx: &mut Context<TokenActor>, tx: Option<Waiter>) {
        let Some(tx) = tx else { return };
        match self {
            TokenReply::Ready(result) => {
                let _ = tx.send(result);
            }
            TokenReply::Wait(waiters) => waiters.borrow_mut().push(tx),
        }
    }
}

/// The most refresh cycles one group of waiting callers may cause.
const MAX_CYCLES_PER_WAIT: u32 = 3;

/// Why the last refresh attempt failed, and when to try again.
#[derive(Debug, Default)]
struct Failure {
    count: u32,
    retry_at: Option<Instant>,
    /// (Boxed: 120 bytes inline in each idle actor otherwise.)
    last: Option<Box<BrokerError>>,
}

/// The provider refused the refresh token: remembered per store version so
/// that it is never sent again, and forgotten when the store changes.
#[derive(Debug)]
struct LoginRequired {
    reason: String,
    dead_refresh: Option<RefreshToken>,
    version: Option<StoreVersion>,
}

/// The actor that owns one credential.
pub struct TokenActor {
    cfg: Arc<Config>,
    tokens: TokenSet,
    version: Option<StoreVersion>,
    /// The current access token was rejected by the upstream API.
    rejected: bool,
    /// The current token is published as fresh (see [`Self::publish`]).
    fresh: bool,
    /// Until when, by the wall clock (`None`: no expiry known).
    fresh_until: Option<SystemTime>,
    /// (Boxed: rare, 80 bytes inline otherwise.)
    login: Option<Box<LoginRequired>>,
    failure: Failure,
    /// Tokens a refresh returned that are not on disk yet.
    /// (Boxed: rare, and 256 bytes inline in each of 100,000 idle actors.)
    unsaved: Option<Box<Unsaved>>,
    /// The brokers' lock, held from that refresh until they are written.
    /// (Boxed: rare.)
    unsaved_lock: Option<Box<crate::store::StoreLock>>,
    in_flight: bool,
    /// A re-read of the store is under way.
    reloading: bool,
    /// Extra cycles run for the current waiters (bounded).
    waiter_cycles: u32,
    /// The store now holds another account's tokens: serve nothing.
    account_changed: bool,
    /// Callers waiting for the refresh in flight: the reply channels of
    /// their messages, answered directly (no task or channel of our own).
    waiters: Waiters,
    published: Published,
    fresh_timer: Option<SpawnHandle>,
    /// With `keep_fresh`: the next attempt after a failed one.
    retry_timer: Option<SpawnHandle>,
    /// The next attempt to write unwritten tokens.
    unsaved_timer: Option<SpawnHandle>,
    requests: Arc<AtomicU64>,
    counters: Counters,
    shutting_down: bool,
    stop_waiters: Vec<oneshot::Sender<Result<(), BrokerError>>>,
    span: tracing::Span,
}

impl std::fmt::Debug for TokenActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenActor")
            .field("location", &self.cfg.location)
            .field("access", &self.tokens.access_token)
            .field("in_flight", &self.in_flight)
            .field("waiters", &self.waiters.borrow().len())
            .finish_non_exhaustive()
    }
}

/// What to do with one request for a token.
enum Decision {
    Serve(AccessToken),
    ServeAndRefresh(AccessToken),
    /// Wait for the refresh in flight, starting one if none is.
    Wait,
    Fail(BrokerError),
}

impl TokenActor {
    pub(crate) fn new(cfg: Arc<Config>, tokens: TokenSet, version: Option<StoreVersion>, published: Published) -> Self {
        let span = info_span!("credential", location = %cfg.location);
        TokenActor {
            cfg,
            tokens,
            version,
            rejected: false,
            fresh: false,
            fresh_until: None,
            login: None,
            failure: Failure::default(),
            unsaved: None,
            unsaved_lock: None,
            in_flight: false,
            reloading: false,
            waiter_cycles: 0,
            account_changed: false,
            waiters: Waiters::default(),
            published,
            fresh_timer: None,
            retry_timer: None,
            unsaved_timer: None,
            requests: Arc::new(AtomicU64::new(0)),
            counters: Counters::default(),
            shutting_down: false,
            stop_waiters: Vec::new(),
            span,
        }
    }

    fn freshness(&self, now: SystemTime) -> Freshness {
        if self.rejected {
            return Freshness::Expired;
        }
        freshness(&self.tokens, now, self.cfg.policy)
    }

    /// Publishes the current token for the fast path while it is fresh, and
    /// schedules its withdrawal when the refresh-ahead window opens.
    fn publish(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.fresh_timer.take() {
            ctx.cancel_future(timer);
        }
        let now = SystemTime::now();
        self.fresh = false;
        if self.account_changed {
            self.published.publish(None, None);
            return;
        }
        match self.freshness(now) {
            Freshness::Fresh { refresh_at } => {
                self.fresh = true;
                self.fresh_until = Some(refresh_at);
                self.published
                    .publish(Some(&self.tokens.access_token), Some(refresh_at));
                // Readers and `decide` compare the deadline with the wall
                // clock themselves: a timer is needed only to refresh unasked
                // when the window opens (one timer less per idle credential).
                if self.cfg.keep_fresh {
                    let wait = refresh_at.duration_since(now).unwrap_or_default();
                    self.fresh_timer = Some(ctx.run_later(wait, |act, ctx| {
                        act.fresh_timer = None;
                        act.publish(ctx);
                        act.keep_fresh(ctx);
                    }));
                }
            }
            Freshness::Unknown => {
                self.fresh = true;
                self.fresh_until = None;
                self.published.publish(Some(&self.tokens.access_token), None);
            }
            Freshness::Due { .. } | Freshness::Expired => self.published.publish(None, None),
        }
    }

    /// With `keep_fresh`, starts a refresh once the refresh-ahead window is
    /// open although nobody asked, so that another program sharing the
    /// credential (the Codex CLI) always finds a fresh token and never
    /// refreshes on its own. After a failure, tries again when the backoff
    /// ends; after a refusal, only once the store changes.
    fn keep_fresh(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.retry_timer.take() {
            ctx.cancel_future(timer);
        }
        if !self.cfg.keep_fresh || self.in_flight || self.shutting_down || self.account_changed {
            return;
        }
        if !matches!(
            self.freshness(SystemTime::now()),
            Freshness::Due { .. } | Freshness::Expired
        ) {
            return;
        }
        if !self.store_changed_since_login_required() {
            return;
        }
        if self.may_attempt() {
            debug!(parent: &self.span, "the refresh-ahead window is open; refreshing to keep the credential fresh");
            self.start_cycle(ctx);
        } else if let Some(at) = self.failure.retry_at {
            let wait = at.saturating_duration_since(Instant::now());
            self.retry_timer = Some(ctx.run_later(wait, |act, ctx| {
                act.retry_timer = None;
                act.keep_fresh(ctx);
            }));
        }
    }

    /// Unwritten rotated tokens are written again when the backoff ends,
    /// whether or not anyone asks (they hold the brokers' lock meanwhile).
    fn retry_unsaved(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.unsaved_timer.take() {
            ctx.cancel_future(timer);
        }
        if self.unsaved.is_none() || self.in_flight || self.shutting_down {
            return;
        }
        let wait = self
            .failure
            .retry_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(Instant::now()));
        self.unsaved_timer = Some(ctx.run_later(wait, |act, ctx| {
            act.unsaved_timer = None;
            if act.unsaved.is_some() && !act.in_flight && !act.shutting_down {
                act.start_cycle(ctx);
            }
        }));
    }

    fn may_attempt(&self) -> bool {
        !self.in_flight && self.failure.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    fn store_changed_since_login_required(&self) -> bool {
        match &self.login {
            Some(login) => self.cfg.store.version() != login.version,
            None => true,
        }
    }

    fn decide(&self) -> Decision {
        if self.fresh && crate::snapshot::Snapshot::before(self.fresh_until) {
            // Published as fresh, and the wall clock agrees (the withdrawal
            // timer runs on the monotonic clock, which a suspend stops).
            return Decision::Serve(self.tokens.access_token.clone());
        }
        if self.account_changed {
            return Decision::Fail(self.account_error());
        }
        let state = self.freshness(SystemTime::now());
        if state.is_usable() {
            let token = self.tokens.access_token.clone();
            let refresh = matches!(state, Freshness::Due { .. })
                && self.may_attempt()
                && self.store_changed_since_login_required();
            return if refresh {
                Decision::ServeAndRefresh(token)
            } else {
                Decision::Serve(token)
            };
        }
        if self.in_flight {
            return Decision::Wait;
        }
        if let Some(login) = &self.login {
            if !self.store_changed_since_login_required() {
                return Decision::Fail(self.login_error(&login.reason));
            }
            // The file changed since the provider refused us: a cycle will
            // re-read it, adopting new tokens or confirming the sign-in.
            return Decision::Wait;
        }
        match (&self.failure.last, self.failure.retry_at) {
            (Some(err), Some(at)) if Instant::now() < at => Decision::Fail(with_retry_in((**err).clone(), at)),
            _ => Decision::Wait,
        }
    }

    fn answer(&mut self, ctx: &mut Context<Self>) -> TokenReply {
        self.counters.actor_requests += 1;
        match self.decide() {
            Decision::Serve(token) => TokenReply::Ready(Ok(token)),
            Decision::ServeAndRefresh(token) => {
                self.start_cycle(ctx);
                TokenReply::Ready(Ok(token))
            }
            Decision::Fail(err) => TokenReply::Ready(Err(err)),
            Decision::Wait => {
                if !self.in_flight {
                    self.start_cycle(ctx);
                }
                TokenReply::Wait(self.waiters.clone())
            }
        }
    }

    fn account_error(&self) -> BrokerError {
        BrokerError::AccountChanged {
            location: self.cfg.location.clone(),
        }
    }

    /// Checks whether someone else rewrote the store, and re-reads it if so.
    fn poll_store(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight || self.reloading {
            return;
        }
        if self.cfg.store.version() != self.version {
            ctx.notify(Reload);
        }
    }

    fn login_error(&self, reason: &str) -> BrokerError {
        BrokerError::LoginRequired {
            location: self.cfg.location.clone(),
            reason: reason.to_owned(),
            hint: self.cfg.login_hint.clone(),
        }
    }

    /// Starts the one refresh cycle. Runs inside the actor's context, not a
    /// caller's future, so a caller that gives up never cuts it short.
    fn start_cycle(&mut self, ctx: &mut Context<Self>) {
        debug_assert!(!self.in_flight);
        self.in_flight = true;
        let input = CycleInput {
            held: self.tokens.clone(),
            rejected: self.rejected.then(|| self.tokens.access_token.clone()),
            dead_refresh: self.login.as_ref().and_then(|l| l.dead_refresh.clone()),
            unsaved: self.unsaved.as_deref().cloned(),
            held_lock: self.unsaved_lock.take().map(|lock| *lock),
        };
        let span = info_span!(parent: &self.span, "refresh");
        let fut = cycle::run(self.cfg.clone(), input, self.requests.clone()).instrument(span);
        // A wait for the endpoint's permit (provider::limit) ends on shutdown.
        let fut = crate::provider::limit::stoppable(self.cfg.stopping.clone(), fut);
        ctx.spawn(fut.into_actor(self).map(|end, act, ctx| {
            if end.unsaved_abandoned {
                // The store moved past them: never to be written.
                act.unsaved = None;
                act.unsaved_lock = None;
            }
            act.finish_cycle(end.outcome, ctx)
        }));
    }

    fn finish_cycle(&mut self, outcome: CycleOutcome, ctx: &mut Context<Self>) {
        self.in_flight = false;
        // What the callers waiting for this cycle get: `None` means "the
        // current token if it is usable, else one more cycle".
        let answer = match outcome {
            CycleOutcome::Adopted(tokens, version) => {
                self.counters.adoptions += 1;
                self.install(tokens, version);
                None
            }
            CycleOutcome::Refreshed(tokens, version) => {
                self.counters.refreshes += 1;
                let token = tokens.access_token.clone();
                let short_lived = tokens
                    .expiry
                    .is_some_and(|e| e.at <= SystemTime::now() + MIN_USEFUL_LIFETIME);
                self.install(tokens, version);
                if short_lived {
                    // Refreshing again at once would get the same: back off
                    // as after any provider fault, or a keep-fresh broker
                    // would refresh in a loop.
                    warn!(parent: &self.span, "the new access token was already expired on arrival; backing off");
                    let fault = BrokerError::Unavailable {
                        location: self.cfg.location.clone(),
                        cause: crate::provider::RefreshError::Transient {
                            endpoint: self.cfg.provider.token_url().to_owned(),
                            kind: crate::provider::Failure::ExpiredOnArrival,
                            retry_after: None,
                        },
                        retry_in: None,
                    };
                    self.record_failure(fault, None);
                }
                // The waiters asked for the result of this refresh: they get
                // it even if the local clock already calls it expired (clock
                // skew, absurdly short lifetimes), and the actor never loops.
                Some(Ok(token))
            }
            CycleOutcome::Unchanged(version) => {
                self.version = version;
                None
            }
            CycleOutcome::LoginRequired {
                reason,
                dead_refresh,
                version,
            } => {
                self.counters.failures += 1;
                warn!(parent: &self.span, %reason, "login required");
                let err = self.login_error(&reason);
                self.login = Some(Box::new(LoginRequired {
                    reason,
                    dead_refresh,
                    version,
                }));
                Some(Err(err))
            }
            CycleOutcome::Unsaved(unsaved, lock, err) => {
                self.unsaved = Some(unsaved);
                self.unsaved_lock = lock.map(Box::new);
                Some(Err(self.record_failure(err, None)))
            }
            CycleOutcome::Failed(err @ BrokerError::AccountChanged { .. }) => {
                self.account_changed = true;
                Some(Err(err))
            }
            CycleOutcome::Failed(err) => {
                let retry_after = match &err {
                    BrokerError::Unavailable {
                        cause: crate::provider::RefreshError::Transient { retry_after, .. },
                        ..
                    } => *retry_after,
                    _ => None,
                };
                Some(Err(self.record_failure(err, retry_after)))
            }
        };
        self.publish(ctx);
        self.settle_waiters(answer, ctx);
        if self.shutting_down && !self.in_flight {
            ctx.stop();
            return;
        }
        self.keep_fresh(ctx);
        self.retry_unsaved(ctx);
    }

    fn record_failure(&mut self, err: BrokerError, retry_after: Option<Duration>) -> BrokerError {
        self.counters.failures += 1;
        self.failure.count += 1;
        let wait = backoff(self.failure.count, retry_after);
        let at = Instant::now() + wait;
        self.failure.retry_at = Some(at);
        let err = with_retry_in(err, at);
        self.failure.last = Some(Box::new(err.clone()));
        err
    }

    /// Adopts a token set (written by us or by someone else).
    fn install(&mut self, tokens: TokenSet, version: Option<StoreVersion>) {
        if tokens.access_token != self.tokens.access_token {
            self.rejected = false;
        }
        info!(parent: &self.span, access = %tokens.access_token.fingerprint(), "new access token installed");
        self.tokens = tokens;
        self.version = version;
        // Tokens we failed to write are either these (now written) or stale:
        // writing them later would overwrite newer ones.
        self.unsaved = None;
        self.unsaved_lock = None;
        self.login = None;
        self.account_changed = false;
        self.failure = Failure::default();
    }

    /// Answers everyone waiting for the cycle that just ended.
    fn settle_waiters(&mut self, answer: Option<Result<AccessToken, BrokerError>>, ctx: &mut Context<Self>) {
        // Callers parked on the snapshot (`Park`) wait for the same outcome.
        if self.waiters.borrow().is_empty() && !self.published.asked() {
            return;
        }
        let usable = !self.account_changed && self.freshness(SystemTime::now()).is_usable();
        let result = match answer {
            // A failed refresh leaves a still-valid token usable.
            Some(Err(_)) if usable && !self.account_changed => Ok(self.tokens.access_token.clone()),
            Some(result) => result,
            None if usable => Ok(self.tokens.access_token.clone()),
            None if self.waiter_cycles < MAX_CYCLES_PER_WAIT => {
                // The cycle started before the token was rejected, or adopted
                // tokens that need a refresh themselves: one more, with what
                // we know now.
                self.waiter_cycles += 1;
                self.start_cycle(ctx);
                return;
            }
            None => Err(BrokerError::Unavailable {
                location: self.cfg.location.clone(),
                cause: crate::provider::RefreshError::Transient {
                    endpoint: self.cfg.provider.token_url().to_owned(),
                    kind: crate::provider::Failure::NoUsableToken(MAX_CYCLES_PER_WAIT),
                    retry_after: None,
                },
                retry_in: None,
            }),
        };
        self.waiter_cycles = 0;
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        debug!(parent: &self.span, waiters = waiters.len(), ok = result.is_ok(), "answering waiters");
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
        self.published.settle(result);
    }

    fn status(&self) -> Status {
        let state = if self.account_changed {
            State::AccountChanged
        } else if self.login.is_some() && !self.freshness(SystemTime::now()).is_usable() {
            State::LoginRequired
        } else {
            match self.freshness(SystemTime::now()) {
                Freshness::Fresh { .. } | Freshness::Unknown => State::Valid,
                Freshness::Due { .. } => State::RefreshDue,
                Freshness::Expired if self.login.is_some() => State::LoginRequired,
                Freshness::Expired => State::Expired,
            }
        };
        let mut counters = self.counters;
        counters.token_requests = self.requests.load(Ordering::Relaxed);
        Status {
            location: self.cfg.location.clone(),
            state,
            account_id: self.tokens.account_id.clone(),
            expires_at: self.tokens.expiry.map(|e| e.at),
            last_refresh: self.tokens.last_refresh,
            has_refresh_token: self.tokens.refresh_token.is_some(),
            refreshing: self.in_flight,
            access_token_fingerprint: self.tokens.access_token.fingerprint(),
            last_error: self
                .account_changed
                .then(|| self.account_error().to_string())
                .or_else(|| self.login.as_ref().map(|l| self.login_error(&l.reason).to_string()))
                .or_else(|| self.failure.last.as_ref().map(ToString::to_string)),
            counters,
        }
    }
}

fn with_retry_in(err: BrokerError, at: Instant) -> BrokerError {
    match err {
        BrokerError::Unavailable { location, cause, .. } => BrokerError::Unavailable {
            location,
            cause,
            retry_in: Some(at.saturating_duration_since(Instant::now())),
        },
        other => other,
    }
}

impl Actor for TokenActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Callers are bounded by the application; let them queue rather than
        // bounce between the mailbox and their executors.
        ctx.set_mailbox_capacity(1 << 20);
        self.publish(ctx);
        self.keep_fresh(ctx);
        if !self.cfg.watch_interval.is_zero() {
            ctx.run_interval(self.cfg.watch_interval, |act, ctx| act.poll_store(ctx));
        }
        debug!(parent: &self.span, access = %self.tokens.access_token.fingerprint(), "token actor started");
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.published.publish(None, None);
        self.published.close();
        let location = self.cfg.location.clone();
        for waiter in std::mem::take(&mut *self.waiters.borrow_mut()) {
            let _ = waiter.send(Err(BrokerError::Stopped {
                location: location.clone(),
            }));
        }
        // Rotated tokens that never reached the store die with the actor:
        // whoever stopped it must hear so (a CLI must not exit 0).
        let outcome = match &self.unsaved {
            None => Ok(()),
            Some(_) => Err(match self.failure.last.as_deref() {
                Some(err @ BrokerError::Store(_)) => err.clone(),
                _ => BrokerError::Store(crate::store::StoreError::Write {
                    path: self.cfg.location.clone().into(),
                    cause: "the new tokens of a refresh could not be written before the broker stopped".into(),
                }),
            }),
        };
        if outcome.is_err() {
            tracing::error!(parent: &self.span, "stopping with refreshed tokens that could not be written: the rotated refresh token is lost");
        }
        for stop in self.stop_waiters.drain(..) {
            let _ = stop.send(outcome.clone());
        }
        debug!(parent: &self.span, "token actor stopped");
    }
}

impl Handler<GetToken> for TokenActor {
    type Result = TokenReply;

    fn handle(&mut self, _msg: GetToken, ctx: &mut Self::Context) -> Self::Result {
        self.answer(ctx)
    }
}

/// A caller of [`TokenBroker::token`](crate::TokenBroker::token) parked on
/// the published snapshot asks for the outcome of this round on behalf of
/// every caller parked there (one message, not one per caller). Answered by
/// publishing into the snapshot: at once, or by `settle_waiters` when the
/// refresh in flight ends.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Park;

impl Handler<Park> for TokenActor {
    type Result = ();

    fn handle(&mut self, _msg: Park, ctx: &mut Self::Context) {
        if let TokenReply::Ready(result) = self.answer(ctx) {
            self.published.settle(result);
        }
    }
}

impl Handler<Reject> for TokenActor {
    type Result = TokenReply;

    fn handle(&mut self, msg: Reject, ctx: &mut Self::Context) -> Self::Result {
        if msg.token == self.tokens.access_token && !self.rejected {
            info!(parent: &self.span, access = %msg.token.fingerprint(), "the upstream API rejected the current access token");
            self.rejected = true;
            self.publish(ctx);
        }
        self.answer(ctx)
    }
}

impl Handler<Reload> for TokenActor {
    type Result = ResponseActFuture<Self, Result<(), BrokerError>>;

    fn handle(&mut self, _msg: Reload, _ctx: &mut Self::Context) -> Self::Result {
        self.reloading = true;
        let store = self.cfg.store.clone();
        let read = async move {
            tokio::task::spawn_blocking(move || (store.load(), store.version()))
                .await
                .unwrap_or_else(|e| {
                    let err = crate::store::StoreError::Unreadable {
                        path: "store".into(),
                        cause: e.to_string(),
                    };
                    (Err(err), None)
                })
        };
        Box::pin(read.into_actor(self).map(|(result, version), act, ctx| {
            act.reloading = false;
            // Remember what we saw even if it is unusable, so that one bad
            // write is reported once, not on every poll.
            act.version = version;
            let tokens = match result {
                Ok(tokens) => tokens,
                Err(e) => {
                    warn!(parent: &act.span, error = %e, "could not re-read the credentials; keeping the current tokens");
                    return Err(e.into());
                }
            };
            if let (Some(held), Some(now)) = (&act.tokens.account_id, &tokens.account_id) {
                if held != now {
                    warn!(parent: &act.span, "the credentials now belong to another account; serving nothing until restart");
                    act.account_changed = true;
                    act.publish(ctx);
                    return Err(act.account_error());
                }
            }
            if act.in_flight {
                // The cycle re-reads under the lock and settles it.
                return Ok(());
            }
            if act
                .unsaved
                .as_ref()
                .is_some_and(|unsaved| !tokens.differs_from(&unsaved.replaces))
            {
                // The file still holds what our unwritten tokens replace:
                // they are the newer ones, and the next cycle writes them.
                act.publish(ctx);
                return Ok(());
            }
            if tokens.differs_from(&act.tokens) {
                info!(parent: &act.span, "the credentials were changed by someone else; adopting them");
                act.counters.adoptions += 1;
                act.install(tokens, version);
            } else if act.account_changed {
                act.account_changed = false;
            }
            act.publish(ctx);
            act.keep_fresh(ctx);
            Ok(())
        }))
    }
}

impl Handler<GetStatus> for TokenActor {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _msg: GetStatus, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.status())
    }
}

impl Handler<Shutdown> for TokenActor {
    type Result = ResponseFuture<Result<(), BrokerError>>;

    fn handle(&mut self, _msg: Shutdown, ctx: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        // A cycle in flight that has not spent yet stops before it does.
        self.cfg.stopping.store(true, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        if !self.in_flight {
            if self.unsaved.is_some() {
                // One last attempt to write refreshed tokens we still hold,
                // whatever the backoff says: after this they are lost.
                self.start_cycle(ctx);
            } else {
                ctx.stop();
            }
        }
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}
