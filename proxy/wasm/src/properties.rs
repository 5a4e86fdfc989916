//! Properties (`proxy_get_property`): the filter's identity, the connection, the request and
//! response in Envoy's encodings, and otherwise what filters set themselves (per stream,
//! shared by the chain, or per root context).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use http::header::HeaderMap;
use weft_core::filter::AttemptError;

use crate::maps::{MapKind, authority, map_get, map_pairs};
use crate::state::HostState;

/// This proxy as a node of the mesh (`node.id`, `node.metadata.<label>`).
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// The proxy's id (`--id`, else the host name).
    pub id: String,
    /// Its labels (`--label k=v`).
    pub labels: BTreeMap<String, String>,
}

static NODE: OnceLock<Node> = OnceLock::new();

/// Sets what `node.*` reads, once per process (later calls are ignored).
pub fn set_node(node: Node) {
    let _ = NODE.set(node);
}

/// Envoy's `response.flags` bit for why the proxy answered for the upstream.
fn response_flags(error: AttemptError) -> i64 {
    match error {
        AttemptError::None => 0,
        AttemptError::NoHealthyUpstream => 0x2,
        AttemptError::Timeout => 0x4,
        AttemptError::Reset => 0x10,
        AttemptError::ConnectFailure => 0x20,
        AttemptError::Overflow => 0x80,
    }
}

/// A property path with its segments joined by single NULs (the upstream SDKs end a path with
/// a NUL, `weft-sdk` does not), so that filters of either SDK share properties.
pub fn normalize(path: &[u8]) -> Vec<u8> {
    match normalized(path) {
        std::borrow::Cow::Borrowed(p) => p.to_vec(),
        std::borrow::Cow::Owned(p) => p,
    }
}

/// [`normalize`] without a copy when `path` is already normal (no empty segment: the
/// Weft SDK's paths, and every path once stored), so that a lookup allocates nothing.
pub fn normalized(path: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let normal = path.first() != Some(&0)
        && path.last() != Some(&0)
        && !path.windows(2).any(|w| w == [0, 0]);
    if normal {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = Vec::with_capacity(path.len());
    for segment in path.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if !out.is_empty() {
            out.push(0);
        }
        out.extend_from_slice(segment);
    }
    std::borrow::Cow::Owned(out)
}

