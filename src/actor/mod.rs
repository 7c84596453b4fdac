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
mod machine;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::dev::MessageResponse;
use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::clock::{Clock, Jitter};
use crate::credentials::{AccessToken, TokenSet};
use crate::error::BrokerError;
use crate::provider::Provider;
use crate::status::Status;
use crate::store::{Changed, Changes, Loaded, Store, Version};
use cycle::CycleOutcome;
pub(crate) use machine::Rules;
use machine::{
    Adoption, Begin, Decision, Login, Machine, Outcome, Settle, Shutdown as MachineShutdown, MIN_USEFUL_LIFETIME,
};

/// The token handed to callers, as published for the handle's fast path.
pub(crate) type Published = Arc<crate::snapshot::Snapshot>;

/// Everything a [`TokenActor`] needs that does not change.
#[derive(Debug)]
pub(crate) struct Config {
    pub store: Arc<dyn Store>,
    pub provider: Arc<Provider>,
    pub lock_timeout: Duration,
    /// How long a broker whose refresh token was refused waits for the
    /// winner's tokens before it reports that a sign-in is needed.
    pub winner_wait: Duration,
    /// Set when a shutdown is asked for: a cycle that has not spent the
    /// refresh token yet spends nothing.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Token requests sent (each spends a refresh token), for status.
    pub requests: AtomicU64,
    /// How often to check the store for outside changes (zero: never).
    pub watch_interval: Duration,
    /// What the state machine needs: policy, keep-fresh, names for errors.
    pub rules: Rules,
    /// Where the time comes from.
    pub clock: Arc<dyn Clock>,
    /// Whether `clock` is the system's wall clock (the fast path checks
    /// deadlines against it).
    pub wall_clock: bool,
    /// Where refresh-ahead and backoff jitter come from.
    pub jitter: Arc<dyn Jitter>,
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

/// The reply channel of a message waiting for a token.
type Waiter = oneshot::Sender<Result<AccessToken, BrokerError>>;

/// The waiting callers. Shared with the [`TokenReply`]s that add to it; the
/// actor and its replies live on one thread.
type Waiters = Rc<RefCell<Vec<Waiter>>>;

/// The actor's answer to [`GetToken`] or [`Reject`]: a result now, or a place
/// in the line for the refresh in flight.
///
/// Public only because it is the `Handler::Result` of the public actor for
/// public messages, which actix needs at least as visible as the actor
/// (E0446); nothing outside the crate can make or use one, so it is hidden.
#[doc(hidden)]
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

/// The actor that owns one credential: the thin shell around the pure
/// state machine (`machine.rs`) that does the I/O it asks for (run a refresh cycle, publish
/// the token, answer callers, set its one timer).
pub struct TokenActor {
    cfg: Arc<Config>,
    machine: Machine,
    /// The brokers' lock, held from a refresh whose tokens could not be
    /// written until they are.
    unsaved_lock: Option<crate::store::StoreLock>,
    /// Re-reads of the store under way (a `Reload` answers with a future
    /// spawned in the context: several may run side by side).
    reloading: u32,
    /// Re-reads started so far, and the newest of them that what the actor
    /// holds is known to be as new as (the last re-read applied, or every
    /// re-read started before the last refresh cycle ended): one that ends
    /// at or below it read older contents and is dropped.
    reads_started: u64,
    reads_settled: u64,
    /// Notifications of outside changes, subscribed to before the first
    /// load (see [`TokenActor::open`]); taken by `started`.
    changes: Option<Changes>,
    /// A change arrived while a cycle or a re-read ran: look again after.
    change_pending: bool,
    /// Callers waiting for the refresh in flight: the reply channels of
    /// their messages, answered directly (no task or channel of our own).
    /// (Made on first use: most credentials never have a message waiting.)
    waiters: Option<Waiters>,
    published: Published,
    /// When the machine next wants to look at the time.
    timer: Option<SpawnHandle>,
    stop_waiters: Vec<oneshot::Sender<Result<(), BrokerError>>>,
    span: tracing::Span,
}

impl std::fmt::Debug for TokenActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenActor")
            .field("location", &self.cfg.rules.location)
            .field("access", &self.machine.tokens().access_token)
            .field("refreshing", &self.machine.refreshing())
            .field("waiters", &self.waiting_messages())
            .finish_non_exhaustive()
    }
}

