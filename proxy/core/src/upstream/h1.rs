//! The inline HTTP/1.1 upstream codec: a request whose body is empty (most requests in a
//! mesh: GET, HEAD, DELETE, a POST with no body) is written and its response read by the
//! request's own task, with no connection task, channel or wake-up between them, which is
//! what hyper's client connection costs a request. The response head is parsed with
//! `httparse`; its body ([`ResponseBody`]) is read from the connection as the downstream side
//! polls it, and the connection goes back to this worker's pool the moment the body's last
//! byte is read, before the last frame is yielded.
//!
//! Requests with a body, upgrades and `CONNECT` still go through hyper's client
//! (`connect.rs`); an idle connection last used here is handed to hyper for them
//! ([`Conn::into_hyper`]).
//!
//! Response framing follows RFC 9112 §6.3, as hyper's client does: 1xx other than 101 are
//! skipped; HEAD, 204 and 304 have no body; `transfer-encoding` ending in `chunked` is
//! chunked (a `content-length` beside it is removed and the connection not reused); any
//! other `transfer-encoding`, or no length at all, reads to the end of the connection;
//! several `content-length` values must agree. Anything else (an invalid head, a 101 to a
//! request that asked for no upgrade, bad chunk framing, a connection closed early) is an
//! error: the request fails with 502 before a response, or the downstream stream is cut
//! after one.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::Cluster;
use super::limits::ConnectionSlot;
use super::pool as worker;
use crate::body::RequestBody;
use crate::clock;
use crate::tls::Stream;

/// At most this many header fields in a response head (hyper's client default).
const MAX_HEADERS: usize = 100;
/// At most this many bytes of response head, 1xx heads included (hyper's client default
/// buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// At most this many bytes of chunk-size line or trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// How much room a read asks for.
const READ_CHUNK: usize = 8 * 1024;

/// Why an exchange on an inline connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Writing the request or reading the response failed.
    #[error("upstream connection error: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before a whole response head.
    #[error("upstream closed the connection before a response")]
    Closed,
    /// The response head is not valid HTTP/1.
    #[error("invalid upstream response: {0}")]
    Invalid(&'static str),
    /// The response head is larger than the proxy accepts.
    #[error("upstream response head too large")]
    TooLarge,
    /// The response head has more header fields than the proxy accepts.
    #[error("upstream response head has too many header fields")]
    TooManyHeaders,
    /// The body ended before its framing said it would.
    #[error("upstream closed the connection before the body ended")]
    BodyClosed,
}

impl From<httparse::Error> for H1Error {
    fn from(e: httparse::Error) -> Self {
        Self::Invalid(match e {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Status => "invalid status",
            httparse::Error::Token => "invalid token",
            httparse::Error::TooManyHeaders => return Self::TooManyHeaders,
            httparse::Error::Version => "invalid version",
        })
    }
}

/// Whether `req` goes through the inline codec: its body is empty, it is not `CONNECT` and
/// asks for no protocol upgrade.
pub fn suits(req: &Request<RequestBody>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(header::UPGRADE)
}

/// Whether a request may be sent again after its connection failed with nothing received:
/// the methods Go's and browsers' clients replay on a reused connection the server closed.
pub fn replayable(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// An HTTP/1.1 connection to an endpoint driven inline. It holds its cluster's connection
/// slot (`max_connections`) for as long as it lives, in the pool or carrying a request.
pub struct Conn {
    io: Stream,
    /// Bytes read and not yet consumed.
    buf: BytesMut,
    /// The request head being written (its capacity kept across requests).
    wbuf: Vec<u8>,
    slot: ConnectionSlot,
    /// The endpoint's id, for the pool.
    endpoint: u64,
}

/// What the response head said of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// This many bytes still to read.
    Length(u64),
    /// Chunked, at this point of the framing.
    Chunked(Chunk),
    /// Everything until the upstream closes the connection.
    Eof,
    /// The body ended.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data still to read.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// The trailer section (or the empty line that ends the body) is next.
    Trailers,
}

impl Conn {
    /// A new connection over `io`, in `slot`.
    pub fn new(io: Stream, slot: ConnectionSlot, endpoint: u64) -> Box<Self> {
        Box::new(Self {
            io,
            buf: BytesMut::new(),
            wbuf: Vec::new(),
            slot,
            endpoint,
        })
    }

