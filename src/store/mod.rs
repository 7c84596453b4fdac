// TODO(integration): make the module's internals pub(crate) and drop this
// allow; src/actor and src/store are being rewritten in parallel.
#![allow(unreachable_pub)]
//! Where credentials live: the Codex `auth.json`, a generic OAuth2
//! credentials file, or memory; atomic durable writes and the
//! cross-process lock.
//!
//! A store only reads and writes. It never decides to refresh: that is the
//! [`TokenActor`](crate::actor::TokenActor)'s job.

mod codex;
mod file;
mod json_file;
mod json_text;
mod memory;
mod oauth2;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use codex::{CodexAuthFile, CodexFormat};
pub use file::{FileLock, FileVersion};
pub use json_file::{FileFormat, JsonFileStore};
pub use memory::MemoryStore;
pub use oauth2::{OAuth2File, OAuth2Format};

use crate::credentials::{RefreshToken, TokenSet};
pub(crate) use crate::defaults::MAX_FILE_BYTES;

/// A place credentials are kept.
///
/// Implementations must be cheap to call from a blocking thread; the actor
/// calls every method through `spawn_blocking`.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Where the credentials live, for messages (a path, or `memory`).
    fn location(&self) -> &str;

    /// Reads the current token set.
    fn load(&self) -> Result<TokenSet, StoreError>;

    /// Durably replaces the owned fields (tokens, refresh time) with
    /// `tokens`, keeping everything else as it was. When this returns `Ok`
    /// the new tokens survive a crash.
    ///
    /// `replaces` is the token set the refresh started from: if the store
    /// now holds different tokens (a writer that takes no lock, such as the
    /// Codex CLI, changed it meanwhile), nothing is written and the result
    /// is [`StoreError::Conflict`].
    fn save(&self, tokens: &TokenSet, replaces: &TokenSet) -> Result<(), StoreError>;

    /// A cheap identity of the stored contents (for a file: inode, size and
    /// modification time) used to notice changes made by someone else.
    fn version(&self) -> Option<StoreVersion>;

    /// Takes the brokers' exclusive cross-process lock, waiting at most
    /// `timeout`. Held while the store is re-read, a refresh token is spent
    /// and the result is written; dropped to release.
    ///
    /// Only brokers take this lock. Locks that other writers of the same
    /// store wait for (the Codex CLI's) are taken by [`save`](Self::save)
    /// alone, for the few milliseconds of a re-read, compare and rename,
    /// never across a network request.
    fn lock(&self, timeout: Duration) -> Result<StoreLock, StoreError>;

    /// Durably records that `refresh_token` is about to be spent, so that a
    /// broker killed before it saves the result can be recognised on the
    /// next start. The record holds a hash of the token, never the token.
    fn mark_refreshing(&self, refresh_token: &RefreshToken) -> Result<(), StoreError> {
        let _ = refresh_token;
        Ok(())
    }

    /// Removes the record written by [`mark_refreshing`](Self::mark_refreshing).
    fn clear_refreshing(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Durably records that the provider refused a refresh token, where
    /// every broker on this store sees it, so that no broker sends it again.
    /// `key` is a SHA-256 (hex) naming the token together with the endpoint
    /// and client that were refused (a broker pointed at the wrong endpoint
    /// must not stop the others); never the token.
    fn record_refused(&self, key: &str) -> Result<(), StoreError> {
        let _ = key;
        Ok(())
    }

    /// When the refusal `key` was recorded by any broker on this store.
    fn refused_at(&self, key: &str) -> Option<std::time::SystemTime> {
        let _ = key;
        None
    }

    /// The complete tokens a writer killed mid-write left behind (for a
    /// file: a parseable temporary file it never renamed), newest first.
    /// Read under the lock after a record shows an interrupted refresh: the
    /// rotated tokens may be there, and can be adopted instead of spending
    /// the old refresh token again.
    fn recover_interrupted(&self) -> Option<TokenSet> {
        None
    }

    /// The refresh-in-progress record left behind, if any. Read under the
    /// lock: a record found then was left by a holder that died, unless the
    /// record shows its holder still running (a broker that refreshed, could
    /// not write the new tokens, and keeps them to write later).
    fn interrupted_refresh(&self) -> Option<RefreshRecord> {
        None
    }
}

