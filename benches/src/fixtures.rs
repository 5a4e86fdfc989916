//! Inputs shared by the micro-benchmarks, built the way the proxy builds them.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use weft_core::upstream::{Endpoint, EndpointAddress};

/// `n` endpoints on made-up loopback addresses (nothing connects to them), with weights
/// cycling 1, 2, 3 so that the weighted policy has real work to do.
pub fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
    (0..n)
        .map(|i| {
            let addr = EndpointAddress::parse(&format!("127.0.0.1:{}", 20_000 + i))
                .expect("a literal ip:port parses");
            Arc::new(Endpoint::new(addr, (i % 3) as u32 + 1))
        })
        .collect()
}

/// A browser-like request header map as the proxy receives it from hyper: 11 headers (12
/// with `request_id`),
/// including the hop-by-hop ones the proxy must strip (`connection` naming a custom header,
/// `keep-alive`) and an `x-forwarded-for` it must append to. With `request_id` it also
/// carries an `x-request-id` the proxy must keep.
pub fn request_headers(request_id: bool) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(16);
    let mut add = |name: &'static str, value: &'static str| {
        h.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    };
    add("host", "api.internal.example:8080");
    add(
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
    );
    add("accept", "application/json, text/plain, */*");
    add("accept-encoding", "gzip, deflate, br");
    add("accept-language", "en-GB,en;q=0.9");
    add("connection", "keep-alive, x-debug-hop");
    add("keep-alive", "timeout=5");
    add("x-debug-hop", "1");
    add(
        "authorization",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJl",
    );
    add(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    add("x-forwarded-for", "203.0.113.7");
    if request_id {
        add("x-request-id", "9f2c1d8e-5b7a-4c3e-8f1d-2a6b9c0e4d71");
    }
    h
}

/// A copy of `template` built the way hyper builds the map of a request it parses on a new
/// connection: an empty map, `reserve(len)`, then every header appended in order.
/// (`HeaderMap::clone` sizes its copy differently, which changes when an insert has to
/// grow the map, so it would measure a map the proxy never sees.)
pub fn as_parsed(template: &HeaderMap) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.reserve(template.len());
    for (name, value) in template {
        h.append(name.clone(), value.clone());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_have_the_advertised_shape() {
        assert_eq!(endpoints(32).len(), 32);
        assert_eq!(endpoints(3)[2].weight, 3);
        assert_eq!(request_headers(false).len(), 11);
        assert!(request_headers(true).contains_key("x-request-id"));
        assert_eq!(as_parsed(&request_headers(true)), request_headers(true));
    }
}
