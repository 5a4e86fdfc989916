//! Relaying bytes both ways between two connections until both sides end, or neither moves a
//! byte for an idle timeout: upgraded HTTP connections (`http/tunnel.rs`) and opaque TCP
//! (`tcp.rs`) share it.
//!
//! An end of stream on one side shuts the other side's write half down and the opposite
//! direction keeps flowing (half-close), as `tokio::io::copy_bidirectional` does.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock;

/// How a relay ended.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Bytes read from the first side (and written to the second).
    pub from_first: u64,
    /// Bytes read from the second side (and written to the first).
    pub from_second: u64,
    /// Ended by the idle timeout.
    pub idle: bool,
    /// Ended by an error on either side (reset, broken pipe), if any.
    pub error: Option<io::Error>,
}

/// Relays `a` ↔ `b` until both directions end, either fails, or no byte moves for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Option<Duration>) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(clock::now_ms()));
    let mut a = Watched::new(a, last.clone());
    let mut b = Watched::new(b, last.clone());
    let (read_a, read_b) = (a.read.clone(), b.read.clone());
    let copied = tokio::io::copy_bidirectional(&mut a, &mut b);
    let idle_for = async {
        match idle {
            Some(limit) => idle_past(&last, limit).await,
            None => std::future::pending().await,
        }
    };
    let mut out = Relayed::default();
    tokio::select! {
        res = copied => if let Err(e) = res {
            out.error = Some(e);
        },
        () = idle_for => out.idle = true,
    }
    out.from_first = read_a.load(Relaxed);
    out.from_second = read_b.load(Relaxed);
    out
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

/// One side of a relay, noting when bytes move and how many were read.
struct Watched<T> {
    io: T,
    last: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
}

impl<T> Watched<T> {
    fn new(io: T, last: Arc<AtomicU64>) -> Self {
        Self {
            io,
            last,
            read: Arc::new(AtomicU64::new(0)),
        }
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
        let n = buf.filled().len() - before;
        if n > 0 {
            self.last.store(clock::now_ms(), Relaxed);
            self.read.fetch_add(n as u64, Relaxed);
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_and_counts_bytes() {
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, server) = tokio::io::duplex(64);
        let relay = tokio::spawn(relay(proxy_a, proxy_b, None));
        let (mut client, mut server) = (client, server);
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "the server sees the client's end of stream");
        // The server still answers after the client's half-close.
        server.write_all(b"bye!!!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye!!!");
        let done = relay.await.unwrap();
        assert_eq!((done.from_first, done.from_second), (5, 6));
        assert!(!done.idle && done.error.is_none());
    }

    #[tokio::test]
    async fn a_relay_that_moves_nothing_ends_at_its_idle_timeout() {
        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let done = relay(proxy_a, proxy_b, Some(Duration::from_millis(50))).await;
        assert!(done.idle);
    }
}
