//! The error a caller of the broker gets, and the CLI's exit codes.

use std::time::Duration;

use crate::provider::RefreshError;
use crate::store::StoreError;

/// Why the broker could not hand out a token. Cloneable, so one failed
/// refresh can be reported to every caller that waited for it. Never carries
/// token text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The credentials could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The provider rejected the refresh token and no valid access token is
    /// left: a person has to sign in again.
    #[error("login required for {location}: {reason}; {hint}")]
    LoginRequired {
        /// The credentials' location.
        location: String,
        /// Why (for example the provider's error code).
        reason: String,
        /// What to do about it.
        hint: String,
    },
    /// The access token has expired and the provider could not be reached
    /// or failed; the broker retries with backoff.
    #[error("no valid access token for {location}: {cause}{}", retry_hint(*.retry_in))]
    Unavailable {
        /// The credentials' location.
        location: String,
        /// What failed.
        cause: RefreshError,
        /// When the broker will try again, if known.
        retry_in: Option<Duration>,
    },
    /// The credentials now belong to a different account than the one the
    /// broker started with; nothing was spent or written.
    #[error("{location} is now signed in to another account; refusing to mix accounts: restart the broker to use the new account")]
    AccountChanged {
        /// The credentials' location.
        location: String,
    },
    /// The broker was given an unusable setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The broker's actor has stopped (the broker is shutting down).
    #[error("the token broker for {location} has stopped")]
    Stopped {
        /// The credentials' location.
        location: String,
    },
}

fn retry_hint(retry_in: Option<Duration>) -> String {
    match retry_in {
        Some(d) => format!("; retrying in {}", crate::status::human_duration(d)),
        None => String::new(),
    }
}

impl BrokerError {
    /// The CLI's exit code for this error: 2 usage or configuration, 3
    /// credentials file missing, unreadable or invalid, 4 login required,
    /// 5 provider or store unavailable or another process refreshing (try
    /// again later), 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            BrokerError::Config(_) => 2,
            // Another process is refreshing: like a provider that is busy,
            // try again later.
            BrokerError::Store(StoreError::LockTimeout { .. }) => 5,
            // A remote store's engine failed (unreachable): try again later.
            BrokerError::Store(StoreError::Backend { .. }) => 5,
            BrokerError::Store(StoreError::Write { .. } | StoreError::Conflict { .. }) => 1,
            BrokerError::Store(_) => 3,
            BrokerError::LoginRequired { .. } => 4,
            BrokerError::Unavailable { .. } => 5,
            BrokerError::AccountChanged { .. } | BrokerError::Stopped { .. } => 1,
        }
    }

    /// A short machine-readable name for the error (`login_required`...).
    pub fn kind(&self) -> &'static str {
        match self {
            BrokerError::Store(StoreError::NotFound { .. }) => "credentials_missing",
            BrokerError::Store(StoreError::LockTimeout { .. }) => "lock_timeout",
            BrokerError::Store(StoreError::Write { .. }) => "write_failed",
            BrokerError::Store(StoreError::Conflict { .. }) => "write_conflict",
            BrokerError::Store(StoreError::Backend { .. }) => "store_unavailable",
            BrokerError::Store(_) => "credentials_invalid",
            BrokerError::LoginRequired { .. } => "login_required",
            BrokerError::Unavailable { .. } => "provider_unavailable",
            BrokerError::AccountChanged { .. } => "account_changed",
            BrokerError::Config(_) => "usage",
            BrokerError::Stopped { .. } => "stopped",
        }
    }
}
