//! Header rewriting done by the proxy itself: hop-by-hop headers, `x-forwarded-*`,
//! `x-request-id`.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};

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
    HopByHop::scan(headers).strip(headers, upgrade);
}

/// Whether a request asks for a protocol upgrade (`connection: upgrade` + `upgrade: x`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    HopByHop::scan(headers).wants_upgrade(headers)
}

/// Which hop-by-hop headers a head carries, found in one pass over its names (standard
/// names compare as enum tags): most heads carry none, or only `connection: keep-alive`,
/// and then [`HopByHop::strip`] removes just what is there instead of making a hashed
/// lookup per hop-by-hop name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopByHop(u8);

impl HopByHop {
    const CONNECTION: u8 = 1;
    const KEEP_ALIVE: u8 = 1 << 1;
    const PROXY_CONNECTION: u8 = 1 << 2;
    const TRANSFER_ENCODING: u8 = 1 << 3;
    const UPGRADE: u8 = 1 << 4;
    /// A `te` other than exactly `trailers`.
    const TE: u8 = 1 << 5;
    /// Any `te` (not hop-by-hop when it is exactly `trailers`).
    const ANY_TE: u8 = 1 << 6;
    /// An `expect` (not hop-by-hop, but the proxy answers `100-continue` itself).
    const EXPECT: u8 = 1 << 7;

    /// Scans `headers` once.
    pub fn scan(headers: &HeaderMap) -> Self {
        let mut found = 0;
        for (name, value) in headers {
            found |= if name == header::CONNECTION {
                Self::CONNECTION
            } else if name == header::TRANSFER_ENCODING {
                Self::TRANSFER_ENCODING
            } else if name == header::UPGRADE {
                Self::UPGRADE
            } else if name == header::TE {
                if value.as_bytes() == b"trailers" {
                    Self::ANY_TE
                } else {
                    Self::TE | Self::ANY_TE
                }
            } else if name == header::EXPECT {
                Self::EXPECT
            } else if name == KEEP_ALIVE {
                Self::KEEP_ALIVE
            } else if name == PROXY_CONNECTION {
                Self::PROXY_CONNECTION
            } else {
                0
            };
        }
        Self(found)
    }

    /// Whether the head (the one scanned) asks for a protocol upgrade: an `upgrade` header
    /// and `upgrade` among the `connection` options.
    pub fn wants_upgrade(self, headers: &HeaderMap) -> bool {
        self.0 & (Self::UPGRADE | Self::CONNECTION) == Self::UPGRADE | Self::CONNECTION
            && headers
                .get_all(header::CONNECTION)
                .iter()
                .any(|v| connection_options(v).any(|t| t.eq_ignore_ascii_case("upgrade")))
    }

    /// Whether the head has a `te` header.
    pub fn has_te(self) -> bool {
        self.0 & Self::ANY_TE != 0
    }

    /// Whether the head has an `expect` header.
    pub fn has_expect(self) -> bool {
        self.0 & Self::EXPECT != 0
    }

    /// Removes the hop-by-hop headers of the head scanned, as [`strip_hop_by_hop`] says.
    pub fn strip(self, headers: &mut HeaderMap, upgrade: bool) {
        let found = self.0 & !(Self::ANY_TE | Self::EXPECT);
        if found == 0 && !upgrade {
            return;
        }
        if found & Self::CONNECTION != 0 {
            // Headers named in (every) `connection` are hop-by-hop too. Found by a scan of
            // the names rather than by parsing each option into a name (which allocates for
            // names the `http` crate does not know, such as `close`); `keep-alive` was seen
            // above.
            let mut named: Vec<HeaderName> = Vec::new();
            for option in headers
                .get_all(header::CONNECTION)
                .iter()
                .flat_map(connection_options)
            {
                if (upgrade && option.eq_ignore_ascii_case("upgrade"))
                    || option.eq_ignore_ascii_case("keep-alive")
                {
                    continue;
                }
                if let Some(name) = headers
                    .keys()
                    .find(|n| n.as_str().eq_ignore_ascii_case(option))
                {
                    named.push(name.clone());
                }
            }
            for name in named {
                headers.remove(name);
            }
            headers.remove(header::CONNECTION);
        }
        if found & Self::KEEP_ALIVE != 0 {
            headers.remove(&KEEP_ALIVE);
        }
        if found & Self::PROXY_CONNECTION != 0 {
            headers.remove(&PROXY_CONNECTION);
        }
        if found & Self::TRANSFER_ENCODING != 0 {
            headers.remove(header::TRANSFER_ENCODING);
        }
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else if found & Self::UPGRADE != 0 {
            headers.remove(header::UPGRADE);
        }
        if found & Self::TE != 0 {
            headers.remove(header::TE);
        }
    }
}

