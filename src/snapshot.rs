//! The published snapshot: the actor writes the current fresh token here;
//! [`TokenBroker`](crate::TokenBroker) handles read it without a message.
//!
//! Reads are the hot path of the whole library, so each reading thread keeps
//! its own copy of the token, revalidated by one atomic load of a generation
//! counter that the actor bumps on every change. Handing out a token then
//! touches only that thread's memory: no shared reference count bouncing
//! between cores, no lock. The actor withdraws the token with a timer when
//! its refresh-ahead window opens; that timer runs on the monotonic clock,
//! which stands still while the machine is suspended, so every read also
//! compares the wall clock (in milliseconds, kept by a background thread
//! every 100 ms: one relaxed atomic load) with the token's wall-clock
//! deadline. After a resume, or a jump of the wall clock, a token past its
//! deadline is served as fresh for at most 100 ms more.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use crate::credentials::AccessToken;
use crate::error::BrokerError;

/// Gives every snapshot an id that is never reused.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One credential's published token.
#[derive(Debug)]
pub(crate) struct Snapshot {
    id: u64,
    /// Bumped after every change of `token`.
    generation: AtomicU64,
    token: ArcSwapOption<AccessToken>,
    /// Unix milliseconds from which `token` is no longer fresh
    /// ([`NO_DEADLINE`]: until withdrawn).
    fresh_until: AtomicU64,
    /// Callers of [`TokenBroker::token`](crate::TokenBroker::token) parked
    /// until the actor publishes the outcome they wait for.
    /// (Made when the first caller parks: an idle credential pays 8 bytes.)
    waiting: parking_lot::Mutex<Option<Box<Waiting>>>,
}

/// The parked callers and the outcomes published for them.
///
/// Instead of one mailbox message and one reply channel per caller, a
/// caller that finds no fresh token parks here (its waker, 16 bytes) and
/// only the first one messages the actor ([`Park::Ask`]); every outcome the
/// actor settles is published here with a new round number, and each caller
/// takes the first outcome published after it parked.
#[derive(Debug, Default)]
struct Waiting {
    /// Bumped by every published outcome.
    round: u64,
    outcome: Option<Box<Result<AccessToken, BrokerError>>>,
    /// The parked callers of this round (a dropped caller's stays until the
    /// round ends: waking it does nothing).
    wakers: Vec<Waker>,
    /// A caller has asked the actor for this round: the others only wait.
    asked: bool,
    /// The actor has stopped: nothing more will be published.
    closed: bool,
    /// The actor has been dropped, with everything it held.
    done: bool,
}

/// What a parked caller should do now (see [`Snapshot::park`]).
pub(crate) enum Park {
    /// The outcome it waited for.
    Ready(Result<AccessToken, BrokerError>),
    /// Wait; nobody has asked the actor yet for this round: ask it.
    Ask,
    /// Wait; the actor has been asked.
    Wait,
    /// The actor has stopped.
    Closed,
}

/// A caller's place among the parked callers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    /// The round it parked in.
    round: u64,
    /// Its waker's index in that round (`usize::MAX`: not parked yet).
    slot: usize,
}

impl Place {
    /// Not parked yet.
    pub(crate) const NEW: Place = Place {
        round: 0,
        slot: usize::MAX,
    };
}

/// A published token without a wall-clock deadline.
const NO_DEADLINE: u64 = u64::MAX;

/// A thread's copy of one snapshot.
struct Entry {
    id: u64,
    generation: u64,
    token: Option<AccessToken>,
    fresh_until: u64,
}

/// How many snapshots each thread keeps a copy of: a direct-mapped table
/// (by snapshot id), so that a read costs the same with one credential or
/// 100,000, and a thread's copies stay bounded (two credentials that share
/// a slot and are read in turn only cost a fresh copy on each switch).
const COPY_SLOTS: usize = 256;

thread_local! {
    static COPIES: RefCell<Vec<Option<Entry>>> = const { RefCell::new(Vec::new()) };
}

