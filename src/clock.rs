//! Where a broker gets the time and its randomness from.
//!
//! Every decision a [`TokenActor`](crate::actor::TokenActor) makes (is the
//! token fresh, is the refresh-ahead window open, has the backoff ended) is a
//! pure function of its state and of the time it is given. The builder takes
//! a [`Clock`] and a [`Jitter`] source so that tests, simulations and
//! embedders with their own notion of time can drive those decisions without
//! waiting on the wall clock, as smithy-rs does with its time source.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
///
/// Token expiries are wall-clock instants (a JWT's `exp`, a file's
/// `expires_at`), so the clock is a [`SystemTime`] clock.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The time now.
    fn now(&self) -> SystemTime;

    /// Events each time the clock is moved by hand (a [`ManualClock`]), so
    /// that a broker looks at the time again at once instead of when its
    /// timer, which sleeps in real time, fires. `None` (the default): the
    /// clock moves by itself.
    fn moves(&self) -> Option<Moves> {
        None
    }
}

/// A stream of "the clock was moved" events from [`Clock::moves`].
pub type Moves = std::pin::Pin<Box<dyn futures_util::Stream<Item = ()> + Send>>;

/// The operating system's wall clock: the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to: for tests and simulations.
///
/// Cheap to clone; clones share the same time.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use token_broker::clock::{Clock, ManualClock};
///
/// let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
/// let start = clock.now();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(clock.now(), start + Duration::from_secs(90));
/// ```
#[derive(Clone, Debug)]
pub struct ManualClock {
    /// Nanoseconds since the Unix epoch; its subscribers hear every move.
    nanos: Arc<tokio::sync::watch::Sender<u64>>,
}

impl ManualClock {
    /// A clock standing at `at` (times before the Unix epoch count as the
    /// epoch).
    pub fn new(at: SystemTime) -> Self {
        let clock = ManualClock {
            nanos: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        clock.set(at);
        clock
    }

    /// Moves the clock to `at`.
    pub fn set(&self, at: SystemTime) {
        let nanos = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.nanos.send_replace(nanos);
    }

    /// Moves the clock forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.send_modify(|n| *n = n.saturating_add(by));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(*self.nanos.borrow())
    }

    fn moves(&self) -> Option<Moves> {
        let mut rx = self.nanos.subscribe();
        rx.mark_unchanged();
        Some(Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        })))
    }
}

/// A source of random fractions in `[0, 1)`, used to spread refreshes inside
/// the refresh-ahead window and to jitter backoff.
pub trait Jitter: Send + Sync + fmt::Debug + 'static {
    /// A fraction in `[0, 1)`. Values outside are clamped.
    fn fraction(&self) -> f64;
}

/// Uniform random jitter (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn fraction(&self) -> f64 {
        fastrand::f64()
    }
}

/// The same fraction every time: `FixedJitter(0.0)` turns jitter off (every
/// refresh at the start of its window, every backoff at its minimum).
#[derive(Clone, Copy, Debug)]
pub struct FixedJitter(pub f64);

impl Jitter for FixedJitter {
    fn fraction(&self) -> f64 {
        self.0
    }
}

/// The system clock, shared (no allocation per broker).
pub(crate) fn system() -> Arc<dyn Clock> {
    static SYSTEM: std::sync::OnceLock<Arc<dyn Clock>> = std::sync::OnceLock::new();
    SYSTEM.get_or_init(|| Arc::new(SystemClock)).clone()
}

/// Uniform jitter, shared (no allocation per broker).
pub(crate) fn random() -> Arc<dyn Jitter> {
    static RANDOM: std::sync::OnceLock<Arc<dyn Jitter>> = std::sync::OnceLock::new();
    RANDOM.get_or_init(|| Arc::new(RandomJitter)).clone()
}

/// A fraction from `jitter`, clamped to `[0, 1)` (NaN counts as 0).
pub(crate) fn fraction(jitter: &dyn Jitter) -> f64 {
    let f = jitter.fraction();
    if f.is_nan() || f < 0.0 {
        0.0
    } else if f >= 1.0 {
        // The largest f64 below 1.
        1.0 - f64::EPSILON / 2.0
    } else {
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_clamped() {
        assert_eq!(fraction(&FixedJitter(f64::NAN)), 0.0);
        assert_eq!(fraction(&FixedJitter(-3.0)), 0.0);
        assert!(fraction(&FixedJitter(7.0)) < 1.0);
        assert_eq!(fraction(&FixedJitter(0.25)), 0.25);
        for _ in 0..100 {
            let f = fraction(&RandomJitter);
            assert!((0.0..1.0).contains(&f));
        }
    }

    #[tokio::test]
    async fn a_manual_clock_says_when_it_is_moved() {
        use futures_util::StreamExt;
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(10));
        let mut moves = clock.moves().expect("a manual clock reports its moves");
        let quiet = tokio::time::timeout(Duration::from_millis(20), moves.next()).await;
        assert!(quiet.is_err(), "no event before a move");
        clock.advance(Duration::from_secs(1));
        let moved = tokio::time::timeout(Duration::from_secs(1), moves.next()).await;
        assert_eq!(moved.unwrap(), Some(()));
        assert!(SystemClock.moves().is_none());
    }

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(10));
        let copy = clock.clone();
        assert_eq!(copy.now(), UNIX_EPOCH + Duration::from_secs(10));
        clock.advance(Duration::from_millis(1500));
        assert_eq!(copy.now(), UNIX_EPOCH + Duration::from_millis(11_500));
        clock.advance(Duration::MAX);
        assert!(copy.now() > UNIX_EPOCH + Duration::from_secs(10));
        ManualClock::new(UNIX_EPOCH - Duration::from_secs(1));
    }
}
