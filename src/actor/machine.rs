//! The actor's decisions as a pure state machine: no I/O, no clock of its
//! own, no randomness of its own.
//!
//! [`Machine`] holds what one credential's actor knows: the tokens it holds,
//! whether the upstream API rejected the current access token, and one
//! [`State`]. Every question is answered from that and a time `now` passed
//! in: [`Machine::decide`] for a caller, [`Machine::apply`] for the end of a
//! refresh cycle, [`Machine::tick`] for a timer, [`Machine::adopt`] for a
//! re-read of the store. The actix actor (`super`) is the shell that does
//! the I/O these ask for (run a cycle, publish a token, answer callers, set
//! a timer), so every rule here is tested with tables of fixed times.

use std::time::{Duration, SystemTime};

use crate::credentials::{AccessToken, RefreshToken, TokenSet};
use crate::error::BrokerError;
use crate::policy::{backoff_with, freshness_jittered, Freshness, RefreshPolicy};
use crate::provider::{Failure as FailureKind, RefreshError};
use crate::status::Counters;
use crate::store::Version as StoreVersion;

use super::cycle::Unsaved;

/// A refreshed access token with less than this left on arrival counts as
/// a provider fault (with backoff) rather than a success to build on.
pub(crate) const MIN_USEFUL_LIFETIME: Duration = Duration::from_millis(100);

/// The most refresh cycles one group of waiting callers may cause.
pub(crate) const MAX_CYCLES_PER_WAIT: u32 = 3;

/// What the machine needs to know about its credential that never changes.
#[derive(Debug)]
pub(crate) struct Rules {
    /// When tokens are due for refresh.
    pub policy: RefreshPolicy,
    /// Refresh when the refresh-ahead window opens even when nobody asks.
    pub keep_fresh: bool,
    /// Where the credentials live, for errors.
    pub location: String,
    /// What a person should do when a new sign-in is needed (`None`:
    /// "sign in again and write the new tokens to" the location).
    pub login_hint: Option<&'static str>,
    /// The token endpoint, for errors (shared with the provider).
    pub token_url: std::sync::Arc<str>,
}

/// The last failed refresh attempts, and when the next may start.
#[derive(Clone, Debug)]
pub(crate) struct Failing {
    /// Failed attempts in a row.
    pub count: u32,
    /// No attempt before this (callers without a usable token are told).
    pub retry_at: SystemTime,
    /// The last error, as callers get it.
    pub last: BrokerError,
}

/// The provider refused the refresh token (or there is none).
#[derive(Clone, Debug)]
pub(crate) struct Login {
    /// Why, for callers.
    pub reason: String,
    /// The refused refresh token: never sent again.
    pub dead_refresh: Option<RefreshToken>,
    /// The store version it was refused at: only a change of the store
    /// (a new sign-in) is worth another look.
    pub version: Option<StoreVersion>,
}

/// How things stand when no refresh cycle is running.
#[derive(Clone, Debug)]
pub(crate) enum Idle {
    /// Nothing is known to be wrong.
    Ready,
    /// The last attempts failed; the next waits for the backoff.
    BackingOff(Box<Failing>),
    /// A refresh returned tokens that the store has not taken yet: they are
    /// written again when the backoff ends (the shell keeps the store's
    /// lock meanwhile).
    Unsaved(Box<Unsaved>, Box<Failing>),
    /// A new sign-in is needed, unless the store changes.
    LoginRequired(Box<Login>),
    /// The store holds another account's tokens: nothing is served.
    AccountChanged,
}

/// The one state of a credential's actor.
#[derive(Clone, Debug)]
pub(crate) enum State {
    /// No cycle is running.
    Idle(Idle),
    /// A refresh cycle (lock, re-read, maybe spend, write) is running;
    /// `from` is how things stood when it started, `extra` how many more
    /// cycles the current waiters have caused.
    Refreshing { from: Idle, extra: u32 },
    /// The actor has stopped.
    Stopped,
}

/// How a refresh cycle ended, as the machine sees it (the shell keeps the
/// store's lock that comes with unwritten tokens).
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Someone else wrote newer usable tokens; no request was made.
    Adopted(TokenSet, Option<StoreVersion>),
    /// The refresh token was spent and the new tokens are stored.
    Refreshed(TokenSet, Option<StoreVersion>),
    /// The store holds what the actor holds and nothing needed doing.
    Unchanged(Option<StoreVersion>),
    /// The provider refused the refresh token (or there is none).
    LoginRequired(Login),
    /// A refresh succeeded but its tokens could not be written.
    Unsaved(Box<Unsaved>, BrokerError),
    /// Nothing changed; the error says why.
    Failed(BrokerError),
}

/// What one caller gets now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// This token, with no refresh.
    Serve(AccessToken),
    /// This token, and start one background refresh.
    ServeAndRefresh(AccessToken),
    /// Wait for the refresh in flight, starting one if none runs.
    Wait,
    /// This error.
    Fail(BrokerError),
}

/// What the shell does after a cycle ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Answer every waiting caller with this.
    Answer(Result<AccessToken, BrokerError>),
    /// Run one more cycle for the waiting callers (the machine is already
    /// in it).
    Again(Box<Begin>),
}

/// What the shell publishes for the fast path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Publication {
    /// The fresh token, or none to withdraw it.
    pub token: Option<AccessToken>,
    /// Fresh until then on the wall clock (`None`: until withdrawn).
    pub until: Option<SystemTime>,
}

/// What a re-read of the store found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Adoption {
    /// New tokens were installed.
    Adopted,
    /// Nothing to adopt (the same tokens, or a cycle settles it).
    Kept,
    /// The store now holds another account's tokens.
    AccountChanged(BrokerError),
}

