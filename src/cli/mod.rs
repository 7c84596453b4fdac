//! What the command line makes of a [`BrokerError`]: its exit code and the
//! `kind` of its JSON error line. These belong to the binary, not to the
//! library's error type.

pub(crate) mod plot;

use token_broker::server::client::ClientError;
use token_broker::store::StoreError;
use token_broker::BrokerError;

/// The CLI's exit code for `e`: 2 usage or configuration, 3 credentials
/// file missing, unreadable or invalid, 4 login required, 5 provider
/// unavailable or another process refreshing (try again later), 1 anything
/// else.
pub(crate) fn exit_code(e: &BrokerError) -> i32 {
    match e {
        BrokerError::Config(_) => 2,
        // Another process is refreshing: like a provider that is busy, try
        // again later.
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

/// A short machine-readable name for `e` (`login_required`...), the `kind`
/// of the JSON error line.
pub(crate) fn kind(e: &BrokerError) -> &'static str {
    match e {
        BrokerError::Store(StoreError::NotFound { .. }) => "credentials_missing",
        BrokerError::Store(StoreError::LockTimeout { .. }) => "lock_timeout",
        BrokerError::Store(StoreError::Write { .. }) => "write_failed",
        BrokerError::Store(StoreError::Conflict { .. }) => "write_conflict",
        BrokerError::Store(StoreError::Backend { .. }) => "coordination_unavailable",
        BrokerError::Store(_) => "credentials_invalid",
        BrokerError::LoginRequired { .. } => "login_required",
        BrokerError::Unavailable { .. } => "provider_unavailable",
        BrokerError::AccountChanged { .. } => "account_changed",
        BrokerError::Config(_) => "usage",
        BrokerError::Stopped { .. } => "stopped",
    }
}

/// The CLI's exit code for an error the daemon answered (the same codes as
/// for the broker's own errors; see the table in `token_broker::server`).
pub(crate) fn daemon_exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Daemon { code, .. } => match code.as_str() {
            "unknown_profile" | "profile_mismatch" => 2,
            "bad_credentials_file" => 3,
            "login_required" => 4,
            "provider_unavailable" | "store_busy" | "coordination_unavailable" | "stopping" => 5,
            _ => 1,
        },
        // No daemon, or none answering in time (only reported with
        // --daemon require): try again later.
        ClientError::Unreachable { .. } => 5,
        ClientError::Protocol { .. } => 1,
    }
}

/// The `kind` of the JSON error line for an error the daemon answered: the
/// daemon's error code.
pub(crate) fn daemon_kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::Daemon { code, .. } => match code.as_str() {
            "unknown_profile" => "unknown_profile",
            "profile_mismatch" => "profile_mismatch",
            "bad_credentials_file" => "credentials_invalid",
            "login_required" => "login_required",
            "provider_unavailable" => "provider_unavailable",
            "store_busy" => "lock_timeout",
            "coordination_unavailable" => "coordination_unavailable",
            "stopping" => "stopped",
            "write_failed" => "write_failed",
            "account_changed" => "account_changed",
            "bad_profile" => "usage",
            _ => "daemon_error",
        },
        ClientError::Unreachable { .. } => "no_daemon",
        ClientError::Protocol { .. } => "daemon_error",
    }
}
