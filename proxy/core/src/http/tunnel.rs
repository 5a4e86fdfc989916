//! Upgraded connections (WebSocket and other `101 Switching Protocols`): once both sides have
//! upgraded, bytes are relayed both ways until either side ends, or neither moves a byte for
//! the stream idle timeout.
//!
//! A tunnel is a connection like any other: it counts in `weft_downstream_tunnels_active`,
//! holds one of its cluster's `max_connections` while open, and keeps its downstream
//! connection open for the drain (the proxy waits for it until the drain deadline, as for any
//! connection, instead of cutting it at SIGTERM).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::ConnShared;
use crate::upstream::Cluster;

/// While it lives, the connection has an open tunnel (see [`ConnShared::tunnel_closed`]).
/// Made before the tunnel's task is spawned, so that the connection never looks free of it.
pub struct Open {
    conn: Arc<ConnShared>,
}

impl Open {
    /// Counts a tunnel open on `conn`.
    pub fn new(conn: Arc<ConnShared>) -> Self {
        conn.tunnels_open.fetch_add(1, Relaxed);
        let m = &conn.listener.metrics;
        m.tunnels_active.inc();
        m.tunnels_total.inc();
        Self { conn }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.conn.listener.metrics.tunnels_active.dec();
        if self.conn.tunnels_open.fetch_sub(1, Relaxed) == 1 {
            self.conn.tunnel_closed.notify_one();
        }
    }
}

/// Relays bytes both ways once both sides of an upgrade completed (see the module docs).
pub async fn tunnel(
    down: OnUpgrade,
    up: OnUpgrade,
    open: Open,
    cluster: Arc<Cluster>,
    idle: Option<Duration>,
) {
    let conn = open.conn.clone();
    // The upstream connection's own slot went with its HTTP/1.1 connection task.
    let _slot = cluster.try_reserve_connection();
    match tokio::join!(down, up) {
        (Ok(down), Ok(up)) => {
            let done = crate::relay::relay(TokioIo::new(down), TokioIo::new(up), idle).await;
            if done.idle {
                conn.listener.metrics.stream_idle_timeouts.inc();
                tracing::debug!("upgraded connection idle: closed");
            } else if let Some(e) = done.error {
                tracing::debug!("upgraded connection ended: {e}");
            }
        }
        (d, u) => tracing::debug!(
            downstream_ok = d.is_ok(),
            upstream_ok = u.is_ok(),
            "upgrade failed"
        ),
    }
}
