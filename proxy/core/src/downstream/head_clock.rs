//! The request-headers timeout (Envoy's `request_headers_timeout`, nginx's
//! `client_header_timeout`): a client gets `limit` to send a whole request head, counted from
//! the connection's accept for its first head and from a head's first byte for the next ones.
//! A slow client (slowloris) is cut when it runs out, however it dribbles its bytes.
//!
//! It runs inside the connection's reads ([`super::transport::DownstreamIo`]): the timer is
//! armed only while a head is incomplete, and a read that finds it expired fails with
//! `TimedOut`, which ends the connection. HTTP/1 heads are known from the framing scanner;
//! HTTP/2 (prior knowledge, `PRI * HTTP/2.0`) is followed frame by frame here: its first
//! "head" is the connection preface, then every header block (a `HEADERS` frame and its
//! `CONTINUATION`s) counts, from its first byte to the end of the frame that ends it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/2 frame types and the `END_HEADERS` flag.
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Where the bytes of a connection stand, for the timeout.
#[derive(Debug)]
enum Mode {
    /// Not known yet: the first bytes decide (HTTP/2's preface or not).
    Sniffing { seen: usize },
    /// HTTP/1: the framing scanner says whether a head is incomplete.
    Http1,
    /// HTTP/2, with the preface still `preface_left` bytes short.
    Http2(H2Frames),
}

/// HTTP/2 frames, read as far as their 9-byte headers.
#[derive(Debug, Default)]
struct H2Frames {
    /// Preface bytes still to come.
    preface_left: usize,
    /// The frame header being read.
    header: [u8; 9],
    /// Bytes of it read so far.
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// The current frame is part of a header block.
    in_block_frame: bool,
    /// The current frame ends its header block (when its payload is all read).
    ends_block: bool,
    /// A header block started and has not ended.
    block_open: bool,
}

impl H2Frames {
    fn new(preface_left: usize) -> Self {
        Self {
            preface_left,
            ..Self::default()
        }
    }

    /// Reads `bytes`.
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(bytes.len());
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    self.frame_started();
                }
            }
        }
    }

    /// A frame header was read.
    fn frame_started(&mut self) {
        let h = self.header;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let (kind, flags) = (h[3], h[4]);
        self.in_block_frame = kind == HEADERS || (kind == CONTINUATION && self.block_open);
        self.ends_block = self.in_block_frame && flags & END_HEADERS != 0;
        if kind == HEADERS {
            self.block_open = true;
        }
        self.payload_left = len;
        if len == 0 {
            self.frame_done();
        }
    }

    /// The current frame's payload was all read.
    fn frame_done(&mut self) {
        if self.ends_block {
            self.block_open = false;
        }
        self.in_block_frame = false;
        self.ends_block = false;
    }

    /// A head (the preface, or a header block) is incomplete.
    fn head_in_progress(&self) -> bool {
        self.preface_left > 0 || self.block_open
    }
}

/// The request-headers timeout of one connection.
pub struct HeadClock {
    /// Time allowed for a head.
    limit: Duration,
    /// How the connection's bytes are read.
    mode: Mode,
    /// When the head under way must be complete; `None` while no head is under way.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl HeadClock {
    /// The clock of a connection accepted at `accepted`: its first head is due within
    /// `limit` of it. `http2_only`: the connection can only speak HTTP/2 (prior knowledge).
    pub fn new(limit: Duration, accepted: Instant, http2_only: bool) -> Self {
        let mode = if http2_only {
            Mode::Http2(H2Frames::new(H2_PREFACE.len()))
        } else {
            Mode::Sniffing { seen: 0 }
        };
        Self {
            limit,
            mode,
            deadline: Some(Box::pin(tokio::time::sleep_until(accepted + limit))),
        }
    }

    /// Takes note of `bytes`, just read; `h1_head_in_progress`: what the HTTP/1 framing
    /// scanner says after them (`None` when it stopped following the connection). `Err` when
    /// the head under way is already past its deadline.
    pub fn read(
        &mut self,
        bytes: &[u8],
        h1_head_in_progress: Option<bool>,
    ) -> Result<(), std::io::Error> {
        if bytes.is_empty() {
            return Ok(()); // end of stream: hyper ends the connection
        }
        if let Mode::Sniffing { seen } = &mut self.mode {
            let n = (H2_PREFACE.len() - *seen).min(bytes.len());
            if bytes[..n] != H2_PREFACE[*seen..*seen + n] {
                self.mode = Mode::Http1;
            } else if *seen + n == H2_PREFACE.len() {
                let mut frames = H2Frames::new(0);
                frames.feed(&bytes[n..]);
                self.mode = Mode::Http2(frames);
            } else {
                *seen += n;
            }
        } else if let Mode::Http2(frames) = &mut self.mode {
            frames.feed(bytes);
        }
        let in_progress = match &self.mode {
            Mode::Sniffing { .. } => true,
            Mode::Http1 => h1_head_in_progress.unwrap_or(false),
            Mode::Http2(frames) => frames.head_in_progress(),
        };
        match (&self.deadline, in_progress) {
            (Some(d), true) if Instant::now() >= d.deadline() => return Err(timed_out()),
            (Some(_), true) => {}
            (None, true) => {
                self.deadline = Some(Box::pin(tokio::time::sleep(self.limit)));
            }
            (_, false) => self.deadline = None,
        }
        Ok(())
    }

