//! Getting a request onto a connection to one endpoint: an idle pooled connection, a new one
//! within `max_connections`, or one that frees up while the request waits as pending (within
//! `max_pending_requests` and the connect timeout); HTTP/1.1 (a request with an empty body
//! through the inline codec, [`h1`], any other through hyper's client) or HTTP/2.
//!
//! Slots are guards ([`ConnectionSlot`], [`PendingSlot`]): a connection's slot lives in its
//! connection task (or its inline [`Conn`]), a pending request's place in its future, so a request whose client goes
//! away while it connects or waits gives everything back.

use std::io;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::h1::{self, Conn};
use super::limits::ConnectionSlot;
use super::pool::{self as worker, Idle};
use super::{Cluster, Endpoint, EndpointAddress, Limit};
use crate::body::{BoxError, Inbound, RequestBody};
use crate::clock;
use crate::config::UpstreamProtocol;
use crate::tls::Stream;

/// Why a request could not be exchanged with an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection could not be made in time.
    #[error("upstream connect error: {0}")]
    Connect(io::Error),
    /// A circuit-breaker limit refused the request.
    #[error("upstream overflow: {}", .0.as_str())]
    Overflow(Limit),
    /// The connection failed after it was established (reset, protocol error, closed).
    #[error("upstream reset: {0}")]
    Reset(#[source] BoxError),
    /// No response before the deadline.
    #[error("upstream request timeout")]
    Timeout,
}

impl UpstreamError {
    /// Whether the failure says something about the endpoint's health (and so counts for
    /// outlier detection).
    pub fn is_endpoint_failure(&self) -> bool {
        !matches!(self, Self::Overflow(_))
    }
}

/// A pooled HTTP/1 connection travelling with its response, returned to the worker's pool
/// when the response has been read to its end.
#[derive(Debug)]
pub struct PooledH1 {
    cluster: u64,
    endpoint: u64,
    sender: http1::SendRequest<RequestBody>,
}

impl PooledH1 {
    /// Hands the connection back to this worker's pool.
    pub fn release(self) {
        worker::put_h1(
            self.cluster,
            self.endpoint,
            Idle::Hyper(self.sender),
            clock::now_ms(),
        );
    }
}

/// Sends `req` to endpoint `ep` of `cluster`, returning the response and, for HTTP/1, the
/// connection to give back once the response body is done.
pub async fn send(
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    req: Request<RequestBody>,
) -> Result<(Response<Inbound>, Option<PooledH1>), UpstreamError> {
    match cluster.protocol {
        UpstreamProtocol::Http1 => send_h1(cluster, ep, req).await,
        UpstreamProtocol::Http2 => send_h2(cluster, ep, req)
            .await
            .map(|r| (r.map(Inbound::from), None)),
    }
}

/// A connection for an HTTP/1.1 request: idle in the pool, or new.
enum H1Conn {
    Idle(Idle),
    New(Stream, ConnectionSlot),
}

async fn send_h1(
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    mut req: Request<RequestBody>,
) -> Result<(Response<Inbound>, Option<PooledH1>), UpstreamError> {
    let inline = h1::suits(&req);
    // A pooled connection the upstream closed meanwhile fails before the request is written
    // (hyper's client), or with nothing received (inline); then the request goes out on
    // another connection, without counting as an endpoint failure (inline: only a method
    // that may be replayed, `h1::replayable`). Bounded: each round consumes a pooled
    // connection or opens one.
    for _ in 0..8 {
        let (mut conn, reused) = match acquire_h1(cluster, ep, inline).await? {
            H1Conn::Idle(Idle::Inline(conn)) if inline => (conn, true),
            H1Conn::New(stream, slot) if inline => (Conn::new(stream, slot, ep.id), false),
            acquired => {
                let sender = match acquired {
                    H1Conn::Idle(Idle::Hyper(sender)) => sender,
                    // A request with a body on a connection last used inline.
                    H1Conn::Idle(Idle::Inline(conn)) => conn.into_hyper().await.map_err(reset)?,
                    H1Conn::New(stream, slot) => handshake_h1(stream, slot).await?,
                };
                match send_hyper(cluster, ep, sender, req).await {
                    Ok(sent) => return Ok(sent),
                    Err(back) => {
                        req = back?;
                        continue;
                    }
                }
            }
        };
        conn.prepare(&req);
        match conn.exchange(req.method().clone()).await {
            Ok(resp) => return Ok((resp.map(Inbound::from), None)),
            Err((_, false)) if reused && h1::replayable(req.method()) => continue,
            Err((e, _)) => return Err(reset(e)),
        }
    }
    Err(UpstreamError::Connect(io::Error::other(
        "no usable connection after repeated attempts",
    )))
}

fn reset(e: impl Into<BoxError>) -> UpstreamError {
    UpstreamError::Reset(e.into())
}

/// Sends `req` through hyper's client on `sender`; `Err(Ok(req))`: the request was not
/// written, and may go out on another connection.
async fn send_hyper(
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    mut sender: http1::SendRequest<RequestBody>,
    req: Request<RequestBody>,
) -> Result<(Response<Inbound>, Option<PooledH1>), Result<Request<RequestBody>, UpstreamError>> {
    if sender.ready().await.is_err() {
        return Err(Ok(req));
    }
    match sender.try_send_request(req).await {
        Ok(resp) => {
            let pooled = PooledH1 {
                cluster: cluster.id,
                endpoint: ep.id,
                sender,
            };
            Ok((resp.map(Inbound::from), Some(pooled)))
        }
        Err(mut e) => match e.take_message() {
            // The request was not written: safe to send again whatever the error.
            Some(back) => Err(Ok(back)),
            None => Err(Err(reset(e.into_error()))),
        },
    }
}

