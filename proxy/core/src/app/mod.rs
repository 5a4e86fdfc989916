//! The proxy as a process: [`Proxy::bind`] (config validated, chains built and canaried,
//! every socket bound, in that order), [`Proxy::run`] (workers, admin, signals, the control
//! follower) and the drain on SIGTERM; [`reload`] changes a running proxy in place.

pub(crate) mod reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::config::Config;

use crate::admin::AdminState;
use crate::config::IdentitySource;
use crate::downstream::{self as listener, ListenerRuntime, ListenerSlot, WorkerSpec};
use crate::filter::{ChainError, FilterChain, FilterHost};
use crate::http::{ListenerCtx, Live};
use crate::metrics::Metrics;
use crate::tls::{ClientTls, IdentityStore, MeshIdentity, ServerTls, TlsError};
use crate::upstream::{Cluster, ClusterTable, Clusters};
use crate::{admin, control};
use reload::Reloader;

/// Process-level options that are not part of the config file.
#[derive(Clone)]
pub struct ProxyOptions {
    /// Worker threads (each runs its own event loop).
    pub workers: usize,
    /// The config file, re-read on SIGHUP to swap filter chains in place.
    pub config_path: Option<std::path::PathBuf>,
    /// The control service to follow, if any; the config is then the bootstrap.
    pub control: Option<control::ControlOptions>,
    /// Builds filter chains (the WASM host); a listener with filters needs one.
    pub filter_host: Option<Arc<dyn FilterHost>>,
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
    /// A filter could not be loaded or started.
    #[error(transparent)]
    Filter(#[from] ChainError),
    /// A listener has filters but the proxy has no filter host.
    #[error("listener `{0}` has filters, but this proxy has no filter host")]
    NoFilterHost(String),
    /// A runtime or thread could not be created.
    #[error("cannot start: {0}")]
    Runtime(#[from] std::io::Error),
    /// TLS material could not be loaded (a missing or bad file, a key that does not go with
    /// its certificate, an expired identity).
    #[error("{what}: {source}")]
    Tls {
        /// Whose (`identity`, `listener inbound`, `cluster api`).
        what: String,
        /// The cause, naming the file.
        source: TlsError,
    },
}

/// A proxy with its sockets bound, ready to run.
pub struct Proxy {
    config: Config,
    options: ProxyOptions,
    metrics: Arc<Metrics>,
    chains: Vec<Option<Box<dyn FilterChain>>>,
    /// Singleton background services (`wasm.services`), run by the first worker.
    services: Vec<Arc<Box<dyn FilterChain>>>,
    /// The bootstrap config (`config` is it with the persisted control snapshot over it).
    base: Config,
    snapshot: Option<control::ControlSnapshot>,
    admin: std::net::TcpListener,
    listeners: Vec<(String, SocketAddr, Vec<std::net::TcpListener>)>,
    tls: TlsSetup,
    /// The proxy's clusters (built for `config`).
    clusters: Arc<ClusterTable>,
}

/// The proxy's TLS, loaded at startup: its mesh identity and each listener's TLS (`None`
/// where plaintext). Clusters' TLS is built with the clusters ([`build_clusters`]).
struct TlsSetup {
    identity: Arc<IdentityStore>,
    /// Where the identity comes from, to follow it: files, or renewals from the mesh CA.
    follow: Option<IdentityFollow>,
    listeners: Vec<Option<Arc<ServerTls>>>,
}

/// How the identity held is kept fresh.
enum IdentityFollow {
    /// Its files are watched.
    Files([std::path::PathBuf; 3]),
    /// It is renewed from the mesh CA.
    Ca(Box<crate::tls::enroll::Enrolled>),
}

impl TlsSetup {
    fn load(
        config: &Config,
        control: Option<&control::ControlOptions>,
    ) -> Result<Self, StartError> {
        let err = |what: String| move |source| StartError::Tls { what, source };
        let (identity, follow) = match config.identity.as_ref().map(|c| c.source()) {
            None => (None, None),
            // Validation has refused a config whose identity has no one source.
            Some(Err((field, why))) => {
                return Err(StartError::Tls {
                    what: format!("identity.{field}"),
                    source: TlsError::Invalid(why),
                });
            }
            Some(Ok(IdentitySource::Files { cert, key, bundle })) => {
                let id =
                    MeshIdentity::from_files(cert, key, bundle).map_err(err("identity".into()))?;
                let paths = [cert, key, bundle].map(ToOwned::to_owned);
                (Some(id), Some(IdentityFollow::Files(paths)))
            }
            Some(Ok(IdentitySource::Control { token_file })) => {
                let control = control.ok_or_else(|| StartError::Tls {
                    what: "identity.token_file".into(),
                    source: TlsError::Invalid(
                        "an identity from the mesh CA needs the control service (--control)".into(),
                    ),
                })?;
                let (id, enrolled) = crate::tls::enroll::enroll(token_file, control)
                    .map_err(err("identity".into()))?;
                (Some(id), Some(IdentityFollow::Ca(Box::new(enrolled))))
            }
        };
        if let Some(id) = &identity {
            tracing::info!(
                id = %id.id,
                serial = %id.leaf.serial,
                not_after = id.leaf.not_after,
                roots = id.root_count,
                "mesh identity"
            );
        }
        let identity = Arc::new(IdentityStore::new(identity));
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                l.tls
                    .as_ref()
                    .map(|t| {
                        ServerTls::new(t, l.protocol, l.capture.is_some(), &identity).map(Arc::new)
                    })
                    .transpose()
                    .map_err(err(format!("listener `{}`", l.name)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            identity,
            follow,
            listeners,
        })
    }
}

/// How often certificate files are looked at for changes.
const TLS_FILES_EVERY: Duration = Duration::from_secs(1);

impl Proxy {
    /// Binds the admin socket and every listener's per-worker sockets.
    pub fn bind(base: Config, options: ProxyOptions) -> Result<Proxy, StartError> {
        let workers = options.workers.max(1);
        let metrics = Arc::new(Metrics::new());
        // With a control service, the snapshot persisted by the last run comes up first, so
        // that a restart while the control service is down serves the last good config.
        let persisted = options.control.as_ref().and_then(|c| {
            let dir = control::StateDir::new(c.state_dir.clone());
            let snap = dir.load_snapshot()?;
            match dir
                .check_modules(&snap)
                .and_then(|()| control::overlay(&base, &snap, &dir))
            {
                Ok(config) => Some((config, snap)),
                Err(e) => {
                    tracing::warn!("the persisted control snapshot does not apply, starting from the bootstrap config: {e}");
                    None
                }
            }
        });
        let host = options.filter_host.as_deref();
        // Identity and listener TLS come from the bootstrap alone (snapshots do not change
        // them); clusters and chains from the config that runs.
        let tls = TlsSetup::load(&base, options.control.as_ref())?;
        let table = Arc::new(ClusterTable::from_pointee(Clusters::default()));
        let start = |config: &Config| -> Result<_, StartError> {
            let clusters = build_clusters(config, &tls.identity, &metrics, &Clusters::default())
                .map_err(|(what, source)| StartError::Tls { what, source })?;
            table.store(Arc::new(clusters));
            build_chains(config, &metrics, host, &table)
        };
        let (mut config, mut snapshot, mut chains) = match persisted {
            Some((config, snap)) => match start(&config) {
                Ok(built) => {
                    tracing::info!(
                        version = snap.version,
                        "serving the persisted control snapshot"
                    );
                    (config, Some(snap), built)
                }
                Err(e) => {
                    tracing::warn!(
                        "the persisted control snapshot does not start, starting from the bootstrap config: {e}"
                    );
                    (base.clone(), None, start(&base)?)
                }
            },
            None => (base.clone(), None, start(&base)?),
        };
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
        if !config.admin.address.ip().is_loopback() {
            tracing::warn!(
                address = %config.admin.address,
                "the admin endpoint listens beyond loopback and is unauthenticated: anyone \
                 who reaches it reads the running config and stats; keep it on loopback \
                 unless a network policy guards it"
            );
        }
        let bind_all = |config: &Config| -> Result<Vec<_>, StartError> {
            let mut listeners = Vec::new();
            for l in &config.listeners {
                let (addr, sockets) = listener::bind_reuseport(l.address, workers)
                    .map_err(bind_err(format!("listener `{}`", l.name), l.address))?;
                listeners.push((l.name.clone(), addr, sockets));
            }
            Ok(listeners)
        };
        let listeners = match bind_all(&config) {
            Ok(listeners) => listeners,
            // A listener of the persisted snapshot whose address is taken now: the
            // bootstrap's listeners still serve (the control service says the rest).
            Err(e) if snapshot.is_some() => {
                tracing::warn!(
                    "the persisted control snapshot's listeners do not bind, starting from the bootstrap config: {e}"
                );
                chains = start(&base)?;
                config = base.clone();
                snapshot = None;
                bind_all(&config)?
            }
            Err(e) => return Err(e),
        };
        let services = build_services(&config, &metrics, host, &table)?;
        Ok(Proxy {
            config,
            options: ProxyOptions { workers, ..options },
            metrics,
            chains,
            services,
            base,
            snapshot,
            admin,
            listeners,
            tls,
            clusters: table,
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
        let clusters = self.clusters.clone();
        let overload = {
            let (soft, hard) = crate::overload::raise_file_limit();
            let limit = match self.config.overload.max_connections {
                0 => (soft.min(1 << 24) as usize) * 40 / 100,
                n => n as usize,
            };
            tracing::info!(
                open_file_limit = soft,
                hard_limit = hard,
                max_connections = limit,
                "overload budget"
            );
            let (shed, level) = metrics.overload();
            Arc::new(crate::overload::Overload::new(
                limit,
                self.config.overload.keepalive_off_percent,
                shed,
                level,
            ))
        };
        let mut chains = std::mem::take(&mut self.chains).into_iter();
        let slots: Vec<Arc<ListenerSlot>> = self
            .config
            .listeners
            .iter()
            .zip(&self.listeners)
            .enumerate()
            .map(|(i, (l, (_, address, _)))| {
                let chain = chains.next().flatten();
                // Validation has checked the default cluster against these clusters.
                let live = Live::new(
                    chain.map(Arc::new),
                    clusters.load_full(),
                    &l.default_cluster,
                )
                .unwrap_or_else(|_| {
                    Live::new(None, clusters.load_full(), "").expect("no default cluster")
                });
                let tls = self.tls.listeners.get(i).cloned().flatten();
                ListenerSlot::new(
                    listener_runtime(l, live, &metrics, &overload, tls),
                    *address,
                )
            })
            .collect();

        let main_rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(AdminState {
            config: arc_swap::ArcSwap::from_pointee(self.config.clone()),
            control: std::sync::Mutex::new(match &self.options.control {
                Some(c) => serde_json::json!({
                    "address": c.address_list(),
                    "id": c.id,
                    "labels": c.labels,
                    "connected": false,
                    "version": self.snapshot.as_ref().map(|s| s.version),
                    "hash": self.snapshot.as_ref().map(|s| s.hash.clone()),
                    "error": null,
                }),
                None => serde_json::Value::Null,
            }),
            listeners: arc_swap::ArcSwap::from_pointee(self.listener_addrs()),
            clusters: clusters.clone(),
            metrics,
            draining: AtomicBool::new(false),
            identity: self.tls.identity.clone(),
        });
        let drain_timeout = Duration::from_millis(self.config.drain.timeout_ms);
        let timer_anchor = clusters
            .load()
            .list
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
            for ((_, _, sockets), slot) in self.listeners.into_iter().zip(&slots) {
                for (w, socket) in sockets.into_iter().enumerate() {
                    per_worker[w].push((socket, slot.clone()));
                }
            }
            let mut handles = Vec::new();
            let mut workers = Vec::new();
            for (id, listeners) in per_worker.into_iter().enumerate() {
                let (commands_tx, commands) = tokio::sync::mpsc::unbounded_channel();
                workers.push(commands_tx);
                handles.push(listener::spawn_worker(WorkerSpec {
                    id,
                    listeners,
                    commands,
                    clusters: clusters.clone(),
                    drain: drain_rx.clone(),
                    drain_timeout,
                    timer_anchor,
                    services: if id == 0 {
                        std::mem::take(&mut self.services)
                    } else {
                        Vec::new()
                    },
                })?);
            }
            if let Some(tracing_config) = &self.config.tracing {
                let control = self.options.control.as_ref();
                let workload = control.and_then(|c| c.labels.get("app").cloned());
                let resource = crate::otlp::ResourceInfo {
                    service_name: tracing_config
                        .service_name
                        .clone()
                        .or_else(|| workload.clone())
                        .unwrap_or_else(|| "weft-proxy".into()),
                    proxy_id: control.map(|c| c.id.clone()),
                    workload,
                };
                if let Some(exporter) =
                    crate::otlp::start(tracing_config, resource, state.metrics.otlp())
                {
                    tokio::spawn(exporter);
                }
            }
            let admin = tokio::spawn(admin::serve(
                tokio::net::TcpListener::from_std(self.admin)?,
                state.clone(),
            ));
            match self.tls.follow.take() {
                Some(IdentityFollow::Files(paths)) => {
                    tokio::spawn(
                        self.tls
                            .identity
                            .clone()
                            .follow_files(paths, TLS_FILES_EVERY),
                    );
                }
                Some(IdentityFollow::Ca(enrolled)) => {
                    tokio::spawn((*enrolled).renew_forever(self.tls.identity.clone()));
                }
                None => {}
            }
            for slot in &slots {
                slot.runtime.load().follow_tls_files(TLS_FILES_EVERY);
            }
            tracing::info!(workers = handles.len(), "weft-proxy ready");

            let reloader = Arc::new(tokio::sync::Mutex::new(Reloader {
                path: self.options.config_path.clone(),
                base: self.base,
                running: self.config.clone(),
                snapshot: self.snapshot,
                state_dir: self
                    .options
                    .control
                    .as_ref()
                    .map(|c| control::StateDir::new(c.state_dir.clone())),
                filter_host: self.options.filter_host.clone(),
                metrics: state.metrics.clone(),
                listeners: slots,
                workers,
                overload,
                clusters: clusters.clone(),
                identity: self.tls.identity.clone(),
                admin: state.clone(),
                failure_baseline: Default::default(),
            }));
            let follower = self
                .options
                .control
                .clone()
                .map(|opts| tokio::spawn(control::follow(opts, reloader.clone())));
            loop {
                tokio::select! {
                    _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
                    _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
                    _ = hup.recv() => reloader.lock().await.reload_file().await,
                }
            }
            if let Some(f) = follower {
                f.abort();
            }
            state
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            for slot in &reloader.lock().await.listeners {
                slot.close();
            }
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

/// Loads and starts every listener's chain (before any socket is bound: a bad module or
/// config is a startup error).
fn build_chains(
    config: &Config,
    metrics: &Metrics,
    host: Option<&dyn FilterHost>,
    clusters: &Arc<ClusterTable>,
) -> Result<Vec<Option<Box<dyn FilterChain>>>, StartError> {
    let mut chains = Vec::new();
    for l in &config.listeners {
        if l.filters.is_empty() {
            chains.push(None);
            continue;
        }
        let host = host.ok_or_else(|| StartError::NoFilterHost(l.name.clone()))?;
        chains.push(Some(
            host.build_chain(&l.name, &l.filters, clusters, metrics)?,
        ));
    }
    Ok(chains)
}

/// Loads and starts each singleton background service (`wasm.services`), as a chain of one
/// filter that the first worker runs.
fn build_services(
    config: &Config,
    metrics: &Metrics,
    host: Option<&dyn FilterHost>,
    clusters: &Arc<ClusterTable>,
) -> Result<Vec<Arc<Box<dyn FilterChain>>>, StartError> {
    if config.wasm.services.is_empty() {
        return Ok(Vec::new());
    }
    let host = host.ok_or_else(|| StartError::NoFilterHost("wasm.services".into()))?;
    config
        .wasm
        .services
        .iter()
        .map(|s| {
            let chain =
                host.build_chain("wasm.services", std::slice::from_ref(s), clusters, metrics)?;
            Ok(Arc::new(chain))
        })
        .collect()
}

/// The clusters of `config`: a cluster of `old` whose settings stay is kept (its endpoints,
/// pools, statistics and counts; its endpoints follow the config when the caller publishes
/// the table, by [`Cluster::set_endpoints`]); a new or changed one is built, with its TLS.
/// An error names the cluster whose TLS could not be built.
pub(crate) fn build_clusters(
    config: &Config,
    identity: &Arc<IdentityStore>,
    metrics: &Metrics,
    old: &Clusters,
) -> Result<Clusters, (String, TlsError)> {
    let list = config
        .clusters
        .iter()
        .map(|c| {
            if let Some(kept) = old.get(&c.name).filter(|k| k.same_settings(c)) {
                return Ok(kept.clone());
            }
            let tls = c
                .tls
                .as_ref()
                .map(|t| ClientTls::new(t, c.protocol, identity).map(Arc::new))
                .transpose()
                .map_err(|e| (format!("cluster `{}`", c.name), e))?;
            Ok(Arc::new(
                Cluster::new(c, metrics.cluster(&c.name)).with_tls(tls),
            ))
        })
        .collect::<Result<_, _>>()?;
    Ok(Clusters::new(list))
}

/// The runtime of listener `l` running `live`, with its TLS (`None` for plaintext).
pub(crate) fn listener_runtime(
    l: &crate::config::ListenerConfig,
    live: Live,
    metrics: &Metrics,
    overload: &Arc<crate::overload::Overload>,
    tls: Option<Arc<ServerTls>>,
) -> ListenerRuntime {
    let ctx = ListenerCtx {
        name: l.name.clone(),
        live: arc_swap::ArcSwap::from_pointee(live),
        metrics: metrics.listener(&l.name),
        replay_limit: l.replay_buffer_kb as usize * 1024,
        direction: l.direction.number(),
        max_requests_per_connection: l.max_requests_per_connection,
        max_requests_per_http2_connection: l.max_requests_per_http2_connection,
        overload: overload.clone(),
        stream_idle_timeout: (l.stream_idle_timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(l.stream_idle_timeout_ms)),
    };
    ListenerRuntime::new(Arc::new(ctx), l, tls)
}
