//! A credentials store over one JSON file, generic over its format.
//!
//! Reads retry briefly on a file caught half-written by a writer that
//! truncates in place (the Codex CLI does). Writes patch only the fields the
//! format owns, editing the file's text so that every other byte stays as
//! written (numbers beyond `f64`, string escapes, layout), compare the stored tokens with the ones a refresh started
//! from (so a stale writer never overwrites newer tokens), and replace the
//! file atomically and durably.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::file::{self, parse_object, read_bounded, write_atomic};
use super::json_text;
use super::{Store, StoreError, StoreLock, StoreVersion};
use crate::credentials::{RefreshToken, TokenSet};

/// How many times, and how far apart, a read is retried when the file does
/// not parse: long enough for an in-place writer to finish, short enough
/// that a truly broken file is reported promptly.
const SETTLE_ATTEMPTS: u32 = 8;
const SETTLE_PAUSE: Duration = Duration::from_millis(25);

/// The layout of a credentials file: how to read tokens from it and how to
/// write refreshed tokens into it.
pub trait FileFormat: Send + Sync + 'static {
    /// A short name for messages and `Debug` output.
    const NAME: &'static str;

    /// Reads the token set from a parsed file.
    fn read(path: &Path, root: &Map<String, Value>) -> Result<TokenSet, StoreError>;

    /// Writes the owned fields of `tokens` into `root`, leaving every other
    /// key as it was.
    fn patch(path: &Path, root: &mut Map<String, Value>, tokens: &TokenSet) -> Result<(), StoreError>;

    /// The lock files that other writers of a file at `path` take around
    /// their own writes, in the order they take them. A save holds them only
    /// around its re-read, compare and rename. The default is the common
    /// `<file>.lock` convention.
    fn commit_lock_paths(path: &Path) -> Vec<PathBuf> {
        vec![file::sibling(path, ".lock")]
    }
}

/// How long a save waits for the commit locks of another writer. The Codex
/// CLI holds them for milliseconds; a longer wait means a stuck writer, and
/// the refreshed tokens are then kept and written on the next attempt.
const COMMIT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// A file as read: its bytes, the parsed document, and its tokens.
type Settled = (Vec<u8>, Map<String, Value>, TokenSet);

/// A credentials store over one JSON file in format `F`.
pub struct JsonFileStore<F> {
    path: PathBuf,
    location: String,
    format: PhantomData<fn() -> F>,
}

impl<F> Clone for JsonFileStore<F> {
    fn clone(&self) -> Self {
        JsonFileStore {
            path: self.path.clone(),
            location: self.location.clone(),
            format: PhantomData,
        }
    }
}

impl<F: FileFormat> fmt::Debug for JsonFileStore<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(F::NAME).field("path", &self.path).finish()
    }
}

impl<F: FileFormat> JsonFileStore<F> {
    /// A store over the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let location = super::display_path(&path);
        JsonFileStore {
            path,
            location,
            format: PhantomData,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and parses the file, retrying briefly when it does not parse
    /// (possibly caught mid-write by a writer that truncates in place).
    /// Returns the text too, which a save edits.
    fn read_settled(&self) -> Result<Settled, StoreError> {
        let mut attempt = 1;
        loop {
            let result = read_bounded(&self.path).and_then(|bytes| {
                let root = parse_object(&self.path, &bytes)?;
                let tokens = F::read(&self.path, &root)?;
                Ok((bytes, root, tokens))
            });
            match result {
                Err(StoreError::Invalid { .. }) if attempt < SETTLE_ATTEMPTS => {
                    attempt += 1;
                    std::thread::sleep(SETTLE_PAUSE);
                }
                other => return other,
            }
        }
    }

    /// Parses file contents in this format (no retries).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<TokenSet, StoreError> {
        F::read(path, &parse_object(path, bytes)?)
    }
}

impl<F: FileFormat> Store for JsonFileStore<F> {
    fn location(&self) -> &str {
        &self.location
    }

    fn load(&self) -> Result<TokenSet, StoreError> {
        self.read_settled().map(|(_, _, tokens)| tokens)
    }

    fn save(&self, tokens: &TokenSet, replaces: &TokenSet) -> Result<(), StoreError> {
        // Other writers' commit locks, in their order, for milliseconds.
        let _commit = file::commit_locks(&F::commit_lock_paths(&self.path), &self.path, COMMIT_LOCK_TIMEOUT)?;
        // Patch the file as it is now, so keys we do not own survive even if
        // someone added them since we loaded it. A file we cannot parse is
        // never overwritten.
        let (bytes, mut root, stored) = self.read_settled()?;
        if stored.differs_from(replaces) {
            return Err(StoreError::Conflict {
                path: self.path.clone(),
            });
        }
        let before = root.clone();
        F::patch(&self.path, &mut root, tokens)?;
        // Edit the text, so that everything we do not own stays byte for
        // byte as written (numbers beyond f64, escapes, layout).
        let edited = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| json_text::rewrite(text, &before, &root));
        let text = match edited {
            Some(text) => text,
            None => {
                let mut text = serde_json::to_string_pretty(&Value::Object(root))
                    .map_err(|e| StoreError::invalid(&self.path, format!("could not serialise: {e}")))?;
                text.push('\n');
                text
            }
        };
        write_atomic(&self.path, text.as_bytes())
    }

    fn version(&self) -> Option<StoreVersion> {
        file::version_of(&self.path)
    }

    fn lock(&self, timeout: Duration) -> Result<StoreLock, StoreError> {
        file::lock(&self.path, timeout)
    }

    fn record_refused(&self, key: &str) -> Result<(), StoreError> {
        file::record_refused(&self.path, key)
    }

    fn refused_at(&self, key: &str) -> Option<std::time::SystemTime> {
        file::refused_at(&self.path, key)
    }

    fn mark_refreshing(&self, refresh_token: &RefreshToken) -> Result<(), StoreError> {
        file::write_marker(&self.path, refresh_token)
    }

    fn clear_refreshing(&self) -> Result<(), StoreError> {
        file::remove_marker(&self.path)
    }

    fn recover_interrupted(&self) -> Option<TokenSet> {
        file::orphans(&self.path)
            .into_iter()
            .find_map(|bytes| Self::parse(&self.path, &bytes).ok())
    }

    fn interrupted_refresh(&self) -> Option<super::RefreshRecord> {
        file::read_marker(&self.path)
    }
}
