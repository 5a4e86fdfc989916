//! A small HTTP/1.1 keep-alive load generator, meant to run on one thread (so that it can be
//! pinned to one core next to the origin, away from the proxy under test).
//!
//! Two modes:
//! - [`Mode::Max`], closed loop: every connection sends its next request as soon as the
//!   previous response is read. Answers "how many requests per second can this take?".
//! - [`Mode::Rate`], open loop: request `i` is scheduled at `start + i / rate`, whatever
//!   happened to the earlier ones, and is sent on whichever connection is free first.
//!   Answers "how long does a request take at this load?" without coordinated omission:
//!   when every connection is still busy at a request's scheduled time, its latency is
//!   counted from the scheduled time, so a stall shows up in every request it delayed.
//!   When a connection was idle and waiting, the clock starts when the request is actually
//!   written: tokio's timer wakes up to 1 ms late, and that is the generator's lateness,
//!   not the system's.
//!
//! Every wait is bounded (the run's deadline, or the per-request timeout), so a run ends
//! within `duration + timeout` whatever the server does.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{HOST, HeaderValue};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// Longest latency the histogram holds (60 s, in nanoseconds); longer ones are clamped.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// Pause after a failed connect, so a refused port does not become a busy loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Where requests go: a plain `http://` URL.
#[derive(Clone, Debug)]
pub struct Target {
    /// The socket address the host resolved to.
    pub addr: SocketAddr,
    /// The `host` header (the URL's authority).
    pub host: HeaderValue,
    /// Path and query sent in the request line.
    pub path: String,
}

impl Target {
    /// Parses `http://host:port/path`; the host is resolved once, here.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("`{url}`: only http:// URLs are supported"));
        }
        let authority = uri.authority().ok_or_else(|| format!("`{url}`: no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = (authority.host(), port)
            .to_socket_addrs()
            .map_err(|e| format!("`{url}`: cannot resolve: {e}"))?
            .next()
            .ok_or_else(|| format!("`{url}`: host resolves to nothing"))?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self { addr, host, path })
    }
}

/// How requests are paced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Closed loop: each connection keeps exactly one request in flight.
    Max,
    /// Open loop at a fixed number of requests per second, spread over the connections.
    Rate {
        /// Requests per second.
        per_sec: u64,
    },
}

/// One run's parameters.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Where requests go.
    pub target: Target,
    /// How requests are paced.
    pub mode: Mode,
    /// Keep-alive connections, opened before the clock starts.
    pub connections: usize,
    /// How long requests are started for.
    pub duration: Duration,
    /// Longest wait for a connect or for a whole response; past it the request is a timeout.
    pub request_timeout: Duration,
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    /// The parameters it ran with.
    pub config: LoadConfig,
    /// From the first request to the last response.
    pub elapsed: Duration,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses with any other status.
    pub non_2xx: u64,
    /// Failed connects, broken connections and unreadable responses (timeouts excluded).
    pub errors: u64,
    /// Connects or responses that took longer than the request timeout.
    pub timeouts: u64,
    /// Connections reopened after the server closed them cleanly (not errors).
    pub reconnects: u64,
    /// Rate mode: requests started after their scheduled time because every connection
    /// was busy (their latency counts from the scheduled time).
    pub behind_schedule: u64,
    /// Latency of every response, 2xx or not, in nanoseconds.
    pub latency_ns: Histogram<u64>,
}

impl Report {
    /// Responses received, whatever their status.
    pub fn responses(&self) -> u64 {
        self.ok + self.non_2xx
    }

