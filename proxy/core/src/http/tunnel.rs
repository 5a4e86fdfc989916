//! Upgraded connections (WebSocket and other `101 Switching Protocols`): once both sides have
//! upgraded, bytes are relayed both ways until either side ends, or neither moves a byte for
//! the stream idle timeout.
//!
//! A tunnel is a connection like any other: it counts in `weft_downstream_tunnels_active`,
//! holds one of its cluster's `max_connections` while open, and keeps its downstream
//! connection open for the drain (the proxy waits for it until the drain deadline, as for any
//! connection, instead of cutting it at SIGTERM).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::ConnShared;
use crate::clock;
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
            let last = Arc::new(AtomicU64::new(clock::now_ms()));
            let mut down = Watched {
                io: TokioIo::new(down),
                last: last.clone(),
            };
            let mut up = Watched {
                io: TokioIo::new(up),
                last: last.clone(),
            };
            let relay = tokio::io::copy_bidirectional(&mut down, &mut up);
            let idle_for = async {
                match idle {
                    Some(limit) => idle_past(&last, limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                res = relay => if let Err(e) = res {
                    tracing::debug!("upgraded connection ended: {e}");
                },
                () = idle_for => {
                    conn.listener.metrics.stream_idle_timeouts.inc();
                    tracing::debug!("upgraded connection idle: closed");
                }
            }
        }
        (d, u) => tracing::debug!(
            downstream_ok = d.is_ok(),
            upstream_ok = u.is_ok(),
            "upgrade failed"
        ),
    }
}

/// Returns once no byte moved for `limit` since `last` (milliseconds of [`clock`]).
async fn idle_past(last: &AtomicU64, limit: Duration) {
    let limit_ms = limit.as_millis().max(1) as u64;
    loop {
        let due = last.load(Relaxed).saturating_add(limit_ms);
        let now = clock::now_ms();
        if now >= due {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due - now)).await;
    }
}

/// One side of a tunnel, noting when bytes move either way.
struct Watched<T> {
    io: T,
    last: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn moved(&self) {
        self.last.store(clock::now_ms(), Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
