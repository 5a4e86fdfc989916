//! Header maps as filters see them (`proxy_get_header_map_pairs` and friends): which map a
//! call means ([`MapKind`]), the pairs with pseudo-headers first (`:method`, `:path`,
//! `:authority`, `:scheme`; `:status`), and edits that write pseudo-headers through to the
//! request or response head.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, request};

use weft_abi::MapType;

use crate::state::HostState;

/// Which header map a call means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// Request headers (with `:method`, `:path`, `:authority`, `:scheme`).
    RequestHeaders,
    /// Response headers (with `:status`).
    ResponseHeaders,
    /// Headers of the callout response being delivered (with `:status`).
    CalloutHeaders,
    /// Request or response trailers, while a trailers callback runs.
    Trailers(MapType),
    /// A read-only map of what arrived: gRPC initial or trailing metadata, callout
    /// trailers (empty outside the callback that delivers it).
    Received(MapType),
}

impl MapKind {
    /// From the ABI's map type; `None` for a number the ABI does not define.
    pub fn from_abi(t: i32) -> Option<Self> {
        Some(match MapType::from_i32(t)? {
            MapType::HttpRequestHeaders => Self::RequestHeaders,
            MapType::HttpResponseHeaders => Self::ResponseHeaders,
            MapType::HttpCallResponseHeaders => Self::CalloutHeaders,
            t @ (MapType::HttpRequestTrailers | MapType::HttpResponseTrailers) => Self::Trailers(t),
            t @ (MapType::GrpcReceiveInitialMetadata
            | MapType::GrpcReceiveTrailingMetadata
            | MapType::HttpCallResponseTrailers) => Self::Received(t),
        })
    }
}

/// The received map `t` of the callback being delivered, if it has one.
fn received(state: &HostState, t: MapType) -> Option<&HeaderMap> {
    match t {
        MapType::GrpcReceiveInitialMetadata => state.received.initial.as_ref(),
        MapType::GrpcReceiveTrailingMetadata => state.received.trailing.as_ref(),
        MapType::HttpCallResponseTrailers => state.callout_response.as_ref()?.trailers.as_ref(),
        _ => None,
    }
}

/// The request's authority: the URI's, else the `host` header.
pub fn authority(parts: &request::Parts) -> Option<&[u8]> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| parts.headers.get(http::header::HOST).map(|v| v.as_bytes()))
}

/// The pairs of a map, pseudo-headers first.
pub fn map_pairs(state: &HostState, kind: MapKind) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let headers = match kind {
        MapKind::RequestHeaders => {
            let Some(p) = state.req() else { return out };
            out.push((b":method".to_vec(), p.method.as_str().as_bytes().to_vec()));
            out.push((
                b":path".to_vec(),
                p.uri
                    .path_and_query()
                    .map_or(b"/".to_vec(), |pq| pq.as_str().as_bytes().to_vec()),
            ));
            if let Some(a) = authority(p) {
                out.push((b":authority".to_vec(), a.to_vec()));
            }
            out.push((b":scheme".to_vec(), b"http".to_vec()));
            &p.headers
        }
        MapKind::ResponseHeaders | MapKind::CalloutHeaders => {
            let head = if kind == MapKind::ResponseHeaders {
                state.resp()
            } else {
                state
                    .callout_response
                    .as_ref()
                    .and_then(|r| r.head.as_ref())
            };
            let Some(p) = head else { return out };
            out.push((b":status".to_vec(), p.status.as_str().as_bytes().to_vec()));
            &p.headers
        }
        MapKind::Trailers(t) => match &state.trailers {
            Some((kind, map)) if *kind == t => map,
            _ => return out,
        },
        MapKind::Received(t) => match received(state, t) {
            Some(map) => map,
            None => return out,
        },
    };
    for (k, v) in headers {
        // The authority is `:authority` (as Envoy presents HTTP/1.1 requests), not a second
        // `host` entry beside it.
        if kind == MapKind::RequestHeaders && k == http::header::HOST {
            continue;
        }
        out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    out
}

