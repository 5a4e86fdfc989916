//! Downstream connections: the accept loop and the serve loop (HTTP/1.1 and HTTP/2 through hyper, idle timeout,
//! graceful close when the proxy drains).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::h1;
use super::transport::{DownstreamIo, Transport};
use super::workers::{ConnCounter, ConnGuard, drained};
use crate::clock;
use crate::config::{CaptureConfig, DownstreamProtocol, ListenerConfig};
use crate::http::{self as proxy, ConnShared, ListenerCtx};
use crate::overload::{Admitted, Level};
use crate::tls::{PeerTls, ServerTls, Stream, server::is_tls_record};

/// A listener as the workers run it.
pub struct ListenerRuntime {
    /// What requests need.
    pub ctx: Arc<ListenerCtx>,
    /// The HTTP server settings.
    builder: auto::Builder<TokioExecutor>,
    /// Idle timeout of downstream connections (and of opaque TCP relays).
    pub(super) idle_timeout_ms: u64,
    /// The request-headers timeout, if on.
    pub(super) headers_timeout: Option<Duration>,
    /// Whether to scan HTTP/1 request framing (not on HTTP/2-only listeners); HTTP/1
    /// connections start on the inline server then.
    scan_framing: bool,
    /// The largest request head, in bytes.
    max_head: usize,
    /// The most header fields a request head may have.
    max_headers: usize,
    /// TLS, if the listener has it.
    pub(super) tls: Option<Arc<ServerTls>>,
    /// The protocols it accepts.
    pub(super) protocol: DownstreamProtocol,
    /// Transparent capture, if on.
    pub(super) capture: Option<CaptureConfig>,
    /// The task following the TLS certificate files, stopped with the runtime.
    tls_follower: std::sync::OnceLock<tokio::task::AbortHandle>,
}

impl Drop for ListenerRuntime {
    fn drop(&mut self) {
        if let Some(follower) = self.tls_follower.get() {
            follower.abort();
        }
    }
}

impl ListenerRuntime {
    /// Server settings from the listener's config, with its TLS (built at startup, where
    /// bad certificate files stop the proxy).
    pub fn new(ctx: Arc<ListenerCtx>, cfg: &ListenerConfig, tls: Option<Arc<ServerTls>>) -> Self {
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
            DownstreamProtocol::Auto | DownstreamProtocol::Tcp => builder,
        };
        Self {
            ctx,
            builder,
            idle_timeout_ms: cfg.idle_timeout_ms,
            headers_timeout: (cfg.request_headers_timeout_ms > 0)
                .then(|| Duration::from_millis(cfg.request_headers_timeout_ms)),
            scan_framing: cfg.protocol != DownstreamProtocol::Http2,
            max_head: cfg.max_request_header_bytes,
            max_headers: cfg.max_request_headers,
            tls,
            protocol: cfg.protocol,
            capture: cfg.capture.clone(),
            tls_follower: std::sync::OnceLock::new(),
        }
    }

    /// Starts following the listener's certificate files (edge TLS), on the calling tokio
    /// runtime, for as long as this runtime lives (a listener whose settings changed, or
    /// that was removed, stops following its old files once its last connection ends).
    pub fn follow_tls_files(&self, every: Duration) {
        if let Some(tls) = self.tls.clone() {
            let task = tokio::spawn(async move { tls.follow_files(every).await });
            let _ = self.tls_follower.set(task.abort_handle());
        }
    }
}

/// A listener's place on the workers: the runtime new connections get (replaced whole when
/// the listener's settings change; a connection keeps the one it was accepted with) and
/// the signal that closes it (the listener removed, or the proxy draining).
pub struct ListenerSlot {
    /// What new connections get.
    pub runtime: arc_swap::ArcSwap<ListenerRuntime>,
    /// Where it listens.
    pub address: SocketAddr,
    close: watch::Sender<bool>,
}