    /// Whether an idle connection can carry a request: nothing arrived on it while it idled
    /// (neither the upstream's close nor stray bytes). Costs no system call unless the
    /// reactor saw the socket become readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        matches!(
            tokio::io::AsyncRead::poll_read(Pin::new(&mut self.io), &mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Hands the connection to hyper's client (for a request with a body); its connection
    /// task then holds the slot.
    pub async fn into_hyper(self: Box<Self>) -> hyper::Result<http1::SendRequest<RequestBody>> {
        let Conn { io, slot, .. } = *self;
        let (sender, conn) = http1::Builder::new()
            .handshake::<_, RequestBody>(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            let _slot = slot;
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Encodes `req`'s head (its body is empty: [`suits`]) for [`Conn::exchange`].
    pub fn prepare(&mut self, req: &Request<RequestBody>) {
        encode(req, &mut self.wbuf);
    }

    /// Writes the request head [`Conn::prepare`] encoded and reads the response head (to a
    /// request of `method`). On failure, tells whether anything was received from the
    /// upstream.
    pub async fn exchange(
        mut self: Box<Self>,
        method: Method,
    ) -> Result<Response<ResponseBody>, (H1Error, bool)> {
        let written = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        };
        if let Err(e) = written.await {
            return Err((e.into(), false));
        }
        let mut received = false;
        let parsed = loop {
            if !self.buf.is_empty() {
                match parse(&mut self.buf, &method) {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) => {}
                    Err(e) => return Err((e, true)),
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Err((H1Error::TooLarge, true));
            }
            self.buf.reserve(READ_CHUNK);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => return Err((H1Error::Closed, received)),
                Ok(_) => received = true,
                Err(e) => return Err((e.into(), received)),
            }
        };
        let Parsed {
            status,
            version,
            headers,
            decode,
            keep_alive,
        } = parsed;
        let mut body = ResponseBody {
            conn: Some(self),
            decoder: Decoder(decode),
            keep_alive,
        };
        if body.decoder.is_done() {
            body.release();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    fn cluster(&self) -> &Arc<Cluster> {
        self.slot.cluster()
    }
}

/// Writes a request head as hyper's client does: the request line (origin or absolute form,
/// as the URI is), the header fields in the map's order with lower-case names, no
/// `transfer-encoding` (the body is empty).
fn encode(req: &Request<RequestBody>, dst: &mut Vec<u8>) {
    dst.clear();
    dst.extend_from_slice(req.method().as_str().as_bytes());
    dst.push(b' ');
    let uri = req.uri();
    if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
        dst.extend_from_slice(scheme.as_bytes());
        dst.extend_from_slice(b"://");
        dst.extend_from_slice(authority.as_str().as_bytes());
    }
    match uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => dst.extend_from_slice(pq.as_str().as_bytes()),
        _ => dst.push(b'/'),
    }
    dst.extend_from_slice(if req.version() == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for (name, value) in req.headers() {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    decode: Decode,
    keep_alive: bool,
}

/// Parses a response head from the start of `buf`, skipping 1xx heads; `None`: more bytes
/// are needed. Consumes the head (and any skipped 1xx) from `buf`.
fn parse(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, H1Error> {
    // Room for a few header fields first (most heads have fewer than 16, and the room is
    // set up on every parse), for up to MAX_HEADERS when that is not enough.
    match parse_with::<16>(buf, method) {
        Err(H1Error::TooManyHeaders) => parse_with::<MAX_HEADERS>(buf, method),
        parsed => parsed,
    }
}

/// Where a head's fields are: (name start, name end, value start, value end), as offsets
/// from the head's first byte at `base` (an address), for the fields `httparse` parsed.
/// The head is then split off the buffer and the fields sliced out of it without copies.
pub(crate) fn field_spans(
    base: usize,
    fields: &[httparse::Header<'_>],
    spans: &mut [(u32, u32, u32, u32)],
) {
    for (span, h) in spans.iter_mut().zip(fields) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = (
            name as u32,
            (name + h.name.len()) as u32,
            value as u32,
            (value + h.value.len()) as u32,
        );
    }
}

fn parse_with<const N: usize>(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Parsed>, H1Error> {
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; N];
        // Where each field's name and value are in the head.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); N];
        let (len, code, minor, count) = {
            let mut res = httparse::Response::new(&mut []);
            let base = buf.as_ptr() as usize;
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut res,
                buf,
                &mut fields,
            )? {
                httparse::Status::Partial => return Ok(None),
                httparse::Status::Complete(len) => {
                    field_spans(base, res.headers, &mut spans);
                    let code = res.code.unwrap_or(0);
                    (len, code, res.version.unwrap_or(1), res.headers.len())
                }
            }
        };
        if len > MAX_HEAD {
            return Err(H1Error::TooLarge);
        }
        match code {
            101 => {
                return Err(H1Error::Invalid(
                    "101 to a request that asked for no upgrade",
                ));
            }
            100..=199 => {
                buf.advance(len);
                if buf.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            _ => {}
        }
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("invalid status"))?;
        let version = if minor == 1 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        let mut keep_alive = version == Version::HTTP_11;
        let mut close = false;
        // The framing fields, noted as they go by (no lookups afterwards).
        let mut transfer_encoding = None;
        let mut length = None;
        for &(n0, n1, v0, v1) in &spans[..count] {
            let name = HeaderName::from_bytes(&head[n0 as usize..n1 as usize])
                .map_err(|_| H1Error::Invalid("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
                .map_err(|_| H1Error::Invalid("invalid header value"))?;
            if name == header::CONNECTION {
                for option in value.as_bytes().split(|&b| b == b',') {
                    let option = option.trim_ascii();
                    if option.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    }
                }
                // Hop-by-hop, and names no other field: noted above, and left out of the
                // response as the proxy's stripping would leave it (this codec never carries
                // an upgrade's `101`, whose `connection` is kept).
                if crate::http::headers::persistence_only(&value) {
                    continue;
                }
            } else if name == header::TRANSFER_ENCODING {
                transfer_encoding = Some(value.clone());
            } else if name == header::CONTENT_LENGTH {
                for part in value.as_bytes().split(|&b| b == b',') {
                    let n = parse_decimal(part.trim_ascii())
                        .ok_or(H1Error::Invalid("invalid content-length"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(H1Error::Invalid("differing content-length values"));
                    }
                    length = Some(n);
                }
            }
            headers.append(name, value);
        }
        let mut decode = framing(status, version, method, transfer_encoding.as_ref(), length)?;
        if transfer_encoding.is_some() && length.is_some() {
            // RFC 9112 §6.3: transfer-encoding wins, the length goes, the connection closes.
            headers.remove(header::CONTENT_LENGTH);
            close = true;
        }
        if decode == Decode::Length(0) {
            decode = Decode::Done;
        }
        if decode == Decode::Eof {
            close = true;
        }
        return Ok(Some(Parsed {
            status,
            version,
            headers,
            decode,
            keep_alive: keep_alive && !close,
        }));
    }
}

/// How the body of a response to `method` is framed (RFC 9112 §6.3), from its last
/// `transfer-encoding` field and its `content-length` (all its values agreeing).
fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    transfer_encoding: Option<&HeaderValue>,
    length: Option<u64>,
) -> Result<Decode, H1Error> {
    if matches!(status.as_u16(), 204 | 304) || *method == Method::HEAD {
        return Ok(Decode::Done);
    }
    if let Some(last) = transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(H1Error::Invalid(
                "transfer-encoding in an HTTP/1.0 response",
            ));
        }
        let chunked = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            Decode::Chunked(Chunk::Size)
        } else {
            Decode::Eof
        });
    }
    Ok(length.map_or(Decode::Eof, Decode::Length))
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// A chunk-size line (`HEX[ext]`, the line ending already cut off): the size.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return Err(H1Error::Invalid("invalid chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(H1Error::Invalid("invalid chunk size"));
    }
    if rest.iter().any(|&b| b == b'\r' || b == 0) {
        return Err(H1Error::Invalid("invalid chunk extension"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

/// What the response head said of the body, and how far its reading got: the framing of
/// an inline response's body over the bytes read so far, with no I/O of its own (the
/// [`ResponseBody`] feeds it from the connection; [`decode_response`] from memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder(Decode);

/// What [`Decoder::decode`] found in the bytes it was given.
#[derive(Debug)]
pub enum Decoded {
    /// A piece of the body.
    Data(Bytes),
    /// The end of the body, with the trailers of a chunked body that had some.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

impl Decoder {
    /// Whether the body ended.
    pub fn is_done(&self) -> bool {
        self.0 == Decode::Done
    }

    /// Takes what it can from the start of `buf`: a piece of data, the end of the body, or
    /// nothing until more bytes come.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            if buf.is_empty() {
                return Ok(if self.0 == Decode::Done {
                    Decoded::End(None)
                } else {
                    Decoded::More
                });
            }
            match self.0 {
                Decode::Done => return Ok(Decoded::End(None)),
                Decode::Length(left) | Decode::Chunked(Chunk::Data(left)) => {
                    let take = left.min(buf.len() as u64);
                    let data = buf.split_to(take as usize).freeze();
                    let left = left - take;
                    self.0 = match self.0 {
                        Decode::Length(_) if left == 0 => Decode::Done,
                        Decode::Length(_) => Decode::Length(left),
                        _ if left == 0 => Decode::Chunked(Chunk::DataEnd),
                        _ => Decode::Chunked(Chunk::Data(left)),
                    };
                    return Ok(Decoded::Data(data));
                }
                Decode::Eof => return Ok(Decoded::Data(buf.split().freeze())),
                Decode::Chunked(state) => match step(state, buf)? {
                    Step::More => return Ok(Decoded::More),
                    Step::Next(next) => self.0 = Decode::Chunked(next),
                    Step::End(trailers) => {
                        self.0 = Decode::Done;
                        return Ok(Decoded::End(trailers));
                    }
                },
            }
        }
    }

    /// The connection ended: the end of a body read to the end of the connection, an error
    /// for any other that has not ended.
    pub fn eof(&mut self) -> Result<(), H1Error> {
        match self.0 {
            Decode::Eof | Decode::Done => {
                self.0 = Decode::Done;
                Ok(())
            }
            _ => Err(H1Error::BodyClosed),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.0 {
            Decode::Done => SizeHint::with_exact(0),
            Decode::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A whole response decoded from memory by the inline codec: its head, body and trailers.
#[derive(Debug)]
pub struct DecodedResponse {
    /// The status.
    pub status: StatusCode,
    /// The header fields, as the proxy passes them on.
    pub headers: HeaderMap,
    /// The body.
    pub body: Vec<u8>,
    /// The trailers of a chunked body.
    pub trailers: Option<HeaderMap>,
    /// Whether the connection could carry another request.
    pub keep_alive: bool,
}

/// Decodes the response to a request of `method` from `wire`, fed to the codec `piece`
/// bytes at a time, as the inline connection would read it (the connection ends after
/// `wire`). The fuzz target (`fuzz/fuzz_targets/http1_response.rs`) and the unit tests check
/// the codec through it.
pub fn decode_response(
    method: &Method,
    wire: &[u8],
    piece: usize,
) -> Result<DecodedResponse, H1Error> {
    let mut pieces = wire.chunks(piece.max(1));
    let mut buf = BytesMut::new();
    let parsed = loop {
        if !buf.is_empty()
            && let Some(parsed) = parse(&mut buf, method)?
        {
            break parsed;
        }
        if buf.len() >= MAX_HEAD {
            return Err(H1Error::TooLarge);
        }
        buf.extend_from_slice(pieces.next().ok_or(H1Error::Closed)?);
    };
    let mut decoder = Decoder(parsed.decode);
    let mut body = Vec::new();
    let trailers = loop {
        match decoder.decode(&mut buf)? {
            Decoded::Data(data) => body.extend_from_slice(&data),
            Decoded::End(trailers) => break trailers,
            Decoded::More => match pieces.next() {
                Some(next) => buf.extend_from_slice(next),
                None => {
                    decoder.eof()?;
                    break None;
                }
            },
        }
    };
    Ok(DecodedResponse {
        status: parsed.status,
        headers: parsed.headers,
        body,
        trailers,
        keep_alive: parsed.keep_alive && buf.is_empty() && pieces.next().is_none(),
    })
}

/// An upstream response's body read from its inline connection, which goes back to the pool
/// as the last byte is read (when the response allows it), or closes when the body is
/// dropped before its end.
pub struct ResponseBody {
    /// The connection, until the body ended.
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    /// Whether the connection may carry another request once the body is read.
    keep_alive: bool,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("decoder", &self.decoder)
            .finish()
    }
}

impl ResponseBody {
    /// The body ended: the connection goes back to this worker's pool if it can carry
    /// another request (nothing unread after the response), else closes.
    fn release(&mut self) {
        self.decoder.0 = Decode::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.keep_alive && conn.buf.is_empty() {
            let cluster = conn.cluster().clone();
            worker::put_h1(
                cluster.id,
                conn.endpoint,
                worker::Idle::Inline(conn),
                clock::now_ms(),
            );
            cluster.connection_freed.notify_one();
        }
    }

    /// Reads more from the connection into its buffer: the number of bytes read (0: the
    /// upstream closed it).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.buf.reserve(READ_CHUNK);
        let Conn { io, buf, .. } = &mut **conn;
        pin!(io.read_buf(buf)).poll(cx)
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.decoder.0 = Decode::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End(trailers)) => {
                    this.release();
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Ok(Decoded::More) => {}
                Err(e) => return this.fail(e),
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) => match this.decoder.eof() {
                    Ok(()) => {
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e),
                },
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

/// What one step of chunked framing found.
enum Step {
    /// More bytes are needed.
    More,
    /// On to this state.
    Next(Chunk),
    /// The body ended, with these trailers.
    End(Option<HeaderMap>),
}

/// One step of chunked framing over the bytes in `buf` (not empty), for the framing parts
/// that are not data.
fn step(state: Chunk, buf: &mut BytesMut) -> Result<Step, H1Error> {
    match state {
        Chunk::Size => {
            let Some(end) = memchr::memchr(b'\n', buf) else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err(H1Error::Invalid("chunk-size line too long"))
                } else {
                    Ok(Step::More)
                };
            };
            let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
            let size = chunk_size(line)?;
            buf.advance(end + 1);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::DataEnd => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
            } else if buf.starts_with(b"\n") {
                buf.advance(1);
            } else if buf[..] == *b"\r" {
                return Ok(Step::More);
            } else {
                return Err(H1Error::Invalid("chunk data not followed by CRLF"));
            }
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
                buf.advance(if buf[0] == b'\r' { 2 } else { 1 });
                return Ok(Step::End(None));
            }
            if buf[..] == *b"\r" {
                return Ok(Step::More);
            }
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for f in fields.iter() {
                        let name = HeaderName::from_bytes(f.name.as_bytes())
                            .map_err(|_| H1Error::Invalid("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(f.value)
                            .map_err(|_| H1Error::Invalid("invalid trailer value"))?;
                        trailers.append(name, value);
                    }
                    (len, trailers)
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => {
                    return Ok(Step::More);
                }
                Ok(httparse::Status::Partial) => {
                    return Err(H1Error::Invalid("trailer section too large"));
                }
                Err(e) => return Err(e.into()),
            };
            buf.advance(len);
            Ok(Step::End(Some(trailers)))
        }
        Chunk::Data(_) => Ok(Step::Next(state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, method: Method) -> Result<Option<Parsed>, H1Error> {
        parse(&mut BytesMut::from(bytes), &method)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let p = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.decode, Decode::Length(3));
        assert!(p.keep_alive);
        let p = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(p.decode, Decode::Done);
        let p = head("HTTP/1.1 204 No Content\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(p.decode, Decode::Done);
        let p = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.decode, Decode::Chunked(Chunk::Size));
        assert!(!p.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!p.keep_alive, "TE with CL: the connection closes");
        let p = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.decode, Decode::Eof);
        assert!(!p.keep_alive);
        let p = head("HTTP/1.1 200 OK\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(p.decode, Decode::Eof);
        let p = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", Method::GET)
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive, "HTTP/1.0 closes by default");
        let p = head(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(p.keep_alive);
        let p = head(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(!p.keep_alive);
        let p = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.decode, Decode::Length(5));
    }

    #[test]
    fn bad_heads_are_errors() {
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 3x\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(head(bad, Method::GET).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn informational_heads_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        );
        let p = parse(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(p.status, StatusCode::OK);
        assert!(buf.is_empty());
        let mut buf = BytesMut::from("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 O");
        assert!(parse(&mut buf, &Method::GET).unwrap().is_none());
        assert_eq!(
            &buf[..],
            b"HTTP/1.1 200 O",
            "the 1xx is consumed, the rest waits"
        );
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nx-a: 1\r\n");
        assert!(parse(&mut buf, &Method::GET).unwrap().is_none());
    }

    #[test]
    fn heads_with_many_fields_parse_whole() {
        let mut s = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..MAX_HEADERS - 1 {
            s.push_str(&format!("x-{i}: v{i}\r\n"));
        }
        s.push_str("content-length: 2\r\n\r\nok");
        let p = head(&s, Method::GET).unwrap().unwrap();
        assert_eq!(p.headers.len(), MAX_HEADERS);
        assert_eq!(p.headers["x-98"], "v98");
        assert_eq!(p.decode, Decode::Length(2));
    }

    #[test]
    fn too_many_headers_are_an_error() {
        let mut s = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            s.push_str(&format!("x-{i}: v\r\n"));
        }
        s.push_str("\r\n");
        assert!(head(&s, Method::GET).is_err());
    }

    /// Decodes a chunked response with `chunks` as its body, read every piece size: the
    /// same data and trailers whatever the size.
    fn unchunk(chunks: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let wire = [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            chunks,
        ]
        .concat();
        let whole = decode_response(&Method::GET, &wire, wire.len())?;
        for piece in 1..wire.len() {
            let got = decode_response(&Method::GET, &wire, piece)?;
            assert_eq!(got.body, whole.body, "piece {piece}");
            assert_eq!(got.trailers, whole.trailers, "piece {piece}");
        }
        Ok((whole.body, whole.trailers))
    }

    #[test]
    fn chunked_bodies_decode_however_the_bytes_arrive() {
        let (data, trailers) =
            unchunk(b"3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"abc0123456789abcdef");
        assert!(trailers.is_none());
        let (data, trailers) =
            unchunk(b"2\r\nhi\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n").unwrap();
        assert_eq!(data, b"hi");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "ok");
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        for bad in [
            &b"x\r\nabc\r\n0\r\n\r\n"[..],
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"3 4\r\nabc\r\n0\r\n\r\n",
            b"1234567890abcdef0\r\n",
            b"\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            // Cut short: no last chunk.
            b"3\r\nabc\r\n",
        ] {
            assert!(
                unchunk(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn bodies_end_where_their_framing_says() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        for piece in 1..=wire.len() {
            let got = decode_response(&Method::GET, wire, piece).unwrap();
            assert_eq!(got.body, b"hello");
            assert!(got.keep_alive);
        }
        // Bytes past the body: the connection is not reused.
        let got = decode_response(
            &Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nab",
            64,
        )
        .unwrap();
        assert_eq!(got.body, b"a");
        assert!(!got.keep_alive);
        // Read to the end of the connection.
        let got = decode_response(&Method::GET, b"HTTP/1.1 200 OK\r\n\r\nall of it", 3).unwrap();
        assert_eq!(got.body, b"all of it");
        assert!(!got.keep_alive);
        // A length the connection ends before.
        let short = decode_response(
            &Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc",
            4,
        );
        assert!(matches!(short, Err(H1Error::BodyClosed)), "{short:?}");
        // No head at all.
        let none = decode_response(&Method::GET, b"HTTP/1.1 200 OK\r\n", 4);
        assert!(matches!(none, Err(H1Error::Closed)), "{none:?}");
    }

    #[test]
    fn request_heads_are_written_as_hyper_writes_them() {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri("/a/b?c=d")
            .header("host", "svc")
            .header("x-a", "1")
            .header("x-a", "2")
            .header("transfer-encoding", "chunked")
            .body(RequestBody::empty())
            .unwrap();
        let mut out = Vec::new();
        encode(&req, &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "GET /a/b?c=d HTTP/1.1\r\nhost: svc\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
        *req.uri_mut() = "http://svc:8080/x".parse().unwrap();
        *req.version_mut() = Version::HTTP_2;
        encode(&req, &mut out);
        assert!(out.starts_with(b"GET http://svc:8080/x HTTP/1.1\r\n"));
        *req.uri_mut() = "*".parse().unwrap();
        *req.method_mut() = Method::OPTIONS;
        *req.version_mut() = Version::HTTP_10;
        encode(&req, &mut out);
        assert!(out.starts_with(b"OPTIONS * HTTP/1.0\r\n"));
    }
}