/// One value of a map (the first, for repeated headers).
pub fn map_get(state: &HostState, kind: MapKind, key: &[u8]) -> Option<Vec<u8>> {
    match (kind, key) {
        (MapKind::RequestHeaders | MapKind::ResponseHeaders | MapKind::CalloutHeaders, k)
            if k.starts_with(b":") =>
        {
            map_pairs(state, kind)
                .into_iter()
                .find(|(name, _)| name == key)
                .map(|(_, v)| v)
        }
        (MapKind::RequestHeaders, k) => state
            .req()?
            .headers
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
        (MapKind::ResponseHeaders, k) => state
            .resp()?
            .headers
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
        (MapKind::CalloutHeaders, k) => state
            .callout_response
            .as_ref()?
            .head
            .as_ref()?
            .headers
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
        (MapKind::Trailers(t), k) => match &state.trailers {
            Some((kind, map)) if *kind == t => map
                .get(HeaderName::from_bytes(k).ok()?)
                .map(|v| v.as_bytes().to_vec()),
            _ => None,
        },
        (MapKind::Received(t), k) => received(state, t)?
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
    }
}

/// How a map is changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapEdit {
    /// Add a value (repeated headers allowed).
    Add,
    /// Replace all values.
    Replace,
    /// Remove all values.
    Remove,
}

/// What an edit of a map did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edited {
    /// Applied (or nothing to do).
    Done,
    /// A name or value that is not valid HTTP: dropped.
    Invalid,
    /// The map cannot be written in this phase (the response before there is one, the
    /// request once its head went on, trailers outside their callback, a callout's answer):
    /// as in Envoy, `BAD_ARGUMENT`.
    Unavailable,
}

impl From<bool> for Edited {
    fn from(valid: bool) -> Self {
        if valid { Self::Done } else { Self::Invalid }
    }
}

/// Applies `edit` of `key` (`value`) to the live map of `kind`.
pub fn map_edit(
    state: &mut HostState,
    kind: MapKind,
    edit: MapEdit,
    key: &[u8],
    value: &[u8],
) -> Edited {
    match kind {
        MapKind::RequestHeaders => {
            let Some(p) = state.req_mut() else {
                return Edited::Unavailable;
            };
            if key.starts_with(b":") {
                return (edit == MapEdit::Remove || set_request_pseudo(p, key, value)).into();
            }
            edit_headers(&mut p.headers, edit, key, value).into()
        }
        MapKind::ResponseHeaders => {
            let Some(p) = state.resp_mut() else {
                return Edited::Unavailable;
            };
            if key == b":status" {
                if edit == MapEdit::Remove {
                    return Edited::Done;
                }
                return std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .map(|s| p.status = s)
                    .is_some()
                    .into();
            }
            if key.starts_with(b":") {
                return Edited::Done;
            }
            edit_headers(&mut p.headers, edit, key, value).into()
        }
        MapKind::Trailers(t) => match &mut state.trailers {
            Some((kind, map)) if *kind == t => {
                if key.starts_with(b":") {
                    return Edited::Done;
                }
                edit_headers(map, edit, key, value).into()
            }
            _ => Edited::Unavailable,
        },
        // What arrived (callout responses, gRPC metadata) is read-only.
        MapKind::CalloutHeaders | MapKind::Received(_) => Edited::Unavailable,
    }
}

/// Replaces a whole map with `pairs`.
pub fn map_set_all(state: &mut HostState, kind: MapKind, pairs: &[(&[u8], &[u8])]) -> Edited {
    let cleared = match kind {
        MapKind::RequestHeaders => state.req_mut().map(|p| p.headers.clear()),
        MapKind::ResponseHeaders => state.resp_mut().map(|p| p.headers.clear()),
        MapKind::Trailers(t) => match state.trailers.as_mut() {
            Some((kind, map)) if *kind == t => {
                map.clear();
                Some(())
            }
            _ => None,
        },
        MapKind::CalloutHeaders | MapKind::Received(_) => None,
    };
    if cleared.is_none() {
        return Edited::Unavailable;
    }
    let mut result = Edited::Done;
    for (k, v) in pairs {
        if map_edit(state, kind, MapEdit::Add, k, v) != Edited::Done {
            result = Edited::Invalid;
        }
    }
    result
}

