//! The inline HTTP/1.1 upstream codec's response reader (head, framing, chunked bodies and
//! trailers), fed arbitrary upstream bytes in arbitrary pieces: it never panics, and what it
//! decodes (or whether it refuses) does not depend on how the bytes were split (the first
//! byte picks the piece size, the second the request method).
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use weft_core::upstream::h1::decode_response;

fuzz_target!(|data: &[u8]| {
    let [split, method, wire @ ..] = data else {
        return;
    };
    let method = if method & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let whole = decode_response(&method, wire, wire.len());
    let pieces = decode_response(&method, wire, usize::from(*split).max(1));
    match (whole, pieces) {
        (Ok(w), Ok(p)) => {
            assert_eq!(w.status, p.status);
            assert_eq!(w.headers, p.headers);
            assert_eq!(w.body, p.body);
            assert_eq!(w.trailers, p.trailers);
            assert_eq!(w.keep_alive, p.keep_alive);
            if method == Method::HEAD {
                assert!(w.body.is_empty(), "a body to HEAD");
            }
        }
        (Err(_), Err(_)) => {}
        (w, p) => panic!("whole {w:?}, in pieces {p:?}"),
    }
});
