//! Refresh storms across credentials: what the brokers of one process
//! share per token endpoint (per token URL).
//!
//! - **A limit on token requests in flight** (default
//!   [`DEFAULT_ENDPOINT_LIMIT`]): when thousands of credentials fall due at
//!   once, at most that many requests reach the endpoint together; the
//!   others wait for a permit *before* their request is sent (a shutdown
//!   ends the wait, and nothing is spent).
//! - **A shared pause**: a 429 or 503 with `Retry-After` from the endpoint
//!   pauses every credential of that endpoint until then (at most
//!   [`MAX_BACKOFF`]), not only the one that got it. A
//!   credential whose refresh falls in the pause sends nothing and fails
//!   at once with [`Failure::NotSent`](super::Failure::NotSent) and the time
//!   left as `retry_after`: callers whose access token is still valid keep
//!   getting it, those whose token has expired get
//!   [`BrokerError::Unavailable`](crate::BrokerError::Unavailable) with
//!   `retry_in`. The last [`PAUSE_WAIT`] of a pause is waited out instead
//!   (a refresh that would fail and back off for longer than that waits
//!   and is sent).
//! - **One HTTP client** (connection pool and TLS configuration) per
//!   endpoint, instead of one per credential.
//!
//! The limit of an endpoint is the last one set explicitly by a broker of
//! that endpoint ([`BrokerBuilder::endpoint_limit`](crate::BrokerBuilder::endpoint_limit),
//! [`Brokers::endpoint_limit`](crate::Brokers::endpoint_limit)); brokers
//! that set none leave it as it is. An endpoint is forgotten when its last
//! broker is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use crate::clock::Clock;

use crate::defaults::MAX_BACKOFF;
pub use crate::defaults::{DEFAULT_ENDPOINT_LIMIT, PAUSE_WAIT};

/// How often a wait for a permit looks whether its broker is stopping.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// What the brokers of one token endpoint share.
pub struct Endpoint {
    state: Mutex<State>,
    released: tokio::sync::Notify,
    http: OnceLock<Result<reqwest::Client, String>>,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// By the clock of the broker that was told to wait.
    paused_until: Option<SystemTime>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Why no permit was given: nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The endpoint asked every client to wait this much longer.
    Paused(Duration),
    /// The broker is stopping.
    Stopping,
}

/// A token request in flight; dropping it lets the next one go.
#[derive(Debug)]
pub struct Permit {
    endpoint: Arc<Endpoint>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Ok(mut state) = self.endpoint.state.lock() {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        self.endpoint.released.notify_one();
    }
}

fn endpoints() -> &'static Mutex<HashMap<String, Weak<Endpoint>>> {
    static ENDPOINTS: OnceLock<Mutex<HashMap<String, Weak<Endpoint>>>> = OnceLock::new();
    ENDPOINTS.get_or_init(Mutex::default)
}

/// The process's shared state for `token_url`, created on first use.
/// `limit`, when given, becomes the endpoint's limit (zero counts as one).
pub fn endpoint(token_url: &str, limit: Option<usize>) -> Arc<Endpoint> {
    let mut map = endpoints().lock().unwrap_or_else(|e| e.into_inner());
    let found = map.get(token_url).and_then(Weak::upgrade);
    let endpoint = match found {
        Some(endpoint) => endpoint,
        None => {
            // Forget endpoints nobody uses any more (bounded work: only
            // when a new one is added).
            map.retain(|_, weak| weak.strong_count() > 0);
            let endpoint = Arc::new(Endpoint {
                state: Mutex::new(State {
                    limit: DEFAULT_ENDPOINT_LIMIT,
                    in_flight: 0,
                    paused_until: None,
                }),
                released: tokio::sync::Notify::new(),
                http: OnceLock::new(),
            });
            map.insert(token_url.to_owned(), Arc::downgrade(&endpoint));
            endpoint
        }
    };
    drop(map);
    if let Some(limit) = limit {
        endpoint.set_limit(limit);
    }
    endpoint
}

impl Endpoint {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the most token requests in flight (zero counts as one).
    pub fn set_limit(&self, limit: usize) {
        self.lock().limit = limit.max(1);
        // A raised limit lets waiters in.
        self.released.notify_waiters();
    }