fn edit_headers(headers: &mut HeaderMap, edit: MapEdit, key: &[u8], value: &[u8]) -> bool {
    let Ok(name) = HeaderName::from_bytes(key) else {
        return false;
    };
    if edit == MapEdit::Remove {
        headers.remove(name);
        return true;
    }
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return false;
    };
    match edit {
        MapEdit::Add => {
            headers.append(name, value);
        }
        MapEdit::Replace => {
            headers.insert(name, value);
        }
        MapEdit::Remove => {}
    }
    true
}

fn set_request_pseudo(p: &mut request::Parts, key: &[u8], value: &[u8]) -> bool {
    match key {
        b":method" => Method::from_bytes(value).map(|m| p.method = m).is_ok(),
        b":path" => {
            let mut parts = p.uri.clone().into_parts();
            match http::uri::PathAndQuery::try_from(value) {
                Ok(pq) => parts.path_and_query = Some(pq),
                Err(_) => return false,
            }
            Uri::from_parts(parts).map(|u| p.uri = u).is_ok()
        }
        b":authority" => {
            let Ok(v) = HeaderValue::from_bytes(value) else {
                return false;
            };
            if p.uri.authority().is_some() {
                let mut parts = p.uri.clone().into_parts();
                match http::uri::Authority::try_from(value) {
                    Ok(a) => parts.authority = Some(a),
                    Err(_) => return false,
                }
                if let Ok(u) = Uri::from_parts(parts) {
                    p.uri = u;
                }
            }
            p.headers.insert(http::header::HOST, v);
            true
        }
        // The scheme of a plain-HTTP listener cannot change.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::state;

    #[test]
    fn pseudo_headers_read_and_write_through_to_the_request() {
        let mut s = state();
        assert_eq!(
            map_get(&s, MapKind::RequestHeaders, b":path").unwrap(),
            b"/a/b?q=1"
        );
        assert_eq!(
            map_get(&s, MapKind::RequestHeaders, b":authority").unwrap(),
            b"svc:8080"
        );
        assert_eq!(
            map_edit(
                &mut s,
                MapKind::RequestHeaders,
                MapEdit::Replace,
                b":path",
                b"/new"
            ),
            Edited::Done
        );
        assert_eq!(
            map_edit(
                &mut s,
                MapKind::RequestHeaders,
                MapEdit::Replace,
                b":method",
                b"POST"
            ),
            Edited::Done
        );
        let req = s.request.as_ref().unwrap();
        assert_eq!(req.uri, "/new");
        assert_eq!(req.method, Method::POST);
        assert_eq!(
            map_edit(
                &mut s,
                MapKind::RequestHeaders,
                MapEdit::Add,
                b"bad name",
                b"v"
            ),
            Edited::Invalid
        );
        assert_eq!(
            map_edit(&mut s, MapKind::RequestHeaders, MapEdit::Add, b"x-a", b"1"),
            Edited::Done
        );
        assert_eq!(
            map_edit(&mut s, MapKind::RequestHeaders, MapEdit::Add, b"x-a", b"2"),
            Edited::Done
        );
        let pairs = map_pairs(&s, MapKind::RequestHeaders);
        assert_eq!(pairs.iter().filter(|(k, _)| k == b"x-a").count(), 2);
        assert_eq!(pairs[0].0, b":method");
        // No response yet, no trailers callback: those maps cannot be written now.
        for kind in [
            MapKind::ResponseHeaders,
            MapKind::Trailers(weft_abi::MapType::HttpRequestTrailers),
            MapKind::CalloutHeaders,
        ] {
            assert_eq!(
                map_edit(&mut s, kind, MapEdit::Add, b"x", b"1"),
                Edited::Unavailable,
                "{kind:?}"
            );
        }
    }
}