/// An idle pooled connection, a new one within `max_connections`, or one that frees up
/// while pending (within `max_pending_requests` and the connect timeout).
async fn acquire_h1(
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    inline: bool,
) -> Result<H1Conn, UpstreamError> {
    loop {
        let now_ms = clock::now_ms();
        if let Some(idle) =
            worker::take_h1(cluster.id, ep.id, now_ms, cluster.idle_timeout_ms, inline)
        {
            return Ok(H1Conn::Idle(idle));
        }
        if let Some(slot) = cluster.try_reserve_connection() {
            let stream = connect_stream(cluster, ep, false).await?;
            return Ok(H1Conn::New(stream, slot));
        }
        wait_for_connection(cluster).await?;
    }
}

/// Waits as a pending request for a connection slot or an idle connection.
async fn wait_for_connection(cluster: &Arc<Cluster>) -> Result<(), UpstreamError> {
    let Some(_pending) = cluster.try_enter_pending() else {
        cluster.metrics.overflow(Limit::MaxPendingRequests);
        return Err(UpstreamError::Overflow(Limit::MaxPendingRequests));
    };
    let freed =
        tokio::time::timeout(cluster.connect_timeout, cluster.connection_freed.notified()).await;
    if freed.is_err() {
        cluster.metrics.overflow(Limit::MaxConnections);
        return Err(UpstreamError::Overflow(Limit::MaxConnections));
    }
    Ok(())
}

/// Opens a TCP connection to the endpoint within the connect timeout.
async fn connect_tcp(cluster: &Cluster, ep: &Endpoint) -> Result<TcpStream, UpstreamError> {
    let endpoint = ep;
    let connect = async {
        match &endpoint.address {
            EndpointAddress::Ip(addr) => TcpStream::connect(addr).await,
            EndpointAddress::Host { host, port } => {
                TcpStream::connect((host.as_str(), *port)).await
            }
        }
    };
    let result = match tokio::time::timeout(cluster.connect_timeout, connect).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            if let Ok(peer) = stream.peer_addr() {
                endpoint.resolved_to(peer);
            }
            return Ok(stream);
        }
        Ok(Err(e)) => e,
        Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timeout"),
    };
    cluster.metrics.connect_failures.inc();
    Err(UpstreamError::Connect(result))
}

/// Opens a connection to the endpoint: TCP within the connect timeout, then the cluster's
/// TLS handshake, if it has TLS, within the same time again; `opaque`: for relaying opaque
/// TCP (the TLS handshake says so with ALPN `weft-tcp`).
pub(crate) async fn connect_stream(
    cluster: &Cluster,
    ep: &Endpoint,
    opaque: bool,
) -> Result<Stream, UpstreamError> {
    let tcp = connect_tcp(cluster, ep).await?;
    let Some(tls) = &cluster.tls else {
        return Ok(Stream::Plain(tcp));
    };
    let handshake = tls.connect(tcp, &ep.address, ep.identity.as_ref(), opaque);
    let error = match tokio::time::timeout(cluster.connect_timeout, handshake).await {
        Ok(Ok(stream)) => {
            return Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(
                stream,
            ))));
        }
        Ok(Err(e)) => e,
        Err(_) => io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout"),
    };
    tracing::debug!(cluster = %cluster.name, endpoint = %ep.address, "TLS to the endpoint failed: {error}");
    cluster.metrics.connect_failures.inc();
    cluster.metrics.tls_failures.inc();
    Err(UpstreamError::Connect(error))
}

/// Makes a new HTTP/1.1 connection of hyper's client over `stream`, in `slot`, which its
/// connection task then holds.
async fn handshake_h1(
    stream: Stream,
    slot: ConnectionSlot,
) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
    let (sender, conn) = http1::Builder::new()
        .handshake::<_, RequestBody>(TokioIo::new(stream))
        .await
        .map_err(reset)?;
    tokio::spawn(async move {
        let _slot = slot;
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

async fn send_h2(
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    req: Request<RequestBody>,
) -> Result<Response<Incoming>, UpstreamError> {
    let mut sender = match worker::h2(cluster.id, ep.id) {
        Some(s) => s,
        None => loop {
            if let Some(slot) = cluster.try_reserve_connection() {
                let s = connect_h2(cluster, ep, slot).await?;
                worker::add_h2(cluster.id, ep.id, s.clone());
                break s;
            }
            wait_for_connection(cluster).await?;
            if let Some(s) = worker::h2(cluster.id, ep.id) {
                break s;
            }
        },
    };
    sender.ready().await.map_err(reset)?;
    sender.send_request(req).await.map_err(reset)
}

/// Makes a new HTTP/2 connection in `slot`, which its connection task then holds.
async fn connect_h2(
    cluster: &Arc<Cluster>,
    ep: &Endpoint,
    slot: ConnectionSlot,
) -> Result<http2::SendRequest<RequestBody>, UpstreamError> {
    let stream = connect_stream(cluster, ep, false).await?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    let (sender, conn) = builder
        .handshake(TokioIo::new(stream))
        .await
        .map_err(reset)?;
    tokio::spawn(async move {
        let _slot = slot;
        let _ = conn.await;
    });
    Ok(sender)
}
