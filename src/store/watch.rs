//! One process-wide watcher of credentials files, shared by every file
//! store: "the file may have changed" events fanned out to subscribers.
//!
//! A registry may hold 100,000 credentials in one process, so a store's
//! idle cost must stay small: no thread and no inotify instance per store.
//! There is one OS watcher (the `notify` crate: inotify on Linux), started
//! on the first subscription, watching the *folders* that hold the files
//! (an `auth.json` is replaced by a rename, which a watch on the file
//! itself would lose), each folder once however many files in it are
//! watched. Its events are matched by file name and sent to the
//! subscribers' `watch` channels, which coalesce a burst into one event for
//! a subscriber that has not looked yet. Events for reads (`open`, a close
//! without writing) are dropped: a broker's own reads never wake anyone.
//!
//! Where the OS cannot tell (a folder on a network filesystem, where other
//! hosts' writes raise no local event; a folder that could not be watched;
//! a watcher that could not start; a watched folder deleted or moved), a
//! subscription falls back to a `stat` of the file every `fallback_poll`,
//! done by one shared polling thread, started only when some subscription
//! needs it.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::watch;

use super::{Changed, Changes};

/// Events for the file at `path` (and, when it is a symbolic link, for the
/// file it names) from now on, for as long as the stream is kept.
pub(crate) fn subscribe(path: &Path, fallback_poll: Duration) -> Changes {
    let hub = hub();
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    // Folders by their canonical path: two spellings of one folder (a
    // symbolic link to it, `..`) are one inotify watch, which reports its
    // events under one name only and is removed for both by one unwatch.
    let mut keys: Vec<(PathBuf, OsString)> = Vec::new();
    keys.extend(split(&absolute).map(|(dir, name)| (std::fs::canonicalize(&dir).unwrap_or(dir), name)));
    if let Ok(target) = std::fs::canonicalize(&absolute) {
        if let Some(key) = split(&target) {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let baseline = identity(&absolute);
    let (tx, rx) = watch::channel(0u64);

    // Adding and removing OS watches is serialised by `os`; the event
    // handler never takes it, so a watch call (a round trip to notify's
    // thread) is never made while holding `state`, which the handler needs.
    let mut os = hub.os.lock();
    let watcher = os.get_or_insert_with(start_os_watcher);
    let mut new_dirs: Vec<PathBuf> = {
        let state = hub.state.lock();
        keys.iter()
            .map(|(dir, _)| dir.clone())
            .filter(|dir| !state.dirs.contains_key(dir))
            .collect()
    };
    new_dirs.dedup();
    let added: Vec<(PathBuf, Dir)> = new_dirs
        .into_iter()
        .map(|dir| {
            let os_watched = watcher
                .as_mut()
                .is_some_and(|w| w.watch(&dir, RecursiveMode::NonRecursive).is_ok());
            let remote = remote_fs(&dir);
            let entry = Dir {
                os_watched,
                remote,
                names: HashMap::new(),
            };
            (dir, entry)
        })
        .collect();

    let mut state = hub.state.lock();
    state.dirs.extend(added);
    let id = state.next_id;
    state.next_id += 1;
    let mut needs_poll = false;
    for (dir, name) in &keys {
        if let Some(entry) = state.dirs.get_mut(dir) {
            needs_poll |= !entry.os_watched || entry.remote;
            entry.names.entry(name.clone()).or_default().push(id);
        }
    }
    state.subs.insert(
        id,
        Sub {
            tx,
            keys,
            path: absolute,
            period: fallback_poll,
            polling: false,
            due: None,
            last: baseline,
        },
    );
    if needs_poll {
        start_polling(hub, &mut state, id);
    }
    drop(state);
    drop(os);

    let subscription = Subscription { id };
    Changes::new(futures_util::stream::unfold(
        (rx, subscription),
        |(mut rx, subscription)| async move {
            rx.changed().await.ok()?;
            Some((Changed, (rx, subscription)))
        },
    ))
}

/// Whether the folder `dir` is watched by the OS, and how many file names
/// in it have subscribers: for tests.
#[cfg(all(test, feature = "sim"))]
pub(crate) fn folder(dir: &Path) -> Option<(bool, usize)> {
    let state = hub().state.lock();
    state.dirs.get(dir).map(|d| (d.os_watched, d.names.len()))
}

struct Hub {
    /// The OS watcher: `None` before the first subscription, `Some(None)`
    /// when it could not start (every subscription polls then).
    os: Mutex<Option<Option<notify::RecommendedWatcher>>>,
    state: Mutex<State>,
    /// Wakes the polling thread when a subscription starts polling.
    wake: Condvar,
}

#[derive(Default)]
struct State {
    next_id: u64,
    subs: HashMap<u64, Sub>,
    dirs: HashMap<PathBuf, Dir>,
    poller_running: bool,
}

struct Sub {
    tx: watch::Sender<u64>,
    /// The folders and file names it listens to.
    keys: Vec<(PathBuf, OsString)>,
    path: PathBuf,
    /// How often to poll when it must; zero: never.
    period: Duration,
    polling: bool,
    due: Option<Instant>,
    last: Option<Identity>,
}

struct Dir {
    /// The OS reports this folder's changes.
    os_watched: bool,
    /// On a network filesystem: other hosts' writes raise no local event.
    remote: bool,
    /// Subscribers by file name.
    names: HashMap<OsString, Vec<u64>>,
}

/// The identity of a file's contents: if none of these changed, nobody
/// rewrote the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    inode: u64,
    size: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
}

fn identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Identity {
        dev: meta.dev(),
        inode: meta.ino(),
        size: meta.len(),
        modified: meta.modified().ok(),
        changed: (meta.ctime(), meta.ctime_nsec()),
    })
}