impl TokenActor {
    pub(crate) fn new(cfg: Arc<Config>, tokens: TokenSet, version: Option<Version>, published: Published) -> Self {
        let span = info_span!("credential", location = %cfg.rules.location);
        let machine = Machine::new(tokens, version, crate::clock::fraction(&*cfg.jitter));
        TokenActor {
            cfg,
            machine,
            unsaved_lock: None,
            reloading: 0,
            reads_started: 0,
            reads_settled: 0,
            changes: None,
            change_pending: false,
            waiters: None,
            published,
            timer: None,
            stop_waiters: Vec::new(),
            span,
        }
    }

    /// Also listens to `changes`, the store's notifications (subscribed to
    /// before the credentials were loaded, so that none is missed).
    pub(crate) fn with_changes(mut self, changes: Option<Changes>) -> Self {
        self.changes = changes;
        self
    }

    /// How many messages wait for the refresh in flight.
    fn waiting_messages(&self) -> usize {
        self.waiters.as_ref().map_or(0, |w| w.borrow().len())
    }

    /// The reply channels of the messages waiting, emptied.
    fn take_waiters(&mut self) -> Vec<Waiter> {
        self.waiters
            .as_ref()
            .map(|w| std::mem::take(&mut *w.borrow_mut()))
            .unwrap_or_default()
    }

    fn now(&self) -> SystemTime {
        self.cfg.clock.now()
    }

    fn jitter(&self) -> f64 {
        crate::clock::fraction(&*self.cfg.jitter)
    }

    /// Publishes what the machine says is fresh for the fast path, and sets
    /// the one timer for when it next wants to look at the time (the token's
    /// freshness ends, a backoff ends): starting a cycle then if it says so.
    fn refresh_view(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        let now = self.now();
        self.publish_at(now);
        if self.machine.tick(&self.cfg.rules, now) {
            debug!(parent: &self.span, "refreshing unasked (the refresh-ahead window is open, or unwritten tokens wait)");
            self.start_cycle(ctx);
            return;
        }
        // Readers compare a published deadline with the wall clock
        // themselves: without keep-fresh, the end of the fresh period needs
        // no timer (one timer less per idle credential).
        let withdraw = !self.cfg.wall_clock;
        if let Some(at) = self.machine.wake_at(&self.cfg.rules, now, withdraw) {
            // A time already past with nothing to start would spin.
            if let Ok(wait) = at.duration_since(now) {
                self.timer = Some(ctx.run_later(wait, |act, ctx| {
                    act.timer = None;
                    act.refresh_view(ctx);
                }));
            }
        }
    }

    fn answer(&mut self, ctx: &mut Context<Self>) -> TokenReply {
        self.machine.count_request();
        match self.machine.decide(&self.cfg.rules, self.now()) {
            Decision::Serve(token) => TokenReply::Ready(Ok(token)),
            Decision::ServeAndRefresh(token) => {
                self.start_cycle(ctx);
                TokenReply::Ready(Ok(token))
            }
            Decision::Fail(err) => TokenReply::Ready(Err(err)),
            Decision::Wait => {
                self.start_cycle(ctx);
                TokenReply::Wait(self.waiters.get_or_insert_with(Waiters::default).clone())
            }
        }
    }

    /// The store may have changed (a notification): re-read it, or, while
    /// a cycle or a re-read runs (it may have read before the change), once
    /// it is over.
    fn poll_store(&mut self, ctx: &mut Context<Self>) {
        if self.machine.refreshing() || self.reloading > 0 {
            if !self.change_pending {
                self.change_pending = true;
                ctx.run_later(CHANGE_RECHECK, |act, ctx| {
                    act.change_pending = false;
                    act.poll_store(ctx);
                });
            }
            return;
        }
        ctx.notify(Reload);
    }

    /// Starts a refresh cycle unless one runs. It runs inside the actor's
    /// context, not a caller's future, so a caller that gives up never cuts
    /// it short.
    fn start_cycle(&mut self, ctx: &mut Context<Self>) {
        if let Some(begin) = self.machine.begin() {
            self.run_cycle(begin, ctx);
        }
    }

    fn run_cycle(&mut self, begin: Begin, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        let span = info_span!(parent: &self.span, "refresh");
        let fut = cycle::run(self.cfg.clone(), begin, self.unsaved_lock.take()).instrument(span);
        ctx.spawn(fut.into_actor(self).map(|end, act, ctx| act.finish_cycle(end, ctx)));
    }

