//! When a token is fresh, due for refresh or expired, and how long to wait
//! after a failed refresh. Pure functions of time, tested on their own.

use std::time::{Duration, Instant, SystemTime};

use crate::credentials::TokenSet;
use crate::defaults::{MAX_BACKOFF, MIN_BACKOFF};
/// The Codex CLI refreshes on its own when less than this is left (and
/// after a second 401). A broker on a Codex file refreshes before that mark
/// whenever the token lives long enough, so the Codex CLI never has to.
pub const CODEX_REFRESH_MARK: Duration = Duration::from_secs(300);
/// How far before a neighbour's mark the refresh point is placed.
pub const NEIGHBOUR_MARGIN: Duration = Duration::from_secs(30);

/// When to refresh: the refresh-ahead window, and the mark at which another
/// program sharing the credential refreshes on its own, if any.
///
/// ```
/// use std::time::Duration;
/// use token_broker::policy::{RefreshPolicy, CODEX_REFRESH_MARK};
/// let policy = RefreshPolicy::new(Duration::from_secs(600)).before_neighbour(CODEX_REFRESH_MARK);
/// // 8-minute tokens: the window opens 5.5 minutes before expiry, not at half-life.
/// let eight = Duration::from_secs(480);
/// assert_eq!(policy.ahead(Some(eight)), Duration::from_secs(330));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// How long before expiry the window opens (at half-life for tokens
    /// that live less than twice this).
    pub window: Duration,
    /// Another program refreshes the same credential on its own when this
    /// much is left (the Codex CLI: 5 minutes).
    pub neighbour_mark: Option<Duration>,
}

impl RefreshPolicy {
    /// A policy with refresh-ahead `window` and no neighbour.
    pub const fn new(window: Duration) -> Self {
        RefreshPolicy {
            window,
            neighbour_mark: None,
        }
    }

    /// Opens the window before `mark` (plus [`NEIGHBOUR_MARGIN`]) whenever
    /// the token's lifetime allows it, overriding the half-life rule.
    pub const fn before_neighbour(mut self, mark: Duration) -> Self {
        self.neighbour_mark = Some(mark);
        self
    }

    /// How long before expiry to refresh a token of `lifetime` (`None`:
    /// unknown).
    pub fn ahead(&self, lifetime: Option<Duration>) -> Duration {
        let mut ahead = match lifetime {
            Some(life) if life < self.window.saturating_mul(2) => life / 2,
            _ => self.window,
        };
        if let Some(mark) = self.neighbour_mark {
            let want = mark.saturating_add(NEIGHBOUR_MARGIN);
            match lifetime {
                // Keep at least a tenth of the lifetime fresh, so a refresh
                // never triggers the next one at once; below that the
                // neighbour's mark cannot be beaten.
                Some(life) if life > want => ahead = ahead.max(want.min(life - life / 10)),
                Some(_) => {}
                None => ahead = ahead.max(want),
            }
        }
        ahead
    }

    /// Whether the configured window falls after the neighbour's mark, so
    /// that the neighbour could refresh first without the override.
    pub fn window_after_mark(&self) -> bool {
        self.neighbour_mark.is_some_and(|mark| self.window <= mark)
    }
}

impl From<Duration> for RefreshPolicy {
    fn from(window: Duration) -> Self {
        RefreshPolicy::new(window)
    }
}

/// How usable an access token is at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Use it as is, with no network call, until `refresh_at`.
    Fresh {
        /// When the refresh-ahead window opens.
        refresh_at: SystemTime,
    },
    /// No expiry is known: use it until the upstream API rejects it.
    Unknown,
    /// Still valid until `expires_at`, but inside the refresh-ahead window:
    /// hand it out and refresh once in the background.
    Due {
        /// When it stops working.
        expires_at: SystemTime,
    },
    /// No longer valid: callers wait for a refresh.
    Expired,
}

impl Freshness {
    /// Whether the token may still be handed out.
    pub fn is_usable(self) -> bool {
        !matches!(self, Freshness::Expired)
    }
}

/// The freshness of `tokens` at `now` under `policy` (a [`RefreshPolicy`]
/// or just a refresh-ahead window).
///
/// The window opens `window` before expiry; for a token whose whole
/// lifetime is shorter than twice the window, it opens at half-life; with a
/// neighbour's mark, before that mark when the lifetime allows.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use token_broker::policy::{freshness, Freshness};
/// use token_broker::credentials::{Expiry, ExpirySource, TokenSet};
/// let now = SystemTime::now();
/// let mut set = TokenSet::new("opaque", None).unwrap();
/// set.expiry = Some(Expiry { at: now + Duration::from_secs(3 * 86400), lifetime: None, source: ExpirySource::Stored });
/// assert!(matches!(freshness(&set, now, Duration::from_secs(600)), Freshness::Fresh { .. }));
/// ```
pub fn freshness(tokens: &TokenSet, now: SystemTime, policy: impl Into<RefreshPolicy>) -> Freshness {
    freshness_jittered(tokens, now, policy, 0.0)
}

