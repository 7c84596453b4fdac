//! The socket's HTTP routes (see the table in [`server`](super)).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::daemon::{Shared, Slot, BODY_TIMEOUT, MAX_REQUEST_BYTES};
use super::CREDENTIAL_HEADER;
use crate::credentials::AccessToken;
use crate::store::StoreError;
use crate::BrokerError;

type AppState = Arc<Shared>;

pub(super) fn router(shared: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/profiles", get(profiles))
        .route("/v1/profiles/{name}/token", get(token))
        .route("/v1/profiles/{name}/reject", post(reject))
        .route("/v1/profiles/{name}/status", get(status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), observe))
        .with_state(shared)
}

/// An error answer: `{"error": code, "message": ...}`.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    pub(super) retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn unknown_profile(name: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_profile",
            format!(
                "no profile named {:?}: add it to the daemon's configuration and send the daemon SIGHUP",
                name.chars().take(80).collect::<String>()
            ),
        )
    }

    fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let message = e.to_string();
        let one_second = Duration::from_secs(1);
        match &e {
            BrokerError::LoginRequired { .. } => ApiError::new(StatusCode::UNAUTHORIZED, "login_required", message),
            BrokerError::Unavailable { retry_in, .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable", message)
                    .retry_after(retry_in.unwrap_or(one_second))
            }
            BrokerError::Store(StoreError::LockTimeout { .. }) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_busy", message).retry_after(one_second)
            }
            BrokerError::Store(StoreError::Backend { .. }) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "coordination_unavailable", message)
                    .retry_after(one_second)
            }
            BrokerError::Store(StoreError::Write { .. } | StoreError::Conflict { .. }) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "write_failed", message)
            }
            BrokerError::Store(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_credentials_file", message),
            BrokerError::AccountChanged { .. } => ApiError::new(StatusCode::CONFLICT, "account_changed", message),
            BrokerError::Config(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad_profile", message),
            BrokerError::Stopped { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "stopping",
                "the profile is restarting or the daemon is stopping; try again",
            )
            .retry_after(one_second),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, retry_after(after));
        }
        response
    }
}

/// A `Retry-After` value: whole seconds, rounded up, at least one.
pub(super) fn retry_after(after: Duration) -> HeaderValue {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// Counts and times every request by route, method and status.
async fn observe(State(shared): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    shared
        .metrics
        .http(&route, &method, response.status().as_u16(), started.elapsed());
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route: see GET /v1/profiles",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "the route does not take this method: GET, or POST for /v1/profiles/{name}/reject",
    )
}

/// The `{name}` of a profile route, or a JSON `bad_request` when it does
/// not decode to UTF-8.
struct ProfileName(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ProfileName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(name)) => Ok(ProfileName(name)),
            Err(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the profile name in the path is not percent-encoded UTF-8",
            )),
        }
    }
}

async fn metrics(State(shared): State<AppState>) -> Response {
    let text = shared.metrics.render(&shared).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn profiles(State(shared): State<AppState>) -> Response {
    let slots: Vec<Arc<Slot>> = shared.slots.read().values().cloned().collect();
    let mut list = Vec::with_capacity(slots.len());
    for slot in slots {
        let entry = match shared.brokers.get(&slot.name) {
            Some(broker) => match broker.status().await {
                Ok(s) => json!({
                    "name": slot.name,
                    "state": s.state,
                    "expires_at": s.expires_at.map(crate::credentials::format_rfc3339),
                }),
                Err(_) => json!({ "name": slot.name, "state": "stopping", "expires_at": null }),
            },
            None => json!({ "name": slot.name, "state": "not-started", "expires_at": null }),
        };
        list.push(entry);
    }
    Json(json!({ "profiles": list })).into_response()
}

/// The profile `name`, when it names the credential the caller expects
/// (its [`CREDENTIAL_HEADER`], when sent).
fn slot(shared: &Shared, name: &str, headers: &HeaderMap) -> Result<Arc<Slot>, ApiError> {
    let slot = shared.slot(name).ok_or_else(|| ApiError::unknown_profile(name))?;
    if let Some(expected) = headers.get(CREDENTIAL_HEADER) {
        if expected.as_bytes() != slot.credential_id.as_bytes() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "profile_mismatch",
                format!(
                    "the daemon's profile {} is another credential than the caller's configuration names \
                     (another file, token endpoint or client id): make the two configurations agree and send \
                     the daemon SIGHUP, or use --daemon never",
                    slot.name
                ),
            ));
        }
    }
    Ok(slot)
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn token(
    State(shared): State<AppState>,
    ProfileName(name): ProfileName,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let slot = slot(&shared, &name, &headers)?;
    let reply = shared.serve_token(&slot).await?;
    Ok(no_store(Json(reply.to_json()).into_response()))
}

async fn reject(
    State(shared): State<AppState>,
    ProfileName(name): ProfileName,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let slot = slot(&shared, &name, &headers)?;
    let rejected = read_rejected(&headers, body).await?;
    let reply = shared.serve_reject(&slot, &rejected).await?;
    Ok(no_store(Json(reply.to_json()).into_response()))
}

/// The body of a reject: `{"access_token": "..."}`, read within
/// [`BODY_TIMEOUT`] and [`MAX_REQUEST_BYTES`].
async fn read_rejected(headers: &HeaderMap, body: Body) -> Result<AccessToken, ApiError> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    if let Some(kind) = headers.get(header::CONTENT_TYPE) {
        let json = kind
            .to_str()
            .map(|k| {
                k.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            })
            .unwrap_or(false);
        if !json {
            return Err(bad("the body must be application/json: {\"access_token\": \"...\"}"));
        }
    }
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_REQUEST_BYTES)).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "bad_request",
                "the body did not arrive in time",
            ))
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {} KiB", MAX_REQUEST_BYTES / 1024),
            ))
        }
        Ok(Ok(bytes)) => bytes,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| bad("the body is not JSON: send {\"access_token\": \"...\"}"))?;
    match value.get("access_token").and_then(|t| t.as_str()) {
        Some(t) if !t.is_empty() && !t.chars().any(char::is_control) => Ok(AccessToken::new(t)),
        _ => Err(bad(
            "send {\"access_token\": \"...\"}: the token the upstream API answered 401 for",
        )),
    }
}

async fn status(
    State(shared): State<AppState>,
    ProfileName(name): ProfileName,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let slot = slot(&shared, &name, &headers)?;
    let broker = shared.broker(&slot).await?;
    let status = broker.status().await?;
    let now = SystemTime::now();
    let text = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/plain") && !a.contains("application/json"));
    Ok(if text {
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            status.display_at(now).to_string(),
        )
            .into_response()
    } else {
        Json(status.to_json(now)).into_response()
    })
}
