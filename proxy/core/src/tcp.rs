//! Opaque TCP: a downstream connection relayed byte for byte to an endpoint of a cluster
//! (balanced per connection, with the cluster's connect timeout, TLS, `max_connections` and
//! outlier detection), or straight to its original destination (passthrough).
//!
//! The upstream is connected as soon as the target is known, before the client has sent
//! anything, so that protocols where the server speaks first (MySQL, SMTP) work at once.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::clock;
use crate::http::ListenerCtx;
use crate::metrics::TcpMetrics;
use crate::relay;
use crate::tls::Stream;
use crate::upstream::{Cluster, Limit, connect, pool};

/// Where an opaque connection goes.
pub enum Target {
    /// An endpoint of this cluster.
    Cluster(Arc<Cluster>),
    /// Straight to this address (the original destination of a captured connection).
    Passthrough {
        /// The address.
        address: SocketAddr,
        /// Time the connection may take.
        connect_timeout: Duration,
    },
}

/// The metrics label of passthrough connections.
pub const PASSTHROUGH: &str = "passthrough";

/// Endpoints tried for one connection before it is closed.
const CONNECT_TRIES: usize = 3;

/// Relays `down` (from `peer`) to `target` until both sides end or neither moves a byte for
/// `idle`; a connection no upstream takes is closed, and counted in `weft_tcp_refused_total`.
pub async fn relay<D>(
    down: D,
    peer: SocketAddr,
    target: Target,
    ctx: &ListenerCtx,
    idle: Option<Duration>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let started = clock::now_ns();
    match target {
        Target::Cluster(cluster) => {
            let metrics = ctx.metrics.tcp(&cluster.name);
            // Held for the connection's life: `max_connections` bounds relays as it bounds
            // HTTP connections, and the balancers see the endpoint's connections as active.
            let Some(_slot) = cluster.try_reserve_connection() else {
                cluster.metrics.overflow(Limit::MaxConnections);
                metrics.refused.inc();
                tracing::debug!(listener = %ctx.name, %peer, cluster = %cluster.name, "opaque connection refused: max_connections");
                return;
            };
            let mut tried = Vec::new();
            let mut up = None;
            for _ in 0..CONNECT_TRIES {
                let now_ms = clock::now_ms();
                let mut pick = pool::pick(&cluster, now_ms);
                for _ in 0..4 {
                    match &pick {
                        Some(ep) if tried.contains(&ep.id) => pick = pool::pick(&cluster, now_ms),
                        _ => break,
                    }
                }
                let Some(ep) = pick else { break };
                tried.push(ep.id);
                match connect::connect_stream(&cluster, &ep, true).await {
                    Ok(stream) => {
                        cluster.record_success(&ep);
                        up = Some((stream, ep.begin_request()));
                        break;
                    }
                    Err(e) => {
                        cluster.record_failure(&ep);
                        tracing::debug!(listener = %ctx.name, cluster = %cluster.name, endpoint = %ep.address, "opaque connect failed: {e}");
                    }
                }
            }
            let Some((up, _active)) = up else {
                metrics.refused.inc();
                tracing::debug!(listener = %ctx.name, %peer, cluster = %cluster.name, "opaque connection closed: no endpoint took it");
                return;
            };
            cluster.metrics.upstream_connections_active.inc();
            relay_counted(down, up, &metrics, idle, started).await;
            cluster.metrics.upstream_connections_active.dec();
        }
        Target::Passthrough {
            address,
            connect_timeout,
        } => {
            let metrics = ctx.metrics.tcp(PASSTHROUGH);
            let up = match tokio::time::timeout(connect_timeout, TcpStream::connect(address)).await
            {
                Ok(Ok(up)) => up,
                Ok(Err(e)) => return passthrough_failed(ctx, &metrics, address, e),
                Err(_) => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timeout");
                    return passthrough_failed(ctx, &metrics, address, e);
                }
            };
            let _ = up.set_nodelay(true);
            relay_counted(down, Stream::Plain(up), &metrics, idle, started).await;
        }
    }
}

fn passthrough_failed(ctx: &ListenerCtx, metrics: &TcpMetrics, address: SocketAddr, e: io::Error) {
    metrics.refused.inc();
    tracing::debug!(listener = %ctx.name, %address, "passthrough connect failed: {e}");
}

async fn relay_counted<D>(
    down: D,
    up: Stream,
    metrics: &TcpMetrics,
    idle: Option<Duration>,
    started: u64,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    metrics.connections.inc();
    metrics.active.inc();
    let done = relay::relay(down, up, idle).await;
    metrics.active.dec();
    metrics.sent.inc_by(done.from_first);
    metrics.received.inc_by(done.from_second);
    metrics
        .duration
        .observe_ns(clock::now_ns().saturating_sub(started));
    if let Some(e) = done.error {
        tracing::debug!("opaque connection ended: {e}");
    }
}
