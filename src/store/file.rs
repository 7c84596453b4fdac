//! File plumbing shared by the file stores: bounded reads, atomic durable
//! writes, identity of a file's contents, and the sibling lock file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{HeldLock, RefreshRecord, StoreError, StoreFuture, StoreLock, MAX_FILE_BYTES};
use crate::credentials::RefreshToken;

/// An exclusive advisory lock on a sibling lock file (the brokers'
/// `auth.json.broker.lock`, plus the credentials file's own inode).
///
/// The operating system drops the lock when the holder's file descriptor
/// closes, including when the process dies: a killed broker never leaves a
/// lock that blocks others.
#[derive(Debug)]
pub(crate) struct FileLock {
    file: File,
    /// With the brokers' lock: a lock on the credentials file's own inode,
    /// the one lock a broker in a container that bind-mounts the file
    /// shares with brokers outside it.
    _data: Option<File>,
    /// The lock file's path, to check that it is still the file there.
    path: PathBuf,
}

impl FileLock {
    /// Whether the lock still excludes others: its lock file has not been
    /// deleted or replaced (`rm auth.json.broker.lock`) since it was taken.
    pub(crate) fn is_valid(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(held), Ok(now)) = (self.file.metadata(), fs::symlink_metadata(&self.path)) else {
            return false;
        };
        held.nlink() > 0 && held.dev() == now.dev() && held.ino() == now.ino()
    }
}

impl HeldLock for FileLock {
    fn is_valid(&self) -> bool {
        FileLock::is_valid(self)
    }

