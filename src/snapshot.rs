//! The published snapshot: the actor writes the current fresh token here;
//! [`TokenBroker`](crate::TokenBroker) handles read it without a message.
//!
//! Reads are the hot path of the whole library, so each reading thread keeps
//! its own copy of the token, revalidated by one atomic load of a generation
//! counter that the actor bumps on every change. Handing out a token then
//! touches only that thread's memory: no shared reference count bouncing
//! between cores, no lock, no clock read. (The actor withdraws the token
//! with a timer when its refresh-ahead window opens, so readers never need
//! the time.)

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwapOption;

use crate::credentials::AccessToken;

/// Gives every snapshot an id that is never reused.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One credential's published token.
#[derive(Debug)]
pub(crate) struct Snapshot {
    id: u64,
    /// Bumped after every change of `token`.
    generation: AtomicU64,
    token: ArcSwapOption<AccessToken>,
}

/// A thread's copy of one snapshot.
struct Entry {
    id: u64,
    generation: u64,
    token: Option<AccessToken>,
    owner: Weak<Snapshot>,
}

thread_local! {
    static COPIES: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

impl Snapshot {
    /// An empty snapshot (nothing fresh to hand out).
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Snapshot {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            token: ArcSwapOption::empty(),
        })
    }

    /// Publishes `token` as fresh, or withdraws the current one (`None`).
    pub(crate) fn publish(&self, token: Option<&AccessToken>) {
        self.token.store(token.map(|t| Arc::new(t.clone())));
        // Release: a reader that sees the new generation sees the new token.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The fresh token, if one is published.
    #[inline]
    pub(crate) fn read(self: &Arc<Self>) -> Option<AccessToken> {
        let generation = self.generation.load(Ordering::Acquire);
        COPIES
            .try_with(|copies| {
                let mut copies = copies.borrow_mut();
                if let Some(entry) = copies.iter_mut().find(|e| e.id == self.id) {
                    if entry.generation != generation {
                        entry.generation = generation;
                        entry.token = self.load_private_copy();
                    }
                    return entry.token.clone();
                }
                // First read on this thread: forget copies of dropped brokers.
                copies.retain(|e| e.owner.strong_count() > 0);
                let token = self.load_private_copy();
                copies.push(Entry {
                    id: self.id,
                    generation,
                    token: token.clone(),
                    owner: Arc::downgrade(self),
                });
                token
            })
            // The thread is shutting down: read without caching.
            .unwrap_or_else(|_| self.token.load().as_deref().cloned())
    }

    /// A copy of the published token in memory of its own, so that clones
    /// on this thread never touch a reference count other threads use.
    fn load_private_copy(&self) -> Option<AccessToken> {
        self.token.load().as_deref().map(|t| AccessToken::new(t.expose()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_follow_every_change() {
        let snap = Snapshot::new();
        assert_eq!(snap.read(), None);
        snap.publish(Some(&AccessToken::new("one")));
        assert_eq!(snap.read().unwrap().expose(), "one");
        assert_eq!(snap.read().unwrap().expose(), "one");
        snap.publish(Some(&AccessToken::new("two")));
        assert_eq!(snap.read().unwrap().expose(), "two");
        snap.publish(None);
        assert_eq!(snap.read(), None);
        let other = Snapshot::new();
        other.publish(Some(&AccessToken::new("other")));
        assert_eq!(other.read().unwrap().expose(), "other");
        assert_eq!(snap.read(), None);
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(other.read().unwrap().expose(), "other"));
        });
    }
}
