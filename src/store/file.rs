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

/// The lock file that guards `path`: `path` with `.lock` appended.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let target = resolve_link(path);
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    target.with_file_name(name)
}

/// Takes the exclusive lock on `path`'s lock file, polling until `timeout`.
pub(crate) fn lock(path: &Path, timeout: Duration) -> Result<StoreLock, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock_path = lock_path(path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| StoreError::Write {
            path: lock_path.clone(),
            cause: describe_io(&e),
        })?;
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(StoreLock::File(FileLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => {
                return Err(StoreError::Write {
                    path: lock_path,
                    cause: describe_io(&e),
                })
            }
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(StoreError::LockTimeout {
                path: lock_path,
                waited,
            });
        }
        std::thread::sleep(pause.min(timeout - waited));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// The sidecar that records a refresh in progress: `path` + `.refreshing`.
fn marker_path(path: &Path) -> PathBuf {
    let target = resolve_link(path);
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".refreshing");
    target.with_file_name(name)
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
