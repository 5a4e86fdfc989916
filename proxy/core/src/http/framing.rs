//! HTTP/1.x request-framing scanner used as a request-smuggling defence.
//!
//! hyper's HTTP/1 server accepts a request that carries both `Content-Length`
//! and `Transfer-Encoding` (it drops `Content-Length` and decodes the body as
//! chunked), and the service never sees the original headers. Weft answers
//! such requests with 400, so the downstream IO wrapper feeds every byte it
//! reads, in order, to a [`FramingScanner`]. The scanner follows HTTP/1.1
//! request framing (heads, `Content-Length` bodies, chunked bodies with
//! extensions and trailers) and records, per request head, whether both
//! headers were present. The wrapper then calls [`FramingVerdicts::publish`]
//! and the service asks [`FramingVerdicts::has_conflict`] for the N-th
//! (0-based) request of the connection, without taking a lock.
//!
//! The scanner never allocates, keeps at most a 17-byte line prefix, skips
//! body bytes in O(1) per call, and gives up ("passthrough") on anything it
//! does not need to understand: HTTP/2 prior knowledge, `Upgrade`, `CONNECT`,
//! and malformed framing (which hyper rejects on its own). In passthrough
//! [`FramingScanner::feed`] is O(1) and later heads have no verdict.
//!
//! The framing rules mirror hyper's default (strict) HTTP/1 parser; a server
//! configured to ignore invalid header lines could frame some malformed
//! requests differently from this scanner.

use std::sync::atomic::{AtomicU64, Ordering, fence};

/// Largest request head (or trailer section) the scanner follows, in bytes.
const MAX_SECTION_BYTES: usize = 128 * 1024;

/// Number of head verdicts remembered (bits in the ring).
const RING_LEN: u64 = 64;

/// Line prefix kept while classifying a line: long enough for the request
/// line checks (`PRI * HTTP/2.0` is 14 bytes) and the longest header name
/// of interest (`transfer-encoding` is 17 bytes).
const PREFIX_CAP: usize = 17;

/// Request line of the HTTP/2 connection preface.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Method (with its delimiter) that switches the connection to a tunnel.
const CONNECT_METHOD: &[u8] = b"CONNECT ";

/// Verdict on one request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    /// The head did not carry both `Content-Length` and `Transfer-Encoding`.
    Ok,
    /// The head carried both `Content-Length` and `Transfer-Encoding`; the
    /// request must be rejected with 400.
    ConflictingLength,
}

/// Position inside the current line of a request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// At the first byte of a line.
    Start,
    /// A line began with CR; an LF must follow (empty line).
    EmptyCr,
    /// Collecting the first bytes of the line into the prefix buffer.
    Prefix,
    /// Inside a `content-length` header value.
    ContentLength(Value),
    /// The rest of the line is irrelevant; skip to LF.
    Skip,
}

/// Position inside a `content-length` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// Optional whitespace before the digits.
    Before,
    /// Inside the digits; holds the value so far.
    Digits(u64),
    /// Optional whitespace after the digits; holds the value.
    After(u64),
}

/// Position inside a chunked body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex chunk size; holds the value and digit count so far.
    Size {
        /// Chunk size so far.
        value: u64,
        /// Whether at least one hex digit was read.
        any_digit: bool,
    },
    /// After the size: whitespace, `;ext` and CR up to the LF.
    SizeRest(u64),
    /// Inside chunk data; holds the bytes left (> 0).
    Data(u64),
    /// After chunk data: CR (or a bare LF) expected.
    DataCr,
    /// After chunk data and CR: LF expected.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// An empty final line began with CR; LF expected.
    TrailerCr,
    /// Inside a trailer field line; skip to LF.
    TrailerLine,
}

/// What the scanner is currently looking at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A request head (or the empty lines before it).
    Head(Line),
    /// A `Content-Length` body; holds the bytes left (> 0).
    Body(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Tracking stopped for good.
    Passthrough,
}

/// Facts collected about the request head being scanned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct HeadInfo {
    /// The request line has been read (later empty line ends the head).
    request_line_seen: bool,
    /// A `content-length` header was present.
    has_content_length: bool,
    /// A `transfer-encoding` header was present.
    has_transfer_encoding: bool,
    /// An `upgrade` header was present.
    has_upgrade: bool,
    /// The method is `CONNECT`.
    is_connect: bool,
    /// The agreed value of all `content-length` headers.
    content_length: Option<u64>,
    /// Some `content-length` value was malformed or values disagreed.
    content_length_invalid: bool,
}

