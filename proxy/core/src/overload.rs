//! Overload protection, in the spirit of Envoy's overload manager: the proxy counts its
//! downstream connections across listeners and workers against a limit (by default a share
//! of its open-file limit) and acts before it runs out of descriptors:
//!
//! - at `keepalive_off_percent` of the limit, HTTP/1.1 responses close their connections
//!   (clients reconnect as they need, so idle keep-alive connections stop piling up);
//! - at the limit, new connections are shed (accepted and closed at once, so the accept queue
//!   keeps moving and the process never hits `EMFILE`), and the idle timeout of downstream
//!   connections drops to a second, so that connections holding a slot without sending
//!   anything make room for clients that have work.
//!
//! Levels are published on a `watch` channel that every connection's serve loop listens to;
//! on the request path a level check is one relaxed load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

/// How loaded the proxy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Below every threshold.
    Normal = 0,
    /// Responses close their HTTP/1.1 connections.
    KeepAliveOff = 1,
    /// New connections are shed and idle ones closed.
    Shed = 2,
}

/// The proxy's downstream connection budget and its level.
#[derive(Debug)]
pub struct Overload {
    open: AtomicUsize,
    limit: usize,
    keepalive_off_at: usize,
    level: AtomicU8,
    tx: watch::Sender<Level>,
    shed: Counter,
    level_gauge: Gauge,
}

/// One downstream connection counted against the budget, given back on drop.
#[derive(Debug)]
pub struct Admitted {
    overload: Arc<Overload>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let open = self.overload.open.fetch_sub(1, Relaxed) - 1;
        self.overload.settle(open);
    }
}

impl Overload {
    /// A budget of `limit` downstream connections (0: no limit); keep-alive goes off at
    /// `keepalive_off_percent` of it. `shed` counts shed connections, `level` shows the level.
    pub fn new(limit: usize, keepalive_off_percent: u32, shed: Counter, level: Gauge) -> Self {
        let limit = if limit == 0 { usize::MAX } else { limit };
        Self {
            open: AtomicUsize::new(0),
            limit,
            keepalive_off_at: limit.saturating_mul(keepalive_off_percent as usize) / 100,
            level: AtomicU8::new(Level::Normal as u8),
            tx: watch::Sender::new(Level::Normal),
            shed,
            level_gauge: level,
        }
    }

    /// The limit (`usize::MAX` for none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts a connection just accepted: `None` when it must be shed (the budget is spent).
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let open = self.open.fetch_add(1, Relaxed) + 1;
        if open > self.limit {
            self.open.fetch_sub(1, Relaxed);
            self.shed.inc();
            self.set(Level::Shed);
            return None;
        }
        self.settle(open);
        Some(Admitted {
            overload: self.clone(),
        })
    }

    /// The level now.
    #[inline]
    pub fn level(&self) -> Level {
        match self.level.load(Relaxed) {
            0 => Level::Normal,
            1 => Level::KeepAliveOff,
            _ => Level::Shed,
        }
    }

    /// Whether responses should close their HTTP/1.1 connections now.
    #[inline]
    pub fn keepalive_off(&self) -> bool {
        self.level.load(Relaxed) >= Level::KeepAliveOff as u8
    }

    /// Level changes, for a connection's serve loop.
    pub fn subscribe(&self) -> watch::Receiver<Level> {
        self.tx.subscribe()
    }

    /// Sets the level for `open` connections: shed at the limit, keep-alive off from its
    /// threshold, and back to normal only below 90% of that (so it does not flap).
    fn settle(&self, open: usize) {
        let level = if open >= self.limit {
            Level::Shed
        } else if open >= self.keepalive_off_at {
            Level::KeepAliveOff
        } else if open < self.keepalive_off_at.saturating_mul(9) / 10 {
            Level::Normal
        } else {
            self.level().min(Level::KeepAliveOff)
        };
        self.set(level);
    }

    fn set(&self, level: Level) {
        if self.level.swap(level as u8, Relaxed) != level as u8 {
            self.level_gauge.set(level as i64);
            self.tx.send_replace(level);
            if level != Level::Normal {
                tracing::warn!(
                    open = self.open.load(Relaxed),
                    limit = self.limit,
                    "overload: {}",
                    match level {
                        Level::Shed => "shedding new connections and closing idle ones",
                        _ => "keep-alive off",
                    }
                );
            } else {
                tracing::info!("overload: back to normal");
            }
        }
    }
}

/// The open-file limit, raised first to its hard limit when the soft one is lower (as Go
/// and most servers do at startup): `(soft, hard)` after the attempt.
pub fn raise_file_limit() -> (u64, u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let (Some(cur), max) = (lim.current, lim.maximum)
        && max.is_none_or(|m| m > cur)
    {
        let want = max.unwrap_or(1 << 20);
        let raised = rustix::process::Rlimit {
            current: Some(want),
            maximum: max,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            lim = getrlimit(Resource::Nofile);
        }
    }
    (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_past_the_limit_are_shed_and_levels_follow_the_count() {
        let o = Arc::new(Overload::new(10, 80, Counter::default(), Gauge::default()));
        let mut held: Vec<Admitted> = (0..7).map(|_| o.admit().unwrap()).collect();
        assert_eq!(o.level(), Level::Normal);
        held.push(o.admit().unwrap());
        assert_eq!(o.level(), Level::KeepAliveOff, "8 of 10");
        held.extend((0..2).map(|_| o.admit().unwrap()));
        assert_eq!(o.level(), Level::Shed, "10 of 10");
        assert!(o.admit().is_none(), "the 11th is shed");
        held.truncate(5);
        assert_eq!(o.level(), Level::Normal, "5 of 10");
        assert_eq!(o.shed.get(), 1);
    }
}
