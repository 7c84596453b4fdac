//! `GET /metrics`: Prometheus text exposition (OpenMetrics), with
//! `prometheus-client`.
//!
//! Kept as requests are served: tokens served and callers waiting per
//! profile, HTTP requests and their latency by route, refused connections.
//! Read from each profile's actor at every scrape: token requests made,
//! refreshes by outcome, adoptions, seconds until expiry and the state.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::daemon::{Shared, Slot};
use crate::status::State;

type Labels = Vec<(&'static str, String)>;

fn profile(name: &str) -> Labels {
    vec![("profile", name.to_owned())]
}

pub(crate) struct Metrics {
    registry: Registry,
    proxy: ProxyFamilies,
    served: Family<Labels, Counter>,
    waiting: Family<Labels, Gauge>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    pub(crate) refused: Counter,
    samples: Arc<Samples>,
    /// One scrape at a time (the samples are shared).
    scraping: tokio::sync::Mutex<()>,
}

/// The proxies' metric families (empty without proxies).
#[derive(Clone)]
struct ProxyFamilies {
    requests: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    bytes: Family<Labels, Counter>,
}

/// One proxy's metrics, its label sets made once.
#[derive(Clone)]
pub(crate) struct ProxyMetrics {
    name: String,
    families: ProxyFamilies,
    retries: Counter,
    latency: Histogram,
    up: Counter,
    down: Counter,
    /// The series of status 200, once a request has been answered so
    /// (the others are looked up, which costs three `String`s a request).
    ok: std::sync::Arc<std::sync::OnceLock<Counter>>,
}

impl ProxyMetrics {
    /// A request answered with `status`.
    pub(crate) fn request(&self, status: u16) {
        let series = || vec![("proxy", self.name.clone()), ("status", status.to_string())];
        if status == 200 {
            self.ok
                .get_or_init(|| self.families.requests.get_or_create_owned(&series()))
                .inc();
            return;
        }
        self.families.requests.get_or_create(&series()).inc();
    }

    /// A request sent again after a 401.
    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    /// The upstream's time to response headers.
    pub(crate) fn upstream_latency(&self, took: Duration) {
        self.latency.observe(took.as_secs_f64());
    }

    /// Request body bytes streamed to the upstream.
    pub(crate) fn bytes_up(&self, n: usize) {
        self.up.inc_by(n as u64);
    }

    /// The counter of request body bytes streamed to the upstream, for a
    /// body that counts its own (one reference, not the whole set).
    pub(crate) fn up(&self) -> Counter {
        self.up.clone()
    }

    /// The counter of response body bytes streamed to the client, for an
    /// answer's body (one reference, not the whole set: a clone of these
    /// metrics is a `String` and nine reference counts a request).
    pub(crate) fn down(&self) -> Counter {
        self.down.clone()
    }
}

/// What every profile's actor said at the last scrape.
#[derive(Debug, Default)]
struct Samples(Mutex<Vec<Sample>>);

#[derive(Debug)]
struct Sample {
    profile: String,
    state: Option<State>,
    token_requests: u64,
    refreshes: u64,
    failures: u64,
    adoptions: u64,
    expires_in: Option<f64>,
    coordination_unavailable: bool,
}

/// One profile's request-side metrics, kept by its slot (no label lookup
/// per request).
pub(crate) struct ProfileMetrics {
    served: Counter,
    waiting: Gauge,
}

impl ProfileMetrics {
    pub(crate) fn served(&self) {
        self.served.inc();
    }

    /// Counts a caller as waiting until the guard drops.
    pub(crate) fn waiting(&self) -> Waiting {
        self.waiting.inc();
        Waiting(self.waiting.clone())
    }
}

/// Decrements a profile's waiting gauge when dropped.
pub(crate) struct Waiting(Gauge);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("token_broker");
        let served = Family::<Labels, Counter>::default();
        let waiting = Family::<Labels, Gauge>::default();
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            // 50 µs to about 27 s.
            Histogram::new(exponential_buckets(0.000_05, 4.0, 10))
        });
        let refused = Counter::default();
        let samples = Arc::new(Samples::default());
        registry.register("tokens_served", "Access tokens handed to callers", served.clone());
        registry.register(
            "callers_waiting",
            "Callers waiting for a token (a refresh under way)",
            waiting.clone(),
        );
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request",
            latency.clone(),
        );
        registry.register(
            "refused_connections",
            "Connections refused because their user is not allowed",
            refused.clone(),
        );
        registry.register_collector(Box::new(samples.clone()));
        let proxy = ProxyFamilies {
            requests: Family::default(),
            retries: Family::default(),
            // 100 µs to about 26 s.
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_1, 4.0, 10))),
            bytes: Family::default(),
        };
        registry.register(
            "proxy_requests",
            "Requests the proxies answered, by status",
            proxy.requests.clone(),
        );
        registry.register(
            "proxy_retries",
            "Requests sent again with a new token after the upstream answered 401",
            proxy.retries.clone(),
        );
        registry.register(
            "proxy_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            proxy.latency.clone(),
        );
        registry.register(
            "proxy_bytes",
            "Body bytes streamed through the proxies (direction: up to the upstream, down to the client)",
            proxy.bytes.clone(),
        );
        Metrics {
            registry,
            proxy,
            served,
            waiting,
            requests,
            latency,
            refused,
            samples,
            scraping: tokio::sync::Mutex::new(()),
        }
    }

    /// A profile's served counter and waiting gauge (the same ones again
    /// for a restarted profile, so that its counts go on).
    pub(crate) fn for_profile(&self, name: &str) -> ProfileMetrics {
        ProfileMetrics {
            served: self.served.get_or_create_owned(&profile(name)),
            waiting: self.waiting.get_or_create_owned(&profile(name)),
        }
    }

    /// The metrics of the proxy `name`.
    pub(crate) fn for_proxy(&self, name: &str) -> ProxyMetrics {
        let f = &self.proxy;
        let one = || vec![("proxy", name.to_owned())];
        let way = |d: &str| vec![("proxy", name.to_owned()), ("direction", d.to_owned())];
        ProxyMetrics {
            name: name.to_owned(),
            retries: f.retries.get_or_create_owned(&one()),
            latency: f.latency.get_or_create_owned(&one()),
            up: f.bytes.get_or_create_owned(&way("up")),
            down: f.bytes.get_or_create_owned(&way("down")),
            ok: Default::default(),
            families: f.clone(),
        }
    }

    pub(crate) fn forget(&self, name: &str) {
        self.served.remove(&profile(name));
        self.waiting.remove(&profile(name));
    }

    pub(crate) fn http(&self, route: &str, method: &str, status: u16, took: Duration) {
        let method = match method {
            "GET" | "POST" | "HEAD" | "PUT" | "DELETE" => method,
            _ => "other",
        };
        self.requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route", route.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// Asks every profile's actor, then encodes everything.
    pub(crate) async fn render(&self, shared: &Shared) -> String {
        let _one = self.scraping.lock().await;
        let slots: Vec<Arc<Slot>> = shared.slots.read().values().cloned().collect();
        let now = SystemTime::now();
        let mut samples = Vec::with_capacity(slots.len());
        for slot in slots {
            let status = match shared.brokers.get(&slot.name) {
                Some(broker) => broker.status().await.ok(),
                None => None,
            };
            samples.push(match status {
                Some(s) => Sample {
                    profile: slot.name.clone(),
                    state: Some(s.state),
                    token_requests: s.counters.token_requests,
                    refreshes: s.counters.refreshes,
                    failures: s.counters.failures,
                    adoptions: s.counters.adoptions,
                    expires_in: s.expires_at.map(|at| match at.duration_since(now) {
                        Ok(d) => d.as_secs_f64(),
                        Err(e) => -e.duration().as_secs_f64(),
                    }),
                    coordination_unavailable: s.coordination_unavailable,
                },
                None => Sample {
                    profile: slot.name.clone(),
                    state: None,
                    token_requests: 0,
                    refreshes: 0,
                    failures: 0,
                    adoptions: 0,
                    expires_in: None,
                    coordination_unavailable: false,
                },
            });
        }
        *self.samples.0.lock() = samples;
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

const STATES: [(Option<State>, &str); 6] = [
    (Some(State::Valid), "valid"),
    (Some(State::RefreshDue), "refresh-due"),
    (Some(State::Expired), "expired"),
    (Some(State::LoginRequired), "login-required"),
    (Some(State::AccountChanged), "account-changed"),
    (None, "not-started"),
];

impl Collector for Samples {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.0.lock();
        let counter = |encoder: &mut DescriptorEncoder,
                       name: &str,
                       help: &str,
                       value: &dyn Fn(&Sample) -> u64|
         -> Result<(), std::fmt::Error> {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for s in samples.iter() {
                let labels = profile(&s.profile);
                ConstCounter::new(value(s)).encode(metric.encode_family(&labels)?)?;
            }
            Ok(())
        };
        counter(
            &mut encoder,
            "token_requests",
            "Requests sent to the token endpoint (each spends a refresh token)",
            &|s| s.token_requests,
        )?;
        counter(
            &mut encoder,
            "adoptions",
            "Newer tokens written by another program and adopted",
            &|s| s.adoptions,
        )?;
        {
            let mut metric =
                encoder.encode_descriptor("refreshes", "Refresh attempts by outcome", None, MetricType::Counter)?;
            for s in samples.iter() {
                for (outcome, value) in [("success", s.refreshes), ("failure", s.failures)] {
                    let labels: Labels = vec![("profile", s.profile.clone()), ("outcome", outcome.to_owned())];
                    ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "token_expiry_seconds",
                "Seconds until the access token expires (negative: expired)",
                None,
                MetricType::Gauge,
            )?;
            for s in samples.iter() {
                if let Some(secs) = s.expires_in {
                    let labels = profile(&s.profile);
                    ConstGauge::new(secs).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "coordination_unavailable",
                "1 while the profile's coordination store (etcd) cannot be reached: valid tokens are served, \
                 nothing is spent",
                None,
                MetricType::Gauge,
            )?;
            for s in samples.iter() {
                let labels = profile(&s.profile);
                ConstGauge::new(i64::from(s.coordination_unavailable)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut metric = encoder.encode_descriptor(
            "profile_state",
            "The profile's state (1 for the current one)",
            None,
            MetricType::Gauge,
        )?;
        for s in samples.iter() {
            for (state, shown) in STATES {
                let labels: Labels = vec![("profile", s.profile.clone()), ("state", shown.to_owned())];
                ConstGauge::new(i64::from(s.state == state)).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
