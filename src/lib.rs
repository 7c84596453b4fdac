//! # token-broker
//!
//! Hands out OAuth access tokens to many concurrent jobs without ever racing
//! on a refresh token.
//!
//! Providers rotate refresh tokens: each works once, and spending one twice
//! gets `refresh_token_reused` (sometimes revoking the whole token family).
//! token-broker makes that race impossible by construction: for each
//! credential exactly one [`TokenActor`](actor::TokenActor) owns the state
//! and is the only code that may spend its refresh token.
//!
//! - A still-valid access token is always used as is: no network call.
//! - A refresh happens once per expiry, however many callers wait.
//! - The credentials file is re-read under a cross-process lock before a
//!   refresh token is spent, and the new tokens are durably written before
//!   any caller sees them.
//! - No token ever appears in `Debug`, `Display`, errors or logs.
//!
//! ```no_run
//! use token_broker::TokenBroker;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), token_broker::BrokerError> {
//!     let broker = TokenBroker::codex().build()?;
//!     let token = broker.token().await?;
//!     println!("{} chars", token.expose().len());
//!     broker.shutdown().await;
//!     Ok(())
//! }
//! ```
//!
//! [`TokenBroker`] has a complete example that runs against the simulated
//! provider in `sim`.
//!
//! ## Cargo features
//!
//! - `cli` (default): the `token-broker` command line; enables `sim`.
//! - `sim`: the `sim` module, a simulated token endpoint (on axum) and the
//!   load scheduler behind `token-broker simulate`, for tests, benchmarks
//!   and demonstrations.
//!
//! With `default-features = false` the crate is the broker alone: the
//! actor, the handle, the stores and the provider client, without clap,
//! axum, tracing-subscriber, humantime or rlimit.
//!
//! Data flows one way: caller → [`TokenBroker`] → [`TokenActor`](actor::TokenActor)
//! → [`store`] / [`provider`] → actor → published snapshot → caller.
//!
//! ## Core dumps
//!
//! A broker holds live tokens (and any client secret) in memory, so a core
//! dump of its process holds them too. The `token-broker` binary makes
//! itself non-dumpable (`prctl(PR_SET_DUMPABLE, 0)` on Linux, which also
//! keeps other processes of the same user from reading its memory) and sets
//! `RLIMIT_CORE` to 0 before it reads anything. A library cannot decide
//! that for its host process: **embedders should do the same** early in
//! `main`, unless they rely on core dumps and protect them like the
//! credentials file.

#![warn(missing_docs)]
#![warn(unreachable_pub)]

pub mod actor;
pub mod clock;
pub mod credentials;
pub mod defaults;
mod error;
mod failpoint;
mod handle;
pub mod policy;
pub mod provider;
mod registry;
mod runtime;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "sim")]
pub mod sim;
mod snapshot;
pub mod status;
pub mod store;

pub use credentials::{AccessToken, TokenSet};

/// The README's examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
pub use error::BrokerError;
pub use handle::{BrokerBuilder, TokenBroker, TokenFuture};
pub use provider::Dialect;
pub use registry::Brokers;
pub use status::{State, Status};

#[cfg(test)]
mod tests {
    #[test]
    fn handles_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<crate::TokenBroker>();
        assert_send_sync::<crate::AccessToken>();
        assert_send_sync::<crate::BrokerError>();
    }
}