    /// The most token requests in flight.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Token requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// How long the endpoint is still paused for at `now`.
    pub fn paused_for(&self, now: SystemTime) -> Option<Duration> {
        let until = self.lock().paused_until?;
        let left = until.duration_since(now).unwrap_or_default();
        (!left.is_zero()).then_some(left)
    }

    /// Pauses every credential of the endpoint for `wait` from `now` (at
    /// most [`MAX_BACKOFF`]), unless a longer pause is already set.
    pub fn pause(&self, wait: Duration, now: SystemTime) {
        let until = crate::policy::later(now, wait.min(MAX_BACKOFF));
        let mut state = self.lock();
        if state.paused_until.is_none_or(|at| at < until) {
            state.paused_until = Some(until);
        }
        drop(state);
        // Waiters look at the pause and give up.
        self.released.notify_waiters();
    }

    /// Waits for a permit to send one token request. Fails at once while
    /// the endpoint is paused (at the time `clock` says), and as soon as
    /// `stop` is set.
    pub async fn acquire(self: &Arc<Self>, stop: Option<&AtomicBool>, clock: &dyn Clock) -> Result<Permit, Refused> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let mut pause_left = Duration::ZERO;
            {
                let mut state = self.lock();
                if let Some(until) = state.paused_until {
                    pause_left = until.duration_since(clock.now()).unwrap_or_default();
                    if pause_left > PAUSE_WAIT {
                        return Err(Refused::Paused(pause_left));
                    }
                    if pause_left.is_zero() {
                        state.paused_until = None;
                    }
                }
                if pause_left.is_zero() && state.in_flight < state.limit {
                    state.in_flight += 1;
                    return Ok(Permit { endpoint: self.clone() });
                }
            }
            if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                return Err(Refused::Stopping);
            }
            if !pause_left.is_zero() {
                // The end of a pause: wait it out (in slices, for `stop`).
                tokio::time::sleep(pause_left.min(STOP_CHECK)).await;
                continue;
            }
            match stop {
                Some(_) => {
                    let _ = tokio::time::timeout(STOP_CHECK, released).await;
                }
                None => released.await,
            }
        }
    }

    /// The endpoint's HTTP client, built once by `build`.
    pub(crate) fn client(
        &self,
        build: impl FnOnce() -> Result<reqwest::Client, String>,
    ) -> Result<&reqwest::Client, String> {
        self.http.get_or_init(build).as_ref().map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_the_limit_in_flight_and_a_pause_refuses_everyone() {
        let clock = crate::clock::ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let endpoint = endpoint("https://limit.test/token", Some(2));
        let a = endpoint.acquire(None, &clock).await.unwrap();
        let _b = endpoint.acquire(None, &clock).await.unwrap();
        assert_eq!(endpoint.in_flight(), 2);
        let stop = AtomicBool::new(false);
        let waiting = endpoint.acquire(Some(&stop), &clock);
        tokio::pin!(waiting);
        assert!(futures_util::FutureExt::now_or_never(waiting.as_mut()).is_none());
        drop(a);
        let c = waiting.await.unwrap();
        assert_eq!(endpoint.in_flight(), 2);
        stop.store(true, Ordering::SeqCst);
        assert_eq!(
            endpoint.acquire(Some(&stop), &clock).await.unwrap_err(),
            Refused::Stopping
        );
        drop(c);
        endpoint.pause(Duration::from_secs(30), clock.now());
        assert!(
            matches!(endpoint.acquire(None, &clock).await, Err(Refused::Paused(left)) if left == Duration::from_secs(30))
        );
        assert_eq!(endpoint.paused_for(clock.now()), Some(Duration::from_secs(30)));
        // The pause ends by the clock that set it, not by the wall.
        clock.advance(Duration::from_secs(30));
        assert_eq!(endpoint.paused_for(clock.now()), None);
        drop(endpoint.acquire(None, &clock).await.unwrap());
        // The same URL is the same endpoint; no limit given leaves it.
        assert_eq!(super::endpoint("https://limit.test/token", None).limit(), 2);
        assert_eq!(
            super::endpoint("https://other.test/token", None).limit(),
            DEFAULT_ENDPOINT_LIMIT
        );
    }
}