/// The largest share of the refresh-ahead window by which a refresh is
/// delayed at random, so that many credentials that fall due in the same
/// minute do not all refresh at once. Half the window always stays for the
/// refresh itself, and a neighbour's mark is never passed.
pub const WINDOW_JITTER: f64 = 0.5;

/// [`freshness`] with the refresh point moved later by `jitter` (a fraction
/// in `[0, 1)`) of at most [`WINDOW_JITTER`] of the window, never past a
/// neighbour's mark. `jitter = 0` is [`freshness`] exactly, and a jittered
/// token is never `Fresh` where the plain one is `Due` for longer than the
/// cut: every refresh point stays inside the window.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use token_broker::policy::{freshness_jittered, Freshness};
/// use token_broker::credentials::{Expiry, ExpirySource, TokenSet};
/// let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
/// let mut set = TokenSet::new("opaque", None).unwrap();
/// // Eight minutes left, a ten-minute window: due at once without jitter...
/// set.expiry = Some(Expiry { at: now + Duration::from_secs(480), lifetime: None, source: ExpirySource::Stored });
/// let window = Duration::from_secs(600);
/// assert!(matches!(freshness_jittered(&set, now, window, 0.0), Freshness::Due { .. }));
/// // ...and still fresh for a credential whose refresh was spread 40% later.
/// assert!(matches!(freshness_jittered(&set, now, window, 0.99), Freshness::Fresh { .. }));
/// ```
pub fn freshness_jittered(
    tokens: &TokenSet,
    now: SystemTime,
    policy: impl Into<RefreshPolicy>,
    jitter: f64,
) -> Freshness {
    let policy = policy.into();
    let Some(expiry) = tokens.expiry else {
        return Freshness::Unknown;
    };
    if now >= expiry.at {
        return Freshness::Expired;
    }
    let lifetime = expiry
        .lifetime
        .or_else(|| tokens.last_refresh.and_then(|at| expiry.at.duration_since(at).ok()));
    let ahead = policy.ahead(lifetime);
    let ahead = ahead.saturating_sub(policy.jitter_cut(ahead, jitter));
    let refresh_at = expiry.at.checked_sub(ahead).unwrap_or(SystemTime::UNIX_EPOCH);
    if now < refresh_at {
        Freshness::Fresh { refresh_at }
    } else {
        Freshness::Due { expires_at: expiry.at }
    }
}

impl RefreshPolicy {
    /// How much later than `ahead` before expiry a refresh with `jitter`
    /// happens: at most [`WINDOW_JITTER`] of `ahead`, and never past the
    /// neighbour's mark (plus [`NEIGHBOUR_MARGIN`]).
    pub fn jitter_cut(&self, ahead: Duration, jitter: f64) -> Duration {
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut most = ahead.mul_f64(WINDOW_JITTER);
        if let Some(mark) = self.neighbour_mark {
            most = most.min(ahead.saturating_sub(mark.saturating_add(NEIGHBOUR_MARGIN)));
        }
        most.mul_f64(jitter)
    }
}