/// One credential's actor state and the rules that move it.
#[derive(Debug)]
pub(crate) struct Machine {
    tokens: TokenSet,
    /// The store version `tokens` were read at, or last seen.
    seen: Option<StoreVersion>,
    /// The upstream API rejected the current access token.
    rejected: bool,
    /// This token generation's share of the refresh-ahead jitter.
    jitter: f64,
    state: State,
    /// A shutdown was asked for.
    stopping: bool,
    counters: Counters,
}

impl Machine {
    /// A machine holding `tokens` read at `seen`; `jitter` in `[0, 1)`
    /// spreads this generation's refresh point.
    pub(crate) fn new(tokens: TokenSet, seen: Option<StoreVersion>, jitter: f64) -> Self {
        Machine {
            tokens,
            seen,
            rejected: false,
            jitter,
            state: State::Idle(Idle::Ready),
            stopping: false,
            counters: Counters::default(),
        }
    }

    /// The tokens held.
    pub(crate) fn tokens(&self) -> &TokenSet {
        &self.tokens
    }

    /// The state.
    #[cfg(test)]
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// Counters since the start (without the shell's token-request count).
    pub(crate) fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether a cycle is running.
    pub(crate) fn refreshing(&self) -> bool {
        matches!(self.state, State::Refreshing { .. })
    }

    /// How things stand apart from a running cycle.
    fn idle(&self) -> Option<&Idle> {
        match &self.state {
            State::Idle(idle) | State::Refreshing { from: idle, .. } => Some(idle),
            State::Stopped => None,
        }
    }

    fn account_changed(&self) -> bool {
        matches!(self.idle(), Some(Idle::AccountChanged))
    }

    fn login(&self) -> Option<&Login> {
        match self.idle() {
            Some(Idle::LoginRequired(login)) => Some(&**login),
            _ => None,
        }
    }

    fn failing(&self) -> Option<&Failing> {
        match self.idle() {
            Some(Idle::BackingOff(f) | Idle::Unsaved(_, f)) => Some(&**f),
            _ => None,
        }
    }

    /// Unwritten rotated tokens, if any.
    pub(crate) fn unsaved(&self) -> Option<&Unsaved> {
        match self.idle() {
            Some(Idle::Unsaved(unsaved, _)) => Some(unsaved),
            _ => None,
        }
    }

    /// The freshness of the held token at `now`.
    pub(crate) fn freshness(&self, rules: &Rules, now: SystemTime) -> Freshness {
        if self.rejected {
            return Freshness::Expired;
        }
        freshness_jittered(&self.tokens, now, rules.policy, self.jitter)
    }

    /// Whether a new attempt may start at `now` (none runs, no backoff).
    fn may_attempt(&self, now: SystemTime) -> bool {
        !self.refreshing() && self.failing().is_none_or(|f| now >= f.retry_at)
    }

    /// After a refusal, only a change of the store is worth another cycle.
    fn store_changed_since_login(&self) -> bool {
        self.login().is_none_or(|login| login.version != self.seen)
    }

    /// What a caller asking for a token at `now` gets.
    pub(crate) fn decide(&self, rules: &Rules, now: SystemTime) -> Decision {
        if matches!(self.state, State::Stopped) {
            return Decision::Fail(BrokerError::Stopped {
                location: rules.location.clone(),
            });
        }
        if self.account_changed() {
            return Decision::Fail(account_error(rules));
        }
        let state = self.freshness(rules, now);
        if state.is_usable() {
            let token = self.tokens.access_token.clone();
            let refresh = matches!(state, Freshness::Due { .. })
                && !self.stopping
                && self.may_attempt(now)
                && self.store_changed_since_login();
            return if refresh {
                Decision::ServeAndRefresh(token)
            } else {
                Decision::Serve(token)
            };
        }
        if self.refreshing() {
            return Decision::Wait;
        }
        if let Some(login) = self.login() {
            if !self.store_changed_since_login() {
                return Decision::Fail(login_error(rules, &login.reason));
            }
            // The store changed since the provider refused us: a cycle will
            // re-read it, adopting new tokens or confirming the sign-in.
            return Decision::Wait;
        }
        match self.failing() {
            Some(f) if now < f.retry_at => Decision::Fail(with_retry_in(f.last.clone(), f.retry_at, now)),
            _ => Decision::Wait,
        }
    }

    /// Counts one request answered by the actor.
    pub(crate) fn count_request(&mut self) {
        self.counters.actor_requests += 1;
    }

    /// The upstream API rejected `token`: if it is the current token, it is
    /// no longer served. Returns whether anything changed.
    pub(crate) fn reject(&mut self, token: &AccessToken) -> bool {
        if *token == self.tokens.access_token && !self.rejected {
            self.rejected = true;
            return true;
        }
        false
    }

    /// Starts a cycle: what it needs to know. `None` when one runs already
    /// or the actor stopped.
    pub(crate) fn begin(&mut self) -> Option<Begin> {
        if !matches!(self.state, State::Idle(_)) {
            return None;
        }
        let State::Idle(idle) = std::mem::replace(&mut self.state, State::Stopped) else {
            return None;
        };
        let begin = Begin {
            held: self.tokens.clone(),
            rejected: self.rejected.then(|| self.tokens.access_token.clone()),
            dead_refresh: match &idle {
                Idle::LoginRequired(login) => login.dead_refresh.clone(),
                _ => None,
            },
            unsaved: match &idle {
                Idle::Unsaved(unsaved, _) => Some((**unsaved).clone()),
                _ => None,
            },
        };
        self.state = State::Refreshing { from: idle, extra: 0 };
        Some(begin)
    }

