//! The HTTP/1 request framing scanner, fed arbitrary bytes in arbitrary pieces: it never
//! panics, and its verdicts do not depend on how the bytes were split (the first byte picks
//! the piece size).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_core::http::framing::FramingScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let mut whole = FramingScanner::new();
    whole.feed(bytes);
    let mut pieces = FramingScanner::new();
    for piece in bytes.chunks(usize::from(split).max(1)) {
        pieces.feed(piece);
    }
    assert_eq!(whole.heads_seen(), pieces.heads_seen());
    assert_eq!(whole.is_passthrough(), pieces.is_passthrough());
    assert_eq!(whole.head_in_progress(), pieces.head_in_progress());
    for n in 0..whole.heads_seen() {
        assert_eq!(whole.verdict(n), pieces.verdict(n), "head {n}");
    }
});