impl Snapshot {
    /// An empty snapshot (nothing fresh to hand out).
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Snapshot {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            token: ArcSwapOption::empty(),
            fresh_until: AtomicU64::new(NO_DEADLINE),
            waiting: parking_lot::Mutex::default(),
        })
    }

    /// Parks a caller (first call: `place` is [`Place::NEW`]) or checks on
    /// it: the outcome published since it parked, else a wait (registering
    /// `waker`), and whether it must ask the actor.
    pub(crate) fn park(&self, place: &mut Place, waker: &Waker) -> Park {
        let mut waiting = self.waiting.lock();
        let waiting = waiting.get_or_insert_with(Box::default);
        if place.slot == usize::MAX {
            if waiting.closed {
                return Park::Closed;
            }
            place.round = waiting.round;
            place.slot = waiting.wakers.len();
            waiting.wakers.push(waker.clone());
        } else if waiting.round == place.round && waiting.closed {
            // Stopped with no outcome published since this caller parked.
            return Park::Closed;
        } else if waiting.round != place.round {
            let outcome = match &waiting.outcome {
                Some(outcome) => (**outcome).clone(),
                None => return Park::Closed,
            };
            return Park::Ready(outcome);
        } else if let Some(mine) = waiting.wakers.get_mut(place.slot) {
            if !mine.will_wake(waker) {
                mine.clone_from(waker);
            }
        }
        if waiting.asked {
            Park::Wait
        } else {
            waiting.asked = true;
            Park::Ask
        }
    }

    /// Publishes the outcome for every parked caller and wakes them (the
    /// actor, when it settles its waiters or answers a [`Park`] at once).
    pub(crate) fn settle(&self, outcome: Result<AccessToken, BrokerError>) {
        let wakers = {
            let mut waiting = self.waiting.lock();
            let waiting = match waiting.as_mut() {
                Some(waiting) if !waiting.closed => waiting,
                // Nobody ever parked (or nobody can any more): nothing to tell.
                _ => return,
            };
            waiting.round = waiting.round.wrapping_add(1);
            waiting.outcome = Some(Box::new(outcome));
            waiting.asked = false;
            std::mem::take(&mut waiting.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Whether callers are parked, waiting for the actor's answer.
    pub(crate) fn asked(&self) -> bool {
        self.waiting.lock().as_ref().is_some_and(|w| w.asked)
    }

    /// The actor has stopped: callers parked since the last outcome, and
    /// later ones, hear that the broker stopped ([`Park::Closed`]); callers
    /// woken by the last outcome still get it.
    pub(crate) fn close(&self) {
        self.end(false);
    }

    /// The actor has been dropped, with everything it held (after
    /// [`close`](Self::close), or instead of it if it never ran).
    pub(crate) fn mark_done(&self) {
        self.end(true);
    }

    fn end(&self, done: bool) {
        let wakers = {
            let mut waiting = self.waiting.lock();
            let waiting = waiting.get_or_insert_with(Box::default);
            waiting.closed = true;
            waiting.done |= done;
            std::mem::take(&mut waiting.wakers)
        };
        for waker in wakers {
            waker.wake();
        }
    }

    /// Waits until [`mark_done`](Self::mark_done).
    pub(crate) async fn wait_done(&self) {
        std::future::poll_fn(|cx| {
            let mut waiting = self.waiting.lock();
            let waiting = waiting.get_or_insert_with(Box::default);
            if waiting.done {
                return std::task::Poll::Ready(());
            }
            // Woken by the end of a round too: then it looks again.
            waiting.wakers.push(cx.waker().clone());
            std::task::Poll::Pending
        })
        .await
    }

    /// Publishes `token` as fresh until `until` on the wall clock (`None`:
    /// until withdrawn), or withdraws the current one (`None`).
    pub(crate) fn publish(&self, token: Option<&AccessToken>, until: Option<SystemTime>) {
        let until = until.map_or(NO_DEADLINE, |at| {
            at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
        });
        self.fresh_until.store(until, Ordering::Relaxed);
        self.token.store(token.map(|t| Arc::new(t.clone())));
        // Release: a reader that sees the new generation sees the new token.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The fresh token, if one is published and its wall-clock deadline
    /// has not passed.
    #[inline]
    pub(crate) fn read(self: &Arc<Self>) -> Option<AccessToken> {
        let generation = self.generation.load(Ordering::Acquire);
        COPIES
            .try_with(|copies| {
                let mut copies = copies.borrow_mut();
                if copies.is_empty() {
                    copies.resize_with(COPY_SLOTS, || None);
                }
                let slot = &mut copies[self.id as usize % COPY_SLOTS];
                if let Some(entry) = slot.as_mut().filter(|e| e.id == self.id) {
                    if entry.generation != generation {
                        entry.generation = generation;
                        entry.token = self.load_private_copy();
                        entry.fresh_until = self.fresh_until.load(Ordering::Relaxed);
                    }
                    if entry.fresh_until != NO_DEADLINE && wall_ms() >= entry.fresh_until {
                        return None;
                    }
                    return entry.token.clone();
                }
                // First read here, or the slot held another snapshot.
                let token = self.load_private_copy();
                let fresh_until = self.fresh_until.load(Ordering::Relaxed);
                *slot = Some(Entry {
                    id: self.id,
                    generation,
                    token: token.clone(),
                    fresh_until,
                });
                token.filter(|_| fresh_until == NO_DEADLINE || wall_ms() < fresh_until)
            })
            // The thread is shutting down: read without caching.
            .unwrap_or_else(|_| {
                let until = self.fresh_until.load(Ordering::Relaxed);
                self.token
                    .load()
                    .as_deref()
                    .cloned()
                    .filter(|_| until == NO_DEADLINE || wall_ms() < until)
            })
    }

    /// A copy of the published token in memory of its own, so that clones
    /// on this thread never touch a reference count other threads use.
    fn load_private_copy(&self) -> Option<AccessToken> {
        self.token.load().as_deref().map(|t| AccessToken::new(t.expose()))
    }
}

/// The wall clock in Unix milliseconds, for the hot path: one relaxed load
/// of a value a background thread refreshes every [`WALL_TICK`]. Reading the
/// clock itself costs more than the rest of a read (about 5 ns for the
/// vDSO's coarse clock on a virtual machine). After a resume, the thread
/// wakes within one tick, so a token past its deadline is served for at
/// most that long, instead of until the monotonic withdrawal timer
/// catches up (which can be hours).
#[inline]
fn wall_ms() -> u64 {
    match WALL.load(Ordering::Relaxed) {
        0 => start_wall_clock(),
        ms => ms,
    }
}

/// The last wall-clock reading in Unix milliseconds (0: not started).
static WALL: AtomicU64 = AtomicU64::new(0);

/// How often the wall clock is read for the hot path.
const WALL_TICK: std::time::Duration = std::time::Duration::from_millis(100);

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| (d.as_millis() as u64).max(1))
}

/// Starts the thread that keeps [`WALL`] current (once per process), and
/// returns the time now.
#[cold]
fn start_wall_clock() -> u64 {
    static STARTED: std::sync::Once = std::sync::Once::new();
    let now = unix_ms_now();
    STARTED.call_once(|| {
        WALL.store(now, Ordering::Relaxed);
        let spawned = std::thread::Builder::new()
            .name("token-broker-clock".into())
            .spawn(|| loop {
                std::thread::sleep(WALL_TICK);
                WALL.store(unix_ms_now(), Ordering::Relaxed);
            });
        if spawned.is_err() {
            // No thread: every read asks the clock itself (slower, exact).
            WALL.store(0, Ordering::Relaxed);
        }
    });
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_follow_every_change() {
        let snap = Snapshot::new();
        assert_eq!(snap.read(), None);
        snap.publish(Some(&AccessToken::new("one")), None);
        assert_eq!(snap.read().unwrap().expose(), "one");
        assert_eq!(snap.read().unwrap().expose(), "one");
        snap.publish(Some(&AccessToken::new("two")), None);
        assert_eq!(snap.read().unwrap().expose(), "two");
        snap.publish(None, None);
        assert_eq!(snap.read(), None);
        let other = Snapshot::new();
        other.publish(Some(&AccessToken::new("other")), None);
        assert_eq!(other.read().unwrap().expose(), "other");
        assert_eq!(snap.read(), None);
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(other.read().unwrap().expose(), "other"));
        });
    }

    /// Finding 10 of the adversarial review: after a suspend the monotonic
    /// withdrawal timer has not fired, but the wall clock has passed the
    /// token's deadline: the token is no longer served as fresh, also from
    /// a thread's cached copy.
    #[test]
    fn a_token_past_its_wall_clock_deadline_is_never_served() {
        let snap = Snapshot::new();
        let now = SystemTime::now();
        snap.publish(
            Some(&AccessToken::new("fresh")),
            Some(now + std::time::Duration::from_secs(60)),
        );
        assert_eq!(snap.read().unwrap().expose(), "fresh");
        // The same token, published with a deadline that has passed (as
        // after a resume): the cached copy is not served either.
        snap.publish(
            Some(&AccessToken::new("fresh")),
            Some(now - std::time::Duration::from_secs(1)),
        );
        assert_eq!(snap.read(), None);
        assert_eq!(snap.read(), None);
    }
}
