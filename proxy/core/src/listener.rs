//! Downstream side: listening sockets, connections, their idle and drain handling, and the
//! worker threads that run them.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use crate::clock;
use crate::cluster::Cluster;
use crate::config::{DownstreamProtocol, ListenerConfig};
use crate::framing::FramingScanner;
use crate::proxy::{self, ConnShared, ListenerCtx};
use crate::worker;

/// Binds `count` sockets to `addr` with `SO_REUSEPORT`, one per worker, so the kernel spreads
/// connections across workers. A first probe bind without `SO_REUSEPORT` makes a port held by
/// any other socket a clear error, and resolves port 0 to one free port for all workers.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())?;
    let local = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an inet socket"))?;
    drop(probe);
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let s = Socket::new(
            Domain::for_address(local),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&local.into())?;
        s.listen(1024)?;
        sockets.push(s.into());
    }
    Ok((local, sockets))
}

/// A listener as the workers run it.
pub struct ListenerRuntime {
    /// What requests need.
    pub ctx: Arc<ListenerCtx>,
    /// The HTTP server settings.
    builder: auto::Builder<TokioExecutor>,
    /// Idle timeout of downstream connections.
    idle_timeout_ms: u64,
    /// Whether to scan HTTP/1 request framing (not on HTTP/2-only listeners).
    scan_framing: bool,
}

impl ListenerRuntime {
    /// Server settings from the listener's config.
    pub fn new(ctx: Arc<ListenerCtx>, cfg: &ListenerConfig) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .max_headers(cfg.max_request_headers)
            .max_buf_size(cfg.max_request_header_bytes);
        builder
            .http2()
            .max_header_list_size(u32::try_from(cfg.max_request_header_bytes).unwrap_or(u32::MAX));
        let builder = match cfg.protocol {
            DownstreamProtocol::Http1 => builder.http1_only(),
            DownstreamProtocol::Http2 => builder.http2_only(),
            DownstreamProtocol::Auto => builder,
        };
        Self {
            ctx,
            builder,
            idle_timeout_ms: cfg.idle_timeout_ms,
            scan_framing: cfg.protocol != DownstreamProtocol::Http2,
        }
    }
}

/// What one worker thread runs.
pub struct WorkerSpec {
    /// Worker number.
    pub id: usize,
    /// Its socket of each listener.
    pub listeners: Vec<(std::net::TcpListener, Arc<ListenerRuntime>)>,
    /// All clusters.
    pub clusters: Arc<[Arc<Cluster>]>,
    /// Becomes true when the proxy drains.
    pub drain: watch::Receiver<bool>,
    /// How long in-flight requests get once draining.
    pub drain_timeout: Duration,
    /// Period of the worker's anchor timer: at most the shortest request timeout.
    pub timer_anchor: Duration,
}

/// Starts a worker thread with its own single-threaded runtime.
pub fn spawn_worker(spec: WorkerSpec) -> io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("weft-worker-{}", spec.id))
        .spawn(move || rt.block_on(run_worker(spec)))
}

async fn run_worker(spec: WorkerSpec) {
    worker::install(spec.id, &spec.clusters);
    // tokio wakes its own driver with an eventfd write whenever a newly registered timer is
    // earlier than every other one (tokio-rs/tokio#5207): on a quiet worker that is every
    // request's timeout, one extra syscall per request. A periodic timer that always fires
    // before any request timeout keeps new request timers from ever being the earliest.
    let anchor = spec.timer_anchor;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(anchor);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
        }
    });
    let conns = ConnCounter::default();
    for (_, listener) in &spec.listeners {
        if let Some(chain) = listener.ctx.chain.load_full() {
            chain.warm();
        }
    }
    for (socket, listener) in spec.listeners {
        match TcpListener::from_std(socket) {
            Ok(socket) => {
                tokio::spawn(accept_loop(
                    socket,
                    listener,
                    spec.drain.clone(),
                    conns.clone(),
                ));
            }
            Err(e) => tracing::error!("worker {}: cannot register listener: {e}", spec.id),
        }
    }
    let mut drain = spec.drain;
    drained(&mut drain).await;
    if tokio::time::timeout(spec.drain_timeout, conns.wait_zero())
        .await
        .is_err()
    {
        tracing::warn!(
            worker = spec.id,
            open = conns.count(),
            "drain deadline reached; closing remaining connections"
        );
    }
}

