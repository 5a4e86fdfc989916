//! Live taps: `Observe.Tap` calls and the proxies' `Discovery.Taps` streams, joined.
//!
//! A proxy opens its taps stream when it connects ([`TapHub::proxy_connected`]). A tap call
//! picks proxies, gets an id, and sends each a command to sample (path prefix, rate); the
//! samples they send back go to the call's stream by tap id ([`TapHub::deliver`], dropped
//! when the caller is behind). When the call ends — cancelled, or its duration over — its
//! [`TapGuard`] tells the proxies to stop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use weft_proto::v1::{TapCommand, TapEvent};

/// Samples a tap call may have waiting before more are dropped.
const SINK: usize = 1024;

#[derive(Default)]
struct Inner {
    /// Each proxy's command stream, with the number of the stream (a reconnect replaces it).
    proxies: HashMap<String, (u64, mpsc::Sender<TapCommand>)>,
    /// Each running tap: where its samples go, the proxies it runs on, and what it asks
    /// of them (its start command).
    taps: HashMap<u64, (mpsc::Sender<TapEvent>, Vec<String>, TapCommand)>,
    next: u64,
}

/// The proxies' taps streams and the running tap calls.
#[derive(Default)]
pub struct TapHub {
    inner: Mutex<Inner>,
}

/// Stops its tap on the proxies when dropped (the call ended).
pub struct TapGuard {
    hub: Arc<crate::state::ControlState>,
    id: u64,
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        self.hub.taps.stop(self.id);
    }
}

impl TapHub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers proxy `id`'s taps stream: the commands for it come out of the receiver,
    /// starting with the taps that run on it (a proxy reconnecting picks them up again).
    /// Returns the stream's number, for [`TapHub::proxy_gone`].
    pub fn proxy_connected(&self, id: &str) -> (u64, mpsc::Receiver<TapCommand>) {
        // Room for every start and stop a busy operator makes between two reads.
        let (tx, rx) = mpsc::channel(256);
        let mut inner = self.lock();
        for (_, on, start) in inner.taps.values() {
            if on.iter().any(|p| p == id) {
                let _ = tx.try_send(start.clone());
            }
        }
        inner.next += 1;
        let n = inner.next;
        inner.proxies.insert(id.to_owned(), (n, tx));
        (n, rx)
    }

    /// Proxy `id`'s taps stream `n` ended.
    pub fn proxy_gone(&self, id: &str, n: u64) {
        let mut inner = self.lock();
        if inner.proxies.get(id).is_some_and(|(m, _)| *m == n) {
            inner.proxies.remove(id);
        }
    }

    /// A sample from a proxy, to its tap's caller (dropped when it is behind or gone, or
    /// when the tap does not run on that proxy).
    pub fn deliver(&self, event: TapEvent) {
        if let Some((sink, on, _)) = self.lock().taps.get(&event.tap_id)
            && on.contains(&event.proxy)
        {
            let _ = sink.try_send(event);
        }
    }

    /// Starts a tap on those of `proxies` that have a taps stream: its id, where its samples
    /// come out, and the proxies it runs on (none: nothing started).
    pub fn start(
        &self,
        proxies: &[String],
        path_prefix: &str,
        max_rps: u32,
    ) -> (u64, mpsc::Receiver<TapEvent>, Vec<String>) {
        let (tx, rx) = mpsc::channel(SINK);
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        let start = TapCommand {
            tap_id: id,
            path_prefix: path_prefix.to_owned(),
            max_rps,
            stop: false,
        };
        let mut on = Vec::new();
        for p in proxies {
            if let Some((_, commands)) = inner.proxies.get(p)
                && commands.try_send(start.clone()).is_ok()
            {
                on.push(p.clone());
            }
        }
        if !on.is_empty() {
            inner.taps.insert(id, (tx, on.clone(), start));
        }
        (id, rx, on)
    }

    /// Stops tap `id` on its proxies; its caller's stream ends.
    pub fn stop(&self, id: u64) {
        let mut inner = self.lock();
        let Some((_, on, _)) = inner.taps.remove(&id) else {
            return;
        };
        for p in on {
            if let Some((_, commands)) = inner.proxies.get(&p) {
                let _ = commands.try_send(TapCommand {
                    tap_id: id,
                    stop: true,
                    ..Default::default()
                });
            }
        }
    }

    /// The guard that stops tap `id` when its call ends.
    pub fn guard(state: Arc<crate::state::ControlState>, id: u64) -> TapGuard {
        TapGuard { hub: state, id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_reaches_only_its_proxies_and_follows_one_that_reconnects() {
        let hub = TapHub::default();
        let (_, mut a) = hub.proxy_connected("a");
        let (_, mut b) = hub.proxy_connected("b");
        let (id, mut samples, on) = hub.start(&["a".into()], "/x", 5);
        assert_eq!(on, ["a"]);
        assert_eq!(a.try_recv().expect("a start").path_prefix, "/x");
        assert!(b.try_recv().is_err(), "b is not tapped");
        // Samples count only from the proxies the tap runs on.
        for proxy in ["a", "b"] {
            hub.deliver(TapEvent {
                tap_id: id,
                proxy: proxy.into(),
                ..Default::default()
            });
        }
        assert_eq!(samples.try_recv().expect("a sample").proxy, "a");
        assert!(samples.try_recv().is_err(), "not b's");
        // a reconnects: its new stream starts with the tap.
        let (n, mut again) = hub.proxy_connected("a");
        assert_eq!(again.try_recv().expect("the tap again").tap_id, id);
        // The call ends: a is told to stop, and the caller's stream ends.
        hub.stop(id);
        assert!(again.try_recv().expect("stop").stop);
        hub.proxy_gone("a", n);
        assert!(matches!(
            samples.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ));
    }
}