/// A property value in Envoy's encodings: strings as bytes, integers as 8-byte little-endian.
pub fn property(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    // The segments, on the stack for every path short enough (all the named ones are).
    let mut stack: [&[u8]; 8] = [&[]; 8];
    let mut n = 0;
    for s in path.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if n < stack.len() {
            stack[n] = s;
        }
        n += 1;
    }
    let heap: Vec<&[u8]>;
    let segments: &[&[u8]] = if n <= stack.len() {
        &stack[..n]
    } else {
        heap = path.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
        &heap
    };
    let int = |v: i64| Some(v.to_le_bytes().to_vec());
    let text = |s: &str| Some(s.as_bytes().to_vec());
    let info = state.info.as_ref();
    match segments {
        [b"plugin_name"] => text(&state.plugin.name),
        [b"plugin_root_id"] => text(&state.plugin.root_id),
        [b"plugin_vm_id"] => text(&state.plugin.vm_id),
        [b"source", b"address"] => text(&info?.source.to_string()),
        [b"source", b"port"] => int(info?.source.port().into()),
        [b"destination", b"address"] => text(&info?.destination.to_string()),
        [b"destination", b"port"] => int(info?.destination.port().into()),
        [b"connection", b"id"] => int(info?.connection_id as i64),
        // The downstream connection's TLS, as Envoy names and encodes it (a bool is one
        // byte); a plaintext connection is not mutual TLS and has no SNI.
        [b"connection", b"mtls"] => {
            info.map(|i| vec![u8::from(i.tls.as_ref().is_some_and(|t| t.mtls))])
        }
        [b"connection", b"requested_server_name"] => text(
            info?
                .tls
                .as_ref()
                .and_then(|t| t.sni.as_deref())
                .unwrap_or(""),
        ),
        [b"connection", b"tls_version"] => text(info?.tls.as_ref()?.version),
        [b"connection", b"uri_san_peer_certificate"] => text(info?.tls.as_ref()?.uri_sans.first()?),
        // Istio's name for the verified peer identity: its SPIFFE ID.
        [b"source", b"principal"] => text(&info?.tls.as_ref()?.peer_id.as_ref()?.to_string()),
        [b"xds", b"cluster_name"] | [b"cluster_name"] => {
            let info = info?;
            text(info.clusters.names.get(info.cluster? as usize)?)
        }
        // The route a router filter matched (its `weft.route` stream property).
        [b"route_name"] | [b"xds", b"route_name"] => state
            .stream_props
            .as_ref()?
            .get(crate::stream::ROUTE_PROPERTY)
            .cloned(),
        [b"node", b"id"] | [b"xds", b"node", b"id"] => text(&NODE.get()?.id),
        [b"node", b"metadata", key] | [b"xds", b"node", b"metadata", key] => {
            text(NODE.get()?.labels.get(std::str::from_utf8(key).ok()?)?)
        }
        // Messages as Envoy serializes them: protobuf bytes (`google.protobuf.Struct`,
        // `envoy.config.core.v3.Node`).
        [b"node", b"metadata"] | [b"xds", b"node", b"metadata"] => {
            Some(metadata_struct(&NODE.get()?.labels))
        }
        [b"node"] | [b"xds", b"node"] => Some(node_message(NODE.get()?)),
        // The listener's `direction` (0 unspecified, 1 inbound, 2 outbound).
        [b"listener_direction"] => int(info?.direction.into()),
        [b"upstream", b"address"] => text(&info?.upstream?.to_string()),
        [b"upstream", b"port"] => int(info?.upstream?.port().into()),
        // Attempts made so far, as Envoy counts them (the first is 1).
        [b"upstream", b"request_attempt_count"] => match info?.attempt.number {
            0 => None,
            n => int(n.into()),
        },
        [b"request", rest @ ..] => {
            let req = state.req();
            match rest {
                [b"path"] => map_get(state, MapKind::RequestHeaders, b":path"),
                [b"url_path"] => text(req?.uri.path()),
                [b"query"] => text(req?.uri.query().unwrap_or("")),
                [b"referer"] => map_get(state, MapKind::RequestHeaders, b"referer"),
                [b"useragent"] => map_get(state, MapKind::RequestHeaders, b"user-agent"),
                [b"host"] => authority(req?).map(<[u8]>::to_vec),
                [b"scheme"] => text(if info.is_some_and(|i| i.tls.is_some()) {
                    "https"
                } else {
                    "http"
                }),
                [b"method"] => text(req?.method.as_str()),
                [b"protocol"] => text(match req?.version {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                }),
                [b"id"] => map_get(state, MapKind::RequestHeaders, b"x-request-id"),
                [b"headers"] => {
                    let pairs = map_pairs(state, MapKind::RequestHeaders);
                    Some(weft_abi::map::serialize(pairs.iter().map(|(k, v)| (k, v))))
                }
                [b"headers", name] => all_of(state, MapKind::RequestHeaders, name),
                [b"time"] => int(info?.start_unix_ns as i64),
                [b"duration"] => {
                    int(weft_core::clock::now_ns().saturating_sub(info?.start_ns) as i64)
                }
                [b"size"] => int(content_length(&req?.headers)),
                _ => None,
            }
        }
        [b"response", rest @ ..] => {
            let resp = state.resp();
            match rest {
                [b"code"] => int(resp?.status.as_u16().into()),
                // A filter's local reply carries its own details.
                [b"code_details"] => match state
                    .stream_props
                    .as_ref()
                    .and_then(|p| p.get(crate::stream::CODE_DETAILS))
                {
                    Some(details) => Some(details.clone()),
                    None => text(info?.attempt.error.code_details()),
                },
                [b"flags"] => int(response_flags(info?.attempt.error)),
                [b"headers"] => {
                    let pairs = map_pairs(state, MapKind::ResponseHeaders);
                    Some(weft_abi::map::serialize(pairs.iter().map(|(k, v)| (k, v))))
                }
                [b"headers", name] => all_of(state, MapKind::ResponseHeaders, name),
                [b"size"] => int(content_length(&resp?.headers)),
                _ => None,
            }
        }
        // What filters set on the stream, under the names Envoy filters read it by: filter
        // state (`wasm.` + the path a filter set) and dynamic metadata
        // (`metadata.filter_metadata.<namespace>.<key>` for the path `<namespace>.<key>`).
        [b"filter_state", key] => {
            let path = key.strip_prefix(b"wasm.")?;
            let props = state.stream_props.as_ref()?;
            // `wasm.a.b` names the path `a`, `b` (or the one segment `a.b`).
            let dotted: Vec<u8> = path
                .iter()
                .map(|b| if *b == b'.' { 0 } else { *b })
                .collect();
            props
                .get(normalized(path).as_ref())
                .or_else(|| props.get(normalized(&dotted).as_ref()))
                .cloned()
        }
        [b"metadata", b"filter_metadata", rest @ ..] if !rest.is_empty() => {
            state.stream_props.as_ref()?.get(&rest.join(&0u8)).cloned()
        }
        _ => match &state.stream_props {
            Some(props) => props.get(normalized(path).as_ref()).cloned(),
            None => state
                .properties
                .get(&(state.context, normalize(path)))
                .cloned(),
        },
    }
}