/// Tracks HTTP/1.x request framing across a byte stream fed in arbitrary chunks.
///
/// Feed it every byte read from a downstream connection, in order. It counts
/// complete request heads and remembers, for the last 64 of them, whether
/// the head carried both `Content-Length` and `Transfer-Encoding`.
#[derive(Clone, Debug)]
pub struct FramingScanner {
    /// Current position in the framing.
    state: State,
    /// Number of complete request heads seen.
    heads_seen: u64,
    /// Ring of conflict bits: bit `n % 64` is set iff head `n` conflicted.
    conflicts: u64,
    /// Bytes of the current head or trailer section so far.
    section_bytes: usize,
    /// First bytes of the current line (header names lower-cased).
    prefix: [u8; PREFIX_CAP],
    /// Number of valid bytes in `prefix`.
    prefix_len: usize,
    /// Facts about the head being scanned.
    head: HeadInfo,
}

impl Default for FramingScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl FramingScanner {
    /// Creates a scanner positioned at the start of a connection.
    #[must_use]
    pub fn new() -> Self {
        Self {
            state: State::Head(Line::Start),
            heads_seen: 0,
            conflicts: 0,
            section_bytes: 0,
            prefix: [0; PREFIX_CAP],
            prefix_len: 0,
            head: HeadInfo::default(),
        }
    }

