//! The stream idle timeout (Envoy's `stream_idle_timeout`): a response body, a request body
//! or an upgraded tunnel that moves no bytes for the limit is ended, so that a peer that
//! stalls after the head cannot hold a client (or an upstream) forever.
//!
//! Activity costs one clock read; the timer is armed once and re-armed only when it fires
//! early (bytes moved since), never reset per frame.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::clock;

/// Watches one stream's activity against its idle limit.
#[derive(Debug)]
pub struct IdleClock {
    /// The limit, in milliseconds.
    limit_ms: u64,
    /// When bytes last moved, in [`clock`] milliseconds.
    last_ms: u64,
    /// Fires at the earliest time the stream could be idle for the limit.
    timer: Option<Pin<Box<Sleep>>>,
    /// Counts the streams it ends.
    expired: Option<prometheus_client::metrics::counter::Counter>,
}

impl IdleClock {
    /// A clock for a stream active now, idle past `limit`.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit_ms: limit.as_millis().max(1) as u64,
            last_ms: clock::now_ms(),
            timer: None,
            expired: None,
        }
    }

    /// Counts the streams it ends in `counter`.
    pub fn counted(mut self, counter: prometheus_client::metrics::counter::Counter) -> Self {
        self.expired = Some(counter);
        self
    }

    /// The stream is being ended for idleness: counts it.
    pub fn expired(&mut self) {
        if let Some(c) = self.expired.take() {
            c.inc();
        }
    }

    /// Bytes moved.
    #[inline]
    pub fn touch(&mut self) {
        self.last_ms = clock::now_ms();
    }

    /// Called while the stream waits: `Ready` once it has been idle for the limit (the task
    /// is woken then).
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let due_ms = self.last_ms.saturating_add(self.limit_ms);
            let now_ms = clock::now_ms();
            if now_ms >= due_ms {
                return Poll::Ready(());
            }
            let at = Instant::now() + Duration::from_millis(due_ms - now_ms);
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            // Fired early (bytes moved since it was set): wait for the new due time.
            if timer.deadline() <= Instant::now() {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// The limit.
    pub fn limit(&self) -> Duration {
        Duration::from_millis(self.limit_ms)
    }
}

/// The error a stream ends with when it was idle too long.
pub fn idle_error(limit: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("stream idle for {} ms", limit.as_millis()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_idle_for_the_limit_is_reported_and_activity_puts_it_off() {
        let mut idle = IdleClock::new(Duration::from_millis(300));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(idle.poll_idle(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
        idle.touch();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(idle.poll_idle(&mut cx).is_pending(), "active 200 ms ago");
        let started = std::time::Instant::now();
        std::future::poll_fn(|cx| idle.poll_idle(cx)).await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(50) && waited < Duration::from_millis(1000),
            "{waited:?}"
        );
    }
}
