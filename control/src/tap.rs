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
    /// Each running tap: where its samples go, and the proxies it runs on.
    taps: HashMap<u64, (mpsc::Sender<TapEvent>, Vec<String>)>,
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

    /// Registers proxy `id`'s taps stream: the commands for it come out of the receiver.
    /// Returns the stream's number, for [`TapHub::proxy_gone`].
    pub fn proxy_connected(&self, id: &str) -> (u64, mpsc::Receiver<TapCommand>) {
        // Room for every start and stop a busy operator makes between two reads.
        let (tx, rx) = mpsc::channel(256);
        let mut inner = self.lock();
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
        if let Some((sink, on)) = self.lock().taps.get(&event.tap_id)
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
        let mut on = Vec::new();
        for p in proxies {
            if let Some((_, commands)) = inner.proxies.get(p) {
                let sent = commands.try_send(TapCommand {
                    tap_id: id,
                    path_prefix: path_prefix.to_owned(),
                    max_rps,
                    stop: false,
                });
                if sent.is_ok() {
                    on.push(p.clone());
                }
            }
        }
        if !on.is_empty() {
            inner.taps.insert(id, (tx, on.clone()));
        }
        (id, rx, on)
    }

    /// Stops tap `id` on its proxies; its caller's stream ends.
    pub fn stop(&self, id: u64) {
        let mut inner = self.lock();
        let Some((_, on)) = inner.taps.remove(&id) else {
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