/// Unsubscribes when the stream is dropped.
struct Subscription {
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let hub = hub();
        let mut os = hub.os.lock();
        let emptied: Vec<(PathBuf, bool)> = {
            let mut state = hub.state.lock();
            let Some(sub) = state.subs.remove(&self.id) else {
                return;
            };
            let mut emptied = Vec::new();
            for (dir, name) in sub.keys {
                let Some(entry) = state.dirs.get_mut(&dir) else {
                    continue;
                };
                if let Some(ids) = entry.names.get_mut(&name) {
                    ids.retain(|id| *id != self.id);
                    if ids.is_empty() {
                        entry.names.remove(&name);
                    }
                }
                if entry.names.is_empty() {
                    let watched = entry.os_watched;
                    state.dirs.remove(&dir);
                    emptied.push((dir, watched));
                }
            }
            emptied
        };
        if let Some(Some(watcher)) = os.as_mut() {
            for (dir, watched) in emptied {
                if watched {
                    let _ = watcher.unwatch(&dir);
                }
            }
        }
    }
}

fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| Hub {
        os: Mutex::new(None),
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
    })
}

fn start_os_watcher() -> Option<notify::RecommendedWatcher> {
    match notify::recommended_watcher(dispatch) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files for changes; polling them instead");
            None
        }
    }
}