/// The comma-separated options of one `connection` value, trimmed (none if it is not text).
fn connection_options(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
}

/// Whether a `connection` field's options are only `keep-alive` and `close` (or none): it
/// names no other field, so all it does is say whether its hop's connection persists. The
/// inline HTTP/1.1 codecs note that and leave the field out of the head they build, which
/// is what [`strip_hop_by_hop`] would have done with it (filters see requests with their
/// hop-by-hop fields gone, as in Envoy), without inserting it into the map and removing it
/// again.
pub fn persistence_only(value: &HeaderValue) -> bool {
    value.as_bytes().split(|&b| b == b',').all(|o| {
        let o = o.trim_ascii();
        o.is_empty() || o.eq_ignore_ascii_case(b"keep-alive") || o.eq_ignore_ascii_case(b"close")
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
    // One hashed lookup for `x-forwarded-for` whether it is there or not.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Occupied(mut e) if !e.get().is_empty() => {
            let prev = e.get();
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&v) {
                e.insert(value);
            }
        }
        Entry::Occupied(mut e) => {
            e.insert(peer.clone());
        }
        Entry::Vacant(e) => {
            e.insert(peer.clone());
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
}

/// Keeps a non-empty `x-request-id`, or sets a new random (v4) UUID. Returns the id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    let new_id = || {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        // A hyphenated UUID is always a valid header value.
        HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    };
    // One hashed lookup whether it is there or not.
    match headers.entry(&X_REQUEST_ID) {
        Entry::Occupied(e) if !e.get().is_empty() => e.get().clone(),
        Entry::Occupied(mut e) => {
            let id = new_id();
            e.insert(id.clone());
            id
        }
        Entry::Vacant(e) => e.insert(new_id()).clone(),
    }
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

    #[test]
    fn a_connection_field_of_only_persistence_options_names_nothing() {
        for v in [
            "keep-alive",
            "close",
            "Keep-Alive",
            " close , keep-alive ",
            "",
            ",",
        ] {
            assert!(persistence_only(&HeaderValue::from_static(v)), "{v:?}");
        }
        for v in ["upgrade", "keep-alive, x-secret", "close,te", "keepalive"] {
            assert!(!persistence_only(&HeaderValue::from_static(v)), "{v:?}");
        }
    }

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
    fn every_connection_header_counts_and_keep_alive_alone_costs_no_more_than_its_removal() {
        // Two `connection` headers: the options of both are hop-by-hop.
        let mut h = map(&[
            ("connection", "x-a"),
            ("connection", "X-B, close"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("close", "a header named by an option"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&[("x-kept", "yes")]));

        // The usual HTTP/1 response: only `connection: keep-alive`.
        let mut h = map(&[("content-length", "3"), ("connection", "keep-alive")]);
        let hop = HopByHop::scan(&h);
        assert!(!hop.wants_upgrade(&h) && !hop.has_te() && !hop.has_expect());
        hop.strip(&mut h, false);
        assert_eq!(h, map(&[("content-length", "3")]));

        let h = map(&[("expect", "100-continue"), ("te", "trailers")]);
        let hop = HopByHop::scan(&h);
        assert!(hop.has_expect() && hop.has_te());
        // `upgrade` without `connection: upgrade` is no upgrade.
        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
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
