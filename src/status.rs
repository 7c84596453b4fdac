//! A snapshot of a credential's state, without secrets, for `status`
//! commands, health endpoints and logs.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::credentials::format_rfc3339;

/// The state of a credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The access token is valid and outside the refresh-ahead window (or
    /// its expiry is unknown and nobody has rejected it).
    Valid,
    /// The access token is valid but inside the refresh-ahead window.
    RefreshDue,
    /// The access token has expired (or the upstream API rejected it).
    Expired,
    /// The provider rejected the refresh token: a new sign-in is needed.
    LoginRequired,
    /// The credentials now belong to another account than the broker
    /// started with: nothing is served until a restart.
    AccountChanged,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Valid => "valid",
            State::RefreshDue => "refresh-due",
            State::Expired => "expired",
            State::LoginRequired => "login-required",
            State::AccountChanged => "account-changed",
        })
    }
}

/// Counters kept by a credential's actor since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Requests sent to the token endpoint (each spends a refresh token).
    pub token_requests: u64,
    /// Refreshes that succeeded and were written to the store.
    pub refreshes: u64,
    /// Times newer tokens written by someone else were adopted.
    pub adoptions: u64,
    /// Refresh attempts that failed.
    pub failures: u64,
    /// Token requests answered by the actor (not from the published snapshot).
    pub actor_requests: u64,
}

/// A credential's state, without any secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Where the credentials live.
    pub location: String,
    /// The state.
    pub state: State,
    /// The account, when known.
    pub account_id: Option<String>,
    /// When the access token expires, when known.
    pub expires_at: Option<SystemTime>,
    /// When the tokens were last refreshed, when recorded.
    pub last_refresh: Option<SystemTime>,
    /// Whether a refresh token is present.
    pub has_refresh_token: bool,
    /// Whether a refresh is under way.
    pub refreshing: bool,
    /// A safe fingerprint of the access token, to tell tokens apart.
    pub access_token_fingerprint: String,
    /// The last error, if the last refresh failed.
    pub last_error: Option<String>,
    /// Whether the store's coordination engine (etcd) could not be reached
    /// at the last attempt: nothing is spent meanwhile, valid access
    /// tokens are still served. Always false for a file.
    pub coordination_unavailable: bool,
    /// Counters since the broker started.
    pub counters: Counters,
}

impl Status {
    /// The status as JSON, with times as RFC 3339 and relative to `now`.
    pub fn to_json(&self, now: SystemTime) -> serde_json::Value {
        serde_json::json!({
            "location": self.location,
            "state": self.state,
            "account_id": self.account_id,
            "expires_at": self.expires_at.map(format_rfc3339),
            "expires_in_seconds": self.expires_at.map(|at| signed_seconds(at, now)),
            "last_refresh": self.last_refresh.map(format_rfc3339),
            "has_refresh_token": self.has_refresh_token,
            "refreshing": self.refreshing,
            "access_token_fingerprint": self.access_token_fingerprint,
            "last_error": self.last_error,
            "coordination_unavailable": self.coordination_unavailable,
            "counters": self.counters,
        })
    }

    /// The status as human-readable lines, with times relative to `now`.
    pub fn display_at(&self, now: SystemTime) -> impl fmt::Display + '_ {
        StatusLines { status: self, now }
    }
}

struct StatusLines<'a> {
    status: &'a Status,
    now: SystemTime,
}

impl fmt::Display for StatusLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.status;
        writeln!(f, "credentials:    {}", s.location)?;
        writeln!(f, "state:          {}", s.state)?;
        // The account id comes from the file: never let it break a line.
        let account = match s.account_id.as_deref() {
            Some(id) if id.chars().any(char::is_control) => format!("{id:?}"),
            Some(id) => id.to_owned(),
            None => "unknown".to_owned(),
        };
        writeln!(f, "account:        {account}")?;
        match s.expires_at {
            Some(at) => writeln!(
                f,
                "access token:   expires {} ({})",
                format_rfc3339(at),
                relative(at, self.now)
            )?,
            None => writeln!(f, "access token:   expiry unknown")?,
        }
        match s.last_refresh {
            Some(at) => writeln!(f, "last refresh:   {} ({})", format_rfc3339(at), relative(at, self.now))?,
            None => writeln!(f, "last refresh:   never recorded")?,
        }
        writeln!(
            f,
            "refresh token:  {}",
            if s.has_refresh_token { "present" } else { "absent" }
        )?;
        if let Some(err) = &s.last_error {
            writeln!(f, "last error:     {err}")?;
        }
        if s.coordination_unavailable {
            writeln!(
                f,
                "coordination:   unavailable (coordination_unavailable): serving the valid token, spending nothing"
            )?;
        }
        Ok(())
    }
}

fn signed_seconds(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// "in 3h12m" or "5m ago".
pub fn relative(at: SystemTime, now: SystemTime) -> String {
    match at.duration_since(now) {
        Ok(d) => format!("in {}", human_duration(d)),
        Err(e) => format!("{} ago", human_duration(e.duration())),
    }
}

/// A duration as its two largest units: "3d4h", "3h12m", "5m3s", "42s".
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, mins, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d{hours}h")
    } else if hours > 0 {
        format!("{hours}h{mins}m")
    } else if mins > 0 {
        format!("{mins}m{s}s")
    } else if secs > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 12 * 60 + 5)), "3h12m");
        assert_eq!(human_duration(Duration::from_secs(2 * 86400 + 3600)), "2d1h");
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(relative(now + Duration::from_secs(60), now), "in 1m0s");
        assert_eq!(relative(now - Duration::from_secs(60), now), "1m0s ago");
    }
}