    /// Feed the next bytes read from the socket (any chunking, including 1 byte at a time).
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let used = match self.state {
                State::Passthrough => return,
                State::Head(line) => self.step_head(line, rest),
                State::Body(left) => self.step_body(left, rest),
                State::Chunked(chunk) => self.step_chunked(chunk, rest),
            };
            // Every step consumes at least one byte of a non-empty input.
            rest = rest.get(used.max(1)..).unwrap_or_default();
        }
    }

    /// True while a request head has begun (some of its bytes were read) and is not complete.
    #[must_use]
    pub fn head_in_progress(&self) -> bool {
        matches!(self.state, State::Head(_)) && self.section_bytes > 0
    }

    /// Number of complete request heads seen so far.
    #[must_use]
    pub fn heads_seen(&self) -> u64 {
        self.heads_seen
    }

    /// Verdict for the head with 0-based index `n` on this connection, if it has been seen and is within the last 64 heads.
    #[must_use]
    pub fn verdict(&self, n: u64) -> Option<HeadVerdict> {
        ring_bit(self.conflicts, self.heads_seen, n).map(|conflict| {
            if conflict {
                HeadVerdict::ConflictingLength
            } else {
                HeadVerdict::Ok
            }
        })
    }

    /// True once the scanner stopped tracking (see below); verdicts after that are unknown.
    ///
    /// Tracking stops for HTTP/2 prior knowledge (`PRI * HTTP/2.0`), a head
    /// with an `Upgrade` header, a `CONNECT` request, and unparseable framing
    /// (bad chunk size, a head or trailer section over 128 KiB, a bad
    /// `Content-Length` without `Transfer-Encoding`). Verdicts of heads
    /// completed before that point stay available.
    #[must_use]
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Stops tracking for good.
    fn passthrough(&mut self) {
        self.state = State::Passthrough;
    }

    /// Counts `n` bytes against the head/trailer size limit; switches to
    /// passthrough and returns false when the limit is exceeded.
    fn account(&mut self, n: usize) -> bool {
        self.section_bytes = self.section_bytes.saturating_add(n);
        if self.section_bytes > MAX_SECTION_BYTES {
            self.passthrough();
            false
        } else {
            true
        }
    }

    /// One step inside a request head; returns the bytes consumed.
    fn step_head(&mut self, line: Line, bytes: &[u8]) -> usize {
        let Some(&b) = bytes.first() else {
            return 0;
        };
        if line == Line::Skip {
            let (used, eol) = skip_line(bytes);
            if self.account(used) && eol {
                self.end_of_line();
            }
            return used;
        }
        if !self.account(1) {
            return 1;
        }
        match line {
            Line::Start => match b {
                b'\r' => self.state = State::Head(Line::EmptyCr),
                b'\n' => self.empty_line(),
                _ => {
                    if let Some(used) = self.line_start_whole(bytes) {
                        return used;
                    }
                    self.prefix_len = 0;
                    self.prefix_byte(b);
                }
            },
            Line::EmptyCr => {
                if b == b'\n' {
                    self.empty_line();
                } else {
                    // Bare CR: malformed, hyper rejects it.
                    self.passthrough();
                }
            }
            Line::Prefix => {
                if b == b'\n' {
                    self.end_of_line();
                } else {
                    self.prefix_byte(b);
                }
            }
            Line::ContentLength(value) => self.content_length_byte(value, b),
            Line::Skip => {}
        }
        1
    }

    /// The start of a head line when its first bytes are all in `bytes` (the usual case): the
    /// request line's first 14 bytes, or a header name and its colon, classified at once
    /// rather than byte by byte. Returns the bytes consumed, or `None` to go byte by byte
    /// (a line end comes first, or the line is split across reads). The first byte has
    /// already been counted against the section limit.
    fn line_start_whole(&mut self, bytes: &[u8]) -> Option<usize> {
        let (used, next) = if self.head.request_line_seen {
            // A name of interest is at most PREFIX_CAP bytes; its colon comes right after.
            let window = bytes.get(..bytes.len().min(PREFIX_CAP + 1))?;
            let colon = memchr::memchr2(b':', b'\n', window)?;
            if window.get(colon) != Some(&b':') {
                return None;
            }
            let name = window.get(..colon)?;
            let next = if name.eq_ignore_ascii_case(b"content-length") {
                self.head.has_content_length = true;
                Line::ContentLength(Value::Before)
            } else {
                if name.eq_ignore_ascii_case(b"transfer-encoding") {
                    self.head.has_transfer_encoding = true;
                } else if name.eq_ignore_ascii_case(b"upgrade") {
                    self.head.has_upgrade = true;
                }
                Line::Skip
            };
            (colon.saturating_add(1), next)
        } else {
            let first = bytes.get(..H2_PREFACE_LINE.len())?;
            if memchr::memchr(b'\n', first).is_some() {
                return None;
            }
            if first == H2_PREFACE_LINE {
                self.passthrough();
                return Some(1);
            }
            if first.starts_with(CONNECT_METHOD) {
                self.head.is_connect = true;
            }
            (first.len(), Line::Skip)
        };
        // The first byte was counted by the caller.
        if self.account(used.saturating_sub(1)) {
            self.state = State::Head(next);
        }
        Some(used)
    }

    /// Handles one byte of the line prefix (not LF).
    fn prefix_byte(&mut self, b: u8) {
        self.state = State::Head(Line::Prefix);
        if !self.head.request_line_seen {
            self.push_prefix(b);
            let prefix = self.prefix.get(..self.prefix_len).unwrap_or_default();
            if prefix == CONNECT_METHOD {
                self.head.is_connect = true;
            } else if prefix == H2_PREFACE_LINE {
                self.passthrough();
            } else if self.prefix_len >= H2_PREFACE_LINE.len() {
                self.state = State::Head(Line::Skip);
            }
            return;
        }
        if b == b':' {
            let name = self.prefix.get(..self.prefix_len).unwrap_or_default();
            self.state = State::Head(match name {
                b"content-length" => {
                    self.head.has_content_length = true;
                    Line::ContentLength(Value::Before)
                }
                b"transfer-encoding" => {
                    self.head.has_transfer_encoding = true;
                    Line::Skip
                }
                b"upgrade" => {
                    self.head.has_upgrade = true;
                    Line::Skip
                }
                _ => Line::Skip,
            });
        } else if self.prefix_len >= PREFIX_CAP {
            // Longer than any header name of interest.
            self.state = State::Head(Line::Skip);
        } else {
            self.push_prefix(b.to_ascii_lowercase());
        }
    }

    /// Appends to the prefix buffer if there is room.
    fn push_prefix(&mut self, b: u8) {
        if let Some(slot) = self.prefix.get_mut(self.prefix_len) {
            *slot = b;
            self.prefix_len = self.prefix_len.saturating_add(1);
        }
    }

    /// Handles one byte of a `content-length` value.
    fn content_length_byte(&mut self, value: Value, b: u8) {
        let next = match (value, b) {
            (Value::Before, b'\n') => {
                self.head.content_length_invalid = true;
                self.end_of_line();
                return;
            }
            (Value::Digits(v) | Value::After(v), b'\n') => {
                match self.head.content_length {
                    Some(prev) if prev != v => self.head.content_length_invalid = true,
                    _ => self.head.content_length = Some(v),
                }
                self.end_of_line();
                return;
            }
            (Value::Before, b' ' | b'\t' | b'\r') => Line::ContentLength(Value::Before),
            (Value::Before, b'0'..=b'9') => digit(0, b),
            (Value::Digits(v), b'0'..=b'9') => digit(v, b),
            (Value::Digits(v) | Value::After(v), b' ' | b'\t' | b'\r') => {
                Line::ContentLength(Value::After(v))
            }
            _ => Line::Skip,
        };
        if next == Line::Skip {
            self.head.content_length_invalid = true;
        }
        self.state = State::Head(next);
    }

    /// A non-empty head line ended.
    fn end_of_line(&mut self) {
        self.head.request_line_seen = true;
        self.state = State::Head(Line::Start);
    }

    /// An empty line: skipped before the request line, ends the head after it.
    fn empty_line(&mut self) {
        if self.head.request_line_seen {
            self.finish_head();
        } else {
            self.state = State::Head(Line::Start);
        }
    }

    /// Records the verdict for the completed head and sets up its body.
    fn finish_head(&mut self) {
        let head = std::mem::take(&mut self.head);
        let bit = 1u64 << (self.heads_seen % RING_LEN);
        if head.has_content_length && head.has_transfer_encoding {
            self.conflicts |= bit;
        } else {
            self.conflicts &= !bit;
        }
        self.heads_seen = self.heads_seen.wrapping_add(1);
        self.section_bytes = 0;
        self.state = if head.has_upgrade || head.is_connect {
            State::Passthrough
        } else if head.has_transfer_encoding {
            State::Chunked(Chunk::Size {
                value: 0,
                any_digit: false,
            })
        } else if head.content_length_invalid {
            State::Passthrough
        } else {
            match head.content_length {
                Some(len) if len > 0 => State::Body(len),
                _ => State::Head(Line::Start),
            }
        };
    }

    /// The current message (head and body) is complete.
    fn message_done(&mut self) {
        self.section_bytes = 0;
        self.state = State::Head(Line::Start);
    }

    /// Skips `Content-Length` body bytes in O(1); returns the bytes consumed.
    fn step_body(&mut self, left: u64, bytes: &[u8]) -> usize {
        let (used, left) = take_up_to(left, bytes.len());
        if left == 0 {
            self.message_done();
        } else {
            self.state = State::Body(left);
        }
        used
    }

    /// One step inside a chunked body; returns the bytes consumed.
    fn step_chunked(&mut self, chunk: Chunk, bytes: &[u8]) -> usize {
        let Some(&b) = bytes.first() else {
            return 0;
        };
        let next = match chunk {
            Chunk::Size { value, any_digit } => match hex_value(b) {
                Some(d) => match value.checked_mul(16).and_then(|v| v.checked_add(d)) {
                    Some(value) => Chunk::Size {
                        value,
                        any_digit: true,
                    },
                    None => return self.fail(),
                },
                None if !any_digit => return self.fail(),
                None => match b {
                    b'\n' => self.chunk_size_done(value),
                    b' ' | b'\t' | b';' | b'\r' => Chunk::SizeRest(value),
                    _ => return self.fail(),
                },
            },
            Chunk::SizeRest(value) => {
                let (used, eol) = skip_line(bytes);
                if eol {
                    let next = self.chunk_size_done(value);
                    self.state = State::Chunked(next);
                }
                return used;
            }
            Chunk::Data(left) => {
                let (used, left) = take_up_to(left, bytes.len());
                self.state = State::Chunked(if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                });
                return used;
            }
            Chunk::DataCr => match b {
                b'\r' => Chunk::DataLf,
                b'\n' => new_chunk(),
                _ => return self.fail(),
            },
            Chunk::DataLf => match b {
                b'\n' => new_chunk(),
                _ => return self.fail(),
            },
            Chunk::TrailerStart | Chunk::TrailerCr | Chunk::TrailerLine => {
                return self.step_trailer(chunk, b, bytes);
            }
        };
        self.state = State::Chunked(next);
        1
    }

    /// One step inside the trailer section; returns the bytes consumed.
    fn step_trailer(&mut self, chunk: Chunk, b: u8, bytes: &[u8]) -> usize {
        if chunk == Chunk::TrailerLine {
            let (used, eol) = skip_line(bytes);
            if self.account(used) && eol {
                self.state = State::Chunked(Chunk::TrailerStart);
            }
            return used;
        }
        if !self.account(1) {
            return 1;
        }
        match (chunk, b) {
            (Chunk::TrailerStart, b'\r') => self.state = State::Chunked(Chunk::TrailerCr),
            (Chunk::TrailerStart | Chunk::TrailerCr, b'\n') => self.message_done(),
            (Chunk::TrailerStart, _) => self.state = State::Chunked(Chunk::TrailerLine),
            _ => self.passthrough(),
        }
        1
    }

    /// The chunk-size line ended; returns where the body continues.
    fn chunk_size_done(&mut self, value: u64) -> Chunk {
        if value == 0 {
            self.section_bytes = 0;
            Chunk::TrailerStart
        } else {
            Chunk::Data(value)
        }
    }

    /// Malformed framing: switch to passthrough, consuming one byte.
    fn fail(&mut self) -> usize {
        self.passthrough();
        1
    }
}