    /// Applies the end of the running cycle at `now`. `abandoned`: the cycle
    /// found the store moved past the unwritten tokens it was given.
    /// `waiting`: callers wait for this cycle. Returns what they get, if
    /// anyone waits.
    pub(crate) fn apply(
        &mut self,
        rules: &Rules,
        outcome: Outcome,
        abandoned: bool,
        waiting: bool,
        now: SystemTime,
        jitter: f64,
    ) -> Option<Settle> {
        let (mut from, extra) = match std::mem::replace(&mut self.state, State::Stopped) {
            State::Refreshing { from, extra } => (from, extra),
            other => {
                // No cycle ran: nothing to apply.
                self.state = other;
                return None;
            }
        };
        if abandoned {
            if let Idle::Unsaved(_, failing) = from {
                from = Idle::BackingOff(failing);
            }
        }
        let failures = match &from {
            Idle::BackingOff(f) | Idle::Unsaved(_, f) => f.count,
            _ => 0,
        };
        // What the waiters get: `None` means "the current token if usable,
        // else one more cycle".
        let answer = match outcome {
            Outcome::Adopted(tokens, version) => {
                self.counters.adoptions += 1;
                self.install(tokens, version, jitter);
                None
            }
            Outcome::Refreshed(tokens, version) => {
                self.counters.refreshes += 1;
                let token = tokens.access_token.clone();
                let short_lived = tokens
                    .expiry
                    .is_some_and(|e| e.at <= crate::policy::later(now, MIN_USEFUL_LIFETIME));
                self.install(tokens, version, jitter);
                if short_lived {
                    // Refreshing again at once would get the same: back off
                    // as after any provider fault, or a keep-fresh broker
                    // would refresh in a loop.
                    let fault = unavailable(rules, FailureKind::ExpiredOnArrival);
                    self.fail(Idle::Ready, failures, fault, None, now, jitter);
                }
                // The waiters asked for the result of this refresh: they get
                // it even if the local clock already calls it expired.
                Some(Ok(token))
            }
            Outcome::Unchanged(version) => {
                self.seen = version;
                self.state = State::Idle(from);
                None
            }
            Outcome::LoginRequired(login) => {
                self.counters.failures += 1;
                let err = login_error(rules, &login.reason);
                self.seen = login.version.clone();
                self.state = State::Idle(Idle::LoginRequired(Box::new(login)));
                Some(Err(err))
            }
            Outcome::Unsaved(unsaved, err) => {
                let err = self.fail(
                    Idle::Unsaved(unsaved, Box::new(placeholder(&err, now))),
                    failures,
                    err,
                    None,
                    now,
                    jitter,
                );
                Some(Err(err))
            }
            Outcome::Failed(err @ BrokerError::AccountChanged { .. }) => {
                self.counters.failures += 1;
                self.state = State::Idle(Idle::AccountChanged);
                Some(Err(err))
            }
            Outcome::Failed(err) => {
                let retry_after = match &err {
                    BrokerError::Unavailable {
                        cause: RefreshError::Transient { retry_after, .. },
                        ..
                    } => *retry_after,
                    _ => None,
                };
                let err = self.fail(from, failures, err, retry_after, now, jitter);
                Some(Err(err))
            }
        };
        if !waiting {
            return None;
        }
        let usable = !self.account_changed() && self.freshness(rules, now).is_usable();
        let result = match answer {
            // A failed refresh leaves a still-valid token usable.
            Some(Err(_)) if usable => Ok(self.tokens.access_token.clone()),
            Some(result) => result,
            None if usable => Ok(self.tokens.access_token.clone()),
            None if extra < MAX_CYCLES_PER_WAIT && !self.stopping => {
                // The cycle started before the token was rejected, or
                // adopted tokens that need a refresh themselves: one more,
                // with what we know now.
                if let Some(begin) = self.begin() {
                    if let State::Refreshing { extra: e, .. } = &mut self.state {
                        *e = extra + 1;
                    }
                    return Some(Settle::Again(Box::new(begin)));
                }
                Err(unavailable(rules, FailureKind::NoUsableToken(MAX_CYCLES_PER_WAIT)))
            }
            None if self.stopping => Err(BrokerError::Stopped {
                location: rules.location.clone(),
            }),
            None => Err(unavailable(rules, FailureKind::NoUsableToken(MAX_CYCLES_PER_WAIT))),
        };
        Some(Settle::Answer(result))
    }

    /// Records a failure on top of `from` (keeping unwritten tokens), with
    /// backoff; returns the error as callers get it.
    fn fail(
        &mut self,
        from: Idle,
        failures: u32,
        err: BrokerError,
        retry_after: Option<Duration>,
        now: SystemTime,
        jitter: f64,
    ) -> BrokerError {
        self.counters.failures += 1;
        let count = failures.saturating_add(1);
        let retry_at = crate::policy::later(now, backoff_with(count, retry_after, jitter));
        let err = with_retry_in(err, retry_at, now);
        let failing = Box::new(Failing {
            count,
            retry_at,
            last: err.clone(),
        });
        self.state = State::Idle(match from {
            Idle::Unsaved(unsaved, _) => Idle::Unsaved(unsaved, failing),
            _ => Idle::BackingOff(failing),
        });
        err
    }

    /// Installs tokens (written by us or by someone else): everything known
    /// about the old ones is forgotten.
    fn install(&mut self, tokens: TokenSet, version: Option<StoreVersion>, jitter: f64) {
        if tokens.access_token != self.tokens.access_token {
            self.rejected = false;
        }
        self.tokens = tokens;
        self.seen = version;
        self.jitter = jitter;
        // Tokens we failed to write are either these (now written) or stale:
        // writing them later would overwrite newer ones. A login or account
        // problem belonged to the old tokens.
        self.state = State::Idle(Idle::Ready);
    }