    fn finish_cycle(&mut self, end: cycle::CycleEnd, ctx: &mut Context<Self>) {
        // Whatever a re-read started before now found, this cycle read
        // the store after it, under the lock.
        self.reads_settled = self.reads_started;
        let before = self.machine.tokens().access_token.clone();
        let outcome = match end.outcome {
            CycleOutcome::Adopted(tokens, version) => Outcome::Adopted(tokens, version),
            CycleOutcome::Refreshed(tokens, version) => Outcome::Refreshed(tokens, version),
            CycleOutcome::Unchanged(version) => Outcome::Unchanged(version),
            CycleOutcome::LoginRequired {
                reason,
                dead_refresh,
                version,
            } => {
                warn!(parent: &self.span, %reason, "login required");
                Outcome::LoginRequired(Login {
                    reason,
                    dead_refresh,
                    version,
                })
            }
            CycleOutcome::Unsaved(unsaved, lock, err) => {
                self.unsaved_lock = lock;
                Outcome::Unsaved(unsaved, err)
            }
            CycleOutcome::Failed(err) => Outcome::Failed(err),
        };
        // Callers parked on the snapshot (`Park`) wait for the same outcome.
        let waiting = self.waiting_messages() > 0 || self.published.asked();
        let now = self.now();
        let jitter = self.jitter();
        let settle = self
            .machine
            .apply(&self.cfg.rules, outcome, end.unsaved_abandoned, waiting, now, jitter);
        if self.machine.unsaved().is_none() {
            // Written, or stale: the lock kept for them goes.
            self.unsaved_lock = None;
        }
        let tokens = self.machine.tokens();
        if tokens.access_token != before {
            info!(parent: &self.span, access = %tokens.access_token.fingerprint(), "new access token installed");
            if tokens.expiry.is_some_and(|e| e.at <= now + MIN_USEFUL_LIFETIME) {
                warn!(parent: &self.span, "the new access token was already expired on arrival; backing off");
            }
        }
        match settle {
            Some(Settle::Again(begin)) => {
                // The machine is already in the next cycle for the waiters.
                self.publish_only();
                self.run_cycle(*begin, ctx);
                return;
            }
            Some(Settle::Answer(result)) => {
                let waiters = self.take_waiters();
                debug!(parent: &self.span, waiters = waiters.len(), ok = result.is_ok(), "answering waiters");
                // Parked callers first: a caller that parks after hearing a
                // reply below must never be handed this (older) outcome.
                self.published.settle(result.clone());
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
            None => {}
        }
        if self.machine.should_stop() {
            ctx.stop();
            return;
        }
        self.refresh_view(ctx);
    }

    /// Publishes without touching the timer (a cycle is about to run).
    fn publish_only(&mut self) {
        self.publish_at(self.now());
    }

    /// Publishes what the machine says is fresh at `now`. The fast path
    /// checks a token's deadline against the system's wall clock, so with
    /// another clock nothing is published: every caller asks the actor,
    /// which decides at the time that clock says.
    fn publish_at(&mut self, now: SystemTime) {
        let publication = self.machine.publication(&self.cfg.rules, now);
        if self.cfg.wall_clock {
            self.published.publish(publication.token.as_ref(), publication.until);
        } else {
            self.published.publish(None, None);
        }
    }

    fn status(&self) -> Status {
        let (state, last_error) = self.machine.status(&self.cfg.rules, self.now());
        let tokens = self.machine.tokens();
        let mut counters = self.machine.counters();
        counters.token_requests = self.cfg.requests.load(Ordering::Relaxed);
        Status {
            location: self.cfg.rules.location.clone(),
            state,
            account_id: tokens.account_id.clone(),
            expires_at: tokens.expiry.map(|e| e.at),
            last_refresh: tokens.last_refresh,
            has_refresh_token: tokens.refresh_token.is_some(),
            refreshing: self.machine.refreshing(),
            access_token_fingerprint: tokens.access_token.fingerprint(),
            last_error,
            coordination_unavailable: self.cfg.store.coordination_unavailable(),
            counters,
        }
    }
}

impl Actor for TokenActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Callers are bounded by the application; let them queue rather than
        // bounce between the mailbox and their executors.
        ctx.set_mailbox_capacity(1 << 20);
        self.refresh_view(ctx);
        if let Some(changes) = self.changes.take() {
            ctx.add_stream(changes);
        }
        if let Some(moves) = self.cfg.clock.moves() {
            // A clock moved by hand (tests, simulations): look at the time
            // again at once, not when a timer sleeping in real time fires.
            ctx.add_stream(futures_util::StreamExt::map(moves, |()| ClockMoved));
        }
        debug!(parent: &self.span, access = %self.machine.tokens().access_token.fingerprint(), "token actor started");
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.published.publish(None, None);
        self.published.close();
        let location = self.cfg.rules.location.clone();
        for waiter in self.take_waiters() {
            let _ = waiter.send(Err(BrokerError::Stopped {
                location: location.clone(),
            }));
        }
        // Rotated tokens that never reached the store die with the actor:
        // whoever stopped it must hear so (a CLI must not exit 0).
        let outcome = self.machine.stop(&self.cfg.rules);
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
/// publishing into the snapshot: at once, or when the refresh in flight
/// ends.
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
        if self.machine.reject(&msg.token) {
            info!(parent: &self.span, access = %msg.token.fingerprint(), "the upstream API rejected the current access token");
            self.publish_only();
        }
        self.answer(ctx)
    }
}

