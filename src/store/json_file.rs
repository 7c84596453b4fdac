//! A credentials store over one JSON file, generic over its format.
//!
//! Reads retry briefly on a file caught half-written by a writer that
//! truncates in place (the Codex CLI does). Writes patch only the fields the
//! format owns, editing the file's text so that every other byte stays as
//! written (numbers beyond `f64`, string escapes, layout), compare the
//! stored tokens with the version a refresh started from (so a stale writer
//! never overwrites newer tokens), and replace the file atomically and
//! durably.
//!
//! The [`Store`] methods run the blocking file I/O on tokio's blocking pool;
//! the `*_blocking` methods do it on the calling thread, for synchronous
//! code.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::file::{self, parse_object, read_bounded, write_atomic};
use super::json_text;
use super::{Changes, Loaded, Store, StoreError, StoreFuture, StoreLock, Version};
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

impl<F: FileFormat> JsonFileStore<F> {
    /// Reads the file on the calling thread (blocking): for synchronous
    /// code, tools and tests. [`Store::load`] does the same on tokio's
    /// blocking pool.
    pub fn load_blocking(&self) -> Result<Loaded, StoreError> {
        self.read_settled().map(|(_, _, tokens)| Loaded {
            version: Version::of_tokens(&tokens),
            tokens,
        })
    }

    /// The refresh-in-progress record, read on the calling thread (see
    /// [`Store::interrupted_refresh`]).
    pub fn interrupted_refresh_blocking(&self) -> Option<super::RefreshRecord> {
        file::read_marker(&self.path)
    }

    /// The save itself, on the calling thread: under the other writers'
    /// commit locks, re-read, compare the owned tokens with `expected`,
    /// patch and replace atomically.
    fn save_blocking(&self, tokens: &TokenSet, expected: &Version) -> Result<Version, StoreError> {
        // Other writers' commit locks, in their order, for milliseconds.
        let _commit = file::commit_locks(&F::commit_lock_paths(&self.path), &self.path, COMMIT_LOCK_TIMEOUT)?;
        // Patch the file as it is now, so keys we do not own survive even if
        // someone added them since we loaded it. A file we cannot parse is
        // never overwritten.
        let (bytes, mut root, stored) = self.read_settled()?;
        // The version names the owned tokens only: a writer that rewrote
        // the file with the same tokens (the Codex CLI re-saving it) is no
        // conflict; one that changed them is.
        if Version::of_tokens(&stored) != *expected {
            return Err(StoreError::Conflict {
                location: self.path.as_path().into(),
            });
        }
        let before = root.clone();
        F::patch(&self.path, &mut root, tokens)?;
        // What a load of the new file will see (a refresh without a new
        // refresh token keeps the stored one).
        let written = F::read(&self.path, &root).unwrap_or_else(|_| {
            let mut merged = tokens.clone();
            if merged.refresh_token.is_none() {
                merged.refresh_token = stored.refresh_token.clone();
            }
            merged
        });
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
        write_atomic(&self.path, text.as_bytes())?;
        Ok(Version::of_tokens(&written))
    }

    /// Runs `f` with a clone of this store on tokio's blocking pool (or on
    /// the calling thread outside a runtime).
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Self) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, Result<T, StoreError>> {
        let store = self.clone();
        let location: super::Location = self.path.as_path().into();
        Box::pin(async move {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => runtime
                    .spawn_blocking(move || f(store))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::backend(location, e))),
                Err(_) => f(store),
            }
        })
    }
}

impl<F: FileFormat> Store for JsonFileStore<F> {
    fn location(&self) -> &str {
        &self.location
    }

