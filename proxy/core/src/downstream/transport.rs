//! What a downstream connection runs over. [`Transport`] is the seam a TLS or opaque-TCP
//! transport plugs into: the serve loop takes any byte stream that knows its addresses.
//! [`DownstreamIo`] wraps it to feed the HTTP/1 framing scanner.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::http::ConnShared;
use crate::http::framing::FramingScanner;

/// A downstream byte stream: plain TCP today; TLS (and a stream whose first bytes were
/// peeked for protocol detection) implement it too.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The address the connection arrived on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Disables Nagle's algorithm where the transport has it.
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()>;
}

impl Transport for TcpStream {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }

    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        TcpStream::set_nodelay(self, nodelay)
    }
}

pin_project! {
    /// A downstream TCP stream that feeds what it reads to the HTTP/1 framing scanner, which
    /// spots requests carrying both `content-length` and `transfer-encoding` (hyper accepts
    /// and normalises those, so the request path could not see them otherwise).
    pub struct DownstreamIo<T> {
        #[pin]
        stream: T,
        scanner: Option<Box<FramingScanner>>,
        shared: Arc<ConnShared>,
    }
}

impl<T: Transport> DownstreamIo<T> {
    /// Wraps `stream`; `scan`: feed HTTP/1 request bytes to the framing scanner.
    pub fn new(stream: T, shared: Arc<ConnShared>, scan: bool) -> Self {
        Self {
            stream,
            scanner: scan.then(Box::default),
            shared,
        }
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