    /// A re-read of the store found `tokens` at `version`.
    pub(crate) fn adopt(
        &mut self,
        rules: &Rules,
        tokens: TokenSet,
        version: Option<StoreVersion>,
        jitter: f64,
    ) -> Adoption {
        // Remember what we saw even if nothing is adopted, so that one
        // change is looked at once.
        self.seen = version.clone();
        if let (Some(held), Some(now)) = (&self.tokens.account_id, &tokens.account_id) {
            if held != now {
                match &mut self.state {
                    State::Idle(idle) | State::Refreshing { from: idle, .. } => *idle = Idle::AccountChanged,
                    State::Stopped => {}
                }
                return Adoption::AccountChanged(account_error(rules));
            }
        }
        if self.refreshing() || matches!(self.state, State::Stopped) {
            // The cycle re-reads under the lock and settles it.
            return Adoption::Kept;
        }
        if self
            .unsaved()
            .is_some_and(|unsaved| !tokens.differs_from(&unsaved.replaces))
        {
            // The store still holds what our unwritten tokens replace: they
            // are the newer ones, and the next cycle writes them.
            return Adoption::Kept;
        }
        if tokens.differs_from(&self.tokens) {
            self.counters.adoptions += 1;
            self.install(tokens, version, jitter);
            return Adoption::Adopted;
        }
        if self.account_changed() {
            // The account we started with is back.
            self.state = State::Idle(Idle::Ready);
        }
        Adoption::Kept
    }

    /// What to publish for the fast path at `now`.
    pub(crate) fn publication(&self, rules: &Rules, now: SystemTime) -> Publication {
        let withdrawn = Publication {
            token: None,
            until: None,
        };
        if self.account_changed() || matches!(self.state, State::Stopped) {
            return withdrawn;
        }
        match self.freshness(rules, now) {
            Freshness::Fresh { refresh_at } => Publication {
                token: Some(self.tokens.access_token.clone()),
                until: Some(refresh_at),
            },
            Freshness::Unknown => Publication {
                token: Some(self.tokens.access_token.clone()),
                until: None,
            },
            Freshness::Due { .. } | Freshness::Expired => withdrawn,
        }
    }

    /// When the machine next wants [`tick`](Self::tick)ed: the end of the
    /// fresh period (with `keep_fresh`, or when the shell must `withdraw`
    /// the published token itself), the end of a backoff with unwritten
    /// tokens or with `keep_fresh` due. `None`: never.
    pub(crate) fn wake_at(&self, rules: &Rules, now: SystemTime, withdraw: bool) -> Option<SystemTime> {
        if self.refreshing() || self.stopping || matches!(self.state, State::Stopped) || self.account_changed() {
            return None;
        }
        let fresh = self.freshness(rules, now);
        let mut at = match fresh {
            // To withdraw the published token, or to refresh unasked.
            Freshness::Fresh { refresh_at } if withdraw || rules.keep_fresh => Some(refresh_at),
            _ => None,
        };
        let retry = self.failing().map(|f| f.retry_at);
        let keep_fresh_due = rules.keep_fresh && matches!(fresh, Freshness::Due { .. } | Freshness::Expired);
        if self.unsaved().is_some() || keep_fresh_due {
            at = earliest(at, retry);
        }
        // A due token of a keep-fresh broker that may refresh now is
        // handled by `tick` at once; a time in the past wakes at once.
        at
    }

    /// A timer fired (or the machine just changed) at `now`: whether to
    /// start a cycle nobody asked for. Unwritten tokens are written again
    /// when the backoff ends; with `keep_fresh`, a token whose window is
    /// open is refreshed so that a neighbour never has to.
    pub(crate) fn tick(&self, rules: &Rules, now: SystemTime) -> bool {
        if self.refreshing() || self.stopping || matches!(self.state, State::Stopped) || self.account_changed() {
            return false;
        }
        if self.unsaved().is_some() {
            return self.may_attempt(now);
        }
        rules.keep_fresh
            && matches!(self.freshness(rules, now), Freshness::Due { .. } | Freshness::Expired)
            && self.store_changed_since_login()
            && self.may_attempt(now)
    }

    /// A shutdown was asked for: whether to stop at once (`Stop`), run one
    /// last cycle to write unwritten tokens (`WriteFirst`), or wait for the
    /// running cycle (`Wait`).
    pub(crate) fn shutdown(&mut self) -> Shutdown {
        self.stopping = true;
        match &self.state {
            State::Refreshing { .. } => Shutdown::Wait,
            State::Idle(Idle::Unsaved(..)) => Shutdown::WriteFirst,
            State::Idle(_) | State::Stopped => Shutdown::Stop,
        }
    }

    /// Whether a shutdown was asked for and no cycle runs: stop now.
    pub(crate) fn should_stop(&self) -> bool {
        self.stopping && !self.refreshing()
    }

    /// The actor stopped: what whoever stopped it hears. `Err` when rotated
    /// tokens die with it.
    pub(crate) fn stop(&mut self, rules: &Rules) -> Result<(), BrokerError> {
        let outcome = match (self.unsaved(), self.failing()) {
            (None, _) => Ok(()),
            (
                Some(_),
                Some(Failing {
                    last: err @ BrokerError::Store(_),
                    ..
                }),
            ) => Err(err.clone()),
            (Some(_), _) => Err(BrokerError::Store(crate::store::StoreError::Write {
                location: crate::store::Location::named(rules.location.clone()),
                cause: "the new tokens of a refresh could not be written before the broker stopped".into(),
            })),
        };
        self.state = State::Stopped;
        outcome
    }

    /// The state for a status report at `now`, and the last error.
    pub(crate) fn status(&self, rules: &Rules, now: SystemTime) -> (crate::status::State, Option<String>) {
        use crate::status::State as S;
        let fresh = self.freshness(rules, now);
        let state = if self.account_changed() {
            S::AccountChanged
        } else if self.login().is_some() && !fresh.is_usable() {
            S::LoginRequired
        } else {
            match fresh {
                Freshness::Fresh { .. } | Freshness::Unknown => S::Valid,
                Freshness::Due { .. } => S::RefreshDue,
                Freshness::Expired => S::Expired,
            }
        };
        let last_error = if self.account_changed() {
            Some(account_error(rules).to_string())
        } else if let Some(login) = self.login() {
            Some(login_error(rules, &login.reason).to_string())
        } else {
            self.failing().map(|f| f.last.to_string())
        };
        (state, last_error)
    }
}

