//! File plumbing shared by the file stores: bounded reads, atomic durable
//! writes, identity of a file's contents, and the sibling lock file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{StoreError, StoreLock, StoreVersion, MAX_FILE_BYTES};
use crate::credentials::RefreshToken;

/// The identity of a file's contents: if none of these changed, nobody
/// rewrote the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVersion {
    dev: u64,
    inode: u64,
    size: u64,
    modified: Option<SystemTime>,
}

/// An exclusive advisory lock on a sibling lock file (`auth.json.lock`).
///
/// The operating system drops the lock when the holder's file descriptor
/// closes, including when the process dies: a killed broker never leaves a
/// lock that blocks others.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Reads a credentials file, refusing directories, unreadable files and
/// anything larger than [`MAX_FILE_BYTES`].
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, StoreError> {
    let unreadable = |e: io::Error| StoreError::Unreadable {
        path: path.to_path_buf(),
        cause: describe_io(&e),
    };
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) => {
            StoreError::Unreadable {
                path: path.to_path_buf(),
                cause: "it is a symbolic link to a file that does not exist".into(),
            }
        }
        io::ErrorKind::NotFound => StoreError::NotFound {
            path: path.to_path_buf(),
        },
        _ => unreadable(e),
    })?;
    let meta = file.metadata().map_err(unreadable)?;
    if meta.is_dir() {
        return Err(StoreError::Unreadable {
            path: path.to_path_buf(),
            cause: "it is a directory".into(),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(StoreError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Parses `bytes` as a JSON object, with an error that never quotes the
/// file's contents.
pub(crate) fn parse_object(
    path: &Path,
    bytes: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(StoreError::invalid(path, "the file is empty"));
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(StoreError::invalid(path, "expected a JSON object at the top level")),
        // serde_json's syntax errors name a line and column, never the text.
        Err(e) => Err(StoreError::invalid(path, format!("not valid JSON ({e})"))),
    }
}

pub(crate) fn required_string<'a>(
    path: &Path,
    obj: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<&'a str, StoreError> {
    optional_string(path, obj, key)?.ok_or_else(|| StoreError::invalid(path, format!("`{key}` is missing")))
}

/// A string field; missing, null and empty all mean "absent".
pub(crate) fn optional_string<'a>(
    path: &Path,
    obj: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<&'a str>, StoreError> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(StoreError::invalid(path, format!("`{key}` is not a string"))),
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the
/// same folder (mode 0600), fsync, rename over the target, fsync the folder.
/// A crash at any instant leaves either the old file or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let target = resolve_link(path);
    let write_err = |e: io::Error| StoreError::Write {
        path: path.to_path_buf(),
        cause: describe_io(&e),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = temp_prefix(&target);
    sweep_temp_files(&dir, &prefix);
    // tempfile creates the file with mode 0600 on Unix.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(write_err)?;
    tmp.write_all(bytes).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(&target).map_err(|e| write_err(e.error))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    Ok(())
}

/// The prefix of the temporary files that replace `target`:
/// `.auth.json.tb-`, so that writers of different files never touch each
/// other's temporary files.
fn temp_prefix(target: &Path) -> String {
    format!(".{}.tb-", target.file_name().unwrap_or_default().to_string_lossy())
}

/// Removes temporary files a killed writer of the same file left behind.
/// Called with the file's lock held: every writer of the file holds it while
/// its temporary file exists, so any such file found now is an orphan.
fn sweep_temp_files(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(".tmp") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The version of the file at `path`, or `None` when it cannot be stat'ed.
pub(crate) fn version_of(path: &Path) -> Option<StoreVersion> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ok()?;
    Some(StoreVersion::File(FileVersion {
        dev: meta.dev(),
        inode: meta.ino(),
        size: meta.len(),
        modified: meta.modified().ok(),
    }))
}

/// The brokers' own lock file: `path` with `.broker.lock` appended.
///
/// Only token-broker processes take it, and they hold it across the whole
/// refresh (re-read, request, write): single flight between brokers. No
/// other program waits for it, so holding it during network I/O blocks no
/// neighbour.
pub(crate) fn broker_lock_path(path: &Path) -> PathBuf {
    sibling(path, ".broker.lock")
}

/// `path` (through a symlink, to the file it names) with `suffix` appended
/// to its file name.
pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let target = resolve_link(path);
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    target.with_file_name(name)
}

/// Takes the brokers' exclusive lock on `path`, polling until `timeout`.
pub(crate) fn lock(path: &Path, timeout: Duration) -> Result<StoreLock, StoreError> {
    let file = lock_file(&broker_lock_path(path), crate::policy::instant_after(timeout), timeout)?;
    Ok(StoreLock::File(FileLock { _file: file }))
}

/// Takes the commit locks of another program that writes the same file, in
/// the order that program takes them, polling each until `timeout` (shared).
/// Held only around a re-read, a compare and a rename: milliseconds.
pub(crate) fn commit_locks(paths: &[PathBuf], timeout: Duration) -> Result<Vec<FileLock>, StoreError> {
    let deadline = crate::policy::instant_after(timeout);
    paths
        .iter()
        .map(|p| lock_file(p, deadline, timeout).map(|file| FileLock { _file: file }))
        .collect()
}

/// Opens (creating it, mode 0600) and exclusively locks the lock file at
/// `lock_path`, polling until `deadline`.
///
/// A lock file deleted or replaced while we waited (someone ran `rm` on it)
/// would give us a lock nobody else sees: after each successful `flock` the
/// open file must still be the one at the path, else we start again.
fn lock_file(lock_path: &Path, deadline: Instant, timeout: Duration) -> Result<File, StoreError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let open_err = |e: io::Error| StoreError::Write {
        path: lock_path.to_path_buf(),
        cause: describe_io(&e),
    };
    let mut pause = Duration::from_millis(1);
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(lock_path)
            .map_err(open_err)?;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(open_err(e)),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::LockTimeout {
                    path: lock_path.to_path_buf(),
                    waited: timeout,
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        let held = file.metadata().map_err(open_err)?;
        match fs::symlink_metadata(lock_path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(file),
            // Deleted or replaced while we waited: lock the file that is there now.
            _ if Instant::now() < deadline => continue,
            _ => {
                return Err(StoreError::LockTimeout {
                    path: lock_path.to_path_buf(),
                    waited: timeout,
                })
            }
        }
    }
}