/// State at the start of a chunk-size line.
fn new_chunk() -> Chunk {
    Chunk::Size {
        value: 0,
        any_digit: false,
    }
}

/// Appends a decimal digit to a `content-length` value, or gives up on
/// overflow.
fn digit(value: u64, b: u8) -> Line {
    let d = u64::from(b.wrapping_sub(b'0'));
    match value.checked_mul(10).and_then(|v| v.checked_add(d)) {
        Some(v) => Line::ContentLength(Value::Digits(v)),
        None => Line::Skip,
    }
}

/// Value of an ASCII hex digit.
fn hex_value(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

/// Bytes up to and including the next LF: `(consumed, found_lf)`.
fn skip_line(bytes: &[u8]) -> (usize, bool) {
    match memchr::memchr(b'\n', bytes) {
        Some(i) => (i.saturating_add(1), true),
        None => (bytes.len(), false),
    }
}

/// Consumes up to `left` of `available` bytes: `(consumed, still_left)`.
fn take_up_to(left: u64, available: usize) -> (usize, u64) {
    match usize::try_from(left) {
        Ok(l) if l <= available => (l, 0),
        _ => {
            let used = u64::try_from(available).unwrap_or(u64::MAX);
            (available, left.saturating_sub(used))
        }
    }
}

/// Bit for head `n` from a ring of conflict bits after `count` heads, if it
/// is still held by the ring.
fn ring_bit(bits: u64, count: u64, n: u64) -> Option<bool> {
    if n >= count || count.saturating_sub(n) > RING_LEN {
        return None;
    }
    Some((bits >> (n % RING_LEN)) & 1 == 1)
}

/// Lock-free publication of verdicts: a 64-bit ring of conflict bits plus a head counter (`AtomicU64`s).
///
/// Single writer (the IO wrapper that owns the [`FramingScanner`]), any
/// number of readers. The writer stores the head count in `begin`, then the
/// ring, then the count in `end` (a seqlock-style protocol without retry):
/// a reader that sees `end > n` knows the ring holds head `n` unless a newer
/// publication already rotated it out, which it detects through `begin`.
#[derive(Default, Debug)]
pub struct FramingVerdicts {
    /// Head count of the publication in progress (written before `bits`).
    begin: AtomicU64,
    /// Ring of conflict bits (bit `n % 64` for head `n`).
    bits: AtomicU64,
    /// Head count of the last complete publication (written after `bits`).
    end: AtomicU64,
}

impl FramingVerdicts {
    /// Called by the writer side after [`FramingScanner::feed`]: publishes the verdicts for heads seen so far.
    ///
    /// Costs one relaxed load when no new head completed since the last call.
    /// Must only be called from one writer at a time.
    pub fn publish(&self, scanner: &FramingScanner) {
        let count = scanner.heads_seen;
        if self.end.load(Ordering::Relaxed) == count {
            return;
        }
        self.begin.store(count, Ordering::Relaxed);
        fence(Ordering::Release);
        self.bits.store(scanner.conflicts, Ordering::Relaxed);
        self.end.store(count, Ordering::Release);
    }

    /// Reader side: `Some(true)` if head `n` had both `Content-Length` and `Transfer-Encoding`, `Some(false)` if not, `None` if not (yet) known.
    ///
    /// Also `None` once head `n` has dropped out of the last 64 published
    /// heads, or if the scanner stopped tracking before reaching it.
    #[must_use]
    pub fn has_conflict(&self, n: u64) -> Option<bool> {
        let end = self.end.load(Ordering::Acquire);
        if n >= end {
            return None;
        }
        let bits = self.bits.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        // `bits` comes from a publication whose count is at least `end` and
        // at most `begin`; if even `begin` still covers `n`, the bit is valid.
        let begin = self.begin.load(Ordering::Relaxed);
        ring_bit(bits, begin.max(end), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observable result of scanning a whole stream.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        heads: u64,
        verdicts: Vec<Option<HeadVerdict>>,
        passthrough: bool,
    }

    fn outcome(s: &FramingScanner) -> Outcome {
        let heads = s.heads_seen();
        Outcome {
            heads,
            verdicts: (0..heads + 2).map(|n| s.verdict(n)).collect(),
            passthrough: s.is_passthrough(),
        }
    }

    fn feed_in_chunks(stream: &[u8], size: usize) -> Outcome {
        let mut s = FramingScanner::new();
        for piece in stream.chunks(size) {
            s.feed(piece);
        }
        outcome(&s)
    }

    /// Scans `stream` in one feed, at several fixed chunk sizes (including 1
    /// byte at a time) and split in two at every offset; asserts every
    /// chunking gives the same outcome and returns it.
    fn scan(stream: &[u8]) -> Outcome {
        let whole = feed_in_chunks(stream, stream.len().max(1));
        for size in [1, 2, 3, 5, 7, 16, 64] {
            assert_eq!(feed_in_chunks(stream, size), whole, "chunk size {size}");
        }
        for at in 0..=stream.len() {
            let mut s = FramingScanner::new();
            let (a, b) = stream.split_at(at);
            s.feed(a);
            s.feed(b);
            assert_eq!(outcome(&s), whole, "split at {at}");
        }
        whole
    }

    const OK: Option<HeadVerdict> = Some(HeadVerdict::Ok);
    const CONFLICT: Option<HeadVerdict> = Some(HeadVerdict::ConflictingLength);

    fn verdicts(o: &Outcome) -> Vec<Option<HeadVerdict>> {
        o.verdicts.iter().take(o.heads as usize).copied().collect()
    }

    #[test]
    fn content_length_then_transfer_encoding_conflicts() {
        let o = scan(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [CONFLICT]);
        assert!(!o.passthrough);
    }

    #[test]
    fn transfer_encoding_then_content_length_conflicts() {
        let o = scan(
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 3\r\n\
              \r\n3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [CONFLICT, OK]);
        assert!(!o.passthrough);
    }

    #[test]
    fn conflict_regardless_of_values_and_counts() {
        // Garbage Content-Length next to Transfer-Encoding: still a conflict,
        // and framing follows the chunked body (as hyper does).
        let o = scan(
            b"POST / HTTP/1.1\r\nContent-Length: nope\r\nTransfer-Encoding: gzip\r\n\
              Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n\
              GET /next HTTP/1.1\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [CONFLICT, OK]);
        assert!(!o.passthrough);
    }

    #[test]
    fn single_framing_header_or_none_is_ok() {
        let only_cl = scan(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(verdicts(&only_cl), [OK]);
        let only_te = scan(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert_eq!(verdicts(&only_te), [OK]);
        let neither = scan(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n");
        assert_eq!(verdicts(&neither), [OK]);
        for o in [only_cl, only_te, neither] {
            assert!(!o.passthrough);
            assert_eq!(o.verdicts[1], None, "head 1 not seen yet");
        }
    }

    #[test]
    fn incomplete_head_has_no_verdict() {
        let o = scan(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n");
        assert_eq!(o.heads, 0);
        assert_eq!(o.verdicts[0], None);
    }

    #[test]
    fn two_pipelined_requests() {
        let o = scan(
            b"POST /a HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world\
              POST /b HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nbody\r\n0\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK, CONFLICT]);
    }

    #[test]
    fn three_pipelined_requests_with_every_body_kind() {
        let o = scan(
            b"POST /chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              a\r\n0123456789\r\n3\r\nxyz\r\n0\r\n\r\n\
              PUT /both HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n\
              0\r\n\r\n\
              POST /length HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
              GET /none HTTP/1.1\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK, CONFLICT, OK, OK]);
        assert!(!o.passthrough);
    }

    #[test]
    fn byte_at_a_time_matches_single_feed() {
        let stream: &[u8] = b"\r\nGET / HTTP/1.1\r\n\r\n\
              POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n\
              POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n12345";
        let mut one = FramingScanner::new();
        for &b in stream {
            one.feed(&[b]);
        }
        let mut all = FramingScanner::new();
        all.feed(stream);
        assert_eq!(outcome(&one), outcome(&all));
        assert_eq!(verdicts(&outcome(&one)), [OK, CONFLICT, OK]);
    }

    #[test]
    fn framing_headers_inside_bodies_are_not_headers() {
        let o = scan(
            b"POST /a HTTP/1.1\r\nContent-Length: 55\r\n\r\n\
              Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
              POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              2f\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n\
              GET /c HTTP/1.1\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK, OK, OK]);
        assert!(!o.passthrough);
    }

    #[test]
    fn chunk_extensions_and_trailers() {
        let o = scan(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              4;name=value;other\r\nwiki\r\n5 ; q=\"x;y\"\r\npedia\r\n\
              0;last\r\nExpires: never\r\nChecksum: abc\r\n\r\n\
              GET /after HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK, CONFLICT]);
        assert!(!o.passthrough);
    }

    #[test]
    fn bare_lf_and_leading_empty_lines() {
        let o = scan(
            b"\r\n\n\r\nPOST / HTTP/1.1\nContent-Length: 3\nTransfer-Encoding: chunked\n\n\
              3\nabc\n0\n\n\r\nGET / HTTP/1.1\n\n",
        );
        assert_eq!(verdicts(&o), [CONFLICT, OK]);
        assert!(!o.passthrough);
    }

    #[test]
    fn whitespace_before_colon_does_not_match() {
        let o = scan(
            b"POST / HTTP/1.1\r\nContent-Length : 5\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK]);
    }

    #[test]
    fn lookalike_header_names_do_not_match() {
        let o = scan(
            b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\nContent-Length-X: 5\r\n\
              Transfer-Encodings: chunked\r\nContent-Length: 2\r\n\r\nok\
              GET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK, OK]);
    }

    #[test]
    fn content_length_value_forms() {
        // Whitespace, leading zeros and repeated equal values are fine.
        let o = scan(
            b"POST / HTTP/1.1\r\nContent-Length:\t 003 \r\nContent-Length: 3\r\n\r\nabc\
              GET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(verdicts(&o), [OK, OK]);
        assert!(!o.passthrough);
        // Differing values: hyper rejects, so stop tracking.
        let o = scan(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd");
        assert_eq!(verdicts(&o), [OK]);
        assert!(o.passthrough);
    }

    #[test]
    fn h2_prior_knowledge_is_passthrough() {
        let o = scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00");
        assert!(o.passthrough);
        assert_eq!(o.heads, 0);
    }

    #[test]
    fn upgrade_is_passthrough_after_its_own_verdict() {
        let o = scan(
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
              GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(o.passthrough);
        assert_eq!(verdicts(&o), [OK]);
        assert_eq!(o.verdicts[1], None);
    }

    #[test]
    fn connect_is_passthrough() {
        let o = scan(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\
              POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(o.passthrough);
        assert_eq!(o.heads, 1);
    }

    #[test]
    fn malformed_framing_is_passthrough() {
        let bad_chunk = scan(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert!(bad_chunk.passthrough);
        let huge_chunk =
            scan(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n");
        assert!(huge_chunk.passthrough);
        let missing_crlf =
            scan(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n");
        assert!(missing_crlf.passthrough);
        let bad_length =
            scan(b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        assert!(bad_length.passthrough);
        assert_eq!(verdicts(&bad_length), [OK]);
        let overflow = scan(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n");
        assert!(overflow.passthrough);
        let empty = scan(b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n");
        assert!(empty.passthrough);
        let bare_cr = scan(b"\rGET / HTTP/1.1\r\n\r\n");
        assert!(bare_cr.passthrough);
    }

    #[test]
    fn oversized_head_is_passthrough() {
        let mut stream = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        stream.resize(MAX_SECTION_BYTES + 10, b'a');
        stream.extend_from_slice(b"\r\n\r\n");
        for size in [1, 4096, stream.len()] {
            let o = feed_in_chunks(&stream, size);
            assert!(o.passthrough, "chunk size {size}");
            assert_eq!(o.heads, 0);
        }
        // Just under the limit is still tracked.
        let mut stream = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        stream.resize(MAX_SECTION_BYTES - 4, b'a');
        stream.extend_from_slice(b"\r\n\r\n");
        let o = feed_in_chunks(&stream, 1000);
        assert!(!o.passthrough);
        assert_eq!(o.heads, 1);
    }

    #[test]
    fn large_content_length_body_is_skipped_without_buffering() {
        let mut s = FramingScanner::new();
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n");
        let junk = [b'\n'; 8192];
        for _ in 0..100 {
            s.feed(&junk);
        }
        assert_eq!(s.heads_seen(), 1);
        assert!(!s.is_passthrough());
        assert_eq!(s.state, State::Body(1_000_000_000_000 - 819_200));
    }

    #[test]
    fn scanner_keeps_only_last_64_verdicts() {
        let mut s = FramingScanner::new();
        for i in 0..100u64 {
            if i % 3 == 0 {
                s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
            } else {
                s.feed(b"GET / HTTP/1.1\r\n\r\n");
            }
        }
        assert_eq!(s.heads_seen(), 100);
        for n in 0..36 {
            assert_eq!(s.verdict(n), None, "head {n} rotated out");
        }
        for n in 36..100 {
            let want = if n % 3 == 0 {
                HeadVerdict::ConflictingLength
            } else {
                HeadVerdict::Ok
            };
            assert_eq!(s.verdict(n), Some(want), "head {n}");
        }
        assert_eq!(s.verdict(100), None);
    }

    #[test]
    fn verdicts_publish_round_trip_and_ring_wrap() {
        let v = FramingVerdicts::default();
        let mut s = FramingScanner::new();
        assert_eq!(v.has_conflict(0), None);
        v.publish(&s);
        assert_eq!(v.has_conflict(0), None);

        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(v.has_conflict(0), None, "not published yet");
        v.publish(&s);
        assert_eq!(v.has_conflict(0), Some(true));
        assert_eq!(v.has_conflict(1), None);
        s.feed(b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
        v.publish(&s);
        v.publish(&s); // unchanged: no-op
        assert_eq!(v.has_conflict(0), Some(true));
        assert_eq!(v.has_conflict(1), Some(false));

        // 2 heads so far; 148 more, conflicts on multiples of 5.
        for i in 2..150u64 {
            if i % 5 == 0 {
                s.feed(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n0\r\n\r\n");
            } else {
                s.feed(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi");
            }
            if i % 7 == 0 {
                v.publish(&s);
            }
        }
        v.publish(&s);
        for n in 0..86 {
            assert_eq!(v.has_conflict(n), None, "head {n} rotated out");
        }
        for n in 86..150 {
            assert_eq!(v.has_conflict(n), Some(n % 5 == 0), "head {n}");
            assert_eq!(
                v.has_conflict(n),
                s.verdict(n).map(|x| x == HeadVerdict::ConflictingLength)
            );
        }
        assert_eq!(v.has_conflict(150), None);
        assert_eq!(v.has_conflict(u64::MAX), None);
    }

    #[test]
    fn concurrent_readers_never_see_wrong_bits() {
        use std::sync::Arc;
        const HEADS: u64 = 20_000;
        let v = Arc::new(FramingVerdicts::default());
        // Test-only hint of how far the writer got, to probe near the frontier.
        let progress = Arc::new(AtomicU64::new(0));
        let writer = {
            let (v, progress) = (Arc::clone(&v), Arc::clone(&progress));
            std::thread::spawn(move || {
                let mut s = FramingScanner::new();
                for i in 0..HEADS {
                    if i % 3 == 0 {
                        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
                    } else {
                        s.feed(b"GET / HTTP/1.1\r\n\r\n");
                    }
                    v.publish(&s);
                    progress.store(i + 1, Ordering::Relaxed);
                }
            })
        };
        let mut checked = 0u64;
        loop {
            let finished = writer.is_finished();
            let frontier = progress.load(Ordering::Relaxed);
            for n in frontier.saturating_sub(70)..frontier + 3 {
                if let Some(c) = v.has_conflict(n) {
                    assert_eq!(c, n % 3 == 0, "head {n}");
                    checked += 1;
                }
            }
            if finished {
                break;
            }
        }
        writer.join().expect("writer thread");
        assert!(checked > 0);
        for n in 0..HEADS - 64 {
            assert_eq!(v.has_conflict(n), None);
        }
        for n in HEADS - 64..HEADS {
            assert_eq!(v.has_conflict(n), Some(n % 3 == 0));
        }
    }

    /// Small deterministic PRNG (xorshift) so the test needs no dependencies.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn arbitrary_input_never_panics_and_is_chunking_independent() {
        let seeds: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4;a\r\nabcd\r\n0\r\nT: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi",
            b"\n\nPUT / HTTP/1.1\nTransfer-Encoding: chunked\n\n1\nx\n0\n\n",
        ];
        let alphabet = b"\r\n:;0123456789abcdefxyz \tCcTtLl-";
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..400 {
            let mut stream = seeds[round % seeds.len()].to_vec();
            for _ in 0..(xorshift(&mut rng) % 6) {
                let at = (xorshift(&mut rng) as usize) % (stream.len() + 1);
                let b = if xorshift(&mut rng).is_multiple_of(4) {
                    xorshift(&mut rng) as u8
                } else {
                    alphabet[(xorshift(&mut rng) as usize) % alphabet.len()]
                };
                match xorshift(&mut rng) % 3 {
                    0 => stream.insert(at, b),
                    1 if at < stream.len() => stream[at] = b,
                    _ if at < stream.len() => {
                        stream.remove(at);
                    }
                    _ => {}
                }
            }
            let _ = scan(&stream);
        }
        for _ in 0..50 {
            let stream: Vec<u8> = (0..300).map(|_| xorshift(&mut rng) as u8).collect();
            let _ = scan(&stream);
        }
    }

    #[test]
    fn passthrough_ignores_everything_after() {
        let mut s = FramingScanner::new();
        s.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(s.is_passthrough());
        s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(s.heads_seen(), 0);
        assert_eq!(s.verdict(0), None);
    }
}