    fn load(&self) -> StoreFuture<'_, Result<Loaded, StoreError>> {
        self.blocking(|store| store.load_blocking())
    }

    fn save<'a>(&'a self, tokens: &'a TokenSet, expected: &'a Version) -> StoreFuture<'a, Result<Version, StoreError>> {
        let (tokens, expected) = (tokens.clone(), expected.clone());
        self.blocking(move |store| store.save_blocking(&tokens, &expected))
    }

    fn lock(&self, timeout: Duration) -> StoreFuture<'_, Result<StoreLock, StoreError>> {
        self.blocking(move |store| file::lock(&store.path, timeout))
    }

    /// Notifications from the process-wide watcher (inotify on the file's
    /// folder), with a `stat` every `fallback_poll` where it cannot see
    /// changes (network filesystems).
    fn changes(&self, fallback_poll: Duration) -> Changes {
        super::watch::subscribe(&self.path, fallback_poll)
    }

    fn mark_refreshing<'a>(&'a self, refresh_token: &'a RefreshToken) -> StoreFuture<'a, Result<(), StoreError>> {
        let token = refresh_token.clone();
        self.blocking(move |store| file::write_marker(&store.path, &token))
    }

    fn clear_refreshing(&self) -> StoreFuture<'_, Result<(), StoreError>> {
        self.blocking(|store| file::remove_marker(&store.path))
    }

    fn interrupted_refresh(&self) -> StoreFuture<'_, Result<Option<super::RefreshRecord>, StoreError>> {
        self.blocking(|store| Ok(file::read_marker(&store.path)))
    }

    fn recover_interrupted(&self) -> StoreFuture<'_, Option<TokenSet>> {
        let found = self.blocking(|store| {
            Ok(file::orphans(&store.path)
                .into_iter()
                .find_map(|bytes| Self::parse(&store.path, &bytes).ok()))
        });
        Box::pin(async move { found.await.ok().flatten() })
    }

    fn record_refused<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<(), StoreError>> {
        let key = key.to_owned();
        self.blocking(move |store| file::record_refused(&store.path, &key))
    }

    fn refused_at<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Result<Option<SystemTime>, StoreError>> {
        let key = key.to_owned();
        self.blocking(move |store| Ok(file::refused_at(&store.path, &key)))
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use std::process::Command;

    use futures_util::StreamExt;

    use super::*;
    use crate::credentials::AccessToken;
    use crate::sim::{codex_auth_json, Issued};
    use crate::store::{Changed, CodexAuthFile};

    fn issued(n: u32) -> Issued {
        let jwt = crate::sim::unsigned_jwt;
        Issued {
            access_token: jwt(&format!(r#"{{"exp":4000000000,"iat":3999996400,"n":{n}}}"#)),
            refresh_token: format!("rt_{n}_1234567890"),
            id_token: jwt(r#"{"https://api.openai.com/auth":{"chatgpt_account_id":"acct"}}"#),
            account_id: "acct".into(),
        }
    }

    /// Waits up to a second for the next event.
    async fn next_event(changes: &mut Changes) -> Option<Changed> {
        tokio::time::timeout(Duration::from_secs(1), changes.next())
            .await
            .ok()
            .flatten()
    }

    /// Waits briefly for an event that should not come.
    async fn quiet(changes: &mut Changes) -> bool {
        tokio::time::timeout(Duration::from_millis(150), changes.next())
            .await
            .is_err()
    }

    fn sh(script: &str, path: &Path) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[tokio::test]
    async fn another_process_writing_the_file_is_notified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        std::fs::write(&path, codex_auth_json(&issued(1))).unwrap();
        let store = CodexAuthFile::new(&path);
        // No polling: only the OS can tell.
        let mut changes = store.changes(Duration::ZERO);
        assert_eq!(super::super::watch::folder(dir.path()), Some((true, 1)));

        // Our own reads and locks raise nothing.
        let loaded = store.load().await.unwrap();
        store
            .lock(Duration::from_secs(1))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
        assert!(quiet(&mut changes).await, "a read or a lock was taken for a change");

        // A rename over the file, as the Codex CLI writes it.
        let text = codex_auth_json(&issued(2));
        std::fs::write(dir.path().join("tmp"), &text).unwrap();
        sh(r#"mv "$(dirname "$1")/tmp" "$1""#, &path);
        assert_eq!(next_event(&mut changes).await, Some(Changed));
        while !quiet(&mut changes).await {}
        assert_ne!(store.load().await.unwrap().version, loaded.version);

        // An in-place write.
        sh(r#"cat "$1" > "$1.copy" && cat "$1.copy" > "$1""#, &path);
        assert_eq!(next_event(&mut changes).await, Some(Changed));
        while !quiet(&mut changes).await {}

        // Our own sidecar files are other names: nothing.
        store.record_refused("00").await.unwrap();
        assert!(quiet(&mut changes).await, "a sidecar write was taken for a change");

        // Dropping the stream unsubscribes; the folder is no longer watched.
        drop(changes);
        assert_eq!(super::super::watch::folder(dir.path()), None);
    }

    #[tokio::test]
    async fn many_stores_in_one_folder_share_one_watch() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..50).map(|i| dir.path().join(format!("creds-{i}.json"))).collect();
        for (i, path) in paths.iter().enumerate() {
            std::fs::write(path, codex_auth_json(&issued(i as u32))).unwrap();
        }
        let mut streams: Vec<Changes> = paths
            .iter()
            .map(|path| CodexAuthFile::new(path).changes(Duration::from_secs(1)))
            .collect();
        assert_eq!(super::super::watch::folder(dir.path()), Some((true, 50)));
        // A write to one file tells its subscriber only.
        std::fs::write(dir.path().join("creds-7.json"), codex_auth_json(&issued(99))).unwrap();
        assert_eq!(next_event(&mut streams[7]).await, Some(Changed));
        assert!(quiet(&mut streams[8]).await);
        streams.clear();
        assert_eq!(super::super::watch::folder(dir.path()), None);
    }

    #[tokio::test]
    async fn a_folder_that_cannot_be_watched_is_polled() {
        let dir = tempfile::tempdir().unwrap();
        // The folder does not exist yet: the OS cannot watch it.
        let path = dir.path().join("later").join("auth.json");
        let store = CodexAuthFile::new(&path);
        let mut changes = store.changes(Duration::from_millis(20));
        assert_eq!(super::super::watch::folder(&dir.path().join("later")), Some((false, 1)));
        std::fs::create_dir(dir.path().join("later")).unwrap();
        std::fs::write(&path, codex_auth_json(&issued(1))).unwrap();
        assert_eq!(next_event(&mut changes).await, Some(Changed));
    }

    /// Two spellings of one folder (a symbolic link to it, or `..` in a
    /// path) are one inotify watch: a store reached through one spelling
    /// must not blind, or unwatch, a store reached through the other.
    #[tokio::test]
    async fn two_spellings_of_one_folder_do_not_blind_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let first = real.join("first.json");
        std::fs::write(&first, codex_auth_json(&issued(1))).unwrap();
        std::fs::write(real.join("second.json"), codex_auth_json(&issued(2))).unwrap();

        // No polling: only the OS can tell.
        let mut watched = CodexAuthFile::new(&first).changes(Duration::ZERO);
        let other = CodexAuthFile::new(link.join("second.json")).changes(Duration::ZERO);

        std::fs::write(&first, codex_auth_json(&issued(3))).unwrap();
        assert_eq!(
            next_event(&mut watched).await,
            Some(Changed),
            "a store through another spelling of the folder blinded this one"
        );
        while !quiet(&mut watched).await {}

        drop(other);
        std::fs::write(&first, codex_auth_json(&issued(4))).unwrap();
        assert_eq!(
            next_event(&mut watched).await,
            Some(Changed),
            "dropping a store through another spelling of the folder unwatched this one"
        );
    }

    #[tokio::test]
    async fn save_is_a_compare_and_swap_on_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        std::fs::write(&path, codex_auth_json(&issued(1))).unwrap();
        let store = CodexAuthFile::new(&path);
        let start = store.load().await.unwrap();
        let mut ours = start.tokens.clone();
        ours.access_token = AccessToken::new(issued(2).access_token);
        ours.refresh_token = None;

        // Rewritten with the same tokens (another layout): no conflict.
        let same: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string(&same).unwrap()).unwrap();
        assert_eq!(store.load().await.unwrap().version, start.version);

        // Changed tokens (the Codex CLI committed its own refresh): refused,
        // nothing written.
        let theirs = codex_auth_json(&issued(3));
        std::fs::write(&path, &theirs).unwrap();
        let err = store.save(&ours, &start.version).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "credentials file {} was changed by another writer during the refresh; not overwriting it",
                path.display()
            )
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), theirs);

        // Over the version now stored: written, and the new version is
        // what a load sees.
        let now = store.load().await.unwrap();
        let written = store.save(&ours, &now.version).await.unwrap();
        let after = store.load().await.unwrap();
        assert_eq!(after.version, written);
        assert_eq!(after.tokens.access_token, ours.access_token);
        // The refresh token was not replaced (ours has none new): kept.
        assert_eq!(after.tokens.refresh_token, now.tokens.refresh_token);
    }
}
