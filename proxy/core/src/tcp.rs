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
    D: AsyncRead + AsyncWrite + Unpin + Send,
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
    D: AsyncRead + AsyncWrite + Unpin + Send,
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
/// filter that pauses holds its bytes until more come (or the side ends). The two ways run
/// at once (a side that does not read never stops the other way), and the relay ends when
/// both have, when one fails or a filter closes it, or when no byte moves for `idle`.
async fn filtered<D>(
    down: D,
    up: Stream,
    f: Box<dyn ConnectionFilter>,
    idle: Option<Duration>,
) -> relay::Relayed
where
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut out = relay::Relayed::default();
    let filter = std::sync::Mutex::new(f);
    let lock = || {
        filter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if lock().on_new_connection() == NetworkAction::Close {
        lock().finish();
        return out;
    }
    let (mut down_r, mut down_w) = tokio::io::split(down);
    let (mut up_r, mut up_w) = tokio::io::split(up);
    let last = std::sync::atomic::AtomicU64::new(clock::now_ms());
    let (from_down, from_up) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );
    let both = async {
        tokio::try_join!(
            one_way(
                Flow::Downstream,
                (&mut down_r, &mut up_w),
                &from_down,
                &last,
                &filter
            ),
            one_way(
                Flow::Upstream,
                (&mut up_r, &mut down_w),
                &from_up,
                &last,
                &filter
            ),
        )
    };
    let idle_for = async {
        match idle {
            Some(limit) => idle_past(&last, limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = both => if let Err(e) = r {
            out.error = Some(e);
        },
        () = idle_for => out.idle = true,
    }
    out.from_first = from_down.load(std::sync::atomic::Ordering::Relaxed);
    out.from_second = from_up.load(std::sync::atomic::Ordering::Relaxed);
    lock().finish();
    out
}

/// One way of a filtered relay: read, through the filters, written on; its end passed on as
/// a half-close.
async fn one_way(
    flow: Flow,
    (from, to): (
        &mut (dyn AsyncRead + Unpin + Send),
        &mut (dyn AsyncWrite + Unpin + Send),
    ),
    count: &std::sync::atomic::AtomicU64,
    last: &std::sync::atomic::AtomicU64,
    filter: &std::sync::Mutex<Box<dyn ConnectionFilter>>,
) -> io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::AsyncReadExt;
    let lock = || {
        filter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = from.read(&mut buf).await?;
        last.store(clock::now_ms(), Relaxed);
        count.fetch_add(n as u64, Relaxed);
        let end = n == 0;
        let mut data = buf[..n].to_vec();
        // Locked for the filters' synchronous call only, never across an await.
        let action = lock().on_data(flow, &mut data, end);
        if action == NetworkAction::Close {
            return Err(io::Error::other("closed by a network filter"));
        }
        pass(to, &data, end).await?;
        if end {
            lock().on_close(flow);
            return Ok(());
        }
    }
}

/// Returns once no byte moved for `limit` since `last` (milliseconds of [`clock`]).
async fn idle_past(last: &std::sync::atomic::AtomicU64, limit: Duration) {
    let limit_ms = limit.as_millis().max(1) as u64;
    loop {
        let due = last
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_add(limit_ms);
        let now = clock::now_ms();
        if now >= due {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due - now)).await;
    }
}

/// Writes `data` to `w`, and its end as a half-close when `end`: the other way keeps flowing.
async fn pass<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, data: &[u8], end: bool) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    if end {
        w.shutdown().await?;
    }
    Ok(())
}
