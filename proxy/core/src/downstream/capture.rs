//! Capture and opaque listeners: a connection redirected by `weft-proxy init`'s rules is
//! routed by its original destination (`SO_ORIGINAL_DST`), its protocol is detected from its
//! first bytes, and it is served as HTTP (through the filter chain) or relayed as opaque TCP;
//! a `tcp` listener relays every connection to its default cluster.
//!
//! Detection peeks, so the bytes it looked at are still there for whoever serves the
//! connection. It never waits longer than `detect_timeout_ms` (100 ms by default): a client
//! that says nothing by then is relayed as opaque TCP, so protocols where the server speaks
//! first start after that wait, and not at all on a port declared opaque.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use super::connection::{ListenerRuntime, serve_connection};
use crate::config::{CaptureConfig, DownstreamProtocol};
use crate::http::Live;
use crate::tcp::{self, Target};
use crate::tls::{Stream, server::is_opaque};
use crate::upstream::EndpointAddress;

/// The original destination of a redirected connection; `None` when it was not redirected
/// (the socket has none, or it is the listener's own address). IPv4 and IPv6 (`[::]`
/// listeners are dual-stack: an IPv4 connection on one arrives as an IPv4-mapped address,
/// and is answered with its IPv4 destination).
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = unmapped(stream.local_addr().ok()?);
    let dst = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let dst = unmapped(dst.ok()?.as_socket()?);
    (dst != local).then_some(dst)
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) as the IPv4 address it is.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// What a connection's first bytes say it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1 request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
    /// A TLS handshake record.
    Tls,
    /// A TLS handshake that is not a sidecar's (no `weft-mesh` or `weft-tcp` offered), on a
    /// permissive listener: relayed as it is, for the app to terminate.
    TlsPassthrough,
    /// Bytes that are none of these.
    Opaque,
    /// Nothing within the detection timeout.
    Silent,
}

impl Detected {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Tls => "tls",
            Self::TlsPassthrough => "tls_passthrough",
            Self::Opaque => "opaque",
            Self::Silent => "silent",
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token looked for.
const MAX_METHOD: usize = 24;

/// Whether `b` is a `tchar` of RFC 9110 (a method token's characters).
fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An HTTP/1 request line's start: empty lines (which servers skip), a method token — any,
/// not only the nine common ones: WebDAV's, custom ones — then a space and the start of a
/// request target (`/`, `*`, `http://`, `https://`; anything after `CONNECT`). A text
/// protocol's command (`SET k v`, `get key`) is not one. `None` while more bytes are needed.
fn http1_request_line(first: &[u8]) -> Option<bool> {
    let mut rest = first;
    while let Some(r) = rest
        .strip_prefix(b"\r\n")
        .or_else(|| rest.strip_prefix(b"\n"))
    {
        rest = r;
    }
    if rest.is_empty() || rest == b"\r" {
        return None;
    }
    let token = rest.iter().take_while(|b| tchar(**b)).count();
    if token == rest.len() {
        return (token > MAX_METHOD).then_some(false);
    }
    if token == 0 || token > MAX_METHOD || rest[token] != b' ' {
        return Some(false);
    }
    if &rest[..token] == b"CONNECT" {
        return Some(true);
    }
    let target = &rest[token + 1..];
    if target.is_empty() {
        return None;
    }
    if target[0] == b'/' || target[0] == b'*' {
        return Some(true);
    }
    for scheme in [&b"http://"[..], b"https://"] {
        let n = target.len().min(scheme.len());
        if target[..n].eq_ignore_ascii_case(&scheme[..n]) {
            return (n == scheme.len()).then_some(true);
        }
    }
    Some(false)
}

/// What `first` bytes are; `None` while more are needed to tell.
pub fn classify(first: &[u8]) -> Option<Detected> {
    match first {
        [] => None,
        [0x16] => None,
        [0x16, 0x03, ..] => Some(Detected::Tls),
        _ if first.starts_with(PREFACE) => Some(Detected::Http2),
        _ if PREFACE.starts_with(first) => None,
        _ => match http1_request_line(first)? {
            true => Some(Detected::Http1),
            false => Some(Detected::Opaque),
        },
    }
}

/// Peeks at a connection's first bytes for up to `limit`.
pub async fn detect(stream: &TcpStream, limit: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 64];
    let mut seen = 0;
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            // The client closed, or the socket failed: nothing more will come.
            Ok(Ok(0)) | Ok(Err(_)) => return Detected::Opaque,
            Ok(Ok(n)) => {
                if let Some(d) = classify(&buf[..n]) {
                    return d;
                }
                if n == seen {
                    // A partial request line or preface: the rest is on its way.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen = n;
            }
            Err(_) if seen == 0 => return Detected::Silent,
            Err(_) => return Detected::Opaque,
        }
        if tokio::time::Instant::now() >= deadline {
            return Detected::Opaque;
        }
    }
}