    /// Responses per second over the run.
    pub fn rps(&self) -> f64 {
        self.responses() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report as one JSON object; latencies in milliseconds.
    pub fn to_json(&self, url: &str) -> serde_json::Value {
        let h = &self.latency_ns;
        let ms = |ns: u64| ns as f64 / 1e6;
        let (mode, rate) = match self.config.mode {
            Mode::Max => ("max", None),
            Mode::Rate { per_sec } => ("rate", Some(per_sec)),
        };
        serde_json::json!({
            "mode": mode,
            "url": url,
            "connections": self.config.connections,
            "duration_secs": self.config.duration.as_secs_f64(),
            "target_rate": rate,
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "requests": self.responses(),
            "ok": self.ok,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "reconnects": self.reconnects,
            "behind_schedule": self.behind_schedule,
            "rps": self.rps(),
            "latency_ms": {
                "p50": ms(h.value_at_quantile(0.50)),
                "p90": ms(h.value_at_quantile(0.90)),
                "p99": ms(h.value_at_quantile(0.99)),
                "p999": ms(h.value_at_quantile(0.999)),
                "max": ms(h.max()),
                "mean": h.mean() / 1e6,
            },
        })
    }
}

/// Runs the load described by `config`; call it inside a current-thread tokio runtime with
/// time and I/O enabled.
pub async fn run(config: LoadConfig) -> Result<Report, String> {
    let connections = config.connections.max(1);
    // Open every connection before the clock starts, so connects are not in the figures.
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        match connect(&config.target, config.request_timeout).await {
            Ok(s) => senders.push(s),
            Err(e) => return Err(format!("cannot connect to {}: {e}", config.target.addr)),
        }
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        config: config.clone(),
        start,
        deadline: start + config.duration,
        next: AtomicU64::new(0),
    });
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|s| tokio::spawn(drive_connection(shared.clone(), s)))
        .collect();
    let mut total = ConnStats::new();
    for t in tasks {
        let stats = t
            .await
            .map_err(|e| format!("a connection task failed: {e}"))?;
        total.merge(&stats);
    }
    let elapsed = start.elapsed();
    Ok(Report {
        config,
        elapsed,
        ok: total.ok,
        non_2xx: total.non_2xx,
        errors: total.errors,
        timeouts: total.timeouts,
        reconnects: total.reconnects,
        behind_schedule: total.behind_schedule,
        latency_ns: total.latency_ns,
    })
}

/// What every connection task reads.
struct Shared {
    config: LoadConfig,
    start: Instant,
    deadline: Instant,
    /// Rate mode: the index of the next request to schedule.
    next: AtomicU64,
}

/// One connection task's counts, merged at the end.
struct ConnStats {
    ok: u64,
    non_2xx: u64,
    errors: u64,
    timeouts: u64,
    reconnects: u64,
    behind_schedule: u64,
    latency_ns: Histogram<u64>,
}

impl ConnStats {
    fn new() -> Self {
        Self {
            ok: 0,
            non_2xx: 0,
            errors: 0,
            timeouts: 0,
            reconnects: 0,
            behind_schedule: 0,
            latency_ns: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn merge(&mut self, o: &ConnStats) {
        self.ok += o.ok;
        self.non_2xx += o.non_2xx;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        self.reconnects += o.reconnects;
        self.behind_schedule += o.behind_schedule;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency_ns.add(&o.latency_ns);
    }
}

/// Why a connect failed.
enum ConnectError {
    Io(std::io::Error),
    Http(hyper::Error),
    Timeout,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => e.fmt(f),
            Self::Http(e) => e.fmt(f),
            Self::Timeout => f.write_str("timed out"),
        }
    }
}

/// Opens one keep-alive HTTP/1.1 connection; its driver runs as its own task.
async fn connect(
    target: &Target,
    limit: Duration,
) -> Result<SendRequest<Empty<Bytes>>, ConnectError> {
    let open = async {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(ConnectError::Io)?;
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Http)?;
        tokio::spawn(async move {
            // The connection's errors surface on the next request; nothing to do here.
            let _ = conn.await;
        });
        Ok(sender)
    };
    timeout(limit, open)
        .await
        .unwrap_or(Err(ConnectError::Timeout))
}