/// The OS watcher's event handler (on notify's thread).
fn dispatch(result: notify::Result<Event>) {
    let hub = hub();
    let mut state = hub.state.lock();
    let event = match result {
        Ok(event) if !event.need_rescan() => event,
        // Lost events (a queue overflow) or a watcher error: anything may
        // have changed.
        _ => {
            for sub in state.subs.values() {
                sub.tx.send_modify(bump);
            }
            return;
        }
    };
    match event.kind {
        // Reads (ours too) change nothing; a close after writing does.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return,
        _ => {}
    }
    let gone = matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    );
    for path in &event.paths {
        // A watched folder itself deleted or moved: its watch is gone.
        if gone && state.dirs.contains_key(path) {
            let ids: Vec<u64> = match state.dirs.get_mut(path) {
                Some(dir) => {
                    dir.os_watched = false;
                    dir.names.values().flatten().copied().collect()
                }
                None => Vec::new(),
            };
            for id in ids {
                if let Some(sub) = state.subs.get_mut(&id) {
                    sub.tx.send_modify(bump);
                    sub.last = None;
                }
                start_polling(hub, &mut state, id);
            }
            continue;
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            continue;
        };
        let Some(ids) = state.dirs.get(dir).and_then(|d| d.names.get(name)) else {
            continue;
        };
        for id in ids {
            if let Some(sub) = state.subs.get(id) {
                sub.tx.send_modify(bump);
            }
        }
    }
}

fn bump(n: &mut u64) {
    *n = n.wrapping_add(1);
}

/// Makes subscription `id` poll (if it has a period), starting the polling
/// thread if it is not running.
fn start_polling(hub: &'static Hub, state: &mut MutexGuard<'_, State>, id: u64) {
    let Some(sub) = state.subs.get_mut(&id) else { return };
    if sub.period.is_zero() || sub.polling {
        return;
    }
    sub.polling = true;
    sub.due = Instant::now().checked_add(sub.period);
    if !state.poller_running {
        let started = std::thread::Builder::new()
            .name("token-broker-poll".into())
            .spawn(poll_loop)
            .is_ok();
        state.poller_running = started;
    }
    hub.wake.notify_one();
}

/// The shared polling thread: `stat`s each polling subscription's file
/// when it is due, and sends an event when its identity changed.
fn poll_loop() {
    let hub = hub();
    let mut state = hub.state.lock();
    loop {
        let now = Instant::now();
        let due: Vec<(u64, PathBuf)> = state
            .subs
            .iter()
            .filter(|(_, s)| s.polling && s.due.is_some_and(|at| at <= now))
            .map(|(id, s)| (*id, s.path.clone()))
            .collect();
        if !due.is_empty() {
            let seen: Vec<(u64, Option<Identity>)> = MutexGuard::unlocked(&mut state, || {
                due.into_iter().map(|(id, path)| (id, identity(&path))).collect()
            });
            for (id, now_seen) in seen {
                if let Some(sub) = state.subs.get_mut(&id) {
                    if sub.last != now_seen {
                        sub.last = now_seen;
                        sub.tx.send_modify(bump);
                    }
                    sub.due = Instant::now().checked_add(sub.period);
                }
            }
            continue;
        }
        let next = state.subs.values().filter(|s| s.polling).filter_map(|s| s.due).min();
        match next {
            Some(at) => {
                hub.wake.wait_until(&mut state, at);
            }
            None => hub.wake.wait(&mut state),
        }
    }
}

/// `path`'s folder and file name.
fn split(path: &Path) -> Option<(PathBuf, OsString)> {
    let name = path.file_name()?.to_os_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((dir, name))
}

/// Whether `dir` is on a network (or FUSE) filesystem, where writes made
/// elsewhere raise no local event. Unknown counts as remote: polling is
/// the safe side.
#[cfg(target_os = "linux")]
fn remote_fs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const REMOTE: [u32; 11] = [
        0x6969,      // NFS
        0x517B,      // SMB
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x6573_5546, // FUSE (sshfs, ...)
        0x00C3_6400, // Ceph
        0x5346_414F, // AFS
        0x7375_7245, // Coda
        0x0102_1997, // 9P (WSL, VM shares)
        0x4750_4653, // GPFS
        0x0BD0_0BD0, // Lustre
    ];
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: `statfs` is plain data; zeroed is a valid value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `buf` is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return true;
    }
    REMOTE.contains(&(buf.f_type as u32))
}

#[cfg(not(target_os = "linux"))]
fn remote_fs(_dir: &Path) -> bool {
    false
}
