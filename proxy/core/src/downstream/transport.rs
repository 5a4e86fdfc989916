//! What a downstream connection runs over. [`Transport`] is the seam a TLS or opaque-TCP
//! transport plugs into: the serve loop takes any byte stream that knows its addresses.
//! [`DownstreamIo`] wraps it to feed the HTTP/1 framing scanner.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::Stream;
use tokio::time::Instant;

use super::head_clock::HeadClock;
use crate::http::ConnShared;
use crate::http::framing::FramingScanner;

/// A downstream byte stream: plain TCP, or a [`Stream`] (plain TCP or TLS over it).
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The address the connection arrived on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Disables Nagle's algorithm where the transport has it.
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()>;
    /// Ready once the peer has sent something (or closed, or the socket failed): a new
    /// connection waits for it before the HTTP server is set up. Confirmed by a peek: tokio
    /// takes a newly registered socket for ready before any event says so.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        TcpStream::set_nodelay(self, nodelay)
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        peek_ready(self, cx)
    }
}

impl Transport for Stream {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.tcp().set_nodelay(nodelay)
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        peek_ready(self.tcp(), cx)
    }
}

/// Ready when a byte can be read from `tcp` (or it reached its end, or failed), by a peek
/// that takes nothing from it; a peek that finds nothing clears the socket's readiness and
/// waits for the reactor's next event.
fn peek_ready(tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    tcp.poll_peek(cx, &mut buf).map_ok(|_| ())
}

pin_project! {
    /// A downstream TCP stream that feeds what it reads to the HTTP/1 framing scanner, which
    /// spots requests carrying both `content-length` and `transfer-encoding` (hyper accepts
    /// and normalises those, so the request path could not see them otherwise), and to the
    /// request-headers timeout ([`HeadClock`]): a read that finds a head past its time
    /// fails with `TimedOut`, which ends the connection.
    pub struct DownstreamIo<T> {
        #[pin]
        stream: T,
        scanner: Option<Box<FramingScanner>>,
        shared: Arc<ConnShared>,
        heads: Option<HeadClock>,
        // Read before this wrapper existed (by the inline server): served first.
        prefix: Bytes,
    }
}

impl<T: Transport> DownstreamIo<T> {
    /// Wraps `stream`; `scan`: feed HTTP/1 request bytes to the framing scanner (else the
    /// connection speaks only HTTP/2); `heads`: the request-headers timeout, if any, and
    /// when the connection was accepted (its first head is due from then).
    pub fn new(
        stream: T,
        shared: Arc<ConnShared>,
        scan: bool,
        heads: Option<(Duration, Instant)>,
    ) -> Self {
        Self {
            stream,
            scanner: scan.then(Box::default),
            shared,
            heads: heads.map(|(limit, accepted)| HeadClock::new(limit, accepted, !scan)),
            prefix: Bytes::new(),
        }
    }

    /// The same, serving `prefix` (bytes already read from `stream`) before reading more;
    /// they are scanned and timed as if read now.
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = prefix;
        self
    }
}

impl<T: Transport> AsyncRead for DownstreamIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
        } else if this.stream.poll_read(cx, buf)?.is_pending() {
            // A client that stops halfway through a head is cut when its time is up.
            if let Some(clock) = this.heads.as_mut()
                && let Poll::Ready(e) = clock.poll_expired(cx)
            {
                this.shared.listener.metrics.request_headers_timeouts.inc();
                return Poll::Ready(Err(e));
            }
            return Poll::Pending;
        }
        let read = &buf.filled()[before..];
        if let Some(scanner) = this.scanner.as_mut() {
            scanner.feed(read);
            this.shared.framing.publish(scanner);
        }
        if let Some(clock) = this.heads.as_mut() {
            let in_head = this.scanner.as_ref().map(|s| s.head_in_progress());
            if let Err(e) = clock.read(read, in_head) {
                this.shared.listener.metrics.request_headers_timeouts.inc();
                return Poll::Ready(Err(e));
            }
        }
        if this.scanner.as_ref().is_some_and(|s| s.is_passthrough()) {
            *this.scanner = None;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: Transport> AsyncWrite for DownstreamIo<T> {
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