/// What a ClientHello says, as far as routing cares.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The ALPN protocols offered.
    pub alpn: Vec<Vec<u8>>,
    /// The server name asked for (SNI).
    pub sni: Option<String>,
}

/// Peeks at a whole first TLS record (up to 16 KiB, within `limit`) and reads the
/// ClientHello in it; `None` when it is not one, or does not arrive whole in time.
pub async fn peek_client_hello(stream: &TcpStream, limit: Duration) -> Option<ClientHello> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = vec![0u8; 5 + (16 << 10)];
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 5 {
            let want = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if want > buf.len() {
                return None;
            }
            if n >= want {
                return parse_client_hello(&buf[5..want]);
            }
        }
        if n == 0 {
            return None;
        }
        if n == seen {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Reads a ClientHello handshake message (the body of its first record).
pub fn parse_client_hello(msg: &[u8]) -> Option<ClientHello> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    let mut r = R(msg);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.take(3)?;
    let len = (usize::from(len[0]) << 16) | (usize::from(len[1]) << 8) | usize::from(len[2]);
    let mut r = R(r.take(len)?);
    r.take(2 + 32)?; // version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut hello = ClientHello::default();
    let mut exts = R(r.vec16().unwrap_or_default());
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let mut data = R(exts.vec16()?);
        match kind {
            0 => {
                let mut names = R(data.vec16()?);
                while !names.0.is_empty() {
                    let name_type = names.u8()?;
                    let name = names.vec16()?;
                    if name_type == 0 {
                        hello.sni = std::str::from_utf8(name).ok().map(str::to_owned);
                    }
                }
            }
            16 => {
                let mut list = R(data.vec16()?);
                while !list.0.is_empty() {
                    hello.alpn.push(list.vec8()?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

/// The cluster a captured connection to `dst` goes to: `ports` first, then the cluster with
/// `dst` among its virtual `addresses` (a ClusterIP), then the one one of whose endpoints is
/// `dst` (a mesh service is reached by any of its instances' addresses and balanced over all
/// of them, as a ClusterIP would be).
fn cluster_for(live: &Live, capture: &CaptureConfig, dst: SocketAddr) -> Option<usize> {
    let clusters = &live.clusters;
    if let Some(name) = capture.ports.get(&dst.port()) {
        return clusters.find(name);
    }
    if let Some(i) = clusters
        .list
        .iter()
        .position(|c| c.addresses().contains(&dst))
    {
        return Some(i);
    }
    clusters.list.iter().position(|c| {
        c.endpoints().list.iter().any(|ep| match &ep.address {
            EndpointAddress::Ip(a) => *a == dst,
            EndpointAddress::Host { .. } => ep.peer() == Some(dst),
        })
    })
}

/// Serves a connection of a capture or `tcp` listener (see the module docs).
pub(super) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    listener: &Arc<ListenerRuntime>,
    drain: watch::Receiver<bool>,
    accepted: tokio::time::Instant,
) {
    let ctx = &listener.ctx;
    let capture = listener.capture.as_ref();
    let original = capture.and_then(|_| original_dst(&stream));
    let live = ctx.live.load_full();
    let idle = Some(Duration::from_millis(listener.idle_timeout_ms));
    let (target, cluster) = match (original, capture) {
        (Some(dst), Some(capture)) => match cluster_for(&live, capture, dst) {
            Some(i) => (
                Target::Cluster(live.clusters.list[i].clone()),
                Some(live.clusters.names[i].clone()),
            ),
            None => {
                // No cluster owns the address; TLS may still name one by its server name
                // (an external service the mesh knows as a cluster: egress by SNI).
                if listener.tls.is_none()
                    && listener.protocol != DownstreamProtocol::Tcp
                    && !capture.opaque_ports.contains(&dst.port())
                {
                    let limit = Duration::from_millis(capture.detect_timeout_ms);
                    let d = detect(&stream, limit).await;
                    let sni = match d {
                        Detected::Tls => {
                            peek_client_hello(&stream, limit).await.and_then(|h| h.sni)
                        }
                        _ => None,
                    };
                    if let Some(i) = sni.as_deref().and_then(|n| live.cluster_for_authority(n)) {
                        ctx.metrics.detected("tls_sni");
                        let cluster = live.clusters.list[i].clone();
                        drop(live);
                        return tcp::relay(
                            stream,
                            (peer, dst, false),
                            Target::Cluster(cluster),
                            ctx,
                            idle,
                        )
                        .await;
                    }
                    ctx.metrics.detected(d.label());
                }
                if !capture.passthrough {
                    ctx.metrics.tcp(tcp::PASSTHROUGH).refused.inc();
                    tracing::debug!(listener = %ctx.name, %peer, %dst, "captured connection closed: no cluster owns its destination and passthrough is off");
                    return;
                }
                (
                    Target::Passthrough {
                        address: dst,
                        connect_timeout: Duration::from_millis(capture.connect_timeout_ms),
                    },
                    None,
                )
            }
        },
        _ => match live.default_cluster {
            Some(i) => (
                Target::Cluster(live.clusters.list[i].clone()),
                Some(live.clusters.names[i].clone()),
            ),
            // A capture listener reached directly (not redirected) has no destination to
            // route by: closed, or it would be an open proxy into the mesh with this
            // sidecar's identity (Istio's blackhole).
            None => {
                if capture.is_some() {
                    ctx.metrics.detected("not_redirected");
                    tracing::debug!(listener = %ctx.name, %peer, "a connection not redirected to a capture listener: closed");
                }
                return;
            }
        },
    };
    drop(live);
    let declared = match (original, capture) {
        (Some(dst), Some(c)) => c.opaque_ports.contains(&dst.port()),
        _ => false,
    };
    let passthrough = matches!(target, Target::Passthrough { .. });
    // Passthrough is opaque whatever it speaks (no filters), but a TLS listener still
    // terminates mesh TLS (and a strict one refuses plaintext).
    let tls = listener.tls.as_ref();
    let opaque = listener.protocol == DownstreamProtocol::Tcp || declared || passthrough;
    let detected = if opaque && tls.is_none() {
        if declared {
            ctx.metrics.detected("declared");
        }
        None
    } else {
        // Also on an opaque port of a TLS listener: mesh TLS from another sidecar starts at
        // once, whatever the protocol inside.
        let limit = Duration::from_millis(capture.map_or(100, |c| c.detect_timeout_ms));
        let d = detect(&stream, limit).await;
        // TLS that is not a sidecar's (the app's own, terminated by the app) passes through
        // a permissive listener untouched; a strict one takes mesh TLS only.
        let d = match (d, tls) {
            (Detected::Tls, Some(t)) if t.permissive => {
                match peek_client_hello(&stream, limit).await {
                    Some(hello) if !crate::tls::is_mesh_hello(&hello.alpn) => {
                        tracing::debug!(listener = %ctx.name, %peer, sni = ?hello.sni, "TLS not from the mesh: passed through");
                        Detected::TlsPassthrough
                    }
                    _ => d,
                }
            }
            _ => d,
        };
        ctx.metrics.detected(d.label());
        Some(d)
    };
    let local = original.unwrap_or_else(|| stream.local_addr().unwrap_or(peer));
    // A `tcp` listener's filters are network filters; an HTTP listener's chain never sees
    // opaque bytes.
    let network = listener.protocol == DownstreamProtocol::Tcp;
    match detected {
        Some(Detected::TlsPassthrough) => {
            return tcp::relay(stream, (peer, local, network), target, ctx, idle).await;
        }
        Some(Detected::Tls) if tls.is_some() => {}
        // Plaintext where the listener takes mesh TLS only.
        _ if tls.is_some_and(|t| !t.permissive) => {
            ctx.metrics.tls_handshake_failures.inc();
            tracing::debug!(listener = %ctx.name, %peer, "plaintext on a strict mTLS listener: closed");
            return;
        }
        Some(Detected::Http1 | Detected::Http2) if !opaque => {
            let route = cluster.map(String::into_boxed_str);
            return serve_connection(
                Stream::Plain(stream),
                None,
                (peer, local, route),
                listener,
                drain,
                accepted,
            )
            .await;
        }
        _ => return tcp::relay(stream, (peer, local, network), target, ctx, idle).await,
    }
    // Mesh TLS from another sidecar: terminated here; the handshake's ALPN says whether the
    // bytes inside are HTTP or opaque TCP.
    let Some(tls) = tls else { return };
    let limit = listener
        .headers_timeout
        .unwrap_or(Duration::from_millis(super::connection::HANDSHAKE_MS))
        .saturating_sub(accepted.elapsed());
    let (stream, peer_tls) = match tls.accept(stream, limit).await {
        Ok(accepted) => accepted,
        Err(e) => {
            ctx.metrics.tls_handshake_failures.inc();
            tracing::debug!(listener = %ctx.name, %peer, "TLS handshake failed: {e}");
            return;
        }
    };
    ctx.metrics.tls_connections.inc();
    let stream = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(stream)));
    if is_opaque(peer_tls.alpn.as_deref()) || opaque {
        return tcp::relay(stream, (peer, local, network), target, ctx, idle).await;
    }
    let route = cluster.map(String::into_boxed_str);
    serve_connection(
        stream,
        Some(Arc::new(peer_tls)),
        (peer, local, route),
        listener,
        drain,
        accepted,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_classified_as_soon_as_they_can_be() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None, "a method's start needs more");
        assert_eq!(classify(b"GEX"), None, "a token's start: more is needed");
        assert_eq!(
            classify(b"GEX /"),
            Some(Detected::Http1),
            "any method token"
        );
        assert_eq!(classify(b"PROPFIND /dav HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(
            classify(b"\r\nGET /admin HTTP/1.1"),
            Some(Detected::Http1),
            "leading empty lines"
        );
        assert_eq!(classify(b"GET http://x/ HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(
            classify(b"CONNECT example.com:443 HTTP/1.1"),
            Some(Detected::Http1)
        );
        assert_eq!(
            classify(b"SET key value\r\n"),
            Some(Detected::Opaque),
            "Redis inline"
        );
        assert_eq!(
            classify(b"get key\r\n"),
            Some(Detected::Opaque),
            "memcached"
        );
        assert_eq!(classify(b"PING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Some(Detected::Tls));
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0x16, 0x20]), Some(Detected::Opaque));
        // A Redis command, a PostgreSQL startup message.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Some(Detected::Opaque)
        );
    }

    /// The first record a rustls client sends with `alpn`, to `name`.
    fn hello_bytes(alpn: &[&[u8]], name: &str) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_tells_its_server_name_and_protocols() {
        let bytes = hello_bytes(&[b"h2", b"http/1.1"], "app.example.com");
        assert_eq!(classify(&bytes), Some(Detected::Tls));
        let hello = parse_client_hello(&bytes[5..]).unwrap();
        assert_eq!(hello.sni.as_deref(), Some("app.example.com"));
        assert_eq!(hello.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(!crate::tls::is_mesh_hello(&hello.alpn));
        let mesh = parse_client_hello(&hello_bytes(&[b"h2", b"weft-mesh"], "x.test")[5..]).unwrap();
        assert!(crate::tls::is_mesh_hello(&mesh.alpn));
        // Cut short or not a ClientHello: nothing.
        assert_eq!(parse_client_hello(&bytes[5..40]), None);
        assert_eq!(parse_client_hello(&[2, 0, 0, 0]), None);
    }
}
