//! Changing a running proxy in place: filter chains, default clusters and clusters (added,
//! changed, removed, or their endpoints), from a re-read config file (SIGHUP) or a control
//! service snapshot ([`crate::control`]).
//!
//! Every change is all or nothing: each new chain is built off the request path (compile,
//! link, canary start) and only when all are ready is each published with one atomic swap.
//! New streams take the new chain and clusters; streams in flight finish on the chain and
//! the clusters they started with (a removed cluster lives on until its last request ends),
//! whose instances are freed when the last of them ends. A cluster whose settings stay keeps
//! its pools, statistics and counts. Any error leaves everything as it was.

use std::sync::Arc;

use crate::config::Config;
use crate::config::ListenerConfig;
use crate::control::{ControlSnapshot, StateDir, overlay};
use crate::downstream::{ListenerRuntime, ListenerSlot, WorkerCommand};
use crate::filter::FilterHost;
use crate::http::Live;
use crate::metrics::Metrics;
use crate::tls::ServerTls;
use crate::upstream::{Cluster, ClusterTable};

/// Applies config changes to the running proxy.
pub(crate) struct Reloader {
    /// The config file, re-read on SIGHUP.
    pub path: Option<std::path::PathBuf>,
    /// The bootstrap config, as last read from the file.
    pub base: Config,
    /// The config running now: `base` with the control snapshot over it.
    pub running: Config,
    /// The control snapshot running now.
    pub snapshot: Option<ControlSnapshot>,
    /// Where control snapshots and modules are kept.
    pub state_dir: Option<StateDir>,
    /// Builds filter chains (the WASM host), if the proxy has one.
    pub filter_host: Option<Arc<dyn FilterHost>>,
    pub metrics: Arc<Metrics>,
    /// The listeners now, in config order.
    pub listeners: Vec<Arc<ListenerSlot>>,
    /// Each worker's command channel (new listeners' sockets go to them).
    pub workers: Vec<tokio::sync::mpsc::UnboundedSender<WorkerCommand>>,
    /// The proxy's overload state (new listeners share it).
    pub overload: Arc<crate::overload::Overload>,
    /// The proxy's clusters, replaced whole when any is added, changed or removed.
    pub clusters: Arc<ClusterTable>,
    /// The mesh identity (new clusters' TLS is built over it).
    pub identity: Arc<crate::tls::IdentityStore>,
    /// What `/config_dump` shows.
    pub admin: Arc<crate::admin::AdminState>,
    /// Filter failure counts, by (filter, kind), when what runs was applied.
    pub failure_baseline: std::collections::BTreeMap<(String, String), u64>,
}

impl Reloader {
    /// SIGHUP: re-reads the config file and applies it (with the control snapshot, if any,
    /// over it). Every chain is rebuilt, since a module file may have changed under the same
    /// path (unchanged modules load from the compile cache in milliseconds).
    pub async fn reload_file(&mut self) {
        let Some(path) = self.path.clone() else {
            tracing::warn!("SIGHUP: no config file to re-read");
            return;
        };
        let started = std::time::Instant::now();
        let result = async {
            let base = Config::load(&path).map_err(|e| e.to_string())?;
            let next = match (&self.snapshot, &self.state_dir) {
                (Some(snap), Some(dir)) => {
                    dir.check_modules(snap)?;
                    overlay(&base, snap, dir)?
                }
                _ => base.clone(),
            };
            let swapped = self.apply(next, true).await?;
            self.base = base;
            Ok::<_, String>(swapped)
        }
        .await;
        match result {
            Ok(swapped) => tracing::info!(
                listeners = swapped,
                ms = started.elapsed().as_millis() as u64,
                "SIGHUP: config applied"
            ),
            Err(e) => tracing::error!("SIGHUP: nothing changed: {e}"),
        }
    }

    /// Applies a control snapshot over the bootstrap config and, once it runs, persists it
    /// so that a restart without the control service runs it too.
    pub async fn apply_snapshot(&mut self, snap: ControlSnapshot) -> Result<(), String> {
        let dir = self
            .state_dir
            .clone()
            .ok_or("no state directory for control snapshots")?;
        let started = std::time::Instant::now();
        let next = overlay(&self.base, &snap, &dir)?;
        let swapped = self.apply(next, false).await?;
        if let Err(e) = dir.save_snapshot(&snap) {
            tracing::warn!("the snapshot runs but could not be persisted: {e}");
        }
        tracing::info!(
            version = snap.version,
            hash = %snap.hash.get(..12).unwrap_or(&snap.hash),
            chains_swapped = swapped,
            ms = started.elapsed().as_millis() as u64,
            "control snapshot applied"
        );
        self.snapshot = Some(snap);
        self.failure_baseline = self.filter_failures();
        Ok(())
    }

