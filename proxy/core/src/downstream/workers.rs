//! Worker threads: each runs its own single-threaded tokio runtime with its socket of every
//! listener, accepts and serves connections on it, and waits for them when the proxy drains.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use super::connection::{ListenerSlot, accept_loop};
use crate::upstream::ClusterTable;
use crate::upstream::pool as worker;

/// What one worker thread runs.
pub struct WorkerSpec {
    /// Worker number.
    pub id: usize,
    /// Its socket of each listener.
    pub listeners: Vec<(std::net::TcpListener, Arc<ListenerSlot>)>,
    /// What the proxy asks of the worker while it runs (listeners added live).
    pub commands: tokio::sync::mpsc::UnboundedReceiver<WorkerCommand>,
    /// The proxy's clusters.
    pub clusters: Arc<ClusterTable>,
    /// Becomes true when the proxy drains.
    pub drain: watch::Receiver<bool>,
    /// How long in-flight requests get once draining.
    pub drain_timeout: Duration,
    /// Period of the worker's anchor timer: at most the shortest request timeout.
    pub timer_anchor: Duration,
    /// Singleton background services this worker runs (the first worker runs them all).
    pub services: Vec<Arc<Box<dyn crate::filter::FilterChain>>>,
}

/// What a running worker is asked to do.
pub enum WorkerCommand {
    /// Accept on its socket of a listener added live.
    Listen(std::net::TcpListener, Arc<ListenerSlot>),
}

/// Starts a worker thread with its own single-threaded runtime.
pub fn spawn_worker(spec: WorkerSpec) -> io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("weft-worker-{}", spec.id))
        .spawn(move || rt.block_on(run_worker(spec)))
}

async fn run_worker(spec: WorkerSpec) {
    worker::install(spec.id, spec.clusters.clone());
    crate::http::callout::install(spec.clusters.clone());
    // tokio wakes its own driver with an eventfd write whenever a newly registered timer is
    // earlier than every other one (tokio-rs/tokio#5207): on a quiet worker that is every
    // request's timeout, one extra syscall per request. A periodic timer that always fires
    // before any request timeout keeps new request timers from ever being the earliest.
    // The same tick closes idle upstream connections that expired or were closed by their
    // upstream, once a second (`pool::sweep_idle`).
    let anchor = spec.timer_anchor;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(anchor);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next_sweep_ms = 0;
        loop {
            tick.tick().await;
            let now_ms = crate::clock::now_ms();
            if now_ms >= next_sweep_ms {
                worker::sweep_idle(now_ms);
                next_sweep_ms = now_ms + 1000;
            }
        }
    });
    let conns = ConnCounter::default();
    // Starting a service's chain starts its one instance and its tick loop here.
    for service in &spec.services {
        service.warm();
    }
    for (_, listener) in &spec.listeners {
        if let Some(chain) = listener.runtime.load().ctx.live.load().chain.clone() {
            chain.warm();
        }
    }
    let listen = |socket: std::net::TcpListener, slot: Arc<ListenerSlot>| {
        match TcpListener::from_std(socket) {
            Ok(socket) => {
                tokio::spawn(accept_loop(socket, slot, conns.clone()));
            }
            Err(e) => tracing::error!("worker {}: cannot register listener: {e}", spec.id),
        }
    };
    for (socket, slot) in spec.listeners {
        listen(socket, slot);
    }
    let mut drain = spec.drain;
    let mut commands = spec.commands;
    loop {
        tokio::select! {
            _ = drained(&mut drain) => break,
            Some(command) = commands.recv() => match command {
                WorkerCommand::Listen(socket, slot) => listen(socket, slot),
            },
        }
    }
    if tokio::time::timeout(spec.drain_timeout, conns.wait_zero())
        .await
        .is_err()
    {
        tracing::warn!(
            worker = spec.id,
            open = conns.count(),
            "drain deadline reached; closing remaining connections"
        );
    }
}

/// Resolves once the proxy drains (or is gone).
pub(super) async fn drained(drain: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which is a drain as well.
    let _ = drain.wait_for(|d| *d).await;
}

/// Counts a worker's open connections so draining can wait for them.
#[derive(Clone, Default)]
pub(super) struct ConnCounter {
    inner: Arc<(AtomicUsize, Notify)>,
}

pub(super) struct ConnGuard {
    inner: Arc<(AtomicUsize, Notify)>,
}

impl ConnCounter {
    pub(super) fn enter(&self) -> ConnGuard {
        self.inner.0.fetch_add(1, Relaxed);
        ConnGuard {
            inner: self.inner.clone(),
        }
    }

    fn count(&self) -> usize {
        self.inner.0.load(Relaxed)
    }

    async fn wait_zero(&self) {
        loop {
            let notified = self.inner.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.inner.0.fetch_sub(1, Relaxed) == 1 {
            self.inner.1.notify_waiters();
        }
    }
}
