//! What the request path knows about the downstream connection a request arrived on, shared
//! with the connection's IO wrapper (framing verdicts) and its idle watchdog (activity).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::Notify;

use super::framing::FramingVerdicts;
use super::{ListenerCtx, headers};
use crate::clock;

/// State of one downstream connection shared between its IO wrapper, its request handlers
/// and its idle watchdog.
pub struct ConnShared {
    /// The listener it was accepted on.
    pub listener: Arc<ListenerCtx>,
    /// The peer's IP as a header value, for `x-forwarded-for`.
    pub peer_ip: HeaderValue,
    /// The peer.
    pub peer: SocketAddr,
    /// The local address the connection arrived on.
    pub local: SocketAddr,
    /// Unique id of the connection in this process.
    pub id: u64,
    /// What its TLS handshake established, when it is TLS.
    pub tls: Option<Arc<crate::tls::PeerTls>>,
    /// Request-framing verdicts published by the IO wrapper (HTTP/1 only).
    pub framing: FramingVerdicts,
    /// HTTP/1 requests handed to the service so far (the index of the next head).
    pub heads: AtomicU64,
    /// Requests in flight on this connection.
    pub in_flight: AtomicU32,
    /// When a request last started or ended, in [`clock`] milliseconds.
    pub last_active_ms: AtomicU64,
    /// Requests started on this connection.
    pub requests: AtomicU64,
    /// Requests the client cancelled (reset or left) before their response, within
    /// [`PREMATURE`] of their start.
    pub premature_resets: AtomicU64,
    /// Set when the client's cancellations make it an attacker (HTTP/2 rapid reset and its
    /// slower variants): the connection is closed at once.
    pub abusive: AtomicBool,
    /// Wakes the serve loop when the connection must close: its request cap was reached, or
    /// it is `abusive`.
    pub close: Notify,
    /// Upgraded tunnels open on this connection (at most one: an upgrade ends HTTP on it).
    pub tunnels_open: AtomicU32,
    /// Signalled when the last tunnel closes.
    pub tunnel_closed: Notify,
    /// The cluster a capture listener chose for this connection by its original
    /// destination: its requests go there unless a filter chooses another (instead of the
    /// listener's default cluster).
    pub route_to: Option<Box<str>>,
}

/// A request cancelled by its client sooner than this after it started counts as a premature
/// reset (Envoy's `premature_reset_min_stream_lifetime`).
pub const PREMATURE: Duration = Duration::from_secs(1);
/// Premature resets a connection may have before its ratio is judged.
pub const PREMATURE_FLOOR: u64 = 50;

impl ConnShared {
    /// Counts a request started; when it is the connection's last, wakes the serve loop
    /// (HTTP/2: GOAWAY) and returns true (HTTP/1.1: its response says `connection: close`).
    #[inline]
    pub fn request_started(&self, version: http::Version) -> bool {
        let n = self.requests.fetch_add(1, Relaxed) + 1;
        let cap = if version >= http::Version::HTTP_2 {
            self.listener.max_requests_per_http2_connection
        } else {
            self.listener.max_requests_per_connection
        };
        let last = n == cap;
        if last {
            self.close.notify_one();
        }
        last
    }

    /// Returns once no upgraded tunnel is open on this connection: the connection (and its
    /// place in the drain) lasts as long as its tunnel.
    pub async fn tunnels_closed(&self) {
        while self.tunnels_open.load(Relaxed) > 0 {
            self.tunnel_closed.notified().await;
        }
    }

    /// Counts a request its client cancelled before its response, `age_ns` after it started.
    /// Once at least [`PREMATURE_FLOOR`] of them came within [`PREMATURE`] and they are at
    /// least half of the connection's requests (Envoy's rule), the connection is abusive.
    pub fn request_cancelled(&self, age_ns: u64) {
        if age_ns >= PREMATURE.as_nanos() as u64 {
            return;
        }
        let premature = self.premature_resets.fetch_add(1, Relaxed) + 1;
        if premature >= PREMATURE_FLOOR
            && premature * 2 >= self.requests.load(Relaxed)
            && !self.abusive.swap(true, Relaxed)
        {
            self.close.notify_one();
        }
    }
}

impl ConnShared {
    /// State for a connection from `peer` accepted on `listener` at `local`.
    pub fn new(
        listener: Arc<ListenerCtx>,
        peer: SocketAddr,
        local: SocketAddr,
        tls: Option<Arc<crate::tls::PeerTls>>,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            listener,
            peer_ip: headers::ip_header_value(peer.ip()),
            peer,
            local,
            id: NEXT_ID.fetch_add(1, Relaxed),
            framing: FramingVerdicts::default(),
            heads: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(clock::now_ms()),
            requests: AtomicU64::new(0),
            premature_resets: AtomicU64::new(0),
            abusive: AtomicBool::new(false),
            close: Notify::new(),
            tunnels_open: AtomicU32::new(0),
            tunnel_closed: Notify::new(),
            tls,
            route_to: None,
        }
    }

    /// The same, its requests going to cluster `route_to` when it is set.
    pub fn routed_to(mut self, route_to: Option<Box<str>>) -> Self {
        self.route_to = route_to;
        self
    }
}
