//! The accounting of one stream: counted when the request arrives, finished exactly once when
//! its response body ends, fails or is dropped — or when the request future is dropped before
//! there is a response (the client went away while the upstream or a callout was pending).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::ConnShared;
use crate::body::StreamEnd;
use crate::clock;
use crate::filter::{self, SharedFilterStream};
use crate::upstream::InFlight;

/// Accounting of one stream; the work is done in `Drop`, so it runs however the stream ends.
/// [`StreamEnd::finish`] only records whether the response body was read to its end.
pub struct Stream {
    conn: Arc<ConnShared>,
    /// The current attempt's request to its endpoint (permit, active count, connection).
    pub upstream: Option<InFlight>,
    /// The stream through the filter chain; finished (`on_done`, `on_log`) at the end.
    pub filters: Option<SharedFilterStream>,
    /// The response body was read to its end.
    complete: bool,
}

impl Stream {
    /// Counts a new request on `conn`.
    pub fn begin(conn: Arc<ConnShared>, now_ms: u64) -> Box<Self> {
        conn.listener.metrics.requests_active.inc();
        conn.in_flight.fetch_add(1, Relaxed);
        conn.last_active_ms.store(now_ms, Relaxed);
        Box::new(Self {
            conn,
            upstream: None,
            filters: None,
            complete: false,
        })
    }
}

impl StreamEnd for Stream {
    fn finish(mut self: Box<Self>, complete: bool) {
        self.complete = complete;
        // Dropping runs the accounting.
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(filters) = self.filters.take() {
            filter::lock(&filters).finish();
        }
        let conn = &self.conn;
        conn.listener.metrics.requests_active.dec();
        conn.in_flight.fetch_sub(1, Relaxed);
        conn.last_active_ms.store(clock::now_ms(), Relaxed);
        if let Some(up) = self.upstream.take() {
            up.finish(self.complete);
        }
    }
}
