//! The inline HTTP/1.1 server codec: a downstream connection's requests read, parsed with
//! `httparse` and answered by the connection's own task, without hyper's server, for as long
//! as every request is one it serves whole: HTTP/1.1 with no body (no `content-length`, no
//! `transfer-encoding`), no `expect`, no `upgrade`, no `te`, not `CONNECT`, a head that
//! parses with at most [`FIELDS`] fields. That is nearly every mesh request and every
//! benchmark request.
//!
//! At the first request it does not serve — or at anything it cannot parse — it hands the
//! connection to hyper's server for the rest of its life ([`Outcome::Handoff`]) with the
//! bytes read and not consumed, from that request's head on. hyper and the framing scanner
//! then see that head as the connection's first, so every refusal of malformed or ambiguous
//! framing (400, 431, 414, a bad chunk size, `content-length` beside `transfer-encoding`)
//! is exactly hyper's and the scanner's, as before this codec existed: this module refuses
//! nothing itself.
//!
//! What it does as hyper's server did: the request-headers timeout ([`HeadClock`]); a
//! client that closes its connection while its request is in flight cancels the request
//! (hyper's behaviour without half-close); the response is framed by hyper's rules
//! (`content-length` kept or computed from a body of known size, chunked when the size is
//! unknown, no body for `HEAD`, 204 and 304), gets a `date` when it has none, and says
//! `connection: close` when the connection will not carry another request; the head and a
//! body ready at once go out in one write.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use super::head_clock::HeadClock;
use crate::body::{DownstreamBody, ResponseBody};
use crate::http::{self as proxy, ConnShared};
use crate::tls::Stream;

/// Header fields a head may have to be served inline; one with more goes to hyper (which
/// takes up to the listener's `max_request_headers`).
pub const FIELDS: usize = 32;
/// hyper's longest request target: a longer one goes to hyper (which answers 414).
const MAX_URI: usize = u16::MAX as usize - 1;
/// Bytes read at a time.
const READ_CHUNK: usize = 4 * 1024;
/// Body bytes copied beside the head into one write; a larger piece is written on its own.
const COALESCE: usize = 16 * 1024;

/// What the serve loop tells a connection served inline.
#[derive(Default)]
pub struct Signals {
    /// The connection closes after the exchange in flight (or now, between requests): the
    /// proxy drains, the request cap was reached, or it idled out.
    closing: AtomicBool,
}

impl Signals {
    /// Closes the connection gracefully, as hyper's `graceful_shutdown`.
    pub fn close(&self) {
        self.closing.store(true, Relaxed);
    }

    fn closing(&self) -> bool {
        self.closing.load(Relaxed)
    }
}

/// How a connection served inline ended.
pub enum Outcome {
    /// It is closed.
    Closed,
    /// hyper's server takes it from here: `prefix` is what was read and not consumed (the
    /// head of the request this codec does not serve, and anything after it), `head_started`
    /// when that head's first byte arrived (for the request-headers timeout).
    Handoff {
        /// The connection.
        io: Stream,
        /// Read and not consumed.
        prefix: Bytes,
        /// When the pending head started.
        head_started: Instant,
    },
}

/// The listener's limits the codec needs.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Largest request head, in bytes (`max_request_header_bytes`).
    pub max_head: usize,
    /// Most header fields a head may have (`max_request_headers`): one with more goes to
    /// hyper, which answers 431.
    pub max_headers: usize,
    /// The request-headers timeout, if on.
    pub headers_timeout: Option<Duration>,
}