/// Every value of header `name` in map `kind`, joined with `,` (as Envoy's property reads a
/// repeated header); `None` when there is none.
fn all_of(state: &HostState, kind: MapKind, name: &[u8]) -> Option<Vec<u8>> {
    let name = name.to_ascii_lowercase();
    let values: Vec<Vec<u8>> = map_pairs(state, kind)
        .into_iter()
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .collect();
    (!values.is_empty()).then(|| values.join(&b','))
}

/// Protobuf: a length-delimited field `field` holding `bytes`.
fn pb_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    pb_varint(out, u64::from(field << 3 | 2));
    pb_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Protobuf: a varint.
fn pb_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `labels` as a `google.protobuf.Struct` of string values (field 1: `map<string, Value>`;
/// `Value.string_value` is field 3).
fn metadata_struct(labels: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in labels {
        let mut value = Vec::new();
        pb_bytes(&mut value, 3, v.as_bytes());
        let mut entry = Vec::new();
        pb_bytes(&mut entry, 1, k.as_bytes());
        pb_bytes(&mut entry, 2, &value);
        pb_bytes(&mut out, 1, &entry);
    }
    out
}

/// The node as an `envoy.config.core.v3.Node`: `id` (1) and `metadata` (3).
fn node_message(node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    pb_bytes(&mut out, 1, node.id.as_bytes());
    if !node.labels.is_empty() {
        pb_bytes(&mut out, 3, &metadata_struct(&node.labels));
    }
    out
}

/// The `content-length` header as a number (0 when absent or invalid).
fn content_length(headers: &HeaderMap) -> i64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::state;

    #[test]
    fn properties_use_envoy_encodings() {
        let mut s = state();
        assert_eq!(property(&s, b"request\0path").unwrap(), b"/a/b?q=1");
        assert_eq!(property(&s, b"request\0url_path\0").unwrap(), b"/a/b");
        assert_eq!(property(&s, b"request\0id").unwrap(), b"rid");
        assert_eq!(property(&s, b"plugin_name").unwrap(), b"f");
        assert!(property(&s, b"response\0code").is_none(), "no response yet");
        assert!(property(&s, b"nope").is_none());
        assert_eq!(property(&s, b"request\0query").unwrap(), b"q=1");
        s.request
            .as_mut()
            .unwrap()
            .headers
            .append("x-many", "a".parse().unwrap());
        s.request
            .as_mut()
            .unwrap()
            .headers
            .append("x-many", "b".parse().unwrap());
        assert_eq!(property(&s, b"request\0headers\0x-many").unwrap(), b"a,b");
        assert!(
            property(&s, b"listener_direction").is_none(),
            "outside a stream: no listener"
        );
        let mut info = crate::testing::info();
        info.direction = 2;
        s.info = Some(info);
        assert_eq!(
            property(&s, b"listener_direction").unwrap(),
            2i64.to_le_bytes()
        );
    }

    #[test]
    fn paths_from_either_sdk_name_the_same_property() {
        assert_eq!(normalize(b"weft\0route\0"), b"weft\0route");
        assert_eq!(normalize(b"weft\0route"), b"weft\0route");
        assert_eq!(normalize(b"\0a\0\0b"), b"a\0b");
        assert_eq!(normalize(b"a"), b"a");
        assert_eq!(normalize(b"\0\0"), b"");
        assert!(matches!(
            normalized(b"weft\0route"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
