//! When a token is fresh, due for refresh or expired, and how long to wait
//! after a failed refresh. Pure functions of time, tested on their own.

use std::time::{Duration, SystemTime};

use crate::credentials::TokenSet;

/// The default refresh-ahead window: 10 minutes, twice the Codex CLI's 5,
/// so that a Codex process sharing the file usually finds tokens the broker
/// already refreshed instead of spending its own refresh token.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(600);
/// The shortest wait after a failed refresh.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait after a failed refresh.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

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

/// The freshness of `tokens` at `now` with a refresh-ahead `window`.
///
/// The window opens `window` before expiry; for a token whose whole
/// lifetime is shorter than twice the window, it opens at half-life.
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
pub fn freshness(tokens: &TokenSet, now: SystemTime, window: Duration) -> Freshness {
    let Some(expiry) = tokens.expiry else {
        return Freshness::Unknown;
    };
    if now >= expiry.at {
        return Freshness::Expired;
    }
    let lifetime = expiry
        .lifetime
        .or_else(|| tokens.last_refresh.and_then(|at| expiry.at.duration_since(at).ok()));
    let ahead = match lifetime {
        Some(life) if life < window * 2 => life / 2,
        _ => window,
    };
    let refresh_at = expiry.at.checked_sub(ahead).unwrap_or(SystemTime::UNIX_EPOCH);
    if now < refresh_at {
        Freshness::Fresh { refresh_at }
    } else {
        Freshness::Due { expires_at: expiry.at }
    }
}

/// Exponential backoff with full jitter: a random wait between
/// [`MIN_BACKOFF`] and `min(MAX_BACKOFF, MIN_BACKOFF * 2^(failures-1))`, or
/// the server's `Retry-After` when that is longer (capped at `MAX_BACKOFF`).
pub fn backoff(failures: u32, retry_after: Option<Duration>) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let ceiling = MIN_BACKOFF.saturating_mul(1u32 << exp).min(MAX_BACKOFF);
    let span = ceiling.saturating_sub(MIN_BACKOFF).as_millis() as u64;
    let jittered = MIN_BACKOFF + Duration::from_millis(fastrand::u64(0..=span));
    match retry_after {
        Some(server) => jittered.max(server.min(MAX_BACKOFF)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn backoff_stays_in_bounds() {
        for failures in 0..40 {
            let d = backoff(failures, None);
            assert!(d >= MIN_BACKOFF && d <= MAX_BACKOFF, "{failures}: {d:?}");
        }
        assert_eq!(backoff(1, Some(Duration::from_secs(30))), Duration::from_secs(30));
        assert_eq!(backoff(1, Some(Duration::from_secs(9999))), MAX_BACKOFF);
    }
}