/// Serves HTTP/1.1 on `io` until the connection ends or a request needs hyper.
pub async fn serve(
    mut io: Stream,
    shared: Arc<ConnShared>,
    limits: Limits,
    accepted: Instant,
    signals: &Signals,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = Vec::with_capacity(1024);
    let mut clock = limits
        .headers_timeout
        .map(|limit| HeadClock::new(limit, accepted, false));
    // When the head being read started, for hyper's clock at a hand-off: what this clock's
    // deadline says (the first head: from the accept; a later one: from when it was first
    // seen incomplete), else now (a head that arrived whole). No clock read per request.
    let head_started = |clock: &Option<HeadClock>| {
        clock
            .as_ref()
            .zip(limits.headers_timeout)
            .and_then(|(c, limit)| c.deadline()?.checked_sub(limit))
            .unwrap_or_else(Instant::now)
    };
    loop {
        // A whole head, or the reason there is none.
        let (req, keep_alive) = loop {
            if !buf.is_empty() {
                match parse(&mut buf, limits) {
                    Parse::Request(req, keep_alive) => break (req, keep_alive),
                    Parse::Partial if buf.len() < limits.max_head => {
                        if let Some(clock) = clock.as_mut()
                            && clock.head_pending().is_err()
                        {
                            shared.listener.metrics.request_headers_timeouts.inc();
                            return Outcome::Closed;
                        }
                    }
                    Parse::Partial | Parse::Handoff => {
                        return Outcome::Handoff {
                            head_started: head_started(&clock),
                            io,
                            prefix: buf.freeze(),
                        };
                    }
                }
            }
            match read_head_bytes(&mut io, &mut buf, clock.as_mut(), signals).await {
                HeadRead::Bytes => {}
                HeadRead::TimedOut => {
                    shared.listener.metrics.request_headers_timeouts.inc();
                    return Outcome::Closed;
                }
                HeadRead::Closed => return Outcome::Closed,
            }
        };
        if let Some(clock) = clock.as_mut() {
            clock.head_done();
        }
        let method = req.method().clone();
        let served = {
            let answer = proxy::handle(shared.clone(), req);
            let answer = pin!(answer);
            await_answer(&mut io, &mut buf, answer).await
        };
        let Some(Ok(resp)) = served else {
            // The client left (the request is cancelled), or a filter reset the stream:
            // HTTP/1.1 closes instead of answering.
            return Outcome::Closed;
        };
        let keep_alive = keep_alive && !signals.closing();
        match write_response(&mut io, (&mut buf, &mut wbuf), resp, &method, keep_alive).await {
            Ok(true) if !signals.closing() => {}
            Ok(_) => {
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
            Err(e) => {
                tracing::debug!(peer = %shared.peer, "response write failed: {e}");
                return Outcome::Closed;
            }
        }
        if wbuf.capacity() > 64 * 1024 {
            wbuf = Vec::with_capacity(1024);
        }
    }
}

/// What waiting for head bytes came to.
enum HeadRead {
    /// More bytes are in the buffer.
    Bytes,
    /// The head under way ran out of time.
    TimedOut,
    /// The client closed the connection (or it failed), or it closes between requests.
    Closed,
}

/// Reads more of a head into `buf`, under the request-headers timeout. With no whole head
/// read, a graceful close ends the connection at once (as hyper's, whatever part of a head
/// it holds).
async fn read_head_bytes(
    io: &mut Stream,
    buf: &mut BytesMut,
    mut clock: Option<&mut HeadClock>,
    signals: &Signals,
) -> HeadRead {
    make_room(buf);
    poll_fn(|cx| {
        if signals.closing() {
            return Poll::Ready(HeadRead::Closed);
        }
        match pin!(io.read_buf(&mut *buf)).poll(cx) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(HeadRead::Closed),
            Poll::Ready(Ok(_)) => Poll::Ready(HeadRead::Bytes),
            Poll::Pending => match clock.as_deref_mut().map(|c| c.poll_expired(cx)) {
                Some(Poll::Ready(_)) => Poll::Ready(HeadRead::TimedOut),
                _ => Poll::Pending,
            },
        }
    })
    .await
}

/// Room to read into: the buffer's allocation is shared with the heads of earlier requests
/// (their fields are slices of it), so a new one is made only when little is left.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(READ_CHUNK);
    }
}

