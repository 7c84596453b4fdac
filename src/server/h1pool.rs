//! The proxy's kept-alive HTTP/1.1 connections to a plain `http://`
//! upstream (always HTTP/1.1: no ALPN, no HTTP/2 without TLS).
//!
//! hyper-util's legacy pool does the same for any upstream, and costs about
//! 6,000 instructions a request (by callgrind): a SipHash of the pool key
//! at checkout and at return, a race between the checkout and a lazy
//! connect, a task spawned to return the connection once the answer is
//! read. Here there is one upstream: the idle connections are a stack
//! behind a lock, a request takes the last one returned (or connects), and
//! the answer's body gives the connection back when it ends. `https://`
//! upstreams (HTTP/2 through ALPN) keep hyper-util's client.
//!
//! What hyper-util's client does and this does too: a connection that
//! closed while idle is skipped, and a request that a reused connection
//! could not take (it closed before the request was written) goes on
//! another one; the connect timeout is the `HttpConnector`'s; idle
//! connections are closed after [`IDLE_TIMEOUT`]; a connection is pooled
//! only once it can take the next request (an answer may end before its
//! request has been written).

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tower_service::Service;

/// An error of the connection or of the exchange.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection may stay idle in the pool (as the legacy client's
/// `pool_idle_timeout` was set).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The idle connections to one upstream.
pub(crate) struct H1Pool<B> {
    idle: Mutex<VecDeque<Idle<B>>>,
    connector: HttpConnector,
    /// `http://host:port/`, what the connector resolves and connects to.
    target: Uri,
    builder: Builder,
    /// The most idle connections kept; more are closed.
    max_idle: usize,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<B> H1Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool connecting with `connector` to `target` (its scheme and
    /// authority), keeping at most `max_idle` idle connections, and a task
    /// that closes those idle longer than [`IDLE_TIMEOUT`] (it ends with
    /// the pool). Call inside a tokio runtime.
    pub(crate) fn new(connector: HttpConnector, target: Uri, builder: Builder, max_idle: usize) -> Arc<Self> {
        let pool = Arc::new(H1Pool {
            idle: Mutex::new(VecDeque::new()),
            connector,
            target,
            builder,
            max_idle,
        });
        let weak: Weak<Self> = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE_TIMEOUT / 3).await;
                let Some(pool) = weak.upgrade() else { break };
                pool.idle
                    .lock()
                    .retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < IDLE_TIMEOUT);
            }
        });
        pool
    }

    /// Sends `request` (its URI in origin form) on an idle connection, or a
    /// new one; the answer, and the connection to give back with
    /// [`H1Pool::put`] once the answer's body has been read to its end.
    pub(crate) async fn send(&self, mut request: Request<B>) -> Result<(Response<Incoming>, SendRequest<B>), BoxError> {
        loop {
            let (mut sender, reused) = match self.take() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(e.into());
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut e) => match e.take_message() {
                    // Not written: the connection closed as it was taken.
                    Some(back) if reused => request = back,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    /// A connection whose answer has been read whole, for the next request.
    ///
    /// Pooled only once it can take a request: an answer may end before
    /// its request is written (an upstream that answers from the head, a
    /// 413, and reads the body later or never), and the next request must
    /// not wait behind that upload (hyper-util's pool waits for readiness
    /// too). Mostly it is ready at once; else a task waits for it, at most
    /// [`IDLE_TIMEOUT`], and the connection is closed if it never is.
    pub(crate) fn put(self: &Arc<Self>, mut sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match sender.poll_ready(&mut cx) {
            std::task::Poll::Ready(Ok(())) => self.keep(sender),
            std::task::Poll::Ready(Err(_)) => {}
            std::task::Poll::Pending => {
                let pool = Arc::downgrade(self);
                tokio::spawn(async move {
                    if let Ok(Ok(())) = tokio::time::timeout(IDLE_TIMEOUT, sender.ready()).await {
                        if let Some(pool) = pool.upgrade() {
                            pool.keep(sender);
                        }
                    }
                });
            }
        }
    }

    fn keep(&self, sender: SendRequest<B>) {
        let idle = Idle {
            sender,
            since: Instant::now(),
        };
        let mut stack = self.idle.lock();
        if stack.len() >= self.max_idle {
            stack.pop_front();
        }
        stack.push_back(idle);
    }

    /// The connection returned last that is still open and not idle too
    /// long.
    fn take(&self) -> Option<SendRequest<B>> {
        let mut stack = self.idle.lock();
        while let Some(idle) = stack.pop_back() {
            if idle.sender.is_closed() {
                continue;
            }
            if idle.since.elapsed() >= IDLE_TIMEOUT {
                // The others were returned before it.
                stack.clear();
                return None;
            }
            return Some(idle.sender);
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<B>, BoxError> {
        let io = self.connector.clone().call(self.target.clone()).await?;
        let (sender, connection) = self.builder.handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}
