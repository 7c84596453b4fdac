//! Named points in the refresh protocol where a test can freeze the
//! process, to kill it (SIGKILL) or thaw it (SIGCONT) exactly there.
//!
//! Compiled in only with the `failpoints` feature, which no release build
//! has: there, [`hit`] is an empty function. With it, a point named in
//! `TOKEN_BROKER_FAILPOINTS` (comma-separated) logs one line and stops the
//! whole process with SIGSTOP when reached.
//!
//! | point | where |
//! |---|---|
//! | `refresh-before-record` | lock held and store re-read; nothing recorded |
//! | `refresh-after-record` | in-progress record written; nothing sent |
//! | `refresh-after-response` | the provider answered; nothing written |
//! | `etcd-after-spool` | new tokens in the local spool; not yet in etcd |
//! | `refresh-after-write` | new tokens stored; record and lock not yet released |

/// Stops the process here if the test asked for `name`.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str) {
    let asked = std::env::var("TOKEN_BROKER_FAILPOINTS").is_ok_and(|v| v.split(',').any(|p| p.trim() == name));
    if asked {
        tracing::warn!(failpoint = name, "stopping at a failpoint (SIGSTOP)");
        // SAFETY: raise only sends a signal to this process.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// Does nothing: this build has no failpoints.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}
