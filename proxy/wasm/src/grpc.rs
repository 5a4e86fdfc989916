//! Filters' gRPC calls and streams (`proxy_grpc_call`, `proxy_grpc_stream`) as Envoy's
//! `envoy_grpc` client makes them: a POST of `/{service}/{method}` over HTTP/2 to a cluster
//! (`content-type: application/grpc`, `te: trailers`, `grpc-timeout`, the filter's initial
//! metadata), messages in gRPC's length-prefixed framing, the status from `grpc-status` and
//! `grpc-message` in the trailers (or in the headers of a trailers-only response).
//!
//! A unary call is a callout ([`weft_core::filter::Callout`]) answered with
//! `proxy_on_grpc_receive` (the message in buffer 5) or, when it failed,
//! `proxy_on_grpc_close` (the status through `proxy_get_status`). A stream is a task of the
//! worker ([`run_stream`]) that feeds the request body as the filter sends and delivers
//! `proxy_on_grpc_receive_initial_metadata`, `proxy_on_grpc_receive` per message,
//! `proxy_on_grpc_receive_trailing_metadata` and `proxy_on_grpc_close` to the context that
//! opened it, as they arrive.

use bytes::{Buf as _, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, request};
use http_body_util::BodyExt as _;

use weft_core::filter::CalloutOutcome;

use crate::worker;

/// gRPC status codes this host produces itself.
pub mod code {
    /// The call succeeded.
    pub const OK: u32 = 0;
    /// Unknown error (no status in the response).
    pub const UNKNOWN: u32 = 2;
    /// The deadline passed.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The response broke the protocol (a bad frame, a compressed message).
    pub const INTERNAL: u32 = 13;
    /// The cluster could not be reached.
    pub const UNAVAILABLE: u32 = 14;
}

/// Largest message a filter may receive (as Envoy's default for its gRPC client buffers).
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// What a gRPC callback reads: the message (buffer 5), the metadata (maps 4 and 5) and the
/// status (`proxy_get_status`).
#[derive(Debug, Default)]
pub struct Received {
    /// The message being delivered.
    pub message: Option<Bytes>,
    /// Initial metadata (the response headers).
    pub initial: Option<HeaderMap>,
    /// Trailing metadata (the response trailers).
    pub trailing: Option<HeaderMap>,
    /// The status of the call or stream that closed, with its message.
    pub status: Option<(u32, String)>,
}

/// One event of a gRPC call or stream, as it is delivered to the filter.
#[derive(Debug)]
pub enum Event {
    /// The response headers (`proxy_on_grpc_receive_initial_metadata`).
    Initial(HeaderMap),
    /// A message (`proxy_on_grpc_receive`).
    Message(Bytes),
    /// The trailers (`proxy_on_grpc_receive_trailing_metadata`).
    Trailing(HeaderMap),
    /// The end, with its status and message (`proxy_on_grpc_close`).
    Close(u32, String),
}

/// An open stream of a filter instance, by token in its store. Dropping it resets the
/// stream (its task is aborted).
pub struct OpenStream {
    /// The context that opened it (its events go there).
    pub context: u32,
    /// Where the filter's messages go (`None` closes its side); `None` once it closed it.
    /// Dropped without closing (a cancel), it resets the stream.
    pub tx: Option<tokio::sync::mpsc::UnboundedSender<Option<Bytes>>>,
    /// The stream's task.
    pub task: tokio::task::AbortHandle,
}