/// Sends requests on one connection until the deadline, reconnecting when it breaks.
async fn drive_connection(shared: Arc<Shared>, sender: SendRequest<Empty<Bytes>>) -> ConnStats {
    let cfg = &shared.config;
    let mut stats = ConnStats::new();
    let mut sender = Some(sender);
    loop {
        // When does this request's clock start?
        let started = match cfg.mode {
            Mode::Max => {
                let now = Instant::now();
                if now >= shared.deadline {
                    break;
                }
                now
            }
            Mode::Rate { per_sec } => {
                let i = shared.next.fetch_add(1, Relaxed);
                let offset_ns = u128::from(i) * 1_000_000_000 / u128::from(per_sec.max(1));
                let scheduled = shared.start
                    + Duration::from_nanos(u64::try_from(offset_ns).unwrap_or(u64::MAX));
                if scheduled >= shared.deadline {
                    break;
                }
                if Instant::now() > scheduled {
                    // Every connection was busy when this one was due.
                    stats.behind_schedule += 1;
                    scheduled
                } else {
                    sleep_until(scheduled).await;
                    Instant::now()
                }
            }
        };

        // A connection the server closed cleanly is reopened; that is not an error.
        let mut s = match sender.take() {
            Some(s) if !s.is_closed() => s,
            previous => {
                if previous.is_some() {
                    stats.reconnects += 1;
                }
                match connect(&cfg.target, cfg.request_timeout).await {
                    Ok(s) => s,
                    Err(ConnectError::Timeout) => {
                        stats.timeouts += 1;
                        continue;
                    }
                    Err(_) => {
                        stats.errors += 1;
                        sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                }
            }
        };

        let request = http::Request::get(cfg.target.path.as_str())
            .header(HOST, cfg.target.host.clone())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let exchange = async {
            s.ready().await?;
            let response = s.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        };
        match timeout(cfg.request_timeout, exchange).await {
            Ok(Ok(status)) => {
                let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                stats
                    .latency_ns
                    .saturating_record(ns.clamp(1, MAX_LATENCY_NS));
                if status.is_success() {
                    stats.ok += 1;
                } else {
                    stats.non_2xx += 1;
                }
                sender = Some(s);
            }
            // The connection is dropped; the next request opens a new one.
            Ok(Err(_)) => stats.errors += 1,
            Err(_) => stats.timeouts += 1,
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_address_host_and_path() {
        let t = Target::parse("http://127.0.0.1:18080/a?b=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:18080");
        assert_eq!(t.path, "/a?b=1");
        assert_eq!(Target::parse("http://127.0.0.1:1").unwrap().path, "/");
        assert!(Target::parse("https://127.0.0.1:1/").is_err());
    }

    /// A loopback origin answering 200 on `/`, 503 elsewhere; returns its address.
    async fn origin() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                    let status = if req.uri().path() == "/" { 200 } else { 503 };
                    let response = http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    fn config(addr: SocketAddr, path: &str, mode: Mode) -> LoadConfig {
        LoadConfig {
            target: Target::parse(&format!("http://{addr}{path}")).unwrap(),
            mode,
            connections: 4,
            duration: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn rate_mode_sends_the_scheduled_requests_and_counts_statuses() {
        let addr = origin().await;
        let report = run(config(addr, "/", Mode::Rate { per_sec: 200 }))
            .await
            .unwrap();
        assert_eq!(report.responses(), 100, "{report:?}");
        assert_eq!((report.ok, report.errors, report.timeouts), (100, 0, 0));
        assert!(report.latency_ns.max() < 1_000_000_000);

        let report = run(config(addr, "/nope", Mode::Max)).await.unwrap();
        assert!(report.non_2xx > 100, "{report:?}");
        assert_eq!(report.ok + report.errors, 0);
        let json = report.to_json("x");
        assert_eq!(json["mode"], "max");
        assert!(json["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    }

    #[tokio::test]
    async fn a_refused_port_is_an_error_not_a_hang() {
        // Bind then drop, so the port is very likely closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(run(config(addr, "/", Mode::Max)).await.is_err());
    }
}
