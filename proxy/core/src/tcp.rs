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
use crate::filter::{ConnectionFilter, Flow, NetworkAction, StreamInfo};
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

/// Relays `down` (from `peer`, to `local`) to `target` until both sides end or neither moves
/// a byte for `idle`, through the listener's chain as network filters when `network` (a
/// `tcp` listener's filters are network filters; an HTTP listener's never see opaque
/// bytes); a connection no upstream takes is closed, and counted in
/// `weft_tcp_refused_total`.
pub async fn relay<D>(
    down: D,
    (peer, local, network): (SocketAddr, SocketAddr, bool),
    target: Target,
    ctx: &ListenerCtx,
    idle: Option<Duration>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let started = clock::now_ns();
    let live = ctx.live.load();
    let filters = live
        .chain
        .clone()
        .filter(|_| network)
        .map(|chain| (chain, live.clusters.clone()));
    drop(live);
    let start_filters = move || {
        let (chain, clusters) = filters?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 48);
        chain.start_connection(StreamInfo {
            source: peer,
            destination: local,
            start_ns: started,
            start_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            connection_id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            upstream: None,
            cluster: None,
            clusters,
            direction: ctx.direction,
            attempt: Default::default(),
            tls: None,
        })
    };
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
            relay_counted(down, up, &metrics, idle, started, start_filters()).await;
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
            relay_counted(
                down,
                Stream::Plain(up),
                &metrics,
                idle,
                started,
                start_filters(),
            )
            .await;
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
    filters: Option<Box<dyn ConnectionFilter>>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    metrics.connections.inc();
    metrics.active.inc();
    let done = match filters {
        Some(f) => filtered(down, up, f, idle).await,
        None => relay::relay(down, up, idle).await,
    };
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

/// The relay through network filters: each piece read goes through them (downstream in chain
/// order, upstream in reverse), and what they make of it is written to the other side; a
/// filter that pauses holds its bytes until more come (or the side ends).
async fn filtered<D>(
    down: D,
    up: Stream,
    mut f: Box<dyn ConnectionFilter>,
    idle: Option<Duration>,
) -> relay::Relayed
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut out = relay::Relayed::default();
    if f.on_new_connection() == NetworkAction::Close {
        f.finish();
        return out;
    }
    let (mut down_r, mut down_w) = tokio::io::split(down);
    let (mut up_r, mut up_w) = tokio::io::split(up);
    let (mut down_open, mut up_open) = (true, true);
    let mut from_down = vec![0u8; 16 << 10];
    let mut from_up = vec![0u8; 16 << 10];
    let idle = idle.unwrap_or(Duration::from_secs(86_400 * 365));
    let mut deadline = tokio::time::Instant::now() + idle;
    while down_open || up_open {
        let (flow, read) = tokio::select! {
            r = down_r.read(&mut from_down), if down_open => (Flow::Downstream, r),
            r = up_r.read(&mut from_up), if up_open => (Flow::Upstream, r),
            () = tokio::time::sleep_until(deadline) => {
                out.idle = true;
                break;
            }
        };
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                out.error = Some(e);
                break;
            }
        };
        deadline = tokio::time::Instant::now() + idle;
        let end = n == 0;
        let mut data = match flow {
            Flow::Downstream => {
                out.from_first += n as u64;
                from_down[..n].to_vec()
            }
            Flow::Upstream => {
                out.from_second += n as u64;
                from_up[..n].to_vec()
            }
        };
        if f.on_data(flow, &mut data, end) == NetworkAction::Close {
            break;
        }
        let passed = match flow {
            Flow::Downstream => pass(&mut up_w, &data, end).await,
            Flow::Upstream => pass(&mut down_w, &data, end).await,
        };
        if let Err(e) = passed {
            out.error = Some(e);
            break;
        }
        if end {
            f.on_close(flow);
            match flow {
                Flow::Downstream => down_open = false,
                Flow::Upstream => up_open = false,
            }
        }
    }
    f.finish();
    out
}

/// Writes `data` to `w`, and its end as a half-close when `end`: the other way keeps flowing.
async fn pass<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8], end: bool) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    if end {
        w.shutdown().await?;
    }
    Ok(())
}
