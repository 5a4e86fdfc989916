//! Weft's core sidecar proxy.
//!
//! [`Proxy::bind`] takes a [`Config`], binds every socket (so a port in use is an error before
//! anything runs), and [`Proxy::run`] starts one worker thread per core, each with its own
//! single-threaded tokio runtime and its own `SO_REUSEPORT` socket per listener, plus the
//! admin endpoint on the calling thread. It returns after a graceful drain on SIGTERM or
//! SIGINT. On SIGHUP it re-reads its config file and swaps in the new filter chains.
//!
//! ```no_run
//! use weft_proxy::{Config, Proxy, ProxyOptions};
//! let config = Config::load("proxy.yaml".as_ref())?;
//! let options = ProxyOptions { workers: 2, config_path: None };
//! let proxy = Proxy::bind(config, options)?;
//! proxy.run()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See `docs/ARCHITECTURE.md` for the code map and invariants.

pub mod admin;
pub mod body;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod filter;
pub mod framing;
pub mod headers;
pub mod lb;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod upstream;
pub mod wasm;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use config::Config;

use crate::admin::AdminState;
use crate::cluster::Cluster;
use crate::filter::ChainSlot;
use crate::listener::{ListenerRuntime, WorkerSpec};
use crate::metrics::Metrics;
use crate::proxy::ListenerCtx;

/// Process-level options that are not part of the config file.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Worker threads (each runs its own event loop).
    pub workers: usize,
    /// The config file, re-read on SIGHUP to swap filter chains in place.
    pub config_path: Option<std::path::PathBuf>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A socket could not be bound.
    #[error("{what}: cannot listen on {address}: {source}")]
    Bind {
        /// Which socket (`listener outbound`, `admin`).
        what: String,
        /// The address.
        address: SocketAddr,
        /// The cause; `AddrInUse` when another process holds the port.
        source: std::io::Error,
    },
    /// A WASM filter could not be loaded or started.
    #[error(transparent)]
    Filter(#[from] wasm::WasmError),
    /// The WASM engine could not be created.
    #[error("cannot start the WASM filter host: {0:#}")]
    WasmHost(anyhow::Error),
    /// A runtime or thread could not be created.
    #[error("cannot start: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Swaps filter chains in place from a re-read config file (SIGHUP).
struct Reloader {
    path: Option<std::path::PathBuf>,
    /// The config the chains come from.
    running: Config,
    wasm: Option<Arc<wasm::WasmRuntime>>,
    metrics: Arc<Metrics>,
    listeners: Vec<Arc<ListenerRuntime>>,
}

impl Reloader {
    /// Re-reads the config and, for each listener with filters, builds the new chain off
    /// the request path (compile, link, canary start) and publishes it with one
    /// atomic swap: new streams take it, streams in flight finish on the chain they started
    /// with, whose instances are freed when the last of them ends. Any error keeps every
    /// running chain and is logged and counted. Changes outside `filters` need a restart.
    async fn reload(&mut self) {
        let Some(path) = self.path.clone() else {
            tracing::warn!("SIGHUP: no config file to re-read");
            return;
        };
        let started = std::time::Instant::now();
        let next = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("SIGHUP: config not reloaded, the running chains stay: {e}");
                self.metrics.chain_swap(false);
                return;
            }
        };
        let same_shape = next.listeners.len() == self.running.listeners.len()
            && next
                .listeners
                .iter()
                .zip(&self.running.listeners)
                .all(|(a, b)| a.name == b.name && a.address == b.address)
            && next.clusters.len() == self.running.clusters.len()
            && next
                .clusters
                .iter()
                .zip(&self.running.clusters)
                .all(|(a, b)| a.name == b.name);
        if !same_shape {
            tracing::warn!(
                "SIGHUP: listeners or clusters changed; only filter chains are swapped in place, \
                 the rest needs a restart"
            );
        }
        let wasm = match &self.wasm {
            Some(w) => w.clone(),
            None => match wasm::WasmRuntime::new(next.wasm.cache_dir.clone()) {
                Ok(w) => {
                    let w = Arc::new(w);
                    self.wasm = Some(w.clone());
                    w
                }
                Err(e) => {
                    tracing::error!("SIGHUP: cannot start the WASM filter host: {e:#}");
                    self.metrics.chain_swap(false);
                    return;
                }
            },
        };
        let clusters: Vec<String> = self
            .running
            .clusters
            .iter()
            .map(|c| c.name.clone())
            .collect();
        // Build every changed chain first: all or nothing.
        let mut built = Vec::new();
        for (i, l) in next.listeners.iter().enumerate() {
            // Every chain is rebuilt: a module file may have changed under the same path
            // (unchanged modules load from the compile cache in milliseconds).
            if l.filters.is_empty() && self.running.listeners[i].filters.is_empty() {
                continue;
            }
            let Some(rt) = self.listeners.iter().find(|r| r.ctx.name == l.name) else {
                continue;
            };
            if l.filters.is_empty() {
                built.push((i, rt.clone(), None));
                continue;
            }
            let (wasm, name, filters, clusters, metrics) = (
                wasm.clone(),
                l.name.clone(),
                l.filters.clone(),
                clusters.clone(),
                self.metrics.clone(),
            );
            let chain = tokio::task::spawn_blocking(move || {
                wasm.build_chain(&name, &filters, &clusters, &metrics)
            })
            .await;
            match chain {
                Ok(Ok(c)) => built.push((i, rt.clone(), Some(c))),
                Ok(Err(e)) => {
                    tracing::error!("SIGHUP: the running chains stay: {e}");
                    self.metrics.chain_swap(false);
                    return;
                }
                Err(e) => {
                    tracing::error!("SIGHUP: the running chains stay: {e}");
                    self.metrics.chain_swap(false);
                    return;
                }
            }
        }
        let swapped = built.len();
        for (i, rt, chain) in built {
            rt.ctx
                .chain
                .store(chain.map(|c| Arc::new(Box::new(c) as Box<dyn filter::FilterChain>)));
            self.running.listeners[i].filters = next.listeners[i].filters.clone();
        }
        self.metrics.chain_swap(true);
        tracing::info!(
            listeners = swapped,
            ms = started.elapsed().as_millis() as u64,
            "SIGHUP: filter chains swapped"
        );
    }
}

