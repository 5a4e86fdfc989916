//! Header rewriting done by the proxy itself: hop-by-hop headers, `x-forwarded-*`,
//! `x-request-id`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `keep-alive`.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `proxy-connection`.
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `connection` and every header it names,
/// `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` unless it is
/// exactly `trailers` (gRPC needs that one end to end). When `upgrade` is true the
/// `upgrade` header and `connection: upgrade` are kept, for protocol upgrades such as
/// WebSocket.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of these: one pass over the names (standard names compare as
    // enum tags) is cheaper than a hashed removal per name.
    if !upgrade
        && !headers
            .iter()
            .any(|(name, value)| is_hop_by_hop(name, value))
    {
        return;
    }
    if let Some(conn) = headers.remove(header::CONNECTION) {
        // Names listed in Connection are hop-by-hop too.
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.remove(name);
                }
            }
        }
        // Other Connection values are dropped with their header; `conn` itself is gone.
        drop(conn);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if let Some(te) = headers.get(header::TE)
        && te.as_bytes() != b"trailers"
    {
        headers.remove(header::TE);
    }
}

/// Whether [`strip_hop_by_hop`] has anything to do for this header: a hop-by-hop name, or
/// `te` other than `trailers`. (Names listed in `connection` need a `connection` header.)
fn is_hop_by_hop(name: &HeaderName, value: &HeaderValue) -> bool {
    if name == header::TE {
        return value.as_bytes() != b"trailers";
    }
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether a request asks for a protocol upgrade (`connection: upgrade` + `upgrade: x`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The peer address as a header value; made once per connection.
pub fn ip_header_value(peer: IpAddr) -> HeaderValue {
    // An IP address always formats to a valid header value.
    HeaderValue::from_str(&peer.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Appends the downstream peer's address (`peer`, from [`ip_header_value`]) to
/// `x-forwarded-for` and sets `x-forwarded-proto`, as Envoy does for a proxy that uses the
/// remote address.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &HeaderValue, proto: &'static str) {
    let value = match headers.get(&X_FORWARDED_FOR) {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(peer.clone()),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// Keeps a non-empty `x-request-id`, or sets a new random (v4) UUID. Returns the id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID)
        && !id.is_empty()
    {
        return id.clone();
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    let id = HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// The authority a request names: its URI's (HTTP/2, absolute form), else its `host`
/// header; empty when neither.
pub fn request_authority(head: &http::request::Parts) -> &str {
    head.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| head.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-kept"]);
    }

    #[test]
    fn ordinary_heads_are_left_as_they_are_and_lone_hop_by_hop_headers_still_go() {
        let pairs = [
            ("host", "a"),
            ("te", "trailers"),
            ("accept", "*/*"),
            ("x-connection", "not hop-by-hop"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&pairs));

        for lone in [
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = map(&[("host", "a"), (lone, "x")]);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h, map(&[("host", "a")]), "{lone}");
        }
        let mut h = map(&[("host", "a"), ("te", "gzip")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&[("host", "a")]));
    }

    #[test]
    fn te_trailers_and_upgrades_survive_when_they_should() {
        let mut h = map(&[("te", "trailers"), ("content-type", "application/grpc")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").unwrap(), "trailers");

        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn forwarded_for_appends_and_request_id_is_kept_or_made() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        set_forwarded(
            &mut h,
            &ip_header_value("127.0.0.1".parse().unwrap()),
            "http",
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");

        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &ip_header_value("::1".parse().unwrap()), "http");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "::1");

        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h.get("x-request-id").unwrap(), &id);
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id);
    }
}