    /// Called when a read is pending: `Ready(Err)` once the head under way is past its
    /// deadline (the task is woken then).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        match &mut self.deadline {
            Some(d) => d.as_mut().poll(cx).map(|()| timed_out()),
            None => Poll::Pending,
        }
    }

    /// For a reader that parses HTTP/1.1 heads itself (the inline server): a head is under
    /// way and incomplete. Its deadline starts now if none runs; `Err` once it has passed.
    pub fn head_pending(&mut self) -> Result<(), std::io::Error> {
        self.mode = Mode::Http1;
        match &self.deadline {
            Some(d) if Instant::now() >= d.deadline() => Err(timed_out()),
            Some(_) => Ok(()),
            None => {
                self.deadline = Some(Box::pin(tokio::time::sleep(self.limit)));
                Ok(())
            }
        }
    }

    /// The same: the head under way arrived whole; no deadline runs until the next one.
    pub fn head_done(&mut self) {
        self.mode = Mode::Http1;
        self.deadline = None;
    }

    /// When the head under way must be complete, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.as_ref().map(|d| d.deadline())
    }
}

/// The error a read fails with when a head took too long.
fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "request headers not received within the request headers timeout",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn h2_header_blocks_are_heads_until_end_headers() {
        let mut f = H2Frames::new(H2_PREFACE.len());
        f.feed(&H2_PREFACE[..10]);
        assert!(f.head_in_progress(), "preface incomplete");
        f.feed(&H2_PREFACE[10..]);
        f.feed(&frame(0x4, 0, &[0; 6])); // SETTINGS
        assert!(!f.head_in_progress());
        let headers = frame(HEADERS, 0, &[1, 2, 3]);
        f.feed(&headers[..5]);
        assert!(!f.head_in_progress(), "a frame header not read whole yet");
        f.feed(&headers[5..]);
        assert!(f.head_in_progress(), "HEADERS without END_HEADERS");
        let cont = frame(CONTINUATION, END_HEADERS, &[4, 5, 6, 7]);
        f.feed(&cont[..11]);
        assert!(f.head_in_progress(), "the last CONTINUATION not read whole");
        f.feed(&cont[11..]);
        assert!(!f.head_in_progress());
        // A whole HEADERS frame with END_HEADERS, and DATA: no head under way.
        f.feed(&frame(HEADERS, END_HEADERS | 0x1, &[9; 20]));
        f.feed(&frame(0x0, 0, &[0; 100]));
        assert!(!f.head_in_progress());
    }

    /// Real time (the runtime's clock cannot be paused in this build): steps well apart
    /// from the limit.
    const LIMIT: Duration = Duration::from_millis(1000);
    const STEP: Duration = Duration::from_millis(600);

    #[tokio::test]
    async fn a_head_dribbled_past_the_limit_fails_the_read() {
        let mut c = HeadClock::new(LIMIT, Instant::now(), false);
        assert!(c.deadline().is_some(), "the first head is due from accept");
        c.read(b"GET / HT", Some(true)).unwrap();
        tokio::time::sleep(STEP).await;
        c.read(b"TP/1.1\r\n", Some(true)).unwrap();
        tokio::time::sleep(STEP).await;
        let e = c.read(b"Host: a\r\n", Some(true)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn the_next_head_is_timed_from_its_first_byte() {
        let mut c = HeadClock::new(LIMIT, Instant::now(), false);
        c.read(b"GET / HTTP/1.1\r\n\r\n", Some(false)).unwrap();
        assert!(c.deadline().is_none(), "no head under way: no timer");
        tokio::time::sleep(STEP * 2).await;
        c.read(b"GET /b", Some(true)).unwrap();
        let due = c.deadline().expect("a head under way");
        assert!(due > Instant::now() + STEP, "timed from its first byte");
        c.read(b" HTTP/1.1\r\n\r\n", Some(false)).unwrap();
        assert!(c.deadline().is_none());
    }

    #[tokio::test]
    async fn h2_prior_knowledge_is_recognised_from_the_preface() {
        let mut c = HeadClock::new(LIMIT, Instant::now(), false);
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, &[]));
        // The framing scanner gives up on HTTP/2: its word is not needed.
        c.read(&bytes[..7], None).unwrap();
        assert!(c.deadline().is_some());
        c.read(&bytes[7..], None).unwrap();
        assert!(
            c.deadline().is_none(),
            "preface complete, idle HTTP/2 is fine"
        );
        c.read(&frame(HEADERS, 0, &[1]), None).unwrap();
        assert!(c.deadline().is_some(), "a header block under way");
    }
}
