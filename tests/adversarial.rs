//! Adversarial cases: what a hostile user, an unlucky operator or a broken
//! provider does to a credential. Each test that names a finding of the
//! adversarial review ("Finding N") reproduces it and failed on the code
//! before its fix; the few others guard an edge of those fixes.
//!
//! - `provider`: the token endpoint misbehaves (redirects, echoed secrets,
//!   answers stuck in a stopped process).
//! - `files`: the credentials file and its neighbours are tampered with
//!   (deleted lock files, symlinks, FIFOs, bind mounts, foreign owners).
//! - `process`: the broker process is signalled, stopped or starved.
//! - `review`: what a hostile review of those fixes found in them.
//! - `tokens`: odd tokens from the provider (no usable `exp`, skewed clocks,
//!   expired on arrival, another spelling of the account).

mod common;

#[path = "adversarial/files.rs"]
mod files;
#[path = "adversarial/process.rs"]
mod process;
#[path = "adversarial/provider.rs"]
mod provider;
#[path = "adversarial/review.rs"]
mod review;
#[path = "adversarial/tokens.rs"]
mod tokens;
