//! A client of the daemon's socket API: what `token-broker token
//! --profile NAME` uses, and what a Rust program that would rather not run
//! its own broker can use.
//!
//! ```no_run
//! use token_broker::server::client::DaemonClient;
//!
//! # async fn run() -> Result<(), token_broker::server::client::ClientError> {
//! let client = DaemonClient::new("/run/user/1000/token-broker.sock");
//! let reply = client.token("codex").await?;
//! let header = format!("Bearer {}", reply.access_token.expose());
//! # let _ = header;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::TokenReply;
use crate::credentials::AccessToken;
use crate::store::display_path;

/// The largest answer read from the daemon.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why the daemon did not hand out what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers on the socket (none runs, it refused this user, or
    /// it did not answer within the client's timeout: stopped or stuck): a
    /// caller may fall back to reading the credentials itself.
    #[error("no token-broker daemon answers on {}: {why}", display_path(.socket))]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        why: String,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Daemon {
        /// The HTTP status.
        status: u16,
        /// The error code (`login_required`...; see [`server`](super)).
        code: String,
        /// What to do.
        message: String,
        /// `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// The daemon's answer made no sense.
    #[error("the daemon on {} answered badly: {why}", display_path(.socket))]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// Asks the daemon on a socket. Each call is one connection.
#[derive(Clone, Debug)]
pub struct DaemonClient {
    socket: PathBuf,
    timeout: Duration,
    credential: Option<String>,
}

impl DaemonClient {
    /// A client of the daemon on `socket`, waiting at most 2 minutes for
    /// an answer (a refresh under way may take a while).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        DaemonClient {
            socket: socket.into(),
            timeout: Duration::from_secs(120),
            credential: None,
        }
    }

    /// Asks the daemon to answer only when the profile asked for is this
    /// credential ([`Profile::credential_id`](super::config::Profile::credential_id)
    /// of the caller's profile); else it answers `profile_mismatch`.
    pub fn credential(mut self, credential_id: impl Into<String>) -> Self {
        self.credential = Some(credential_id.into());
        self
    }

    /// How long to wait for an answer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A valid access token of `profile`.
    pub async fn token(&self, profile: &str) -> Result<TokenReply, ClientError> {
        let body = self
            .call(Method::GET, &profile_path(profile, "token"), None, None)
            .await?;
        self.token_reply(&body)
    }

    /// Reports that the upstream API answered 401 for `token`; returns the
    /// token to retry with.
    pub async fn reject(&self, profile: &str, token: &AccessToken) -> Result<TokenReply, ClientError> {
        let body = serde_json::json!({ "access_token": token.expose() }).to_string();
        let body = self
            .call(Method::POST, &profile_path(profile, "reject"), Some(body), None)
            .await?;
        self.token_reply(&body)
    }

    /// `profile`'s status as `token-broker status --json` prints it.
    pub async fn status_json(&self, profile: &str) -> Result<serde_json::Value, ClientError> {
        let body = self
            .call(Method::GET, &profile_path(profile, "status"), None, None)
            .await?;
        serde_json::from_slice(&body).map_err(|_| self.protocol("the status is not JSON"))
    }

    /// `profile`'s status as `token-broker status` prints it.
    pub async fn status_text(&self, profile: &str) -> Result<String, ClientError> {
        let body = self
            .call(Method::GET, &profile_path(profile, "status"), None, Some("text/plain"))
            .await?;
        String::from_utf8(body.to_vec()).map_err(|_| self.protocol("the status is not text"))
    }

    /// The profiles and their states (`GET /v1/profiles`).
    pub async fn profiles(&self) -> Result<serde_json::Value, ClientError> {
        let body = self.call(Method::GET, "/v1/profiles", None, None).await?;
        serde_json::from_slice(&body).map_err(|_| self.protocol("the profile list is not JSON"))
    }

    fn token_reply(&self, body: &[u8]) -> Result<TokenReply, ClientError> {
        serde_json::from_slice(body)
            .ok()
            .and_then(|v| TokenReply::from_json(&v))
            .ok_or_else(|| self.protocol("the token answer is not the expected JSON"))
    }

    fn protocol(&self, why: &str) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            why: why.to_owned(),
        }
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> ClientError {
        ClientError::Unreachable {
            socket: self.socket.clone(),
            why: why.to_string(),
        }
    }

    /// The daemon asked must be this user's, root's, or that of the user
    /// who owns the socket's folder when nobody else could have made that
    /// folder (neither it nor its parent is writable by others): anyone
    /// else listening there (a folder made first in a shared place such as
    /// `/tmp`) is no daemon, never asked.
    fn check_server(&self, stream: &tokio::net::UnixStream) -> Result<(), ClientError> {
        use std::os::unix::fs::MetadataExt;
        let server = stream.peer_cred().map_err(|e| self.unreachable(e))?.uid();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if server == me || server == 0 {
            return Ok(());
        }
        let private = |path: &Path| std::fs::metadata(path).ok().filter(|m| m.mode() & 0o022 == 0);
        let folder = self
            .socket
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let owned = private(folder).is_some_and(|m| m.uid() == server)
            && folder
                .canonicalize()
                .ok()
                .and_then(|f| f.parent().map(Path::to_path_buf))
                .is_some_and(|parent| private(&parent).is_some());
        if owned {
            return Ok(());
        }
        Err(self.unreachable(format_args!(
            "the socket is served by uid {server}, neither this user, root, nor the owner of a folder only it could have made; not asking it"
        )))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        accept: Option<&str>,
    ) -> Result<Bytes, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.unreachable(e))?;
        self.check_server(&stream)?;
        let exchange = async {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| self.unreachable(e))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let mut request = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "token-broker")
                .header(
                    hyper::header::USER_AGENT,
                    concat!("token-broker/", env!("CARGO_PKG_VERSION")),
                );
            if let Some(credential) = &self.credential {
                request = request.header(super::CREDENTIAL_HEADER, credential.as_str());
            }
            if let Some(accept) = accept {
                request = request.header(hyper::header::ACCEPT, accept);
            }
            if body.is_some() {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            let request = request
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|_| self.protocol("could not build the request"))?;
            // A daemon that refuses this user closes the connection unanswered.
            let response = sender.send_request(request).await.map_err(|e| self.unreachable(e))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| self.protocol("the answer broke off or is too large"))?
                .to_bytes();
            if status == StatusCode::OK {
                return Ok(bytes);
            }
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_owned);
            Err(ClientError::Daemon {
                status: status.as_u16(),
                code: text("error").unwrap_or_else(|| "http_error".to_owned()),
                message: text("message").unwrap_or_else(|| format!("the daemon answered {status}")),
                retry_after,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            // Stopped (SIGSTOP) or stuck: as good as no daemon.
            Err(_) => Err(self.unreachable(format_args!(
                "no answer within {}",
                crate::status::human_duration(self.timeout)
            ))),
        }
    }
}

/// `/v1/profiles/{name}/{what}`, the name percent-encoded.
fn profile_path(name: &str, what: &str) -> String {
    let mut path = String::from("/v1/profiles/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'~') {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path.push('/');
    path.push_str(what);
    path
}