/// A refresh-in-progress record found in a store (see
/// [`Store::mark_refreshing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefreshRecord {
    /// The SHA-256 (hex) of the refresh token being spent.
    pub refresh_token_sha256: String,
    /// Whether the process that wrote it is provably still running (same
    /// host and boot, same process start time). A live holder has spent the
    /// token and holds the new tokens in memory: never spend it again.
    pub holder_alive: bool,
    /// The holder's process id, for messages.
    pub holder_pid: u32,
}

/// A cheap identity of a store's contents; equal versions mean "unchanged".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreVersion {
    /// A file's identity.
    File(FileVersion),
    /// A memory store's write counter.
    Memory(u64),
}

/// A held store lock; released on drop.
pub enum StoreLock {
    /// A lock that only exists in this process (memory stores).
    InProcess(parking_lot::ArcMutexGuard<parking_lot::RawMutex, ()>),
    /// An advisory lock on a sibling lock file.
    File(FileLock),
}

impl StoreLock {
    /// Whether the lock still excludes every other broker. A file lock
    /// whose lock file was deleted or replaced while held no longer does:
    /// a newcomer creates a new lock file and gets in. Checked right before
    /// a refresh token is spent.
    pub fn is_valid(&self) -> bool {
        match self {
            StoreLock::InProcess(_) => true,
            StoreLock::File(lock) => lock.is_valid(),
        }
    }
}

impl fmt::Debug for StoreLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLock::InProcess(_) => f.write_str("StoreLock::InProcess"),
            StoreLock::File(lock) => write!(f, "StoreLock::File({lock:?})"),
        }
    }
}

/// Why a store could not be read or written. Never carries token text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The file does not exist.
    #[error("credentials file {} does not exist", display_path(.path))]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but could not be read (permissions, a directory...).
    #[error("credentials file {} could not be read: {cause}", display_path(.path))]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        cause: String,
    },
    /// The file was read but does not hold usable credentials.
    #[error("credentials file {} is invalid: {reason}", display_path(.path))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, without any token text.
        reason: String,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("credentials file {} is too large ({size} bytes; the limit is {MAX_FILE_BYTES})", display_path(.path))]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The new tokens could not be written.
    #[error("could not write credentials file {}: {cause}", display_path(.path))]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        cause: String,
    },
    /// The stored tokens changed while a refresh was under way; nothing was
    /// written.
    #[error("credentials file {} was changed by another writer during the refresh; not overwriting it", display_path(.path))]
    Conflict {
        /// The file.
        path: PathBuf,
    },
    /// Another process held the lock for longer than the timeout: it is
    /// refreshing (slowly). Try again later; killing it mid-refresh could
    /// lose the new tokens.
    #[error("timed out after {} waiting for the lock on {}: another process is refreshing this credential; try again later (killing it mid-refresh could lose the new tokens)", crate::status::human_duration(*.waited), display_path(.path))]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

/// A path for a message, always on one line: as is when it prints plainly,
/// else quoted and escaped like a Rust string (`"/tmp/a\nb/auth.json"`), so
/// that a newline, a terminal escape or a bidirectional override in a file
/// name can neither split nor forge a line of output.
pub(crate) fn display_path(path: &Path) -> String {
    let quoted = format!("{path:?}");
    match path.to_str() {
        // Debug only ever lengthens a string that needs escaping.
        Some(plain) if quoted.len() == plain.len() + 2 => plain.to_owned(),
        _ => quoted,
    }
}

impl StoreError {
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