/// Waits for the request's answer while watching the connection: a client that closes it
/// (or whose connection fails) cancels the request (`None`). Bytes it sends meanwhile
/// (a pipelined request) are kept for later; once some are, the connection is not read
/// again until they are consumed, as hyper does.
async fn await_answer<F>(
    io: &mut Stream,
    buf: &mut BytesMut,
    mut answer: Pin<&mut F>,
) -> Option<F::Output>
where
    F: Future,
{
    poll_fn(|cx| {
        if let Poll::Ready(out) = answer.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if buf.is_empty() {
            make_room(buf);
            match pin!(io.read_buf(&mut *buf)).poll(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Ready(Ok(_)) | Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await
}

/// A parse of the buffer's head.
#[allow(clippy::large_enum_variant)] // made once a request and taken apart at once
enum Parse {
    /// A request served inline, and whether its client keeps the connection alive. Its head
    /// is consumed from the buffer.
    Request(Request<DownstreamBody>, bool),
    /// More bytes are needed.
    Partial,
    /// hyper serves it (the buffer is as it was).
    Handoff,
}

/// Parses the request head at the start of `buf`.
fn parse(buf: &mut BytesMut, limits: Limits) -> Parse {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; FIELDS];
    // Where each field's name and value are in the head.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); FIELDS];
    let (len, method, target, count) = {
        let mut req = httparse::Request::new(&mut []);
        let base = buf.as_ptr() as usize;
        match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Partial) => return Parse::Partial,
            Err(_) => return Parse::Handoff,
            Ok(httparse::Status::Complete(len)) => {
                if req.version != Some(1) {
                    return Parse::Handoff; // HTTP/1.0: hyper's keep-alive rules
                }
                let (Some(method), Some(path)) = (req.method, req.path) else {
                    return Parse::Handoff;
                };
                let method = match method {
                    "GET" => Method::GET,
                    "HEAD" => Method::HEAD,
                    "DELETE" => Method::DELETE,
                    "OPTIONS" => Method::OPTIONS,
                    "CONNECT" => return Parse::Handoff,
                    other => match Method::from_bytes(other.as_bytes()) {
                        Ok(m) => m,
                        Err(_) => return Parse::Handoff,
                    },
                };
                if path.len() > MAX_URI {
                    return Parse::Handoff;
                }
                let p0 = path.as_ptr() as usize - base;
                crate::upstream::h1::field_spans(base, req.headers, &mut spans);
                (len, method, (p0, p0 + path.len()), req.headers.len())
            }
        }
    };
    if len > limits.max_head || count > limits.max_headers {
        return Parse::Handoff;
    }
    // Only fields this codec leaves to hyper, checked on the raw bytes before anything is
    // built (so that a hand-off finds the buffer as it was).
    for &(n0, n1, _, _) in &spans[..count] {
        let name = &buf[n0 as usize..n1 as usize];
        if [
            &b"content-length"[..],
            b"transfer-encoding",
            b"expect",
            b"upgrade",
            b"te",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        {
            return Parse::Handoff;
        }
    }
    let head = buf.split_to(len).freeze();
    match build(&head, method, target, &spans[..count]) {
        Some((req, keep_alive)) => Parse::Request(req, keep_alive),
        None => {
            // Something hyper refuses (with the answer it gives): give the head back.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Parse::Handoff
        }
    }
}

/// How many fields the proxy may add to a request before it goes upstream.
const ADDED_FIELDS: usize = 4;

/// The request of a head parsed whole, and whether its client keeps the connection alive;
/// `None` for what hyper refuses (a target or field that is not valid).
fn build(
    head: &Bytes,
    method: Method,
    (t0, t1): (usize, usize),
    spans: &[(u32, u32, u32, u32)],
) -> Option<(Request<DownstreamBody>, bool)> {
    let uri = Uri::from_maybe_shared(head.slice(t0..t1)).ok()?;
    // Room for the fields the proxy adds on the way upstream (`x-forwarded-for`,
    // `x-forwarded-proto`, `x-request-id`, `x-weft-attempt`): a map filled to its capacity
    // grows (rehashes into a new allocation) at the next insert.
    let mut headers = HeaderMap::with_capacity(spans.len() + ADDED_FIELDS);
    let mut keep_alive = true;
    for &(n0, n1, v0, v1) in spans {
        let name = HeaderName::from_bytes(&head[n0 as usize..n1 as usize]).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize)).ok()?;
        if name == header::CONNECTION {
            if has_token(&value, b"close") {
                keep_alive = false;
            }
            // Hop-by-hop, and names no other field: noted, and left out of the head as the
            // proxy's stripping would leave it.
            if crate::http::headers::persistence_only(&value) {
                continue;
            }
        }
        headers.append(name, value);
    }
    let mut req = Request::new(DownstreamBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some((req, keep_alive))
}

/// Whether a comma-separated field value lists `token` (case-insensitively).
fn has_token(value: &HeaderValue, token: &[u8]) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (0: no body is written, whatever the body holds).
    Length(u64),
    /// Chunked.
    Chunked,
}

