//! What the request path knows about the downstream connection a request arrived on, shared
//! with the connection's IO wrapper (framing verdicts) and its idle watchdog (activity).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use http::HeaderValue;

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
    /// Request-framing verdicts published by the IO wrapper (HTTP/1 only).
    pub framing: FramingVerdicts,
    /// HTTP/1 requests handed to the service so far (the index of the next head).
    pub heads: AtomicU64,
    /// Requests in flight on this connection.
    pub in_flight: AtomicU32,
    /// When a request last started or ended, in [`clock`] milliseconds.
    pub last_active_ms: AtomicU64,
}

impl ConnShared {
    /// State for a connection from `peer` accepted on `listener` at `local`.
    pub fn new(listener: Arc<ListenerCtx>, peer: SocketAddr, local: SocketAddr) -> Self {
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
        }
    }
}