    /// Filter failure counts now, by (filter, kind), for the running chains' filters.
    fn filter_failures(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut out = std::collections::BTreeMap::new();
        for f in self.running.listeners.iter().flat_map(|l| &l.filters) {
            let counters = self.metrics.filter_failures(&f.name);
            for (kind, counter) in crate::metrics::FILTER_FAILURE_KINDS.iter().zip(counters) {
                out.insert((f.name.clone(), (*kind).to_owned()), counter.get());
            }
        }
        out
    }

    /// Version and hash of the running control snapshot (0 and empty without one).
    pub fn snapshot_id(&self) -> (u64, String) {
        self.snapshot
            .as_ref()
            .map(|s| (s.version, s.hash.clone()))
            .unwrap_or_default()
    }

    /// Applies `next`: the chains that changed (all with `rebuild_all`), default clusters,
    /// clusters and their endpoints, listeners added, changed or removed. Returns the
    /// number of chains swapped.
    async fn apply(&mut self, next: Config, rebuild_all: bool) -> Result<usize, String> {
        let result = self.try_apply(next, rebuild_all).await;
        self.metrics.chain_swap(result.is_ok());
        if result.is_ok() {
            self.admin.config.store(Arc::new(self.running.clone()));
        }
        result
    }

    /// Records where this proxy stands with the control service, for `/config_dump`: whether
    /// it is connected and the error now, if any (a connection failure, or the reason of the
    /// last snapshot's NACK).
    pub fn control_status(&self, connected: bool, error: Option<&str>) {
        if let Ok(mut c) = self.admin.control.lock()
            && let Some(obj) = c.as_object_mut()
        {
            let (version, hash) = self.snapshot_id();
            obj.insert("connected".into(), connected.into());
            obj.insert("version".into(), version.into());
            obj.insert("hash".into(), hash.into());
            obj.insert("error".into(), error.into());
        }
    }