/// Resolves once the proxy drains (or is gone).
async fn drained(drain: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which is a drain as well.
    let _ = drain.wait_for(|d| *d).await;
}

async fn accept_loop(
    socket: TcpListener,
    listener: Arc<ListenerRuntime>,
    mut drain: watch::Receiver<bool>,
    conns: ConnCounter,
) {
    let for_connections = drain.clone();
    loop {
        tokio::select! {
            biased;
            _ = drained(&mut drain) => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let guard = conns.enter();
                    tokio::spawn(serve_connection(
                        stream,
                        peer,
                        listener.clone(),
                        for_connections.clone(),
                        guard,
                    ));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(listener = %listener.ctx.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Dropping the socket stops accepting on this worker.
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerRuntime>,
    mut drain: watch::Receiver<bool>,
    _guard: ConnGuard,
) {
    let _ = stream.set_nodelay(true);
    let metrics = &listener.ctx.metrics;
    metrics.connections_total.inc();
    metrics.connections_active.inc();

    let local = stream.local_addr().unwrap_or(peer);
    let shared = Arc::new(ConnShared::new(listener.ctx.clone(), peer, local));
    let io = TokioIo::new(DownstreamIo::new(
        stream,
        shared.clone(),
        listener.scan_framing,
    ));
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let conn = svc_shared.clone();
        async move { Ok::<_, Infallible>(proxy::handle(conn, req).await) }
    });
    let conn = listener.builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);

    let idle_ms = listener.idle_timeout_ms;
    let idle = tokio::time::sleep(Duration::from_millis(idle_ms));
    tokio::pin!(idle);
    let mut closing = false;
    if *drain.borrow_and_update() {
        conn.as_mut().graceful_shutdown();
        closing = true;
    }
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(listener = %listener.ctx.name, %peer, "connection ended: {e}");
                }
                break;
            }
            _ = drained(&mut drain), if !closing => {
                // HTTP/1: finish the request in flight, answer with `connection: close`;
                // HTTP/2: GOAWAY, let open streams finish.
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = &mut idle, if !closing => {
                let idle_for = clock::now_ms().saturating_sub(shared.last_active_ms.load(Relaxed));
                if shared.in_flight.load(Relaxed) == 0 && idle_for >= idle_ms {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    let left = idle_ms.saturating_sub(idle_for).max(1);
                    idle.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(left));
                }
            }
        }
    }
    metrics.connections_active.dec();
}

pin_project! {
    /// A downstream TCP stream that feeds what it reads to the HTTP/1 framing scanner, which
    /// spots requests carrying both `content-length` and `transfer-encoding` (hyper accepts
    /// and normalises those, so the request path could not see them otherwise).
    pub struct DownstreamIo {
        #[pin]
        stream: TcpStream,
        scanner: Option<Box<FramingScanner>>,
        shared: Arc<ConnShared>,
    }
}

impl DownstreamIo {
    fn new(stream: TcpStream, shared: Arc<ConnShared>, scan: bool) -> Self {
        Self {
            stream,
            scanner: scan.then(Box::default),
            shared,
        }
    }
}

impl AsyncRead for DownstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.stream.poll_read(cx, buf))?;
        if let Some(scanner) = this.scanner.as_mut() {
            scanner.feed(&buf.filled()[before..]);
            this.shared.framing.publish(scanner);
            if scanner.is_passthrough() {
                *this.scanner = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for DownstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }
}

/// Counts a worker's open connections so draining can wait for them.
#[derive(Clone, Default)]
struct ConnCounter {
    inner: Arc<(AtomicUsize, Notify)>,
}

struct ConnGuard {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl ConnCounter {
    fn enter(&self) -> ConnGuard {
        self.inner.0.fetch_add(1, Relaxed);
        ConnGuard {
            inner: self.inner.clone(),
        }
    }

    fn count(&self) -> usize {
        self.inner.0.load(Relaxed)
    }

    async fn wait_zero(&self) {
        loop {
            let notified = self.inner.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Relaxed) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}