/// Writes `resp` (to a request of `method`); `Ok(true)` when the connection can carry another
/// request. While it waits for the body, the connection is read as in [`await_answer`]: a
/// client that leaves ends the response (and drops the upstream's body) at once.
async fn write_response(
    io: &mut Stream,
    (buf, wbuf): (&mut BytesMut, &mut Vec<u8>),
    resp: Response<ResponseBody>,
    method: &Method,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    wbuf.clear();
    if parts.status.is_informational() && parts.status != StatusCode::SWITCHING_PROTOCOLS {
        // Not a final response: hyper's server answers 500 and closes instead.
        wbuf.extend_from_slice(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\ndate: ",
        );
        wbuf.extend_from_slice(&http_date());
        wbuf.extend_from_slice(b"\r\n\r\n");
        write_out(io, wbuf, None).await?;
        return Ok(false);
    }
    let ended = body.is_end_stream();
    let known = if ended {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let (framing, keep_alive) = encode_head(&parts, method, (known, ended), keep_alive, wbuf);
    drop(parts);
    let mut left = match framing {
        Framing::Length(0) => {
            // Nothing to send of the body: it is not read (as hyper does).
            drop(body);
            write_out(io, wbuf, None).await?;
            return Ok(keep_alive);
        }
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    loop {
        // A frame ready now goes out with what is buffered; otherwise that is sent first.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                write_out(io, wbuf, None).await?;
                poll_fn(|cx| {
                    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        return Poll::Ready(Ok(frame));
                    }
                    if buf.is_empty() {
                        make_room(buf);
                        if let Poll::Ready(Ok(0) | Err(_)) = pin!(io.read_buf(&mut *buf)).poll(cx) {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "the client closed the connection during the response",
                            )));
                        }
                    }
                    Poll::Pending
                })
                .await?
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: HTTP/1.1 sends none here (the request did not ask with `te`).
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        let mut data = data;
        if let Some(left) = left.as_mut() {
            // More than the length said: clipped to it, as hyper does.
            if data.len() as u64 > *left {
                data.truncate(*left as usize);
            }
            *left -= data.len() as u64;
        } else {
            push_hex(wbuf, data.len());
            wbuf.extend_from_slice(b"\r\n");
        }
        if wbuf.len() + data.len() <= COALESCE {
            wbuf.extend_from_slice(&data);
        } else {
            write_out(io, wbuf, Some(&data)).await?;
        }
        if left.is_none() {
            wbuf.extend_from_slice(b"\r\n");
        }
        if left == Some(0) || body.is_end_stream() {
            break;
        }
    }
    match left {
        None => wbuf.extend_from_slice(b"0\r\n\r\n"),
        Some(0) => {}
        Some(_) => {
            write_out(io, wbuf, None).await?;
            return Err(io::Error::other(
                "response body shorter than its content-length",
            ));
        }
    }
    drop(body);
    write_out(io, wbuf, None).await?;
    Ok(keep_alive)
}