impl ListenerSlot {
    /// A slot for `runtime`, listening on `address`.
    pub fn new(runtime: ListenerRuntime, address: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            runtime: arc_swap::ArcSwap::from_pointee(runtime),
            address,
            close: watch::channel(false).0,
        })
    }

    /// The listener's name.
    pub fn name(&self) -> String {
        self.runtime.load().ctx.name.clone()
    }

    /// Closes the listener: every worker stops accepting on it (its sockets close), and
    /// its connections close gracefully (HTTP/1.1 after the exchange in flight, with
    /// `connection: close`; HTTP/2 with GOAWAY), as when the proxy drains.
    pub fn close(&self) {
        self.close.send_replace(true);
    }

    fn closing(&self) -> watch::Receiver<bool> {
        self.close.subscribe()
    }
}

/// The idle timeout of downstream connections while the proxy sheds load.
const SHED_IDLE_MS: u64 = 1_000;

/// A warning repeated at most every [`RateLimitedLog::EVERY_MS`], with how many were held
/// back in between.
#[derive(Default)]
struct RateLimitedLog {
    last_ms: u64,
    suppressed: u64,
}

impl RateLimitedLog {
    const EVERY_MS: u64 = 5_000;

    /// `Some(held back since the last one)` when this one should be logged.
    fn due(&mut self) -> Option<u64> {
        let now = clock::now_ms();
        if self.last_ms != 0 && now.saturating_sub(self.last_ms) < Self::EVERY_MS {
            self.suppressed += 1;
            return None;
        }
        self.last_ms = now;
        Some(std::mem::take(&mut self.suppressed))
    }
}