/// How far "never" is when a duration is too large to add: a century.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `at + wait`, or a century from `at` when that overflows (an embedder
/// may pass `Duration::MAX` for "no limit"). Never panics.
pub(crate) fn later(at: SystemTime, wait: Duration) -> SystemTime {
    at.checked_add(wait)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// The instant `wait` from now, or a century from now when that overflows.
/// Never panics.
pub(crate) fn instant_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Exponential backoff with full jitter: a wait between [`MIN_BACKOFF`] and
/// `min(MAX_BACKOFF, MIN_BACKOFF * 2^(failures-1))` picked by `jitter` (a
/// fraction in `[0, 1)` from the broker's [`Jitter`](crate::clock::Jitter)
/// source), or the server's `Retry-After` when that is longer (capped at
/// [`MAX_BACKOFF`]).
///
/// ```
/// use std::time::Duration;
/// use token_broker::defaults::MIN_BACKOFF;
/// use token_broker::policy::backoff_with;
/// assert_eq!(backoff_with(3, None, 0.0), MIN_BACKOFF);
/// assert_eq!(backoff_with(3, None, 0.5), Duration::from_millis(2500));
/// assert_eq!(backoff_with(1, Some(Duration::from_secs(30)), 0.0), Duration::from_secs(30));
/// ```
pub fn backoff_with(failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = MIN_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF);
    let jittered = MIN_BACKOFF + ceiling.saturating_sub(MIN_BACKOFF).mul_f64(jitter);
    match retry_after {
        Some(server) => jittered.max(server.min(MAX_BACKOFF)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates_instead_of_overflowing() {
        let now = SystemTime::now();
        assert!(later(now, Duration::MAX) > now);
        assert!(instant_after(Duration::MAX) > Instant::now());
    }
    use crate::credentials::{Expiry, ExpirySource};

    fn set(at: SystemTime, lifetime: Option<Duration>) -> TokenSet {
        let mut s = TokenSet::new("t", None).unwrap();
        s.expiry = Some(Expiry {
            at,
            lifetime,
            source: ExpirySource::JwtExp,
        });
        s
    }

    #[test]
    fn window_and_half_life() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let w = Duration::from_secs(600);
        let s = |secs| Duration::from_secs(secs);
        assert!(matches!(
            freshness(&set(now + s(601), None), now, w),
            Freshness::Fresh { .. }
        ));
        assert!(matches!(
            freshness(&set(now + s(599), None), now, w),
            Freshness::Due { .. }
        ));
        assert_eq!(freshness(&set(now, None), now, w), Freshness::Expired);
        // 2 s tokens refresh at half-life.
        assert!(matches!(
            freshness(&set(now + s(2), Some(s(2))), now, w),
            Freshness::Fresh { .. }
        ));
        assert!(matches!(
            freshness(&set(now + Duration::from_millis(999), Some(s(2))), now, w),
            Freshness::Due { .. }
        ));
        assert_eq!(
            freshness(&TokenSet::new("t", None).unwrap(), now, w),
            Freshness::Unknown
        );
    }

    #[test]
    fn a_codex_neighbour_is_beaten_whenever_the_lifetime_allows() {
        let p = RefreshPolicy::new(Duration::from_secs(600)).before_neighbour(CODEX_REFRESH_MARK);
        let m = |mins: u64| Duration::from_secs(mins * 60);
        // Long tokens: the configured window (10 min) is already earlier.
        assert_eq!(p.ahead(Some(m(60))), m(10));
        // 8-minute tokens: 5.5 min ahead instead of half-life (4 min).
        assert_eq!(p.ahead(Some(m(8))), Duration::from_secs(330));
        // 5.6-minute tokens: as early as a tenth of the lifetime allows.
        let life = Duration::from_secs(336);
        assert_eq!(p.ahead(Some(life)), life - life / 10);
        assert!(p.ahead(Some(life)) > CODEX_REFRESH_MARK);
        // Shorter than the mark: it cannot be beaten; half-life as before.
        assert_eq!(p.ahead(Some(Duration::from_secs(2))), Duration::from_secs(1));
        // Unknown lifetime: before the mark.
        assert_eq!(p.ahead(None), Duration::from_secs(600));
        let short = RefreshPolicy::new(m(2)).before_neighbour(CODEX_REFRESH_MARK);
        assert!(short.window_after_mark());
        assert_eq!(short.ahead(None), Duration::from_secs(330));
        assert_eq!(short.ahead(Some(m(60))), Duration::from_secs(330));
        assert!(!p.window_after_mark());
    }

    #[test]
    fn jitter_spreads_refreshes_inside_the_window_and_before_the_mark() {
        let s = |secs| Duration::from_secs(secs);
        let plain = RefreshPolicy::new(s(600));
        assert_eq!(plain.jitter_cut(s(600), 0.0), Duration::ZERO);
        assert_eq!(plain.jitter_cut(s(600), 0.5), s(150));
        assert_eq!(plain.jitter_cut(s(600), 1.0), s(300));
        assert_eq!(plain.jitter_cut(s(600), f64::NAN), Duration::ZERO);
        let codex = plain.before_neighbour(CODEX_REFRESH_MARK);
        // Ten minutes ahead, the mark at 5m30s: at most 4m30s later.
        assert_eq!(codex.jitter_cut(s(600), 1.0), s(270));
        // Ahead exactly at the mark: no room, no jitter.
        assert_eq!(codex.jitter_cut(s(330), 0.9), Duration::ZERO);
        let now = SystemTime::UNIX_EPOCH + s(1_000_000);
        for j in [0.0, 0.3, 0.999] {
            // Whatever the jitter, a token is never fresh past the mark.
            let t = set(now + s(330), None);
            assert!(matches!(freshness_jittered(&t, now, codex, j), Freshness::Due { .. }));
            assert_eq!(freshness_jittered(&set(now, None), now, codex, j), Freshness::Expired);
        }
        assert_eq!(
            freshness_jittered(&set(now + s(700), None), now, plain, 0.0),
            freshness(&set(now + s(700), None), now, plain)
        );
    }

    #[test]
    fn backoff_stays_in_bounds() {
        for failures in 0..40 {
            let d = backoff_with(failures, None, fastrand::f64());
            assert!(d >= MIN_BACKOFF && d <= MAX_BACKOFF, "{failures}: {d:?}");
        }
        assert_eq!(
            backoff_with(1, Some(Duration::from_secs(30)), 0.3),
            Duration::from_secs(30)
        );
        assert_eq!(backoff_with(1, Some(Duration::from_secs(9999)), 0.3), MAX_BACKOFF);
        assert_eq!(backoff_with(40, None, 1.0), MAX_BACKOFF);
        assert_eq!(backoff_with(2, None, 1.0), Duration::from_secs(2));
        assert_eq!(backoff_with(0, None, 0.99), MIN_BACKOFF);
    }
}