impl Handler<Reload> for TokenActor {
    type Result = ResponseActFuture<Self, Result<(), BrokerError>>;

    fn handle(&mut self, _msg: Reload, _ctx: &mut Self::Context) -> Self::Result {
        self.reloading += 1;
        self.reads_started += 1;
        let read_no = self.reads_started;
        let store = self.cfg.store.clone();
        let read = async move { store.load().await };
        Box::pin(read.into_actor(self).map(move |result, act, ctx| {
            act.reloading -= 1;
            if act.reads_settled >= read_no {
                // A later re-read was applied, or a refresh cycle ended,
                // while this one ran: what it read is older than what the
                // actor holds. (A change made since is notified again.)
                return Ok(());
            }
            let (tokens, version) = match result {
                Ok(Loaded { tokens, version }) => {
                    act.reads_settled = read_no;
                    (tokens, Some(version))
                }
                Err(e) => {
                    warn!(parent: &act.span, error = %e, "could not re-read the credentials; keeping the current tokens");
                    return Err(e.into());
                }
            };
            let jitter = act.jitter();
            let adoption = act.machine.adopt(&act.cfg.rules, tokens, version, jitter);
            let result = match adoption {
                Adoption::AccountChanged(err) => {
                    warn!(parent: &act.span, "the credentials now belong to another account; serving nothing until restart");
                    Err(err)
                }
                Adoption::Adopted => {
                    info!(parent: &act.span, access = %act.machine.tokens().access_token.fingerprint(), "the credentials were changed by someone else; adopting them");
                    Ok(())
                }
                Adoption::Kept => Ok(()),
            };
            if act.machine.refreshing() {
                act.publish_only();
            } else {
                act.refresh_view(ctx);
            }
            result
        }))
    }
}

/// How soon a change that arrived during a cycle or a re-read is looked at
/// again.
const CHANGE_RECHECK: Duration = Duration::from_millis(50);

/// Notifications from [`Store::changes`]: the store may have changed.
impl StreamHandler<Changed> for TokenActor {
    fn handle(&mut self, _event: Changed, ctx: &mut Self::Context) {
        self.poll_store(ctx);
    }

    /// A store whose notifications end stops notifying; the actor goes on.
    fn finished(&mut self, _ctx: &mut Self::Context) {
        debug!(parent: &self.span, "the store's change notifications ended");
    }
}

/// The broker's clock was moved by hand (see [`Clock::moves`]).
struct ClockMoved;

impl StreamHandler<ClockMoved> for TokenActor {
    fn handle(&mut self, _event: ClockMoved, ctx: &mut Self::Context) {
        if !self.machine.refreshing() {
            self.refresh_view(ctx);
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
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
        // A cycle in flight that has not spent yet stops before it does.
        self.cfg.stopping.store(true, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        match self.machine.shutdown() {
            MachineShutdown::Stop => ctx.stop(),
            // One last attempt to write refreshed tokens we still hold,
            // whatever the backoff says: after this they are lost.
            MachineShutdown::WriteFirst => self.start_cycle(ctx),
            MachineShutdown::Wait => {}
        }
        Box::pin(async move { rx.await.unwrap_or(Ok(())) })
    }
}