pub(super) async fn accept_loop(socket: TcpListener, slot: Arc<ListenerSlot>, conns: ConnCounter) {
    let mut drain = slot.closing();
    let for_connections = drain.clone();
    let mut failures = RateLimitedLog::default();
    loop {
        tokio::select! {
            biased;
            _ = drained(&mut drain) => break,
            accepted = socket.accept() => match accepted {
                Ok((stream, peer)) => {
                    let listener = slot.runtime.load_full();
                    // Over budget: shed at once (the socket closes), so the accept queue
                    // keeps moving and descriptors never run out.
                    let Some(admitted) = listener.ctx.overload.admit() else {
                        drop(stream);
                        continue;
                    };
                    let guard = conns.enter();
                    tokio::spawn(accepted_connection(
                        stream,
                        peer,
                        listener.clone(),
                        for_connections.clone(),
                        (guard, admitted),
                    ));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning, and
                    // say so once in a while, not 40 times a second.
                    if let Some(suppressed) = failures.due() {
                        tracing::warn!(
                            listener = %slot.name(),
                            suppressed,
                            "accept failed: {e}"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Dropping the socket stops accepting on this worker.
}

/// A connection from its accept: counted at once, served once its first bytes arrive.
async fn accepted_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerRuntime>,
    drain: watch::Receiver<bool>,
    guards: (ConnGuard, Admitted),
) {
    let metrics = &listener.ctx.metrics;
    metrics.connections_total.inc();
    metrics.connections_active.inc();
    let accepted = tokio::time::Instant::now();
    if listener.capture.is_some() || listener.protocol == DownstreamProtocol::Tcp {
        Box::pin(super::capture::serve(
            stream, peer, &listener, drain, accepted,
        ))
        .await;
    } else {
        serve_http(stream, peer, &listener, drain, accepted).await;
    }
    drop(guards);
    metrics.connections_active.dec();
}

/// Serves an HTTP connection once its first bytes arrive.
pub(super) async fn serve_http(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    listener: &ListenerRuntime,
    drain: watch::Receiver<bool>,
    accepted: tokio::time::Instant,
) {
    if first_bytes(&stream, listener, drain.clone(), accepted).await {
        // Boxed: until here a connection costs this small task, not the HTTP server's state
        // and buffers (a flood of connections that say nothing stays cheap).
        Box::pin(secure_and_serve(stream, peer, listener, drain, accepted)).await;
    }
}

/// Waits for a new connection's first bytes; `false` when it should be closed instead: its
/// first head is past the request-headers timeout or it was idle past the idle timeout (both
/// counted from `accepted`), the proxy drains, or it sheds load and the connection has
/// been idle for a second.
async fn first_bytes<T: Transport>(
    stream: &T,
    listener: &ListenerRuntime,
    mut drain: watch::Receiver<bool>,
    accepted: tokio::time::Instant,
) -> bool {
    let idle = Duration::from_millis(listener.idle_timeout_ms);
    let (limit, head_timeout) = match listener.headers_timeout {
        Some(head) if head <= idle => (head, true),
        _ => (idle, false),
    };
    let mut pressure = listener.ctx.overload.subscribe();
    let shed_deadline = accepted + Duration::from_millis(SHED_IDLE_MS).min(limit);
    let timeout = tokio::time::sleep_until(accepted + limit);
    tokio::pin!(timeout);
    let ready = std::future::poll_fn(|cx| stream.poll_read_ready(cx));
    tokio::pin!(ready);
    if *drain.borrow_and_update() {
        return false;
    }
    loop {
        let shedding = *pressure.borrow_and_update() == Level::Shed;
        tokio::select! {
            biased;
            // Bytes, or an error or end of stream that the server reports as usual.
            _ = ready.as_mut() => return true,
            _ = &mut timeout => {
                if head_timeout {
                    listener.ctx.metrics.request_headers_timeouts.inc();
                }
                return false;
            }
            _ = tokio::time::sleep_until(shed_deadline), if shedding => return false,
            _ = drained(&mut drain) => return false,
            Ok(()) = pressure.changed() => {}
        }
    }
}

/// Time a TLS handshake gets when the request-headers timeout is off.
pub(super) const HANDSHAKE_MS: u64 = 10_000;

/// The TLS handshake, when the listener has TLS (and the client speaks it, on a permissive
/// listener), then the HTTP server.
async fn secure_and_serve(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    listener: &ListenerRuntime,
    drain: watch::Receiver<bool>,
    accepted: tokio::time::Instant,
) {
    let local = stream.local_addr().unwrap_or(peer);
    let Some(tls) = &listener.tls else {
        return serve_connection(
            Stream::Plain(stream),
            None,
            (peer, local, None),
            listener,
            drain,
            accepted,
        )
        .await;
    };
    if tls.permissive {
        let mut first = [0u8; 1];
        let tls_hello = matches!(stream.peek(&mut first).await, Ok(1) if is_tls_record(first[0]));
        if !tls_hello {
            return serve_connection(
                Stream::Plain(stream),
                None,
                (peer, local, None),
                listener,
                drain,
                accepted,
            )
            .await;
        }
    }
    // The handshake is part of the first head's time.
    let limit = listener
        .headers_timeout
        .unwrap_or(Duration::from_millis(HANDSHAKE_MS))
        .saturating_sub(accepted.elapsed());
    let metrics = &listener.ctx.metrics;
    match tls.accept(stream, limit).await {
        Ok((stream, peer_tls)) => {
            metrics.tls_connections.inc();
            let stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(stream)));
            serve_connection(
                stream,
                Some(Arc::new(peer_tls)),
                (peer, local, None),
                listener,
                drain,
                accepted,
            )
            .await;
        }
        Err(e) => {
            metrics.tls_handshake_failures.inc();
            tracing::debug!(listener = %listener.ctx.name, %peer, "TLS handshake failed: {e}");
        }
    }
}

/// Serves HTTP on `stream`; `(peer, local, route)`: the client, the address it reached (the
/// original destination of a captured connection) and the cluster its requests go to
/// unless a filter chooses (`None`: the listener's default cluster).
pub(super) async fn serve_connection(
    stream: Stream,
    peer_tls: Option<Arc<PeerTls>>,
    (peer, local, route): (SocketAddr, SocketAddr, Option<Box<str>>),
    listener: &ListenerRuntime,
    mut drain: watch::Receiver<bool>,
    accepted: tokio::time::Instant,
) {
    let mut pressure = listener.ctx.overload.subscribe();
    let _ = stream.set_nodelay(true);
    let metrics = &listener.ctx.metrics;

    let shared =
        Arc::new(ConnShared::new(listener.ctx.clone(), peer, local, peer_tls).routed_to(route));
    // hyper's server, from the connection's start or from the head the inline server left.
    let hyper_from = |stream: Stream, prefix: Bytes, head_started: tokio::time::Instant| {
        let io = TokioIo::new(
            DownstreamIo::new(
                stream,
                shared.clone(),
                listener.scan_framing,
                listener.headers_timeout.map(|limit| (limit, head_started)),
            )
            .with_prefix(prefix),
        );
        let svc_shared = shared.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let conn = svc_shared.clone();
            async move { proxy::handle(conn, req.map(Into::into)).await }
        });
        Box::pin(listener.builder.serve_connection_with_upgrades(io, service))
    };
    let signals = h1::Signals::default();
    let mut serving = if listener.scan_framing {
        let limits = h1::Limits {
            max_head: listener.max_head,
            max_headers: listener.max_headers,
            headers_timeout: listener.headers_timeout,
        };
        Serving::Inline(Box::pin(h1::serve(
            stream,
            shared.clone(),
            limits,
            accepted,
            &signals,
        )))
    } else {
        Serving::Hyper(hyper_from(stream, Bytes::new(), accepted))
    };

    let idle_ms = listener.idle_timeout_ms;
    let idle = tokio::time::sleep(Duration::from_millis(idle_ms));
    tokio::pin!(idle);
    let mut closing = false;
    if *drain.borrow_and_update() {
        serving.graceful_shutdown(&signals);
        closing = true;
    }
    // The control futures (pressure, close, drain, idle) are polled only when one of them
    // woke the task, not on every read and write of the connection.
    let control = ControlWake::new();
    let mut pressure_gone = false;
    loop {
        let event = {
            let pressure_changed = pressure.changed();
            let close = shared.close.notified();
            let drain_now = drained(&mut drain);
            tokio::pin!(pressure_changed, close, drain_now);
            control.armed();
            std::future::poll_fn(|cx| {
                match &mut serving {
                    Serving::Inline(inline) => {
                        if let Poll::Ready(out) = inline.as_mut().poll(cx) {
                            return Poll::Ready(Event::Inline(out));
                        }
                    }
                    Serving::Hyper(conn) => {
                        if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                            return Poll::Ready(Event::Ended(res));
                        }
                    }
                }
                if !control.woken(cx.waker()) {
                    return Poll::Pending;
                }
                let mut cx = Context::from_waker(control.waker());
                if !pressure_gone && let Poll::Ready(res) = pressure_changed.as_mut().poll(&mut cx)
                {
                    return Poll::Ready(Event::Pressure(res.is_ok()));
                }
                if close.as_mut().poll(&mut cx).is_ready() {
                    return Poll::Ready(Event::Close);
                }
                if !closing {
                    if drain_now.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::Drained);
                    }
                    if idle.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::Idle);
                    }
                }
                Poll::Pending
            })
            .await
        };
        match event {
            Event::Inline(h1::Outcome::Closed) => break,
            Event::Inline(h1::Outcome::Handoff {
                io,
                prefix,
                head_started,
            }) => {
                // hyper and the framing scanner take over at the head the inline server left:
                // for them it is the connection's first.
                shared.heads.store(0, Relaxed);
                serving = Serving::Hyper(hyper_from(io, prefix, head_started));
                if closing {
                    serving.graceful_shutdown(&signals);
                }
            }
            Event::Ended(res) => {
                if let Err(e) = res {
                    tracing::debug!(listener = %listener.ctx.name, %peer, "connection ended: {e}");
                }
                break;
            }
            Event::Pressure(changed) => {
                // Shedding: idle connections get a short idle timeout (Envoy's "reduce
                // timeouts" action), so they make room for clients with work; one just
                // accepted still has time for its first request.
                if changed && *pressure.borrow_and_update() == Level::Shed && !closing {
                    idle.as_mut().reset(tokio::time::Instant::now());
                }
                // The overload state is gone (the proxy is exiting): stop watching it.
                pressure_gone |= !changed;
            }
            Event::Close => {
                if shared.abusive.load(Relaxed) {
                    // Cut at once: a client resetting most of its streams right after opening
                    // them (HTTP/2 rapid reset) gets no more of the upstreams' time.
                    metrics.premature_reset_closes.inc();
                    tracing::debug!(listener = %listener.ctx.name, %peer, "closing: premature resets");
                    break;
                }
                if !closing {
                    // Its last request: HTTP/1.1 answers it with `connection: close`,
                    // HTTP/2 sends GOAWAY and finishes the streams open.
                    serving.graceful_shutdown(&signals);
                    closing = true;
                }
            }
            Event::Drained => {
                // HTTP/1: finish the request in flight, answer with `connection: close`;
                // HTTP/2: GOAWAY, let open streams finish.
                serving.graceful_shutdown(&signals);
                closing = true;
            }
            Event::Idle => {
                let idle_for = clock::now_ms().saturating_sub(shared.last_active_ms.load(Relaxed));
                let shedding = *pressure.borrow() == Level::Shed;
                let limit = if shedding {
                    idle_ms.min(SHED_IDLE_MS)
                } else {
                    idle_ms
                };
                if shared.in_flight.load(Relaxed) == 0 && idle_for >= limit {
                    if shedding {
                        // Closed outright: with no request in flight nothing is lost, and a
                        // half-sent head (which a graceful close would wait for) gives its
                        // slot up too.
                        break;
                    }
                    serving.graceful_shutdown(&signals);
                    closing = true;
                } else {
                    let left = limit.saturating_sub(idle_for).max(1);
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + Duration::from_millis(left));
                }
            }
        }
    }
    // An upgrade handed the connection to its tunnel: it stays open (and counted, and
    // waited for by the drain) as long as the tunnel.
    shared.tunnels_closed().await;
}

