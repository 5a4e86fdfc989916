//! Live taps (`weftctl tap`): the control service asks the proxy to sample requests (by path
//! prefix, at most so many a second), and the request path hands each sampled request to
//! the control follower once answered.
//!
//! With no tap active a request pays one relaxed atomic load ([`probe`]). With taps, a
//! request whose path matches one asks that tap's rate limiter (a compare-and-swap) and,
//! when let through, keeps its method, authority and path until it is answered; the sample
//! goes into a bounded channel (`try_send`: dropped rather than waited for when the follower
//! is behind).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::clock;

/// One tap as the control service asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapSpec {
    /// The tap's id.
    pub id: u64,
    /// Only paths starting with this.
    pub path_prefix: String,
    /// At most this many samples a second.
    pub max_rps: u32,
}

/// One sampled request, answered.
#[derive(Clone, Debug, PartialEq)]
pub struct TapSample {
    /// The tap it is for.
    pub tap_id: u64,
    /// When the request started, ms since the Unix epoch.
    pub at_ms: u64,
    /// The listener.
    pub listener: String,
    /// The method.
    pub method: String,
    /// The authority.
    pub authority: String,
    /// The path and query.
    pub path: String,
    /// The status answered (0: reset).
    pub status: u16,
    /// Time to the response headers, ms.
    pub latency_ms: f64,
    /// The peer address.
    pub source: String,
    /// The peer's SPIFFE ID over mesh TLS.
    pub source_identity: String,
    /// The cluster.
    pub destination: String,
    /// The route a router matched.
    pub route: String,
}

struct Tap {
    spec: TapSpec,
    /// The earliest clock time (ns) the next sample may be taken (a GCRA limiter).
    next_ns: AtomicU64,
}

impl Tap {
    /// Whether a sample may be taken now.
    fn admit(&self, now: u64) -> bool {
        let every = 1_000_000_000 / u64::from(self.spec.max_rps.max(1));
        let mut next = self.next_ns.load(Relaxed);
        loop {
            if now < next {
                return false;
            }
            // A burst of at most one second's worth after a quiet spell.
            let base = next.max(now.saturating_sub(1_000_000_000 - every));
            match self
                .next_ns
                .compare_exchange_weak(next, base + every, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => next = seen,
            }
        }
    }
}

/// The taps active in this proxy and where their samples go.
#[derive(Default)]
struct Taps {
    any: AtomicBool,
    active: ArcSwap<Vec<Arc<Tap>>>,
    sink: Mutex<Option<tokio::sync::mpsc::Sender<TapSample>>>,
}

static TAPS: std::sync::LazyLock<Taps> = std::sync::LazyLock::new(Taps::default);

/// Sets the taps to sample (replacing those active) and where samples go.
pub fn set(specs: Vec<TapSpec>, sink: Option<tokio::sync::mpsc::Sender<TapSample>>) {
    let now = clock::now_ns();
    let old = TAPS.active.load_full();
    let taps: Vec<Arc<Tap>> = specs
        .into_iter()
        .map(|spec| match old.iter().find(|t| t.spec == spec) {
            Some(t) => t.clone(),
            None => Arc::new(Tap {
                spec,
                next_ns: AtomicU64::new(now),
            }),
        })
        .collect();
    *TAPS.sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
    TAPS.any.store(!taps.is_empty(), Relaxed);
    TAPS.active.store(Arc::new(taps));
}

/// What a sampled request keeps until it is answered.
pub struct Probe {
    taps: Vec<u64>,
    at_ms: u64,
    method: String,
    authority: String,
    path: String,
}

/// The taps that sample this request, if any (`None` at once when no tap is active).
#[inline]
pub fn probe(head: &http::request::Parts) -> Option<Box<Probe>> {
    if !TAPS.any.load(Relaxed) {
        return None;
    }
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let now = clock::now_ns();
    let taps: Vec<u64> = TAPS
        .active
        .load()
        .iter()
        .filter(|t| path.starts_with(t.spec.path_prefix.as_str()) && t.admit(now))
        .map(|t| t.spec.id)
        .collect();
    if taps.is_empty() {
        return None;
    }
    let authority = crate::http::headers::request_authority(head).to_owned();
    Some(Box::new(Probe {
        taps,
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        method: head.method.as_str().to_owned(),
        authority,
        path: path.to_owned(),
    }))
}

/// What the request path knows of a sampled request once it is answered.
pub struct Answered<'a> {
    /// The listener.
    pub listener: &'a str,
    /// The status (0: reset).
    pub status: u16,
    /// Time to the response headers, ns.
    pub latency_ns: u64,
    /// The peer.
    pub source: std::net::SocketAddr,
    /// The peer's SPIFFE ID.
    pub source_identity: Option<String>,
    /// The cluster.
    pub destination: &'a str,
    /// The route.
    pub route: Option<&'a str>,
}

/// Hands the samples of an answered request to the follower (dropped when it is behind).
pub fn emit(probe: &Probe, a: Answered<'_>) {
    let sink = TAPS.sink.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(sink) = sink else { return };
    for tap_id in &probe.taps {
        let _ = sink.try_send(TapSample {
            tap_id: *tap_id,
            at_ms: probe.at_ms,
            listener: a.listener.to_owned(),
            method: probe.method.clone(),
            authority: probe.authority.clone(),
            path: probe.path.clone(),
            status: a.status,
            latency_ms: a.latency_ns as f64 / 1e6,
            source: a.source.to_string(),
            source_identity: a.source_identity.clone().unwrap_or_default(),
            destination: a.destination.to_owned(),
            route: a.route.unwrap_or_default().to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_lets_through_at_most_its_rate() {
        let tap = Tap {
            spec: TapSpec {
                id: 1,
                path_prefix: String::new(),
                max_rps: 10,
            },
            next_ns: AtomicU64::new(0),
        };
        // Ten seconds of requests every millisecond: about 10 a second get through (plus
        // the first second's burst).
        let t0 = 5_000_000_000u64;
        let admitted = (0..10_000)
            .filter(|i| tap.admit(t0 + i * 1_000_000))
            .count();
        assert!((100..=111).contains(&admitted), "{admitted}");
    }
}