impl OpenStream {
    /// Closes the filter's side of the stream (the answers still come).
    pub fn close(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(None);
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A message in gRPC's framing: uncompressed flag, 4-byte big-endian length, the bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + message.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(message.len() as u32).to_be_bytes());
    b.extend_from_slice(message);
    b.freeze()
}

/// Splits a response body into gRPC messages as its pieces arrive.
#[derive(Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// Adds a piece of the body.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, if one is buffered; an error for a compressed message (none
    /// was asked for) or one past the size limit.
    pub fn next(&mut self) -> Result<Option<Bytes>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err("compressed gRPC message (no compression was asked for)".into());
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(format!(
                "gRPC message of {len} bytes is past the limit of {MAX_MESSAGE}"
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Whether a partial message is left.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The status in `grpc-status` and `grpc-message` of `map`, if it has one.
fn status_in(map: &HeaderMap) -> Option<(u32, String)> {
    let code = map.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let message = map
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    Some((code, message))
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2).
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if v[i] == b'%'
            && i + 2 < v.len()
            && let (Some(h), Some(l)) = (hex(v[i + 1]), hex(v[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The gRPC status for an HTTP status (gRPC's HTTP-to-status mapping, as Envoy applies it).
pub fn code_for_http(status: u16) -> u32 {
    match status {
        200 => code::OK,
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => code::UNAVAILABLE,
        _ => code::UNKNOWN,
    }
}

/// The status of a response that is not HTTP 200 (gRPC's HTTP-to-status mapping).
fn status_from_http(status: StatusCode) -> (u32, String) {
    let code = code_for_http(status.as_u16());
    (code, format!("upstream answered HTTP {}", status.as_u16()))
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, percent-encoded.
pub fn percent_encode(message: &[u8]) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The status of a transport failure (`why` from the callout or stream): the deadline (the
/// callout's own, or the cluster's request timeout) is DEADLINE_EXCEEDED, anything else
/// (connect failures, resets, no healthy endpoint, a body past the limit) UNAVAILABLE.
fn status_from_failure(why: &str) -> (u32, String) {
    let code = match why {
        weft_core::http::callout::TIMED_OUT | "upstream request timeout" => code::DEADLINE_EXCEEDED,
        _ => code::UNAVAILABLE,
    };
    (code, why.to_owned())
}

/// `grpc-timeout` for `ms` milliseconds: at most 8 digits, so long ones go in coarser units.
fn grpc_timeout(ms: u32) -> String {
    const MAX: u32 = 99_999_999;
    match ms {
        0..=MAX => format!("{ms}m"),
        _ => format!("{}S", ms.div_ceil(1000)),
    }
}

/// The request head of a call or stream to `cluster` for `service`/`method`, with the
/// filter's initial `metadata` (pseudo-headers and the headers gRPC owns are refused).
pub fn request_head(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&[u8], &[u8])],
    timeout_ms: Option<u32>,
) -> Option<request::Parts> {
    let mut req = http::Request::post(format!("/{service}/{method}"))
        .version(http::Version::HTTP_2)
        .header(http::header::HOST, HeaderValue::from_str(cluster).ok()?)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(ms) = timeout_ms {
        req = req.header("grpc-timeout", grpc_timeout(ms));
    }
    for (k, v) in metadata {
        let lower = k.to_ascii_lowercase();
        if k.starts_with(b":")
            || matches!(
                &lower[..],
                b"content-type" | b"te" | b"grpc-timeout" | b"host" | b"content-length"
            )
        {
            continue;
        }
        req = req.header(
            http::HeaderName::from_bytes(&lower).ok()?,
            HeaderValue::from_bytes(v).ok()?,
        );
    }
    Some(req.body(()).ok()?.into_parts().0)
}

/// What a unary call's outcome delivers: its message, or the status it closed with.
pub fn unary_event(outcome: CalloutOutcome) -> Event {
    let r = match outcome.response {
        Ok(r) => r,
        Err(why) => {
            let (code, message) = status_from_failure(&why);
            return Event::Close(code, message);
        }
    };
    if r.head.status != StatusCode::OK {
        let (code, message) =
            status_in(&r.head.headers).unwrap_or_else(|| status_from_http(r.head.status));
        return Event::Close(code, message);
    }
    // A trailers-only response carries its status in the headers.
    let status = r
        .trailers
        .as_ref()
        .and_then(status_in)
        .or_else(|| status_in(&r.head.headers));
    match status {
        Some((code::OK, _)) => {}
        Some((code, message)) => return Event::Close(code, message),
        None => return Event::Close(code::UNKNOWN, "the response has no grpc-status".into()),
    }
    let mut decoder = Decoder::default();
    decoder.push(&r.body);
    match decoder.next() {
        Ok(Some(message)) => Event::Message(message),
        Ok(None) => Event::Close(code::INTERNAL, "the response has no message".into()),
        Err(why) => Event::Close(code::INTERNAL, why),
    }
}

/// Runs a filter's gRPC stream on the worker: sends `head` to `cluster` with the messages
/// the filter sends on the body channel, and delivers what arrives to the stream's context in
/// the instance of generation `generation` in slot `n`, within `ticks` per callback. Ends
/// with `proxy_on_grpc_close`; stops at once when the filter cancels the stream or the
/// instance or context is gone (dropping the exchange resets it).
pub async fn run_stream(
    n: usize,
    generation: u64,
    token: u32,
    cluster: String,
    head: request::Parts,
    body: tokio::sync::mpsc::UnboundedReceiver<Option<Bytes>>,
    ticks: u64,
) {
    let deliver = |event: Event| deliver(n, generation, token, event, ticks);
    let mut streaming =
        match weft_core::http::callout::open_on_worker(&cluster, head, body, None).await {
            Ok(s) => s,
            Err(why) => {
                let (code, message) = status_from_failure(&why);
                deliver(Event::Close(code, message));
                return;
            }
        };
    if streaming.head.status != StatusCode::OK || status_in(&streaming.head.headers).is_some() {
        // Refused, or a trailers-only answer: the status is all there is.
        let (code, message) = status_in(&streaming.head.headers)
            .unwrap_or_else(|| status_from_http(streaming.head.status));
        streaming.finish(true);
        deliver(Event::Close(code, message));
        return;
    }
    if !deliver(Event::Initial(std::mem::take(&mut streaming.head.headers))) {
        return;
    }
    let mut decoder = Decoder::default();
    let mut trailers = None;
    loop {
        match streaming.body.frame().await {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    decoder.push(&data);
                    loop {
                        match decoder.next() {
                            Ok(Some(message)) => {
                                if !deliver(Event::Message(message)) {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(why) => {
                                deliver(Event::Close(code::INTERNAL, why));
                                return;
                            }
                        }
                    }
                }
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    break;
                }
            },
            Some(Err(e)) => {
                deliver(Event::Close(
                    code::UNAVAILABLE,
                    format!("stream reset: {e}"),
                ));
                return;
            }
            None => break,
        }
    }
    streaming.finish(true);
    let status = trailers.as_ref().and_then(status_in);
    if let Some(t) = trailers
        && !deliver(Event::Trailing(t))
    {
        return;
    }
    let (code, message) = match status {
        _ if !decoder.is_empty() => (code::INTERNAL, "the stream ended inside a message".into()),
        Some(s) => s,
        None => (code::UNKNOWN, "the stream ended with no grpc-status".into()),
    };
    deliver(Event::Close(code, message));
}

/// Delivers `event` of stream `token` to its instance; false when the stream is no longer
/// wanted (cancelled, its context or instance gone) or it closed.
fn deliver(n: usize, generation: u64, token: u32, event: Event, ticks: u64) -> bool {
    let mut open = false;
    let mut callouts = Vec::new();
    worker::with_live_slot(n, Some(generation), |instance, _| {
        let result = instance.grpc_stream_event(ticks, token, event);
        callouts = instance.take_callouts();
        open = matches!(result, Ok(true));
        result.map(|_| ())
    });
    crate::ticks::send_detached_callouts(n, generation, callouts, ticks);
    open
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_framed_and_split_as_pieces_arrive() {
        let mut d = Decoder::default();
        let mut wire = frame(b"hello").to_vec();
        wire.extend_from_slice(&frame(b""));
        wire.extend_from_slice(&frame(b"world"));
        d.push(&wire[..3]);
        assert_eq!(d.next(), Ok(None));
        d.push(&wire[3..12]);
        assert_eq!(d.next(), Ok(Some(Bytes::from_static(b"hello"))));
        assert_eq!(d.next(), Ok(None), "the empty message is not whole yet");
        d.push(&wire[12..]);
        assert_eq!(d.next(), Ok(Some(Bytes::new())));
        assert_eq!(d.next(), Ok(Some(Bytes::from_static(b"world"))));
        assert!(d.is_empty());
        d.push(&[1, 0, 0, 0, 0]);
        assert!(d.next().is_err(), "a compressed message is refused");
    }

    #[test]
    fn statuses_come_from_trailers_headers_or_http() {
        let mut m = HeaderMap::new();
        m.insert("grpc-status", HeaderValue::from_static("7"));
        m.insert(
            "grpc-message",
            HeaderValue::from_static("no%20way%3A%20denied"),
        );
        assert_eq!(status_in(&m), Some((7, "no way: denied".into())));
        assert_eq!(status_from_http(StatusCode::SERVICE_UNAVAILABLE).0, 14);
        assert_eq!(status_from_http(StatusCode::UNAUTHORIZED).0, 16);
        assert_eq!(status_from_failure("callout timed out").0, 4);
        assert_eq!(
            status_from_failure("upstream connect error: connection timed out").0,
            14
        );
        assert_eq!(grpc_timeout(250), "250m");
        assert_eq!(grpc_timeout(u32::MAX), "4294968S");
        assert_eq!(percent_decode(b"100%"), "100%");
        let message = "denied: 100% no\n".as_bytes();
        assert_eq!(percent_encode(message), "denied: 100%25 no%0A");
        assert_eq!(
            percent_decode(percent_encode(message).as_bytes()).as_bytes(),
            message
        );
    }

    #[test]
    fn request_heads_keep_grpcs_own_headers() {
        let head = request_head(
            "auth",
            "pkg.Svc",
            "Check",
            &[
                (b"Authorization", b"Bearer x"),
                (b"te", b"no"),
                (b":path", b"/x"),
            ],
            Some(250),
        )
        .unwrap();
        assert_eq!(head.uri, "/pkg.Svc/Check");
        assert_eq!(head.method, http::Method::POST);
        assert_eq!(head.headers["te"], "trailers");
        assert_eq!(head.headers["grpc-timeout"], "250m");
        assert_eq!(head.headers["authorization"], "Bearer x");
        assert_eq!(head.headers["host"], "auth");
    }
}