/// What serves a connection: the inline HTTP/1.1 server, then (from a request it does not
/// serve on) hyper's.
enum Serving<I, H> {
    Inline(Pin<Box<I>>),
    Hyper(Pin<Box<H>>),
}

impl<I, T, S, E, B> Serving<I, auto::UpgradeableConnection<'_, T, S, E>>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: auto::HttpServerConnExec<S::Future, B>,
{
    /// Closes gracefully: HTTP/1.1 after the exchange in flight (with `connection: close`),
    /// HTTP/2 with GOAWAY.
    fn graceful_shutdown(&mut self, signals: &h1::Signals) {
        match self {
            Self::Inline(_) => signals.close(),
            Self::Hyper(conn) => conn.as_mut().graceful_shutdown(),
        }
    }
}

/// What ended one wait of the serve loop.
enum Event {
    /// The inline server ended, or handed the connection to hyper.
    Inline(h1::Outcome),
    /// The connection ended (with hyper's error, if any).
    Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    /// The overload level changed (`false`: its sender is gone).
    Pressure(bool),
    /// `ConnShared::close` was notified.
    Close,
    /// The proxy drains.
    Drained,
    /// The idle timer fired.
    Idle,
}

/// The serve loop's second waker: its control futures (pressure, close, drain, idle timer)
/// are polled with it, so they are polled again only when one of them fired, while the
/// connection, woken by every read and write, is polled with the task's own waker.
struct ControlWake {
    shared: Arc<ControlShared>,
    waker: std::task::Waker,
}

#[derive(Default)]
struct ControlShared {
    /// Set when a control future woke (and when the futures are new: they must be polled
    /// once to register).
    woken: std::sync::atomic::AtomicBool,
    /// The task to wake.
    task: atomic_waker::AtomicWaker,
}

impl std::task::Wake for ControlShared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        self.task.wake();
    }
}

impl ControlWake {
    fn new() -> Self {
        let shared = Arc::new(ControlShared::default());
        let waker = std::task::Waker::from(shared.clone());
        Self { shared, waker }
    }

    /// New control futures: the next poll polls them.
    fn armed(&self) {
        self.shared
            .woken
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Registers the task's waker and tells (and clears) whether a control future woke.
    fn woken(&self, task: &std::task::Waker) -> bool {
        self.shared.task.register(task);
        self.shared
            .woken
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    fn waker(&self) -> &std::task::Waker {
        &self.waker
    }
}