/// What a new cycle needs to know.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Begin {
    /// The tokens the actor holds.
    pub held: TokenSet,
    /// The access token the upstream API rejected, if any.
    pub rejected: Option<AccessToken>,
    /// A refresh token the provider already refused: never sent again.
    pub dead_refresh: Option<RefreshToken>,
    /// Tokens a refresh returned that could not be written yet.
    pub unsaved: Option<Unsaved>,
}

/// What a shutdown asks of the shell.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Shutdown {
    /// Stop now.
    Stop,
    /// Write unwritten tokens in one last cycle, then stop.
    WriteFirst,
    /// A cycle runs: stop when it ends.
    Wait,
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A stand-in failure, replaced by [`Machine::fail`] at once.
fn placeholder(err: &BrokerError, now: SystemTime) -> Failing {
    Failing {
        count: 0,
        retry_at: now,
        last: err.clone(),
    }
}

fn unavailable(rules: &Rules, kind: FailureKind) -> BrokerError {
    BrokerError::Unavailable {
        location: rules.location.clone(),
        cause: RefreshError::Transient {
            endpoint: rules.token_url.to_string(),
            kind,
            retry_after: None,
        },
        retry_in: None,
    }
}

fn account_error(rules: &Rules) -> BrokerError {
    BrokerError::AccountChanged {
        location: rules.location.clone(),
    }
}

fn login_error(rules: &Rules, reason: &str) -> BrokerError {
    BrokerError::LoginRequired {
        location: rules.location.clone(),
        reason: reason.to_owned(),
        hint: match rules.login_hint {
            Some(hint) => hint.to_owned(),
            None => format!("sign in again and write the new tokens to {}", rules.location),
        },
    }
}