/// A proxy with its sockets bound, ready to run.
pub struct Proxy {
    config: Config,
    options: ProxyOptions,
    metrics: Arc<Metrics>,
    chains: Vec<Option<wasm::WasmChain>>,
    wasm: Option<Arc<wasm::WasmRuntime>>,
    admin: std::net::TcpListener,
    listeners: Vec<(String, SocketAddr, Vec<std::net::TcpListener>)>,
}

impl Proxy {
    /// Binds the admin socket and every listener's per-worker sockets.
    pub fn bind(config: Config, options: ProxyOptions) -> Result<Proxy, StartError> {
        let workers = options.workers.max(1);
        let metrics = Arc::new(Metrics::new());
        // Filters are loaded and started once before any socket is bound: a bad module or
        // config is a startup error.
        let mut runtime = None;
        let mut chains = Vec::new();
        for l in &config.listeners {
            if l.filters.is_empty() {
                chains.push(None);
                continue;
            }
            if runtime.is_none() {
                runtime = Some(
                    wasm::WasmRuntime::new(config.wasm.cache_dir.clone())
                        .map_err(StartError::WasmHost)?,
                );
            }
            let rt = runtime
                .as_ref()
                .ok_or_else(|| StartError::WasmHost(anyhow::anyhow!("filter host unavailable")))?;
            let clusters: Vec<String> = config.clusters.iter().map(|c| c.name.clone()).collect();
            chains.push(Some(
                rt.build_chain(&l.name, &l.filters, &clusters, &metrics)?,
            ));
        }
        let bind_err = |what: String, address: SocketAddr| {
            move |source: std::io::Error| StartError::Bind {
                what,
                address,
                source,
            }
        };
        let admin = std::net::TcpListener::bind(config.admin.address)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .map_err(bind_err("admin".into(), config.admin.address))?;
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let (addr, sockets) = listener::bind_reuseport(l.address, workers)
                .map_err(bind_err(format!("listener `{}`", l.name), l.address))?;
            listeners.push((l.name.clone(), addr, sockets));
        }
        Ok(Proxy {
            config,
            options: ProxyOptions {
                workers,
                config_path: options.config_path,
            },
            metrics,
            chains,
            wasm: runtime.map(Arc::new),
            admin,
            listeners,
        })
    }

    /// Where each listener listens.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|(n, a, _)| (n.clone(), *a))
            .collect()
    }

    /// Where the admin endpoint listens.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Runs until SIGTERM or SIGINT, then drains: stops accepting, lets in-flight requests
    /// finish within `drain.timeout_ms` (HTTP/1 answers get `connection: close`, HTTP/2
    /// connections a GOAWAY) and returns.
    pub fn run(mut self) -> Result<(), StartError> {
        let metrics = self.metrics.clone();
        let clusters: Arc<[Arc<Cluster>]> = self
            .config
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Cluster::new(i, c, metrics.cluster(&c.name))))
            .collect();
        let cluster_names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
        let mut chains = std::mem::take(&mut self.chains).into_iter();
        let runtimes: Vec<Arc<ListenerRuntime>> = self
            .config
            .listeners
            .iter()
            .map(|l| {
                let chain = chains.next().flatten();
                let ctx = ListenerCtx {
                    name: l.name.clone(),
                    default_cluster: cluster_names
                        .iter()
                        .position(|c| *c == l.default_cluster)
                        .unwrap_or(0),
                    clusters: clusters.clone(),
                    metrics: metrics.listener(&l.name, &cluster_names),
                    chain: ChainSlot::from_pointee(
                        chain.map(|c| Box::new(c) as Box<dyn filter::FilterChain>),
                    ),
                    replay_limit: l.replay_buffer_kb as usize * 1024,
                };
                Arc::new(ListenerRuntime::new(Arc::new(ctx), l))
            })
            .collect();

        let main_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(AdminState {
            config: self.config.clone(),
            listeners: self.listener_addrs(),
            clusters: clusters.clone(),
            metrics,
            draining: AtomicBool::new(false),
        });
        let drain_timeout = Duration::from_millis(self.config.drain.timeout_ms);
        let timer_anchor = clusters
            .iter()
            .filter_map(|c| c.request_timeout)
            .fold(Duration::from_secs(1), Duration::min)
            .max(Duration::from_millis(1));

        main_rt.block_on(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let mut hup = signal(SignalKind::hangup())?;

            // Hand each worker its own socket of every listener.
            let mut per_worker: Vec<Vec<_>> =
                (0..self.options.workers).map(|_| Vec::new()).collect();
            for ((_, _, sockets), rt) in self.listeners.into_iter().zip(&runtimes) {
                for (w, socket) in sockets.into_iter().enumerate() {
                    per_worker[w].push((socket, rt.clone()));
                }
            }
            let mut handles = Vec::new();
            for (id, listeners) in per_worker.into_iter().enumerate() {
                handles.push(listener::spawn_worker(WorkerSpec {
                    id,
                    listeners,
                    clusters: clusters.clone(),
                    drain: drain_rx.clone(),
                    drain_timeout,
                    timer_anchor,
                })?);
            }
            let admin = tokio::spawn(admin::serve(
                tokio::net::TcpListener::from_std(self.admin)?,
                state.clone(),
            ));
            tracing::info!(workers = handles.len(), "weft-proxy ready");

            let mut reloader = Reloader {
                path: self.options.config_path.clone(),
                running: self.config.clone(),
                wasm: self.wasm.clone(),
                metrics: state.metrics.clone(),
                listeners: runtimes.clone(),
            };
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
                    _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
                    _ = hup.recv() => reloader.reload().await,
                }
            }
            state
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = drain_tx.send(true);
            let joined = tokio::task::spawn_blocking(move || {
                for h in handles {
                    let _ = h.join();
                }
            })
            .await;
            admin.abort();
            if joined.is_err() {
                tracing::error!("a worker panicked while draining");
            }
            tracing::info!("drained; exiting");
            Ok(())
        })
    }
}