/// Appends `n` in lower-case hex (a chunk size).
fn push_hex(dst: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        dst.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

/// Writes `wbuf` (emptied) and then `data`, and flushes.
async fn write_out(io: &mut Stream, wbuf: &mut Vec<u8>, data: Option<&Bytes>) -> io::Result<()> {
    if !wbuf.is_empty() {
        io.write_all(wbuf).await?;
        wbuf.clear();
    }
    if let Some(data) = data {
        io.write_all(data).await?;
    }
    io.flush().await
}

/// Encodes the response head into `dst` as hyper's server does, and returns the body's
/// framing and whether the connection stays open after it. `known`: the body's exact size,
/// if known; `ended`: the body has ended already (nothing will be read of it).
fn encode_head(
    parts: &http::response::Parts,
    method: &Method,
    (known, ended): (Option<u64>, bool),
    keep_alive: bool,
    dst: &mut Vec<u8>,
) -> (Framing, bool) {
    let status = parts.status;
    let head = *method == Method::HEAD;
    let no_content = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        || status.is_informational();
    // May a body (and chunked framing) follow? (hyper's `can_have_body`.)
    let can_body = !head && !no_content;
    let mut keep_alive = keep_alive && status != StatusCode::SWITCHING_PROTOCOLS;
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        match reason {
            Some(r) => dst.extend_from_slice(r.as_bytes()),
            None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        dst.extend_from_slice(b"\r\n");
    }
    let chunked = can_body && parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut framing = chunked.then_some(Framing::Chunked);
    let mut last_coding_chunked = false;
    let mut date = false;
    let mut close_said = false;
    for (name, value) in &parts.headers {
        if *name == header::TRANSFER_ENCODING {
            if !chunked {
                continue; // no body follows: no framing either
            }
            last_coding_chunked = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if *name == header::CONTENT_LENGTH {
            if chunked || (ended && !head) || no_content {
                // transfer-encoding wins; an ended body is said below; 204 and 304 have none.
                continue;
            }
            if framing.is_some() {
                continue; // one length only
            }
            let len = if head {
                Some(0)
            } else {
                known.or_else(|| parse_decimal(value.as_bytes()))
            };
            let Some(len) = len else {
                continue; // not a length: the body's own framing below
            };
            framing = Some(Framing::Length(len));
        } else if *name == header::CONNECTION {
            if has_token(value, b"close") {
                keep_alive = false;
                close_said = true;
            }
        } else if *name == header::DATE {
            date = true;
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    if chunked && !last_coding_chunked {
        dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    let framing = match framing {
        Some(f) => f,
        None => match known {
            Some(n) if !no_content && (n > 0 || !head) => {
                dst.extend_from_slice(b"content-length: ");
                dst.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                dst.extend_from_slice(b"\r\n");
                Framing::Length(if can_body { n } else { 0 })
            }
            Some(_) => Framing::Length(0),
            None if can_body => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            None => Framing::Length(0),
        },
    };
    if !keep_alive && !close_said {
        dst.extend_from_slice(b"connection: close\r\n");
    }
    if !date {
        dst.extend_from_slice(b"date: ");
        dst.extend_from_slice(&http_date());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// A `content-length` value: one decimal number (a list of equal ones was refused or
/// collapsed before it got here).
fn parse_decimal(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The current time as an HTTP date, formatted once a second per thread.
fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let (at, text) = c.get();
        if at == secs && secs != 0 {
            return text;
        }
        let mut out = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        let n = formatted.len().min(29);
        out[..n].copy_from_slice(&formatted.as_bytes()[..n]);
        c.set((secs, out));
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 8192,
        max_headers: 100,
        headers_timeout: None,
    };

    fn parsed(bytes: &str) -> (Parse, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let p = parse(&mut buf, LIMITS);
        (p, buf)
    }

    #[test]
    fn a_bodiless_request_is_served_inline_and_its_head_consumed() {
        let (p, rest) = parsed("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\nGET /next");
        let Parse::Request(req, keep_alive) = p else {
            panic!("not served inline")
        };
        assert!(keep_alive);
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(req.headers()["x-y"], "z");
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn connection_close_is_noted() {
        let (p, _) = parsed("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(matches!(p, Parse::Request(_, false)));
    }

    #[test]
    fn what_hyper_serves_is_handed_off_with_the_buffer_untouched() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nTE: trailers\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
            "G@T / HTTP/1.1\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
        ] {
            let (p, rest) = parsed(head);
            assert!(matches!(p, Parse::Handoff), "{head:?} not handed off");
            assert_eq!(&rest[..], head.as_bytes(), "{head:?}: the buffer changed");
        }
        let many: String = (0..FIELDS + 1).map(|i| format!("x-{i}: v\r\n")).collect();
        let head = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parsed(&head).0, Parse::Handoff));
        // More fields than the listener allows: hyper answers 431.
        let few = Limits {
            max_headers: 2,
            ..LIMITS
        };
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n");
        assert!(matches!(parse(&mut buf, few), Parse::Handoff));
        let mut buf = BytesMut::from("GET / HTTP/1.1\r\na: 1\r\nb: 2\r\n\r\n");
        assert!(matches!(parse(&mut buf, few), Parse::Request(..)));
    }

    #[test]
    fn a_partial_head_waits_and_an_oversized_one_goes_to_hyper() {
        assert!(matches!(
            parsed("GET / HTTP/1.1\r\nHost: x\r\n").0,
            Parse::Partial
        ));
        let mut buf =
            BytesMut::from(format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000)).as_str());
        assert!(matches!(parse(&mut buf, LIMITS), Parse::Handoff));
    }

    fn head_of(
        resp: Response<()>,
        method: Method,
        known: Option<u64>,
        keep_alive: bool,
    ) -> (String, Framing, bool) {
        let (parts, ()) = resp.into_parts();
        let mut dst = Vec::new();
        let ended = known == Some(0);
        let (framing, keep) = encode_head(&parts, &method, (known, ended), keep_alive, &mut dst);
        let text = String::from_utf8(dst).unwrap();
        (text, framing, keep)
    }

    #[test]
    fn response_framing_follows_hypers_rules() {
        let ok = || Response::builder().header("date", "d").body(()).unwrap();
        let (h, f, k) = head_of(ok(), Method::GET, Some(3), true);
        assert_eq!(h, "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 3\r\n\r\n");
        assert_eq!((f, k), (Framing::Length(3), true));
        let (h, f, _) = head_of(ok(), Method::GET, None, true);
        assert!(h.ends_with("transfer-encoding: chunked\r\n\r\n"), "{h}");
        assert_eq!(f, Framing::Chunked);
        let (h, f, _) = head_of(ok(), Method::GET, Some(0), true);
        assert!(h.contains("content-length: 0\r\n"), "{h}");
        assert_eq!(f, Framing::Length(0));
        // HEAD: the upstream's length is kept, nothing follows.
        let head = Response::builder()
            .header("content-length", "42")
            .header("date", "d")
            .body(())
            .unwrap();
        let (h, f, _) = head_of(head, Method::HEAD, Some(0), true);
        assert!(h.contains("content-length: 42\r\n"), "{h}");
        assert_eq!(f, Framing::Length(0));
        // 204: no length.
        let nc = Response::builder()
            .status(204)
            .header("date", "d")
            .body(())
            .unwrap();
        let (h, f, _) = head_of(nc, Method::GET, Some(0), true);
        assert_eq!(h, "HTTP/1.1 204 No Content\r\ndate: d\r\n\r\n");
        assert_eq!(f, Framing::Length(0));
        // Closing: said once; a date added.
        let (h, _, k) = head_of(Response::new(()), Method::GET, Some(0), false);
        assert!(
            h.contains("connection: close\r\n") && h.contains("date: "),
            "{h}"
        );
        assert!(!k);
        let closing = Response::builder()
            .header("connection", "close")
            .body(())
            .unwrap();
        let (h, _, k) = head_of(closing, Method::GET, Some(0), true);
        assert_eq!(h.matches("connection").count(), 1, "{h}");
        assert!(!k);
        // A declared length wins over an unknown size; transfer-encoding over a length.
        let cl = Response::builder()
            .header("content-length", "5")
            .body(())
            .unwrap();
        assert_eq!(head_of(cl, Method::GET, None, true).1, Framing::Length(5));
        let both = Response::builder()
            .header("content-length", "5")
            .header("transfer-encoding", "gzip, chunked")
            .body(())
            .unwrap();
        let (h, f, _) = head_of(both, Method::GET, None, true);
        assert!(!h.contains("content-length"), "{h}");
        assert!(h.contains("transfer-encoding: gzip, chunked\r\n"), "{h}");
        assert_eq!(h.matches("transfer-encoding").count(), 1, "{h}");
        assert_eq!(f, Framing::Chunked);
        let gz = Response::builder()
            .header("transfer-encoding", "gzip")
            .body(())
            .unwrap();
        let (h, _, _) = head_of(gz, Method::GET, None, true);
        assert!(
            h.contains("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n"),
            "{h}"
        );
        // An ended body with a stale length: the length is the body's.
        let stale = Response::builder()
            .header("content-length", "5")
            .body(())
            .unwrap();
        let (h, f, _) = head_of(stale, Method::GET, Some(0), true);
        assert!(
            h.contains("content-length: 0\r\n") && !h.contains(": 5"),
            "{h}"
        );
        assert_eq!(f, Framing::Length(0));
    }

    #[test]
    fn the_date_is_an_http_date() {
        let d = http_date();
        let s = std::str::from_utf8(&d).unwrap();
        assert!(httpdate::parse_http_date(s).is_ok(), "{s}");
    }
}