/// `err` with the time left until `at` (for provider errors).
fn with_retry_in(err: BrokerError, at: SystemTime, now: SystemTime) -> BrokerError {
    match err {
        BrokerError::Unavailable { location, cause, .. } => BrokerError::Unavailable {
            location,
            cause,
            retry_in: Some(at.duration_since(now).unwrap_or_default()),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    //! Every rule of the machine as rows of fixed times: no sleeping, no
    //! clock on the wall.

    use super::*;
    use crate::credentials::{Expiry, ExpirySource};
    use crate::policy::CODEX_REFRESH_MARK;

    /// The epoch of these tables.
    const T0: u64 = 1_700_000_000;

    fn at(secs: i64) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        if secs >= 0 {
            base + Duration::from_secs(secs as u64)
        } else {
            base - Duration::from_secs((-secs) as u64)
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// Tokens `name` that expire at `expires` (seconds from T0), refreshed
    /// with refresh token `rt-<name>`.
    fn tokens(name: &str, expires: Option<i64>) -> TokenSet {
        let mut set = TokenSet::new(&format!("at-{name}"), Some(&format!("rt-{name}"))).unwrap();
        set.expiry = expires.map(|e| Expiry {
            at: at(e),
            lifetime: None,
            source: ExpirySource::Stored,
        });
        set
    }

    fn rules(keep_fresh: bool) -> Rules {
        Rules {
            policy: RefreshPolicy::new(s(600)),
            keep_fresh,
            location: "memory".into(),
            login_hint: Some("sign in again"),
            token_url: std::sync::Arc::from("http://127.0.0.1:1/token"),
        }
    }

    fn token(name: &str) -> AccessToken {
        AccessToken::new(format!("at-{name}"))
    }

    fn version(n: u64) -> Option<StoreVersion> {
        Some(StoreVersion::from_revision(n))
    }

    fn transient(retry_after: Option<Duration>, kind: FailureKind) -> BrokerError {
        BrokerError::Unavailable {
            location: "memory".into(),
            cause: RefreshError::Transient {
                endpoint: "http://127.0.0.1:1/token".into(),
                kind,
                retry_after,
            },
            retry_in: None,
        }
    }

    fn short(d: Decision) -> &'static str {
        match d {
            Decision::Serve(_) => "serve",
            Decision::ServeAndRefresh(_) => "serve+refresh",
            Decision::Wait => "wait",
            Decision::Fail(BrokerError::LoginRequired { .. }) => "fail:login",
            Decision::Fail(BrokerError::AccountChanged { .. }) => "fail:account",
            Decision::Fail(BrokerError::Unavailable { .. }) => "fail:unavailable",
            Decision::Fail(BrokerError::Stopped { .. }) => "fail:stopped",
            Decision::Fail(_) => "fail:other",
        }
    }

    /// A machine that ran one cycle ending in `outcome` at `now`.
    fn after(outcome: Outcome, now: SystemTime, jitter: f64) -> (Machine, Option<Settle>) {
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        m.begin().unwrap();
        let settle = m.apply(&rules(false), outcome, false, true, now, jitter);
        (m, settle)
    }

    #[test]
    fn the_refresh_policy_row_by_row() {
        // (expires at, asked at, jitter, rejected, what the caller gets)
        let rows: &[(Option<i64>, i64, f64, bool, &str)] = &[
            (Some(3600), 0, 0.0, false, "serve"),
            // The window opens 600 s before expiry.
            (Some(601), 0, 0.0, false, "serve"),
            (Some(600), 0, 0.0, false, "serve+refresh"),
            (Some(1), 0, 0.0, false, "serve+refresh"),
            (Some(0), 0, 0.0, false, "wait"),
            (Some(-5), 0, 0.0, false, "wait"),
            // Jitter moves the refresh later inside the window, never out.
            (Some(500), 0, 0.5, false, "serve"),
            (Some(449), 0, 0.5, false, "serve+refresh"),
            (Some(301), 0, 0.999, false, "serve"),
            (Some(299), 0, 0.999, false, "serve+refresh"),
            // No expiry known: used until rejected.
            (None, 0, 0.0, false, "serve"),
            (None, 0, 0.0, true, "wait"),
            // A rejected token is never served, however fresh.
            (Some(3600), 0, 0.0, true, "wait"),
        ];
        for &(expires, now, jitter, rejected, want) in rows {
            let mut m = Machine::new(tokens("a", expires), version(1), jitter);
            if rejected {
                assert!(m.reject(&token("a")));
            }
            let got = short(m.decide(&rules(false), at(now)));
            assert_eq!(
                got, want,
                "expires {expires:?}, now {now}, jitter {jitter}, rejected {rejected}"
            );
        }
    }

    #[test]
    fn the_codex_mark_is_kept_whatever_the_jitter() {
        let codex = Rules {
            policy: RefreshPolicy::new(s(600)).before_neighbour(CODEX_REFRESH_MARK),
            ..rules(true)
        };
        for jitter in [0.0, 0.25, 0.5, 0.999] {
            // 330 s left: the Codex CLI's 300 s mark plus the margin.
            let m = Machine::new(tokens("a", Some(330)), version(1), jitter);
            assert_eq!(short(m.decide(&codex, at(0))), "serve+refresh", "jitter {jitter}");
            assert!(m.tick(&codex, at(0)), "keep-fresh refreshes, jitter {jitter}");
        }
    }

    #[test]
    fn a_stale_rejection_changes_nothing() {
        let mut m = Machine::new(tokens("a", Some(3600)), version(1), 0.0);
        assert!(!m.reject(&token("old")));
        assert_eq!(short(m.decide(&rules(false), at(0))), "serve");
        assert!(m.reject(&token("a")));
        assert!(!m.reject(&token("a")), "rejecting twice changes nothing more");
        let begin = m.begin().unwrap();
        assert_eq!(begin.rejected, Some(token("a")));
        assert!(m.begin().is_none(), "one cycle at a time");
    }

    #[test]
    fn backoff_and_retry_after() {
        let r = rules(false);
        // (failure, jitter, asked at, what the caller gets)
        let rows: &[(Option<Duration>, f64, i64, &str)] = &[
            // First failure: 1 s backoff.
            (None, 0.0, 0, "fail:unavailable"),
            (None, 0.0, 1, "wait"),
            // A server's Retry-After outlasts the backoff.
            (Some(s(30)), 0.0, 29, "fail:unavailable"),
            (Some(s(30)), 0.0, 30, "wait"),
            // ...but never beyond the longest backoff.
            (Some(s(9999)), 0.0, 299, "fail:unavailable"),
            (Some(s(9999)), 0.0, 300, "wait"),
        ];
        for &(retry_after, jitter, asked, want) in rows {
            let (m, settle) = after(
                Outcome::Failed(transient(retry_after, FailureKind::RateLimited)),
                at(0),
                jitter,
            );
            assert!(matches!(
                settle,
                Some(Settle::Answer(Err(BrokerError::Unavailable { .. })))
            ));
            assert_eq!(short(m.decide(&r, at(asked))), want, "{retry_after:?} asked at {asked}");
        }
        // The error tells when the next attempt comes.
        let (m, _) = after(
            Outcome::Failed(transient(Some(s(30)), FailureKind::RateLimited)),
            at(0),
            0.0,
        );
        match m.decide(&r, at(10)) {
            Decision::Fail(BrokerError::Unavailable { retry_in, .. }) => assert_eq!(retry_in, Some(s(20))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_grows_with_each_failure_and_ends_with_success() {
        let r = rules(false);
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        let mut now = at(0);
        let mut waits = Vec::new();
        for _ in 0..5 {
            m.begin().unwrap();
            m.apply(
                &r,
                Outcome::Failed(transient(None, FailureKind::RateLimited)),
                false,
                false,
                now,
                0.999,
            );
            let Some(Failing { retry_at, count, .. }) = m.failing().cloned() else {
                panic!()
            };
            waits.push((count, retry_at.duration_since(now).unwrap().as_secs()));
            now = retry_at;
        }
        assert_eq!(waits, [(1, 1), (2, 1), (3, 3), (4, 7), (5, 15)]);
        m.begin().unwrap();
        let settle = m.apply(
            &r,
            Outcome::Refreshed(tokens("b", Some(7200)), version(2)),
            false,
            true,
            now,
            0.0,
        );
        assert_eq!(settle, Some(Settle::Answer(Ok(token("b")))));
        assert!(matches!(m.state(), State::Idle(Idle::Ready)));
    }

    #[test]
    fn an_unknown_outcome_backs_off_like_any_fault_and_keeps_a_valid_token() {
        let r = rules(false);
        let mut m = Machine::new(tokens("a", Some(60)), version(1), 0.0);
        assert_eq!(short(m.decide(&r, at(0))), "serve+refresh");
        m.begin().unwrap();
        let unknown = transient(None, FailureKind::Timeout(s(30)));
        let settle = m.apply(&r, Outcome::Failed(unknown), false, true, at(1), 0.0);
        // The waiters still get the valid token.
        assert_eq!(settle, Some(Settle::Answer(Ok(token("a")))));
        // Served during the backoff, without a new attempt.
        assert_eq!(short(m.decide(&r, at(1))), "serve");
        assert_eq!(short(m.decide(&r, at(2))), "serve+refresh");
    }

    #[test]
    fn login_required_until_the_store_changes() {
        let r = rules(true);
        let login = Login {
            reason: "invalid_grant".into(),
            dead_refresh: Some(RefreshToken::new("rt-a")),
            version: version(1),
        };
        let (mut m, settle) = after(Outcome::LoginRequired(login), at(0), 0.0);
        assert!(matches!(
            settle,
            Some(Settle::Answer(Err(BrokerError::LoginRequired { .. })))
        ));
        assert_eq!(short(m.decide(&r, at(100))), "fail:login");
        assert!(!m.tick(&r, at(100)), "keep-fresh spends nothing after a refusal");
        assert_eq!(m.wake_at(&r, at(100), true), None);
        assert_eq!(m.status(&r, at(100)).0, crate::status::State::LoginRequired);
        // The same tokens, rewritten (a new version): worth one look.
        assert_eq!(m.adopt(&r, tokens("a", Some(-1)), version(2), 0.0), Adoption::Kept);
        assert_eq!(short(m.decide(&r, at(100))), "wait");
        let begin = m.begin().unwrap();
        assert_eq!(
            begin.dead_refresh,
            Some(RefreshToken::new("rt-a")),
            "the refused token is never sent again"
        );
        // A new sign-in: adopted, everything forgotten.
        let mut m = after(
            Outcome::LoginRequired(Login {
                reason: "x".into(),
                dead_refresh: None,
                version: version(1),
            }),
            at(0),
            0.0,
        )
        .0;
        assert_eq!(
            m.adopt(&r, tokens("new", Some(7200)), version(3), 0.0),
            Adoption::Adopted
        );
        assert_eq!(short(m.decide(&r, at(100))), "serve");
        assert_eq!(m.status(&r, at(100)), (crate::status::State::Valid, None));
    }

    #[test]
    fn another_account_is_never_served_until_the_first_comes_back() {
        let r = rules(true);
        let mut a = tokens("a", Some(7200));
        a.account_id = Some("acct-1".into());
        let mut m = Machine::new(a.clone(), version(1), 0.0);
        let mut b = tokens("b", Some(7200));
        b.account_id = Some("acct-2".into());
        assert!(matches!(m.adopt(&r, b, version(2), 0.0), Adoption::AccountChanged(_)));
        assert_eq!(short(m.decide(&r, at(0))), "fail:account");
        assert_eq!(m.publication(&r, at(0)).token, None);
        assert!(!m.tick(&r, at(7000)));
        assert!(m.begin().is_some(), "a cycle may still run (and re-reads)");
        let (_m2, _) = (0, 0);
        // A cycle that finds the other account again.
        let settle = m.apply(
            &r,
            Outcome::Failed(BrokerError::AccountChanged {
                location: "memory".into(),
            }),
            false,
            true,
            at(0),
            0.0,
        );
        assert!(matches!(
            settle,
            Some(Settle::Answer(Err(BrokerError::AccountChanged { .. })))
        ));
        // The first account is back.
        assert_eq!(m.adopt(&r, a, version(3), 0.0), Adoption::Kept);
        assert_eq!(short(m.decide(&r, at(0))), "serve");
    }

    #[test]
    fn waiters_cause_at_most_three_more_cycles() {
        let r = rules(false);
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        m.begin().unwrap();
        let mut settles = Vec::new();
        for n in 0..5 {
            // Each cycle adopts tokens that are already expired.
            let settle = m.apply(
                &r,
                Outcome::Adopted(tokens(&format!("x{n}"), Some(-1)), version(n + 2)),
                false,
                true,
                at(0),
                0.0,
            );
            let again = matches!(settle, Some(Settle::Again(_)));
            settles.push(again);
            if !again {
                assert!(matches!(
                    settle,
                    Some(Settle::Answer(Err(BrokerError::Unavailable { .. })))
                ));
                break;
            }
        }
        assert_eq!(settles, [true, true, true, false]);
        // Nobody waiting: no extra cycle.
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        m.begin().unwrap();
        assert_eq!(
            m.apply(&r, Outcome::Unchanged(version(1)), false, false, at(0), 0.0),
            None
        );
        assert!(!m.refreshing());
    }

    #[test]
    fn tokens_expired_on_arrival_are_handed_to_the_waiters_then_backed_off() {
        let r = rules(true);
        let (m, settle) = after(Outcome::Refreshed(tokens("b", Some(0)), version(2)), at(0), 0.0);
        assert_eq!(settle, Some(Settle::Answer(Ok(token("b")))));
        assert!(!m.tick(&r, at(0)), "no refresh loop");
        assert_eq!(
            m.wake_at(&r, at(0), true),
            Some(at(1)),
            "keep-fresh tries again after the backoff"
        );
        assert!(m.tick(&r, at(1)));
        assert_eq!(m.counters().refreshes, 1);
        assert_eq!(m.counters().failures, 1);
    }

    /// Review of issue 10, finding 3: a provider (or a clock) that keeps
    /// handing out tokens already expired on arrival is a provider fault
    /// "with backoff", but the backoff restarted at one failure on every
    /// such refresh: a keep-fresh broker spent a refresh token every second,
    /// forever, instead of backing off exponentially to 5 minutes.
    #[test]
    fn tokens_expired_on_arrival_again_and_again_back_off_longer_each_time() {
        let r = rules(true);
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        let mut now = at(0);
        let mut waits = Vec::new();
        for n in 0..5 {
            assert!(m.tick(&r, now), "keep-fresh tries again after the backoff");
            m.begin().unwrap();
            m.apply(
                &r,
                Outcome::Refreshed(tokens(&format!("x{n}"), Some(0)), version(n + 2)),
                false,
                false,
                now,
                0.999,
            );
            let Some(Failing { retry_at, count, .. }) = m.failing().cloned() else {
                panic!()
            };
            waits.push((count, retry_at.duration_since(now).unwrap().as_secs()));
            now = retry_at;
        }
        assert_eq!(waits, [(1, 1), (2, 1), (3, 3), (4, 7), (5, 15)]);
    }

    #[test]
    fn keep_fresh_wakes_when_the_window_opens() {
        let r = rules(true);
        let m = Machine::new(tokens("a", Some(3600)), version(1), 0.0);
        assert_eq!(m.wake_at(&r, at(0), true), Some(at(3000)));
        assert!(!m.tick(&r, at(2999)));
        assert!(m.tick(&r, at(3000)));
        // Without keep_fresh, the timer only withdraws the published token.
        let lazy = rules(false);
        assert_eq!(m.wake_at(&lazy, at(0), true), Some(at(3000)));
        // ...and only when readers cannot compare the deadline themselves.
        assert_eq!(m.wake_at(&lazy, at(0), false), None);
        assert_eq!(m.wake_at(&r, at(0), false), Some(at(3000)));
        assert!(!m.tick(&lazy, at(3000)));
        assert_eq!(m.wake_at(&lazy, at(3000), true), None);
        assert_eq!(
            m.publication(&lazy, at(0)),
            Publication {
                token: Some(token("a")),
                until: Some(at(3000))
            }
        );
        assert_eq!(m.publication(&lazy, at(3000)).token, None);
        let unknown = Machine::new(tokens("a", None), version(1), 0.0);
        assert_eq!(
            unknown.publication(&lazy, at(0)),
            Publication {
                token: Some(token("a")),
                until: None
            }
        );
        assert_eq!(unknown.wake_at(&r, at(0), true), None);
    }

    fn unsaved(write_err: BrokerError) -> (Machine, Option<Settle>) {
        let u = Unsaved {
            tokens: tokens("b", Some(7200)),
            replaces: tokens("a", Some(-1)),
        };
        after(Outcome::Unsaved(Box::new(u), write_err), at(0), 0.0)
    }

    fn write_error() -> BrokerError {
        BrokerError::Store(crate::store::StoreError::Write {
            location: crate::store::Location::named("memory"),
            cause: "disk full".into(),
        })
    }

    #[test]
    fn unwritten_tokens_are_written_again_after_the_backoff_and_on_shutdown() {
        let r = rules(false);
        let (mut m, settle) = unsaved(write_error());
        assert!(matches!(settle, Some(Settle::Answer(Err(BrokerError::Store(_))))));
        assert!(!m.tick(&r, at(0)));
        assert_eq!(m.wake_at(&r, at(0), true), Some(at(1)));
        assert!(m.tick(&r, at(1)), "written again unasked");
        let begin = m.begin().unwrap();
        assert_eq!(begin.unsaved.unwrap().tokens, tokens("b", Some(7200)));
        // The write fails again: the tokens stay, the backoff grows.
        m.apply(&r, Outcome::Failed(write_error()), false, false, at(1), 0.999);
        assert!(m.unsaved().is_some());
        assert_eq!(m.failing().unwrap().count, 2);
        // A shutdown writes them first; if that fails, the stop says so.
        assert_eq!(m.shutdown(), Shutdown::WriteFirst);
        assert!(!m.tick(&r, at(100)), "no timer-driven cycles while stopping");
        m.begin().unwrap();
        assert_eq!(m.shutdown(), Shutdown::Wait);
        m.apply(&r, Outcome::Failed(write_error()), false, false, at(2), 0.0);
        assert!(m.should_stop());
        assert!(matches!(m.stop(&r), Err(BrokerError::Store(_))));
    }

    #[test]
    fn unwritten_tokens_that_the_store_moved_past_are_dropped() {
        let r = rules(false);
        let (mut m, _) = unsaved(write_error());
        // A re-read finds the store still holding what they replace: kept.
        assert_eq!(m.adopt(&r, tokens("a", Some(-1)), version(1), 0.0), Adoption::Kept);
        assert!(m.unsaved().is_some());
        // A cycle that found someone else's tokens drops them.
        m.begin().unwrap();
        m.apply(
            &r,
            Outcome::Adopted(tokens("c", Some(7200)), version(5)),
            true,
            false,
            at(1),
            0.0,
        );
        assert!(m.unsaved().is_none());
        assert_eq!(m.shutdown(), Shutdown::Stop);
        assert_eq!(m.stop(&r), Ok(()));
    }

    #[test]
    fn shutdown_during_a_refresh_waits_for_it_and_spends_nothing_more() {
        let r = rules(true);
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        m.begin().unwrap();
        assert_eq!(m.shutdown(), Shutdown::Wait);
        assert!(!m.should_stop());
        // The refresh lands and is written before the stop.
        let settle = m.apply(
            &r,
            Outcome::Refreshed(tokens("b", Some(7200)), version(2)),
            false,
            true,
            at(0),
            0.0,
        );
        assert_eq!(settle, Some(Settle::Answer(Ok(token("b")))));
        assert!(m.should_stop());
        assert_eq!(m.stop(&r), Ok(()));
        assert_eq!(short(m.decide(&r, at(0))), "fail:stopped");
        assert_eq!(m.publication(&r, at(0)).token, None);
        // Stopping with an expired token: waiters are told, no extra cycle.
        let mut m = Machine::new(tokens("a", Some(-1)), version(1), 0.0);
        m.begin().unwrap();
        m.shutdown();
        let settle = m.apply(
            &r,
            Outcome::Failed(BrokerError::Stopped {
                location: "memory".into(),
            }),
            false,
            true,
            at(0),
            0.0,
        );
        assert!(matches!(settle, Some(Settle::Answer(Err(_)))));
        assert!(m.should_stop());
        // Nothing due is refreshed while stopping.
        let mut m = Machine::new(tokens("a", Some(100)), version(1), 0.0);
        m.shutdown();
        assert_eq!(short(m.decide(&r, at(0))), "serve");
    }

    #[test]
    fn status_rows() {
        use crate::status::State as S;
        let r = rules(false);
        let rows: &[(Option<i64>, S)] = &[
            (Some(3600), S::Valid),
            (Some(300), S::RefreshDue),
            (Some(-1), S::Expired),
            (None, S::Valid),
        ];
        for &(expires, want) in rows {
            let m = Machine::new(tokens("a", expires), version(1), 0.0);
            assert_eq!(m.status(&r, at(0)), (want, None), "{expires:?}");
        }
        let (m, _) = after(Outcome::Failed(transient(None, FailureKind::RateLimited)), at(0), 0.0);
        let (state, last) = m.status(&r, at(0));
        assert_eq!(state, S::Expired);
        assert!(last.unwrap().contains("retrying in"));
    }
}
