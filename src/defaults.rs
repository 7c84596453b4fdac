//! The crate's default durations and limits, in one place.
//!
//! [`BrokerBuilder`](crate::BrokerBuilder) starts from these; the command
//! line's defaults are the same values (its `--help` shows them).

use std::time::Duration;

/// The default refresh-ahead window: 10 minutes, twice the Codex CLI's 5,
/// so that a Codex process sharing the file usually finds tokens the broker
/// already refreshed instead of spending its own refresh token. Tokens that
/// live less than twice the window are refreshed at half-life.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(600);

/// The default timeout of one token request (connect, send and read).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// After a token request's timeout, how long the request in flight may
/// still finish.
///
/// A process stopped past its deadline (Ctrl-Z, `docker pause`, a frozen
/// VM) wakes with the timer already expired and, often, the provider's
/// answer waiting in the socket: the task that reads the socket may simply
/// not have run yet. Dropping that answer would be fatal, because the
/// provider has already spent the refresh token.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(1);

/// The default time a broker whose refresh token was refused waits for the
/// winner's tokens before it reports that a sign-in is needed: longer than
/// the Codex CLI's 5 s commit budget.
pub const DEFAULT_WINNER_WAIT: Duration = Duration::from_secs(8);

/// How often a broker checks its credentials file for outside changes by
/// default (one `stat` call each).
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What the default lock timeout adds to the longest time a legitimate
/// holder needs (see [`default_lock_timeout`]).
pub const LOCK_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// How long a refresh waits for another broker's lock unless told
/// otherwise: as long as a legitimate holder can need, two token requests
/// (an unknown outcome is retried once), the wait for a winner's tokens,
/// and [`LOCK_TIMEOUT_MARGIN`]. 78 s with the other defaults. Saturates
/// instead of overflowing.
///
/// ```
/// use std::time::Duration;
/// use token_broker::defaults::{default_lock_timeout, DEFAULT_HTTP_TIMEOUT, DEFAULT_WINNER_WAIT};
/// assert_eq!(default_lock_timeout(DEFAULT_HTTP_TIMEOUT, DEFAULT_WINNER_WAIT), Duration::from_secs(78));
/// ```
pub const fn default_lock_timeout(http_timeout: Duration, winner_wait: Duration) -> Duration {
    http_timeout
        .saturating_mul(2)
        .saturating_add(winner_wait)
        .saturating_add(LOCK_TIMEOUT_MARGIN)
}

/// How long a refresh cycle already under way can still take to answer
/// its callers: two token requests, each with [`TIMEOUT_GRACE`] (an unknown
/// outcome is retried once), and the wait for a winner's tokens.
pub const fn refresh_bound(http_timeout: Duration, winner_wait: Duration) -> Duration {
    http_timeout
        .saturating_add(TIMEOUT_GRACE)
        .saturating_mul(2)
        .saturating_add(winner_wait)
}

/// What a stop allows for the writes that follow a refresh: four attempts,
/// each waiting up to 10 s for the Codex CLI's commit locks.
pub const WRITES_BOUND: Duration = Duration::from_secs(45);

/// How long a stop waits for a refresh in flight to reach the store:
/// [`refresh_bound`] and [`WRITES_BOUND`]. 115 s with the defaults.
///
/// ```
/// use std::time::Duration;
/// use token_broker::defaults::{finish_bound, DEFAULT_HTTP_TIMEOUT, DEFAULT_WINNER_WAIT};
/// assert_eq!(finish_bound(DEFAULT_HTTP_TIMEOUT, DEFAULT_WINNER_WAIT), Duration::from_secs(115));
/// ```
pub const fn finish_bound(http_timeout: Duration, winner_wait: Duration) -> Duration {
    refresh_bound(http_timeout, winner_wait).saturating_add(WRITES_BOUND)
}

/// The shortest wait after a failed refresh.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);

/// The longest wait after a failed refresh.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The most of a token endpoint's response body that is read.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// The largest credentials file token-broker reads. Real files are a few
/// KiB.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Token requests in flight per token endpoint, shared by every broker of
/// the process that uses it, unless configured otherwise
/// ([`BrokerBuilder::endpoint_limit`](crate::BrokerBuilder::endpoint_limit)).
pub const DEFAULT_ENDPOINT_LIMIT: usize = 8;

/// A pause an endpoint asked for (429 or 503 with `Retry-After`) with at
/// most this left is waited out rather than failed.
pub const PAUSE_WAIT: Duration = Duration::from_secs(1);