/// The sidecar that records a refresh in progress: `path` + `.refreshing`.
fn marker_path(path: &Path) -> PathBuf {
    sibling(path, ".refreshing")
}

/// Durably records that `refresh_token` is about to be spent (its hash, the
/// process id and the time; never the token).
pub(crate) fn write_marker(path: &Path, refresh_token: &RefreshToken) -> Result<(), StoreError> {
    let record = serde_json::json!({
        "pid": std::process::id(),
        "started_at": crate::credentials::format_rfc3339(SystemTime::now()),
        "refresh_token_sha256": refresh_token.sha256_hex(),
    });
    write_atomic(&marker_path(path), format!("{record}\n").as_bytes())
}

/// The refresh-token hash in a marker left behind, if any.
pub(crate) fn read_marker(path: &Path) -> Option<String> {
    let bytes = fs::read(marker_path(path)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("refresh_token_sha256")?.as_str().map(str::to_owned)
}

/// Removes the marker; a missing one is fine.
pub(crate) fn remove_marker(path: &Path) -> Result<(), StoreError> {
    let marker = marker_path(path);
    match fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Write {
            path: marker,
            cause: describe_io(&e),
        }),
    }
}

/// The record of refresh tokens the provider refused: `path` + `.refused`.
fn refused_path(path: &Path) -> PathBuf {
    sibling(path, ".refused")
}

/// How many refused refresh tokens the record remembers.
const REFUSED_KEPT: usize = 32;

/// The refused-token record: `(sha256 hex, when)`, newest last.
fn read_refused(path: &Path) -> Vec<(String, SystemTime)> {
    let Ok(bytes) = read_bounded(&refused_path(path)) else {
        return Vec::new();
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    value
        .get("refused")
        .and_then(|v| v.as_array())
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| {
                    let hash = e.get("refresh_token_sha256")?.as_str()?.to_owned();
                    let at = crate::credentials::parse_rfc3339(e.get("refused_at")?.as_str()?)?;
                    Some((hash, at))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Durably records that the provider refused `refresh_token` (its hash and
/// the time; never the token), so that no broker on this file sends it again.
pub(crate) fn record_refused(path: &Path, refresh_token: &RefreshToken) -> Result<(), StoreError> {
    let hash = refresh_token.sha256_hex();
    let mut entries = read_refused(path);
    entries.retain(|(h, _)| *h != hash);
    entries.push((hash, SystemTime::now()));
    let skip = entries.len().saturating_sub(REFUSED_KEPT);
    let list: Vec<serde_json::Value> = entries
        .iter()
        .skip(skip)
        .map(|(h, at)| {
            serde_json::json!({
                "refresh_token_sha256": h,
                "refused_at": crate::credentials::format_rfc3339(*at),
            })
        })
        .collect();
    let record = serde_json::json!({ "refused": list });
    write_atomic(&refused_path(path), format!("{record}\n").as_bytes())
}

/// When the provider refused `refresh_token`, if a broker recorded that.
pub(crate) fn refused_at(path: &Path, refresh_token: &RefreshToken) -> Option<SystemTime> {
    let hash = refresh_token.sha256_hex();
    read_refused(path)
        .into_iter()
        .find(|(h, _)| *h == hash)
        .map(|(_, at)| at)
}

/// Follows a symlink so that an atomic rename replaces the file it points
/// to, not the link.
fn resolve_link(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// An I/O error's reason without the Rust debug noise ("permission denied").
fn describe_io(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_lowercase(),
        None => text,
    }
}