    async fn try_apply(&mut self, next: Config, rebuild_all: bool) -> Result<usize, String> {
        // Check and build everything first: all or nothing.
        let clusters = Arc::new(
            super::build_clusters(&next, &self.identity, &self.metrics, &self.clusters.load())
                .map_err(|(what, e)| format!("{what}: {e}"))?,
        );
        let mut plans = Vec::new();
        let mut swapped = 0;
        for l in &next.listeners {
            let slot = self.listeners.iter().find(|s| s.name() == l.name).cloned();
            let running = self.running.listeners.iter().find(|r| r.name == l.name);
            let changed = running.is_none_or(|r| {
                serde_json::to_value(&l.filters).ok() != serde_json::to_value(&r.filters).ok()
            });
            let chain = match &slot {
                Some(slot) if !(changed || rebuild_all && !l.filters.is_empty()) => {
                    slot.runtime.load().ctx.live.load().chain.clone()
                }
                _ if l.filters.is_empty() => None,
                _ => {
                    let host = self
                        .filter_host
                        .clone()
                        .ok_or("this proxy has no filter host")?;
                    let (name, filters, table, metrics) = (
                        l.name.clone(),
                        l.filters.clone(),
                        self.clusters.clone(),
                        self.metrics.clone(),
                    );
                    let chain = tokio::task::spawn_blocking(move || {
                        host.build_chain(&name, &filters, &table, &metrics)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    swapped += 1;
                    Some(Arc::new(chain))
                }
            };
            let live = Live::new(chain, clusters.clone(), &l.default_cluster)
                .map_err(|e| format!("listener `{}`: default cluster: {e}", l.name))?;
            let plan = match (slot, running) {
                (Some(slot), Some(r)) if same_settings(l, r) => Plan::Keep(slot, live),
                (Some(slot), Some(r)) if l.address == r.address => {
                    let runtime = self.runtime(l, live)?;
                    Plan::Replace(slot, runtime)
                }
                (old, _) => {
                    let runtime = self.runtime(l, live)?;
                    let (address, sockets) =
                        crate::downstream::bind_reuseport(l.address, self.workers.len())
                            .map_err(|e| format!("listener `{}`: {}: {e}", l.name, l.address))?;
                    Plan::Add(old, runtime, address, sockets)
                }
            };
            plans.push(plan);
        }
        // Publish: the clusters first (endpoints of kept ones follow the config), then each
        // listener: its chain and clusters in one swap, its new settings (the sockets stay),
        // or its new sockets; listeners no longer there close (their connections drain).
        let (added, removed) = {
            let old = self.clusters.load();
            let kept = |c: &Arc<Cluster>, other: &crate::upstream::Clusters| {
                other.list.iter().any(|o| Arc::ptr_eq(o, c))
            };
            (
                clusters.list.iter().filter(|c| !kept(c, &old)).count(),
                old.list.iter().filter(|c| !kept(c, &clusters)).count(),
            )
        };
        for (c, cfg) in clusters.list.iter().zip(&next.clusters) {
            c.set_endpoints(&cfg.endpoints);
        }
        let gone: Vec<String> = {
            let old = self.clusters.load();
            old.names
                .iter()
                .filter(|n| clusters.find(n).is_none())
                .cloned()
                .collect()
        };
        self.clusters.store(clusters);
        crate::upstream::pool::table_replaced();
        let listeners: Vec<String> = next.listeners.iter().map(|l| l.name.clone()).collect();
        for name in &gone {
            self.metrics.forget_cluster(name, &listeners);
        }
        if added + removed > 0 {
            tracing::info!(added, removed, "clusters changed");
        }
        let mut slots = Vec::new();
        for plan in plans {
            match plan {
                Plan::Keep(slot, live) => {
                    slot.runtime.load().ctx.live.store(Arc::new(live));
                    slots.push(slot);
                }
                Plan::Replace(slot, runtime) => {
                    tracing::info!(listener = %slot.name(), "listener settings changed");
                    slot.runtime.store(Arc::new(runtime));
                    slots.push(slot);
                }
                Plan::Add(old, runtime, address, sockets) => {
                    let slot = ListenerSlot::new(runtime, address);
                    for (worker, socket) in self.workers.iter().zip(sockets) {
                        let _ = worker.send(WorkerCommand::Listen(socket, slot.clone()));
                    }
                    tracing::info!(listener = %slot.name(), %address, "listening");
                    if let Some(old) = old {
                        tracing::info!(listener = %old.name(), address = %old.address, "closing the old address");
                        old.close();
                    }
                    slots.push(slot);
                }
            }
        }
        for gone in self
            .listeners
            .iter()
            .filter(|s| !slots.iter().any(|k| k.name() == s.name()))
        {
            tracing::info!(listener = %gone.name(), address = %gone.address, "listener removed: closing");
            gone.close();
        }
        self.admin.listeners.store(Arc::new(
            slots.iter().map(|s| (s.name(), s.address)).collect(),
        ));
        self.listeners = slots;
        self.running = next;
        Ok(swapped)
    }

    /// The runtime of listener `l` running `live`, with its TLS.
    fn runtime(&self, l: &ListenerConfig, live: Live) -> Result<ListenerRuntime, String> {
        let tls = l
            .tls
            .as_ref()
            .map(|t| {
                ServerTls::new(t, l.protocol, l.capture.is_some(), &self.identity).map(Arc::new)
            })
            .transpose()
            .map_err(|e| format!("listener `{}`: {e}", l.name))?;
        let runtime = super::listener_runtime(l, live, &self.metrics, &self.overload, tls);
        runtime.follow_tls_files(super::TLS_FILES_EVERY);
        Ok(runtime)
    }
}

/// What happens to one listener of the config applied.
enum Plan {
    /// Same settings: only its chain, clusters and default cluster ([`Live`]) change.
    Keep(Arc<ListenerSlot>, Live),
    /// New settings on the same address: new connections get the new runtime.
    Replace(Arc<ListenerSlot>, ListenerRuntime),
    /// A new listener, or one that moved (the old slot, closed once the new one listens).
    Add(
        Option<Arc<ListenerSlot>>,
        ListenerRuntime,
        std::net::SocketAddr,
        Vec<std::net::TcpListener>,
    ),
}

/// Whether `a` and `b` are the same listener but for their filters and default cluster
/// (which a [`Live`] swap changes).
fn same_settings(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    let settings = |l: &ListenerConfig| {
        serde_json::to_value(ListenerConfig {
            filters: Vec::new(),
            default_cluster: String::new(),
            ..l.clone()
        })
        .ok()
    };
    settings(a) == settings(b)
}

impl crate::control::Target for Reloader {
    fn running(&self) -> (u64, String) {
        self.snapshot_id()
    }

    fn apply(
        &mut self,
        snap: ControlSnapshot,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(self.apply_snapshot(snap))
    }

    fn status(&self, connected: bool, error: Option<&str>) {
        self.control_status(connected, error)
    }

    fn report(&self) -> crate::control::Report {
        let digest = |listener: &str, filter: &str| {
            self.snapshot.as_ref().and_then(|s| {
                s.chains
                    .iter()
                    .filter(|c| c.listener == listener)
                    .flat_map(|c| &c.filters)
                    .find(|f| f.name == filter)
                    .map(|f| f.digest.clone())
            })
        };
        let filters = self
            .running
            .listeners
            .iter()
            .flat_map(|l| l.filters.iter().map(move |f| (l, f)))
            .map(|(l, f)| {
                let policy = serde_json::to_value(f.failure_policy)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let module = digest(&l.name, &f.name)
                    .unwrap_or_else(|| format!("file:{}", f.module.display()));
                (l.name.clone(), f.name.clone(), module, policy)
            })
            .collect();
        crate::control::Report {
            traffic: self.metrics.golden().take(),
            filters,
            identity: self
                .identity
                .held()
                .map(|id| (id.id.to_string(), id.leaf.not_after)),
        }
    }

    fn failures(&self) -> Vec<(String, String, u64)> {
        self.filter_failures()
            .into_iter()
            .filter_map(|(key, count)| {
                let since = count.saturating_sub(*self.failure_baseline.get(&key).unwrap_or(&0));
                (since > 0).then_some((key.0, key.1, since))
            })
            .collect()
    }
}
