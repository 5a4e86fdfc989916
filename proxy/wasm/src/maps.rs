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

/// A map as filters see it, borrowed from the state: its pseudo-headers (up to four, in
/// order) and its headers. Reading one value or serializing the map walks it without
/// copying it first.
pub struct View<'a> {
    pseudo: [(&'static [u8], &'a [u8]); 4],
    n: usize,
    headers: Option<&'a HeaderMap>,
    /// Request headers: `host` is `:authority` (as Envoy presents HTTP/1.1 requests), not a
    /// second entry beside it.
    skip_host: bool,
}

impl<'a> View<'a> {
    /// The map `kind` of `state` (empty when the state has no such map now).
    pub fn of(state: &'a HostState, kind: MapKind) -> Self {
        let mut v = View {
            pseudo: [(b"", b""); 4],
            n: 0,
            headers: None,
            skip_host: kind == MapKind::RequestHeaders,
        };
        let push = |v: &mut View<'a>, k: &'static [u8], val: &'a [u8]| {
            v.pseudo[v.n] = (k, val);
            v.n += 1;
        };
        match kind {
            MapKind::RequestHeaders => {
                if let Some(p) = state.req() {
                    push(&mut v, b":method", p.method.as_str().as_bytes());
                    let path = p
                        .uri
                        .path_and_query()
                        .map_or(&b"/"[..], |pq| pq.as_str().as_bytes());
                    push(&mut v, b":path", path);
                    if let Some(a) = authority(p) {
                        push(&mut v, b":authority", a);
                    }
                    push(&mut v, b":scheme", b"http");
                    v.headers = Some(&p.headers);
                }
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
                if let Some(p) = head {
                    push(&mut v, b":status", p.status.as_str().as_bytes());
                    v.headers = Some(&p.headers);
                }
            }
            MapKind::Trailers(t) => {
                if let Some((kind, map)) = &state.trailers
                    && *kind == t
                {
                    v.headers = Some(map);
                }
            }
            MapKind::Received(t) => v.headers = received(state, t),
        }
        v
    }

    /// The pairs, pseudo-headers first.
    pub fn pairs(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + '_ {
        let skip_host = self.skip_host;
        self.pseudo[..self.n].iter().copied().chain(
            self.headers
                .into_iter()
                .flatten()
                .filter(move |(k, _)| !(skip_host && *k == http::header::HOST))
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
        )
    }

    /// The first value of `key` (lowercase).
    pub fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        if key.starts_with(b":") {
            return self.pseudo[..self.n]
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v);
        }
        self.headers?
            .get(HeaderName::from_bytes(key).ok()?)
            .map(|v| v.as_bytes())
    }

    /// The map in the ABI's serialized format.
    pub fn serialize(&self) -> Vec<u8> {
        let pairs: Vec<(&[u8], &[u8])> = self.pairs().collect();
        weft_abi::map::serialize(pairs.iter().map(|(k, v)| (*k, *v)))
    }
}

/// The pairs of a map, pseudo-headers first.
pub fn map_pairs(state: &HostState, kind: MapKind) -> Vec<(Vec<u8>, Vec<u8>)> {
    View::of(state, kind)
        .pairs()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

/// One value of a map (the first, for repeated headers).
pub fn map_get(state: &HostState, kind: MapKind, key: &[u8]) -> Option<Vec<u8>> {
    if key.starts_with(b":") {
        return View::of(state, kind).get(key).map(<[u8]>::to_vec);
    }
    // An ordinary header: straight to its map, without the pseudo-headers' lookups.
    headers_of(state, kind)?
        .get(HeaderName::from_bytes(key).ok()?)
        .map(|v| v.as_bytes().to_vec())
}

/// The header map behind `kind` in `state`, if there is one now.
fn headers_of(state: &HostState, kind: MapKind) -> Option<&HeaderMap> {
    match kind {
        MapKind::RequestHeaders => state.req().map(|p| &p.headers),
        MapKind::ResponseHeaders => state.resp().map(|p| &p.headers),
        MapKind::CalloutHeaders => state
            .callout_response
            .as_ref()?
            .head
            .as_ref()
            .map(|p| &p.headers),
        MapKind::Trailers(t) => match &state.trailers {
            Some((kind, map)) if *kind == t => Some(map),
            _ => None,
        },
        MapKind::Received(t) => received(state, t),
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
    fn a_view_reads_what_the_pairs_hold_without_a_second_host_entry() {
        let s = state();
        let view = View::of(&s, MapKind::RequestHeaders);
        let pairs = map_pairs(&s, MapKind::RequestHeaders);
        let names: Vec<&[u8]> = pairs.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(
            names,
            [
                &b":method"[..],
                b":path",
                b":authority",
                b":scheme",
                b"x-request-id"
            ]
        );
        assert_eq!(
            view.serialize(),
            weft_abi::map::serialize(pairs.iter().map(|(k, v)| (k, v)))
        );
        for (k, v) in &pairs {
            assert_eq!(
                view.get(k),
                Some(v.as_slice()),
                "{}",
                String::from_utf8_lossy(k)
            );
        }
        // `host` is `:authority` in the pairs, yet still readable by its own name.
        assert_eq!(view.get(b"host"), Some(&b"svc:8080"[..]));
        assert_eq!(view.get(b":status"), None);
        assert_eq!(
            View::of(&s, MapKind::ResponseHeaders).serialize(),
            weft_abi::map::serialize::<[u8], [u8]>(std::iter::empty())
        );
    }

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
