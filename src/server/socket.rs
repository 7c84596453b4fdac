//! The daemon's Unix socket: a private folder, one daemon per socket (a
//! lock held for the daemon's life), a stale socket replaced, a live one
//! left alone.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::daemon::DaemonError;
use crate::store::display_path;

/// The socket file while the daemon owns it: removed (if still the one it
/// made) and unlocked on drop.
#[derive(Debug)]
pub(crate) struct OwnedSocket {
    path: PathBuf,
    /// The socket file's identity, to never remove another daemon's.
    dev_ino: (u64, u64),
    /// Held (flock) for the daemon's life.
    _lock: File,
}

impl OwnedSocket {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl OwnedSocket {
    /// Removes the socket file, if it is still the one this daemon made
    /// (new clients then find no daemon); the lock stays held until drop.
    pub(crate) fn remove(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Takes the socket at `path`: checks (or makes) its private folder, takes
/// the one-daemon lock, replaces a stale socket, binds with mode 0600
/// (0666 with `shared`).
///
/// With `shared` (`allowed_uids` names other users), those users must be
/// able to reach it: the folder may then be traversable by others (0711,
/// made so when missing; never writable by them) and the socket is 0666.
/// The peer check on every connection is then what keeps everyone else
/// out.
pub(crate) fn bind(path: &Path, shared: bool) -> Result<(std::os::unix::net::UnixListener, OwnedSocket), DaemonError> {
    let socket_err = |message: String| DaemonError::Socket {
        path: path.to_path_buf(),
        message,
    };
    let Some(name) = path.file_name() else {
        return Err(socket_err("is not a file path".into()));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    private_folder(&dir, shared).map_err(socket_err)?;

    let mut lock_name = name.to_os_string();
    lock_name.push(".lock");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir.join(&lock_name))
        .map_err(|e| {
            socket_err(format!(
                "could not open its lock file {}: {e}",
                display_path(Path::new(&lock_name))
            ))
        })?;
    if !try_flock(&lock) {
        return Err(DaemonError::AlreadyRunning {
            path: path.to_path_buf(),
        });
    }

    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Ours to replace, unless something answers on it (a daemon
            // that does not take the lock: an older version).
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(DaemonError::AlreadyRunning {
                    path: path.to_path_buf(),
                });
            }
            tracing::info!(socket = %path.display(), "replacing a stale socket");
            std::fs::remove_file(path).map_err(|e| socket_err(format!("could not remove the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(socket_err(
                "exists and is not a socket; not touching it (remove it or choose another socket)".into(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_err(e.to_string())),
    }

    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|e| socket_err(format!("could not listen: {e}")))?;
    // The folder is private already; the mode keeps the socket so if it is
    // ever moved or the folder opened up (0666 when others are allowed: the
    // peer check keeps everyone else out).
    set_access(path, shared).map_err(|e| socket_err(format!("could not set its mode: {e}")))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| socket_err(e.to_string()))?;
    listener.set_nonblocking(true).map_err(|e| socket_err(e.to_string()))?;
    Ok((
        listener,
        OwnedSocket {
            path: path.to_path_buf(),
            dev_ino: (meta.dev(), meta.ino()),
            _lock: lock,
        },
    ))
}

/// The socket's mode: 0600, or 0666 when other users are allowed (the
/// folder keeps them out otherwise).
pub(crate) fn set_access(path: &Path, shared: bool) -> std::io::Result<()> {
    let mode = if shared { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if shared {
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Ok(meta) = std::fs::metadata(dir) {
            if meta.mode() & 0o001 == 0 {
                tracing::warn!(
                    folder = %dir.display(),
                    "allowed_uids names other users, but the socket's folder does not let them reach the socket: `chmod 711` it"
                );
            }
        }
    }
    Ok(())
}

/// The socket's folder exists (made 0700, or 0711 when `shared`, if not),
/// is a folder, is owned by this user, and is open to nobody else (with
/// `shared`: writable by nobody else).
fn private_folder(dir: &Path, shared: bool) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if shared { 0o711 } else { 0o700 })
            .create(dir)
            .map_err(|e| format!("could not create its folder {}: {e}", display_path(dir)))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| format!("its folder {}: {e}", display_path(dir)))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder", display_path(dir)));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let closed = if shared { mode & 0o022 == 0 } else { mode & 0o077 == 0 };
    if meta.uid() != me || !closed {
        let (wanted, fix) = if shared {
            (
                "not writable by others (0711 lets allowed_uids reach the socket)",
                "chmod 711",
            )
        } else {
            ("mode 0700", "chmod 700")
        };
        return Err(format!(
            "its folder {} must be {wanted} and owned by uid {me} (it is {mode:04o}, owned by uid {}): \
             `{fix}` it, or choose a socket in a private folder such as $XDG_RUNTIME_DIR",
            display_path(dir),
            meta.uid()
        ));
    }
    Ok(())
}

fn try_flock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}
