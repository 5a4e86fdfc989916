//! Responses the proxy or a filter makes instead of an upstream response.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version};

use super::attempt::LocalText;
use super::stream::Stream;
use crate::body::ResponseBody;
use crate::filter::LocalReply;

/// A response a filter made. Its framing is the proxy's: a `content-length` or
/// `transfer-encoding` the filter set is replaced by the real body's length.
pub fn filter_reply(reply: LocalReply, stream: Box<Stream>) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(reply.body, Some(stream)));
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut().remove(header::TRANSFER_ENCODING);
    if !resp.headers().contains_key(header::CONTENT_TYPE) {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp
}

/// A response the proxy makes itself.
pub fn local_reply(
    status: StatusCode,
    text: &'static str,
    stream: Box<Stream>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::local(
        Bytes::from_static(text.as_bytes()),
        Some(stream),
    ));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// A response the proxy made for a failed attempt, with the head the filters left.
pub fn proxy_answer(
    mut head: http::response::Parts,
    stream: Box<Stream>,
) -> Response<ResponseBody> {
    let text = head.extensions.remove::<LocalText>().map_or("", |t| t.0);
    Response::from_parts(
        head,
        ResponseBody::local(Bytes::from_static(text.as_bytes()), Some(stream)),
    )
}

/// Marks an HTTP/1 response `connection: close` when the connection cannot carry another
/// request (the request body was not read to its end, or its framing cannot be trusted), so
/// the client does not reuse it.
pub fn close_connection(
    mut resp: Response<ResponseBody>,
    version: Version,
) -> Response<ResponseBody> {
    if version <= Version::HTTP_11 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Sets `content-length` for a body known whole (drops it when trailers follow, which need
/// chunked framing on HTTP/1.1).
pub fn set_body_length(headers: &mut HeaderMap, data: &Bytes, trailers: bool) {
    headers.remove(header::TRANSFER_ENCODING);
    if trailers {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    }
}