    /// Closing the descriptors releases the `flock`s: no I/O to wait for.
    fn release(self: Box<Self>) -> StoreFuture<'static, Result<(), StoreError>> {
        drop(self);
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Reads a credentials file (following a symbolic link), refusing
/// directories, FIFOs and other files that are not regular, unreadable
/// files and anything larger than [`MAX_FILE_BYTES`].
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, StoreError> {
    read_regular(path, true)
}

/// Reads one of our own sidecar files (a record); a symbolic link there is
/// refused, never followed.
fn read_sidecar(path: &Path) -> Result<Vec<u8>, StoreError> {
    read_regular(path, false)
}

fn read_regular(path: &Path, follow: bool) -> Result<Vec<u8>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = |e: io::Error| StoreError::Unreadable {
        location: path.into(),
        cause: describe_io(&e),
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer that never comes.
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) => {
                StoreError::Unreadable {
                    location: path.into(),
                    cause: "it is a symbolic link to a file that does not exist".into(),
                }
            }
            io::ErrorKind::NotFound => StoreError::NotFound { location: path.into() },
            _ if e.raw_os_error() == Some(libc::ELOOP) => StoreError::Unreadable {
                location: path.into(),
                cause: "it is a symbolic link, which token-broker never follows for its own records".into(),
            },
            _ => unreadable(e),
        })?;
    let meta = file.metadata().map_err(unreadable)?;
    if meta.is_dir() {
        return Err(StoreError::Unreadable {
            location: path.into(),
            cause: "it is a directory".into(),
        });
    }
    if !meta.is_file() {
        return Err(StoreError::Unreadable {
            location: path.into(),
            cause: "it is not a regular file (a FIFO, a socket or a device)".into(),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(StoreError::TooLarge {
            location: path.into(),
            size: meta.len(),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(StoreError::TooLarge {
            location: path.into(),
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

/// Writes `bytes` to the credentials file at `path` (through a symbolic
/// link, to the file it names) atomically and durably: a temporary file in
/// the same folder, fsync, rename over the target, fsync the folder. A crash
/// at any instant leaves either the old file or the new one. The new file
/// keeps the old one's owner, group and mode (a broker run as root on a
/// user's file must not take it from the user).
///
/// A file that a rename cannot replace (a single-file bind mount, whose
/// device differs from its folder's; a file with several hard links, which
/// a rename would split) is rewritten in place instead: readers may catch
/// it half-written for an instant and retry, as token-broker's own do.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let target = resolve_link(path);
    let old = fs::metadata(&target).ok();
    if let Some(meta) = &old {
        if !replaceable_by_rename(&target, meta) {
            return write_in_place(path, &target, bytes);
        }
    }
    replace(path, &target, bytes, old.as_ref())
}

/// Writes one of our own sidecar files (a record) at `path` by the same
/// atomic replacement, never following a symbolic link planted there (the
/// rename replaces the link itself), owned like the credentials file
/// `owner_of`.
fn write_sidecar(path: &Path, bytes: &[u8], owner_of: &Path) -> Result<(), StoreError> {
    let reference = fs::metadata(resolve_link(owner_of)).ok();
    replace(path, path, bytes, reference.as_ref())
}

/// Whether a rename over `target` replaces the file every other reader sees.
pub(crate) fn replaceable_by_rename(target: &Path, meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let same_device = fs::metadata(dir).is_ok_and(|d| d.dev() == meta.dev());
    same_device && meta.nlink() <= 1
}

fn replace(path: &Path, target: &Path, bytes: &[u8], like: Option<&fs::Metadata>) -> Result<(), StoreError> {
    let write_err = |e: io::Error| StoreError::Write {
        location: path.into(),
        cause: describe_io(&e),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = temp_prefix(target);
    sweep_temp_files(&dir, &prefix);
    // tempfile creates the file with O_EXCL and mode 0600 on Unix.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(write_err)?;
    if let Some(like) = like {
        take_owner_and_mode(tmp.as_file(), like).map_err(|cause| StoreError::Write {
            location: path.into(),
            cause,
        })?;
    }
    tmp.write_all(bytes).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    if let Err(e) = tmp.persist(target) {
        // A mount point (a single-file bind mount the check above could not
        // see, on the same filesystem as its folder) cannot be renamed over:
        // rewrite it in place instead of losing the tokens.
        if like.is_some() && e.error.raw_os_error() == Some(libc::EBUSY) {
            return write_in_place(path, target, bytes);
        }
        return Err(write_err(e.error));
    }
    File::open(&dir).and_then(|d| d.sync_all()).map_err(write_err)?;
    Ok(())
}

/// Rewrites `target` in place: write from the start, cut to length, fsync.
fn write_in_place(path: &Path, target: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write_err = |e: io::Error| StoreError::Write {
        location: path.into(),
        cause: describe_io(&e),
    };
    let mut file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(target)
        .map_err(write_err)?;
    if !file.metadata().map_err(write_err)?.is_file() {
        return Err(StoreError::Write {
            location: path.into(),
            cause: "it is not a regular file".into(),
        });
    }
    file.write_all(bytes).map_err(write_err)?;
    file.set_len(bytes.len() as u64).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(())
}

/// Gives `file` the owner and group of `like`, so that a broker run as root
/// (cron, sudo) on a user's file leaves a file the user and the Codex CLI
/// can still read. The mode stays 0600, as the Codex CLI writes it: a
/// credentials file is never made readable by others. Changing the owner
/// takes privilege: when that fails the write is refused, rather than
/// leaving a file its owner can no longer read.
fn take_owner_and_mode(file: &File, like: &fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mine = file.metadata().map_err(|e| describe_io(&e))?;
    if mine.uid() != like.uid() || mine.gid() != like.gid() {
        std::os::unix::fs::fchown(file, Some(like.uid()), Some(like.gid())).map_err(|e| {
            format!(
                "the file belongs to uid {} gid {}, and the new file could not be given that owner ({}); \
                 run token-broker as that user",
                like.uid(),
                like.gid(),
                describe_io(&e)
            )
        })?;
    }
    Ok(())
}

/// A lock file we created as root for another user's credentials must stay
/// usable by that user (and the Codex CLI it runs): give it their owner.
fn share_with_owner(file: &File, credentials: &Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let (Ok(mine), Ok(theirs)) = (file.metadata(), fs::metadata(resolve_link(credentials))) else {
        return;
    };
    if mine.uid() == 0 && theirs.uid() != 0 {
        let _ = std::os::unix::fs::fchown(file, Some(theirs.uid()), Some(theirs.gid()));
    }
}

/// Orphaned temporary files of the credentials file at `path` written since
/// the refresh-in-progress record, newest first: each is what a writer
/// killed during that refresh meant to rename over the file. Older ones (a
/// crash long ago, since overtaken by other writers) are never offered.
pub(crate) fn orphans(path: &Path) -> Vec<Vec<u8>> {
    let Some(since) = fs::symlink_metadata(marker_path(path)).and_then(|m| m.modified()).ok() else {
        return Vec::new();
    };
    let target = resolve_link(path);
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = temp_prefix(&target);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".tmp")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .filter(|(modified, _)| *modified >= since)
        .collect();
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    found.into_iter().filter_map(|(_, p)| read_sidecar(&p).ok()).collect()
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
    let deadline = crate::policy::instant_after(timeout);
    let lock_path = broker_lock_path(path);
    let file = lock_file(&lock_path, path, deadline, timeout)?;
    let data = lock_data_file(path, deadline, timeout)?;
    Ok(StoreLock::new(FileLock {
        file,
        _data: data,
        path: lock_path,
    }))
}

/// Locks the credentials file's own inode (never written through this
/// descriptor), polling until `deadline`. A file that cannot be opened is
/// skipped: the load that follows reports it.
fn lock_data_file(path: &Path, deadline: Instant, timeout: Duration) -> Result<Option<File>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(file) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    else {
        return Ok(None);
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(None);
    }
    match flock_until(&file, deadline) {
        Ok(true) => Ok(Some(file)),
        Ok(false) => Err(StoreError::LockTimeout {
            location: path.into(),
            waited: timeout,
        }),
        // A filesystem without flock: the brokers' lock file still holds.
        Err(_) => Ok(None),
    }
}

/// Polls an exclusive `flock` on `file` until `deadline`: `Ok(true)` once
/// held, `Ok(false)` when the deadline passed first.
fn flock_until(file: &File, deadline: Instant) -> io::Result<bool> {
    let mut pause = Duration::from_millis(1);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Takes the commit locks of another program that writes the credentials
/// file at `credentials`, in the order that program takes them, polling each
/// until `timeout` (shared). Held only around a re-read, a compare and a
/// rename: milliseconds.
pub(crate) fn commit_locks(paths: &[PathBuf], credentials: &Path, timeout: Duration) -> Result<Vec<File>, StoreError> {
    let deadline = crate::policy::instant_after(timeout);
    paths
        .iter()
        .map(|p| lock_file(p, credentials, deadline, timeout))
        .collect()
}

/// Opens (creating it, mode 0600) and exclusively locks the lock file at
/// `lock_path`, polling until `deadline`.
///
/// A lock file deleted or replaced while we waited (someone ran `rm` on it)
/// would give us a lock nobody else sees: after each successful `flock` the
/// open file must still be the one at the path, else we start again.
fn lock_file(lock_path: &Path, credentials: &Path, deadline: Instant, timeout: Duration) -> Result<File, StoreError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let open_err = |e: io::Error| StoreError::Write {
        location: lock_path.into(),
        cause: describe_io(&e),
    };
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(lock_path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => StoreError::Write {
                    location: lock_path.into(),
                    cause: "it is a symbolic link, which token-broker never follows for a lock file".into(),
                },
                _ => open_err(e),
            })?;
        if !file.metadata().map_err(open_err)?.is_file() {
            return Err(StoreError::Write {
                location: lock_path.into(),
                cause: "it is not a regular file (a FIFO, a socket or a device)".into(),
            });
        }
        share_with_owner(&file, credentials);
        if !flock_until(&file, deadline).map_err(open_err)? {
            return Err(StoreError::LockTimeout {
                location: lock_path.into(),
                waited: timeout,
            });
        }
        let held = file.metadata().map_err(open_err)?;
        match fs::symlink_metadata(lock_path) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => return Ok(file),
            // Deleted or replaced while we waited: lock the file that is there now.
            _ if Instant::now() < deadline => continue,
            _ => {
                return Err(StoreError::LockTimeout {
                    location: lock_path.into(),
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

/// Durably records that `refresh_token` is about to be spent: its hash and
/// who spends it (host, boot, process id and start time), never the token.
pub(crate) fn write_marker(path: &Path, refresh_token: &RefreshToken) -> Result<(), StoreError> {
    let me = Holder::current();
    let record = serde_json::json!({
        "pid": me.pid,
        "pid_start": me.pid_start,
        "host": me.host,
        "boot_id": me.boot_id,
        "started_at": crate::credentials::format_rfc3339(SystemTime::now()),
        "refresh_token_sha256": refresh_token.sha256_hex(),
    });
    write_sidecar(&marker_path(path), format!("{record}\n").as_bytes(), path)
}

/// The record left behind, if any.
pub(crate) fn read_marker(path: &Path) -> Option<RefreshRecord> {
    let bytes = read_sidecar(&marker_path(path)).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let hash = value.get("refresh_token_sha256")?.as_str()?.to_owned();
    let holder = Holder {
        pid: value.get("pid").and_then(|v| v.as_u64()).unwrap_or(0) as u32,
        pid_start: value.get("pid_start").and_then(|v| v.as_u64()),
        host: value.get("host").and_then(|v| v.as_str()).map(str::to_owned),
        boot_id: value.get("boot_id").and_then(|v| v.as_str()).map(str::to_owned),
    };
    let me = Holder::current();
    Some(RefreshRecord {
        refresh_token_sha256: hash,
        holder_alive: holder.is_alive(),
        holder_pid: holder.pid,
        mine: holder.pid == me.pid
            && holder.pid_start == me.pid_start
            && holder.host == me.host
            && holder.boot_id == me.boot_id,
    })
}

/// Who wrote a refresh-in-progress record.
struct Holder {
    pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/PID/stat`
    /// field 22): tells a live holder from a new process that reuses its id.
    pid_start: Option<u64>,
    host: Option<String>,
    /// `/proc/sys/kernel/random/boot_id`: a reboot ends every holder.
    boot_id: Option<String>,
}

impl Holder {
    fn current() -> Self {
        let pid = std::process::id();
        Holder {
            pid,
            pid_start: process_start(pid),
            host: read_trimmed("/proc/sys/kernel/hostname"),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        }
    }

    /// Whether the holder is provably still running: same host, same boot,
    /// and a process with its id that started when it did. A record that
    /// cannot be checked (another host, an older record) counts as left by
    /// a holder that died.
    fn is_alive(&self) -> bool {
        let me = Holder::current();
        let (Some(start), Some(host), Some(boot)) = (self.pid_start, &self.host, &self.boot_id) else {
            return false;
        };
        me.host.as_ref() == Some(host) && me.boot_id.as_ref() == Some(boot) && process_start(self.pid) == Some(start)
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The start time of process `pid` (clock ticks since boot), if it runs.
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After it come field 3 (state) onwards; the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the marker; a missing one is fine.
pub(crate) fn remove_marker(path: &Path) -> Result<(), StoreError> {
    let marker = marker_path(path);
    match fs::remove_file(&marker) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Write {
            location: marker.into(),
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
    let Ok(bytes) = read_sidecar(&refused_path(path)) else {
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
                    let hash = e.get("key_sha256")?.as_str()?.to_owned();
                    let at = crate::credentials::parse_rfc3339(e.get("refused_at")?.as_str()?)?;
                    Some((hash, at))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Durably records that the provider refused a refresh token (`key`, a
/// hash naming it and the endpoint; never the token), so that no broker on
/// this file sends it again.
pub(crate) fn record_refused(path: &Path, key: &str) -> Result<(), StoreError> {
    let hash = key.to_owned();
    let mut entries = read_refused(path);
    entries.retain(|(h, _)| *h != hash);
    entries.push((hash, SystemTime::now()));
    let skip = entries.len().saturating_sub(REFUSED_KEPT);
    let list: Vec<serde_json::Value> = entries
        .iter()
        .skip(skip)
        .map(|(h, at)| {
            serde_json::json!({
                "key_sha256": h,
                "refused_at": crate::credentials::format_rfc3339(*at),
            })
        })
        .collect();
    let record = serde_json::json!({ "refused": list });
    write_sidecar(&refused_path(path), format!("{record}\n").as_bytes(), path)
}

/// When the refusal `key` was recorded, if a broker recorded it.
pub(crate) fn refused_at(path: &Path, key: &str) -> Option<SystemTime> {
    read_refused(path).into_iter().find(|(h, _)| h == key).map(|(_, at)| at)
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
