//! The control service's state: modules, config resources, the registry and the proxies it
//! has seen, written through to the [`Store`]. Every change that can alter a proxy's snapshot
//! bumps a change counter that discovery streams watch ([`ControlState::changes`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::gateway;
use crate::model::{
    ClusterSpec, Endpoint, Instance, Kind, Labels, ModuleRecord, Resource, Spec, diff, now_ms,
};
use crate::registry::Registry;
use crate::snapshot::{Snapshot, SnapshotChain, SnapshotCluster, SnapshotListener};
use weft_client::signing::{ModuleSignature, TrustedKeys};

use crate::store::{Changed, Store, StoreError};

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;

/// Why a control operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad input: the message says what.
    #[error("{0}")]
    Invalid(String),
    /// No such thing.
    #[error("not found: {0}")]
    NotFound(String),
    /// Refused in the current state (e.g. deleting a module in use).
    #[error("{0}")]
    Conflict(String),
    /// Not allowed (a module without a trusted signature).
    #[error("{0}")]
    Denied(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an apply did to one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The kind.
    pub kind: Kind,
    /// The name.
    pub name: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: &'static str,
    /// The YAML diff.
    pub diff: String,
}

/// What the service knows of one proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxyState {
    /// Its id.
    pub id: String,
    /// Its labels.
    pub labels: Labels,
    /// Which stream is current (a reconnect replaces the older one).
    pub stream: u64,
    /// Whether a stream is open.
    pub connected: bool,
    /// Last ACKed snapshot version.
    pub acked_version: u64,
    /// Last ACKed snapshot hash.
    pub acked_hash: String,
    /// Last sent snapshot version.
    pub sent_version: u64,
    /// Config version its running snapshot is current for.
    pub synced_version: u64,
    /// The last NACK's reason (cleared by a later ACK).
    pub nack_error: String,
    /// The version NACKed.
    pub nacked_version: u64,
    /// The hash of the snapshot NACKed.
    pub nacked_hash: String,
    /// Last message, ms since the epoch.
    pub last_seen_ms: u64,
    /// Filter failures since it applied what it runs: (filter, kind, count).
    pub failures: Vec<(String, String, u64)>,
    /// Its running chains' filters (from its last report): (listener, filter, module,
    /// failure policy).
    pub filters: Vec<(String, String, String, String)>,
    /// Its mesh identity and when its certificate expires (seconds since the epoch), from
    /// its last report.
    pub identity: Option<(String, i64)>,
    /// When its last traffic report came, ms since the epoch (0: none yet).
    pub last_report_ms: u64,
}

struct Config {
    version: u64,
    resources: BTreeMap<(Kind, String), Resource>,
}

struct Modules {
    records: BTreeMap<String, ModuleRecord>,
    names: BTreeMap<String, String>,
    /// Whether chains may only use modules verified with a trusted key.
    signed_only: bool,
}

/// The shared state behind every gRPC service.
pub struct ControlState {
    store: Arc<dyn Store>,
    registry: Box<dyn Registry>,
    config: Mutex<Config>,
    modules: Mutex<Modules>,
    proxies: Mutex<BTreeMap<String, ProxyState>>,
    changes: watch::Sender<u64>,
    streams: std::sync::atomic::AtomicU64,
    /// Keys a module must be signed by to be stored (none: signatures are kept, not
    /// required).
    module_keys: TrustedKeys,
    /// What the `dns` names of clusters resolve to now (`dns.rs` keeps it).
    dns: Mutex<BTreeMap<String, Vec<Endpoint>>>,
    /// The last snapshot made for each label set, with the change count it was made at:
    /// proxies with the same labels share one (a thousand of them cost one build).
    snapshots: Mutex<std::collections::HashMap<SnapshotKey, (u64, Arc<Snapshot>)>>,
    /// The proxies' traffic reports (golden metrics).
    pub stats: crate::stats::MeshStats,
    /// The rollout running, if any, and those that ran.
    pub rollouts: crate::rollout::Rollouts,
    /// The proxies' taps streams and the running tap calls.
    pub taps: crate::tap::TapHub,
}

/// What a cached snapshot was made for: a label set, and the overlay generation (0: none).
type SnapshotKey = (Labels, u64);

/// Resources that replace (or add to) the stored ones in some proxies' snapshots: a
/// rollout's new version, with the generation that tells its snapshots apart.
pub type Overlay = (u64, Arc<BTreeMap<(Kind, String), Resource>>);

/// Reads again what `changes` says changed in a shared store (another replica wrote it),
/// until the store stops watching. Changes that come while one is read are read together.
pub async fn follow_store(
    state: Arc<ControlState>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Changed>,
) {
    while let Some(mut what) = changes.recv().await {
        let mut said = false;
        loop {
            while let Ok(more) = changes.try_recv() {
                what = what.merge(more);
            }
            let s = state.clone();
            match tokio::task::spawn_blocking(move || s.refresh(what)).await {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    // Read everything again until the store answers: nothing seen may be
                    // dropped (proxies keep what they run meanwhile).
                    if !said {
                        tracing::warn!("cannot read the store's changes: {e}; trying again");
                        said = true;
                    }
                    what = Changed::ALL;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!("reading the store's changes failed: {e}");
                    break;
                }
            }
        }
        if said {
            tracing::info!("read the store's changes");
        }
    }
}

/// Tries of an apply or delete that other replicas keep committing before.
const COMMIT_TRIES: usize = 8;

fn contended() -> ControlError {
    ControlError::Conflict(
        "other control services kept changing the config during this apply; try again".into(),
    )
}

/// Label sets whose snapshots are kept; past it the cache starts over.
const SNAPSHOT_CACHE: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `s` is a valid resource or module name: 1 to 253 of `[A-Za-z0-9._-]`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl ControlState {
    /// Loads everything from the store.
    pub fn load(
        store: Arc<dyn Store>,
        registry: Box<dyn Registry>,
    ) -> Result<ControlState, ControlError> {
        let (resources, version) = store.config()?;
        let records = store
            .modules()?
            .into_iter()
            .map(|m| (m.digest.clone(), m))
            .collect();
        let names = store.module_names()?.into_iter().collect();
        Ok(ControlState {
            registry,
            config: Mutex::new(Config {
                version,
                resources: resources
                    .into_iter()
                    .map(|r| ((r.kind, r.name.clone()), r))
                    .collect(),
            }),
            modules: Mutex::new(Modules {
                records,
                names,
                signed_only: false,
            }),
            proxies: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            snapshots: Mutex::default(),
            streams: 0.into(),
            module_keys: TrustedKeys::default(),
            dns: Mutex::new(store.dns_answers()?.into_iter().collect()),
            stats: Default::default(),
            rollouts: Default::default(),
            taps: Default::default(),
            store,
        })
    }

    /// The `dns` names of the Cluster resources.
    pub fn dns_names(&self) -> std::collections::BTreeSet<String> {
        lock(&self.config)
            .resources
            .values()
            .filter_map(|r| match &r.spec {
                Spec::Cluster(c) if !c.dns.is_empty() => Some(c.dns.clone()),
                _ => None,
            })
            .collect()
    }

    /// Records what DNS name `name` resolves to; proxies get new snapshots if it changed.
    pub fn set_dns_endpoints(&self, name: &str, mut endpoints: Vec<Endpoint>) {
        endpoints.sort();
        endpoints.dedup();
        let changed = {
            let mut dns = lock(&self.dns);
            if dns.get(name) == Some(&endpoints) {
                false
            } else {
                tracing::info!(
                    name,
                    endpoints = ?endpoints.iter().map(|e| e.address.as_str()).collect::<Vec<_>>(),
                    "DNS answer changed"
                );
                dns.insert(name.to_owned(), endpoints.clone());
                true
            }
        };
        if changed {
            // Kept, so that a restart while DNS is down starts from this answer.
            let persist = || self.store.put_dns_answer(name, &endpoints);
            let kept = match tokio::runtime::Handle::try_current() {
                Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                    tokio::task::block_in_place(persist)
                }
                _ => persist(),
            };
            if let Err(e) = kept {
                tracing::warn!(name, "DNS: cannot keep the answer in the store: {e}");
            }
            self.changed();
        }
    }

    /// Forgets the DNS names no cluster names any more.
    pub fn retain_dns(&self, wanted: &std::collections::BTreeSet<String>) {
        lock(&self.dns).retain(|name, _| wanted.contains(name));
    }

    /// Requires every module pushed from now on to be signed by one of `keys`, and every
    /// chain applied to use only such modules. The modules stored already are verified
    /// again now, with these keys: those that fail stay stored (chains running them keep
    /// running) but no chain can be applied with them, and each is named in the log.
    pub fn with_module_keys(self, keys: TrustedKeys) -> Result<Self, ControlError> {
        if keys.is_empty() {
            return Ok(self);
        }
        {
            let mut modules = lock(&self.modules);
            modules.signed_only = true;
            let digests: Vec<String> = modules.records.keys().cloned().collect();
            for digest in digests {
                let bytes = self.store.module_bytes(&digest)?.unwrap_or_default();
                let record = modules.records.get_mut(&digest).expect("listed");
                let signature = ModuleSignature::parse(&record.signature).ok();
                match keys.verify(&bytes, signature.as_ref()) {
                    Ok(key) => record.verified_by = key,
                    Err(e) => {
                        tracing::warn!(module = %record.name, %digest, "stored module not usable in new chains: {e}");
                        record.verified_by.clear();
                    }
                }
            }
        }
        Ok(ControlState {
            module_keys: keys,
            ..self
        })
    }

    /// A receiver that sees a new value after every change that may alter a snapshot.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Tells every proxy stream to look again at what its proxy should run (a rollout's
    /// share changed).
    pub fn reconsider(&self) {
        self.changed();
    }

    /// The current config version.
    pub fn version(&self) -> u64 {
        lock(&self.config).version
    }

    // ---- modules -------------------------------------------------------------------

    /// Validates and stores an unsigned module under `name`.
    pub fn push_module(&self, name: &str, bytes: &[u8]) -> Result<ModuleRecord, ControlError> {
        self.push_signed_module(name, bytes, "")
    }

    /// Validates and stores a module under `name` with its `signature` (one line, or
    /// empty), which must verify with a trusted key when the service has any.
    pub fn push_signed_module(
        &self,
        name: &str,
        bytes: &[u8],
        signature: &str,
    ) -> Result<ModuleRecord, ControlError> {
        if self.store.shared() {
            // A signature another replica stored must be known here to be kept.
            self.refresh(Changed {
                modules: true,
                ..Changed::default()
            })?;
        }
        if !valid_name(name) {
            return Err(ControlError::Invalid(format!(
                "module name `{name}`: use 1 to 253 letters, digits, `.`, `_` or `-`"
            )));
        }
        let parsed = match signature.trim() {
            "" => None,
            line => Some(ModuleSignature::parse(line).map_err(|e| {
                ControlError::Invalid(format!("module `{name}`: its signature: {e}"))
            })?),
        };
        let verified_by = if self.module_keys.is_empty() {
            String::new()
        } else {
            self.module_keys
                .verify(bytes, parsed.as_ref())
                .map_err(|e| ControlError::Denied(format!("module `{name}` refused: {e}")))?
        };
        let signature = parsed.map(|s| s.to_line()).unwrap_or_default();
        let abi_version = crate::module_check::inspect_module(bytes)
            .map_err(|e| ControlError::Invalid(format!("module `{name}` rejected: {e}")))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let mut modules = lock(&self.modules);
        let record = match modules.records.get(&digest) {
            // A new signature replaces the one kept; none keeps it.
            Some(existing) if signature.is_empty() => ModuleRecord {
                name: name.to_owned(),
                ..existing.clone()
            },
            Some(existing) => ModuleRecord {
                name: name.to_owned(),
                signature,
                verified_by,
                ..existing.clone()
            },
            None => ModuleRecord {
                digest: digest.clone(),
                name: name.to_owned(),
                size: bytes.len() as u64,
                abi_version,
                created_ms: now_ms(),
                signature,
                verified_by,
            },
        };
        self.store.put_module(&record, bytes)?;
        modules.records.insert(digest.clone(), record.clone());
        modules.names.insert(name.to_owned(), digest);
        Ok(record)
    }

    /// Every module, by name then digest.
    pub fn modules(&self) -> Vec<ModuleRecord> {
        let mut v: Vec<_> = lock(&self.modules).records.values().cloned().collect();
        v.sort_by(|a, b| (&a.name, &a.digest).cmp(&(&b.name, &b.digest)));
        v
    }

    /// Resolves `sha256:<hex>` or a name to a stored digest (on a shared store, reading
    /// the modules again first when it is not known here: pushed through another replica a
    /// moment ago).
    pub fn resolve_module(&self, reference: &str) -> Result<String, ControlError> {
        match resolve(&lock(&self.modules), reference) {
            Err(ControlError::NotFound(_)) if self.store.shared() => {}
            r => return r,
        }
        self.refresh(Changed {
            modules: true,
            ..Changed::default()
        })?;
        resolve(&lock(&self.modules), reference)
    }

    /// A module's bytes.
    pub fn module_bytes(&self, reference: &str) -> Result<Vec<u8>, ControlError> {
        let digest = self.resolve_module(reference)?;
        self.store
            .module_bytes(&digest)?
            .ok_or_else(|| ControlError::NotFound(format!("module {digest}")))
    }

    /// Deletes a module no chain refers to.
    pub fn delete_module(&self, reference: &str) -> Result<ModuleRecord, ControlError> {
        self.committing(|| self.try_delete_module(reference))
    }

    /// One try of `delete_module`: `None` when another replica committed config first.
    fn try_delete_module(&self, reference: &str) -> Result<Option<ModuleRecord>, ControlError> {
        // Same lock order as `apply`.
        let mut modules = lock(&self.modules);
        let digest = resolve(&modules, reference)?;
        let checked_at = {
            let config = lock(&self.config);
            if let Some(r) = config
                .resources
                .values()
                .find(|r| r.modules().any(|m| m == digest))
            {
                return Err(ControlError::Conflict(format!(
                    "module {digest} is used by {} `{}`; change or delete it first",
                    r.kind.as_str().to_lowercase(),
                    r.name
                )));
            }
            config.version
        };
        if !self.store.delete_module(&digest, checked_at)? {
            return Ok(None);
        }
        modules.names.retain(|_, d| *d != digest);
        modules
            .records
            .remove(&digest)
            .map(Some)
            .ok_or_else(|| ControlError::NotFound(format!("module {digest}")))
    }

    // ---- config --------------------------------------------------------------------

    /// Checks a resource and resolves its module references to digests.
    fn check(modules: &Modules, mut r: Resource) -> Result<Resource, ControlError> {
        let what = format!("{} `{}`", r.kind.as_str().to_lowercase(), r.name);
        let invalid = |m: String| ControlError::Invalid(format!("{what}: {m}"));
        if !valid_name(&r.name) {
            return Err(invalid(
                "name: use 1 to 253 letters, digits, `.`, `_` or `-`".into(),
            ));
        }
        if r.selector.keys().any(|k| k.is_empty()) {
            return Err(invalid("selector: empty label key".into()));
        }
        match (&mut r.spec, r.kind) {
            (Spec::Chain(c), Kind::Chain) => {
                if c.listener.is_empty() {
                    return Err(invalid("spec.listener is required".into()));
                }
                let mut seen = BTreeSet::new();
                for f in &mut c.filters {
                    if f.name.is_empty() || !seen.insert(f.name.clone()) {
                        return Err(invalid(format!(
                            "filter names must be set and unique (`{}`)",
                            f.name
                        )));
                    }
                    f.module = resolve(modules, &f.module).map_err(|e| {
                        invalid(format!(
                            "filter `{}`: {e}; push it with `weftctl module push`",
                            f.name
                        ))
                    })?;
                    if modules.signed_only
                        && modules
                            .records
                            .get(&f.module)
                            .is_none_or(|m| m.verified_by.is_empty())
                    {
                        return Err(ControlError::Denied(format!(
                            "{what}: filter `{}`: module {} is not signed by a trusted key; \
                             push it with `weftctl module push --sign KEY`",
                            f.name, f.module
                        )));
                    }
                    if !f.config_ref.is_empty() && !f.config.is_null() {
                        return Err(invalid(format!(
                            "filter `{}`: set `config` or `config_ref`, not both",
                            f.name
                        )));
                    }
                }
            }
            (Spec::FilterConfig(_), Kind::FilterConfig)
                if r.name == gateway::MESH_ROUTES || r.name == gateway::MESH_RETRIES =>
            {
                return Err(invalid(
                    "the name is reserved: the control service makes it from the HTTPRoutes and GRPCRoutes"
                        .into(),
                ));
            }
            (Spec::FilterConfig(c), Kind::FilterConfig) => {
                if !r.selector.is_empty() {
                    return Err(invalid(
                        "a FilterConfig has no selector: it applies wherever a chain refers to it"
                            .into(),
                    ));
                }
                if c.config.is_null() {
                    return Err(invalid("spec.config is required".into()));
                }
            }
            (Spec::Cluster(c), Kind::Cluster) => {
                if c.endpoints.is_empty() && c.service.is_empty() && c.dns.is_empty() {
                    return Err(invalid(
                        "spec needs endpoints, a service or a dns name".into(),
                    ));
                }
                if !c.dns.is_empty() {
                    crate::dns::DnsTarget::parse(&c.dns)
                        .map_err(|m| invalid(format!("dns: {m}")))?;
                }
                for e in &mut c.endpoints {
                    check_address(&e.address).map_err(|m| invalid(format!("endpoint: {m}")))?;
                    e.weight = e.weight.max(1);
                }
                // Checked as a proxy with an identity checks it (mesh TLS needs one: a
                // proxy without refuses the snapshot, and says why).
                weft_config::ClusterConfig::from_settings(&r.name, c.settings.as_ref(), true)
                    .map_err(invalid)?;
                if c.settings.as_ref().is_some_and(|s| s.is_null()) {
                    c.settings = None;
                }
            }
            (Spec::Listener(l), Kind::Listener) => {
                // Checked as a proxy with an identity checks it; its default cluster is
                // checked by each proxy against the clusters it has.
                weft_config::ListenerConfig::from_settings(&r.name, Some(&l.settings), true)
                    .map_err(invalid)?;
            }
            (Spec::Route(route), Kind::HttpRoute | Kind::GrpcRoute) => {
                if !r.selector.is_empty() {
                    return Err(invalid(
                        "a route has no selector: it applies to every proxy calling its Services"
                            .into(),
                    ));
                }
                let kind = if r.kind == Kind::GrpcRoute {
                    gateway::RouteKind::Grpc
                } else {
                    gateway::RouteKind::Http
                };
                gateway::check(kind, &route.spec).map_err(invalid)?;
            }
            (Spec::Scope(s), Kind::Scope) => {
                if s.services.is_empty() {
                    return Err(invalid(
                        "spec.services must name at least one service (`*` for all)".into(),
                    ));
                }
                if let Some(bad) = s.services.iter().find(|n| {
                    let name = n.strip_suffix('*').unwrap_or(n);
                    !(name.is_empty() || valid_name(name))
                }) {
                    return Err(invalid(format!(
                        "spec.services: `{bad}` is not a service name (or a prefix ending in `*`)"
                    )));
                }
            }
            _ => return Err(invalid("spec does not match the kind".into())),
        }
        Ok(r)
    }

    /// Creates or replaces resources, all or nothing; a dry run only reports.
    ///
    /// On a shared store this replica first reads what others wrote, and commits with
    /// compare-and-swap on the version: when another replica committed first, it reads
    /// again and checks the apply against that, a few times.
    pub fn apply(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
    ) -> Result<(u64, Vec<Change>), ControlError> {
        self.committing(|| self.try_apply(resources.clone(), dry_run))
    }

    /// Runs `try_once` (a change checked against what this replica holds, then committed
    /// with compare-and-swap) until no other replica committed before it (`None`), reading
    /// config and modules again before the first try and between tries.
    fn committing<T>(
        &self,
        mut try_once: impl FnMut() -> Result<Option<T>, ControlError>,
    ) -> Result<T, ControlError> {
        self.catch_up()?;
        for _ in 0..COMMIT_TRIES {
            if let Some(done) = try_once()? {
                return Ok(done);
            }
            self.refresh(Changed {
                config: true,
                modules: true,
                ..Changed::default()
            })?;
        }
        Err(contended())
    }

    /// On a shared store: reads config and modules again, so that checks see what other
    /// replicas committed.
    fn catch_up(&self) -> Result<(), ControlError> {
        if self.store.shared() {
            self.refresh(Changed {
                config: true,
                modules: true,
                ..Changed::default()
            })?;
        }
        Ok(())
    }

    /// One try of `apply`: `None` when another replica committed first.
    fn try_apply(
        &self,
        resources: Vec<Resource>,
        dry_run: bool,
    ) -> Result<Option<(u64, Vec<Change>)>, ControlError> {
        // Modules, then config, held to the end: a module cannot be deleted between the
        // check that a chain's module exists and the commit of that chain.
        let modules = lock(&self.modules);
        let mut checked = Vec::with_capacity(resources.len());
        let mut keys = BTreeSet::new();
        for r in resources {
            if !keys.insert((r.kind, r.name.clone())) {
                return Err(ControlError::Invalid(format!(
                    "{} `{}` appears twice",
                    r.kind.as_str().to_lowercase(),
                    r.name
                )));
            }
            checked.push(Self::check(&modules, r)?);
        }
        let mut config = lock(&self.config);
        // Every `config_ref` names a FilterConfig that exists or comes with this apply.
        for r in &checked {
            for name in r.config_refs() {
                let key = (Kind::FilterConfig, name.to_owned());
                let generated = name == gateway::MESH_ROUTES || name == gateway::MESH_RETRIES;
                if !generated && !keys.contains(&key) && !config.resources.contains_key(&key) {
                    return Err(ControlError::Invalid(format!(
                        "chain `{}`: no FilterConfig `{name}`; apply it first or with the chain",
                        r.name
                    )));
                }
            }
        }
        let next = config.version + 1;
        let mut changes = Vec::new();
        let mut put = Vec::new();
        for mut r in checked {
            let old = config.resources.get(&(r.kind, r.name.clone()));
            let (action, diff) = match old {
                None => ("created", diff("", &r.to_yaml())),
                Some(o) if o.selector == r.selector && o.spec == r.spec => {
                    ("unchanged", String::new())
                }
                Some(o) => ("configured", diff(&o.to_yaml(), &r.to_yaml())),
            };
            changes.push(Change {
                kind: r.kind,
                name: r.name.clone(),
                action,
                diff,
            });
            if action != "unchanged" {
                r.version = next;
                put.push(r);
            }
        }
        if dry_run || put.is_empty() {
            return Ok(Some((config.version, changes)));
        }
        if !self.store.commit_config(next, &put, &[])? {
            return Ok(None);
        }
        config.version = next;
        for r in put {
            config.resources.insert((r.kind, r.name.clone()), r);
        }
        drop(config);
        self.changed();
        Ok(Some((next, changes)))
    }

    /// Resources as an apply would store them (module names resolved to digests), checked
    /// as an apply checks them, with what an apply would change; nothing is stored.
    pub fn checked(
        &self,
        resources: Vec<Resource>,
    ) -> Result<(Vec<Resource>, Vec<Change>), ControlError> {
        let (_, changes) = self.apply(resources.clone(), true)?;
        let modules = lock(&self.modules);
        let checked = resources
            .into_iter()
            .map(|r| Self::check(&modules, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((checked, changes))
    }

    /// The chains whose filters run an older build of module `name`, with those filters
    /// moved to the build the name points to now; and that build's digest.
    pub fn module_candidates(&self, name: &str) -> Result<(String, Vec<Resource>), ControlError> {
        let (current, older) = {
            let modules = lock(&self.modules);
            let current = modules
                .names
                .get(name)
                .cloned()
                .ok_or_else(|| ControlError::NotFound(format!("module `{name}`")))?;
            let older: BTreeSet<String> = modules
                .records
                .values()
                .filter(|m| m.name == name && m.digest != current)
                .map(|m| m.digest.clone())
                .collect();
            (current, older)
        };
        let mut chains = Vec::new();
        for mut r in self.resources(Some(Kind::Chain)).0 {
            let Spec::Chain(c) = &mut r.spec else {
                continue;
            };
            let mut moved = false;
            for f in &mut c.filters {
                if older.contains(&f.module) {
                    f.module = current.clone();
                    moved = true;
                }
            }
            if moved {
                chains.push(r);
            }
        }
        if chains.is_empty() {
            return Err(ControlError::Invalid(format!(
                "no chain runs an older build of module `{name}` than {current}"
            )));
        }
        Ok((current, chains))
    }

    /// Deletes one resource.
    pub fn delete(&self, kind: Kind, name: &str) -> Result<(u64, Change), ControlError> {
        self.committing(|| self.try_delete(kind, name))
    }

    /// One try of `delete`: `None` when another replica committed first.
    fn try_delete(&self, kind: Kind, name: &str) -> Result<Option<(u64, Change)>, ControlError> {
        let mut config = lock(&self.config);
        let key = (kind, name.to_owned());
        let old = config.resources.get(&key).ok_or_else(|| {
            ControlError::NotFound(format!("{} `{name}`", kind.as_str().to_lowercase()))
        })?;
        if kind == Kind::FilterConfig
            && let Some(user) = config
                .resources
                .values()
                .find(|r| r.config_refs().any(|c| c == name))
        {
            return Err(ControlError::Conflict(format!(
                "FilterConfig `{name}` is used by chain `{}`; change or delete it first",
                user.name
            )));
        }
        let change = Change {
            kind,
            name: name.to_owned(),
            action: "deleted",
            diff: diff(&old.to_yaml(), ""),
        };
        let next = config.version + 1;
        if !self
            .store
            .commit_config(next, &[], std::slice::from_ref(&key))?
        {
            return Ok(None);
        }
        config.resources.remove(&key);
        config.version = next;
        drop(config);
        self.changed();
        Ok(Some((next, change)))
    }

    // ---- a shared store ------------------------------------------------------------

    /// Whether this replica does the singleton work (always, on a store of its own).
    pub fn leads(&self) -> bool {
        self.store.leads()
    }

    /// Reads again from the store what `what` says changed (written by another replica of
    /// a shared store), and tells discovery streams when anything did.
    pub fn refresh(&self, what: Changed) -> Result<(), ControlError> {
        let mut changed = false;
        if what.modules {
            changed |= self.refresh_modules()?;
        }
        let config = what.config && self.refresh_config()?;
        changed |= config;
        if what.instances {
            changed |= self.registry.refresh()?;
        }
        // New config may name DNS names whose answers are stored already.
        if what.dns || config {
            changed |= self.refresh_dns()?;
        }
        if changed {
            self.changed();
        }
        Ok(())
    }

    fn refresh_config(&self) -> Result<bool, ControlError> {
        let mut config = lock(&self.config);
        let (resources, version) = self.store.config()?;
        // Versions are committed by compare-and-swap: the same version is the same config.
        if version == config.version {
            return Ok(false);
        }
        tracing::info!(
            from = config.version,
            to = version,
            "config changed in the store"
        );
        config.version = version;
        config.resources = resources
            .into_iter()
            .map(|r| ((r.kind, r.name.clone()), r))
            .collect();
        Ok(true)
    }

    fn refresh_modules(&self) -> Result<bool, ControlError> {
        let mut modules = lock(&self.modules);
        let mut records: BTreeMap<String, ModuleRecord> = self
            .store
            .modules()?
            .into_iter()
            .map(|m| (m.digest.clone(), m))
            .collect();
        let names: BTreeMap<String, String> = self.store.module_names()?.into_iter().collect();
        if names == modules.names
            && records.len() == modules.records.len()
            && records.iter().all(|(d, r)| {
                modules
                    .records
                    .get(d)
                    .is_some_and(|m| m.signature == r.signature && m.name == r.name)
            })
        {
            return Ok(false);
        }
        // Whether a module may be used is this replica's call, with its own keys.
        for (digest, record) in records.iter_mut() {
            match modules.records.get(digest) {
                Some(known) if known.signature == record.signature => {
                    record.verified_by = known.verified_by.clone();
                }
                _ if modules.signed_only => {
                    let bytes = self.store.module_bytes(digest)?.unwrap_or_default();
                    let signature = ModuleSignature::parse(&record.signature).ok();
                    record.verified_by = self
                        .module_keys
                        .verify(&bytes, signature.as_ref())
                        .unwrap_or_default();
                }
                _ => record.verified_by.clear(),
            }
        }
        modules.records = records;
        modules.names = names;
        Ok(true)
    }

    fn refresh_dns(&self) -> Result<bool, ControlError> {
        let wanted = self.dns_names();
        let stored: BTreeMap<String, Vec<Endpoint>> = self
            .store
            .dns_answers()?
            .into_iter()
            .filter(|(name, _)| wanted.contains(name))
            .map(|(name, mut eps)| {
                eps.sort();
                eps.dedup();
                (name, eps)
            })
            .collect();
        let mut dns = lock(&self.dns);
        if *dns == stored {
            return Ok(false);
        }
        *dns = stored;
        Ok(true)
    }

    /// Resources of `kind` (all when `None`), by kind then name, and the config version.
    pub fn resources(&self, kind: Option<Kind>) -> (Vec<Resource>, u64) {
        let config = lock(&self.config);
        let list = config
            .resources
            .values()
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .cloned()
            .collect();
        (list, config.version)
    }

    /// A route's `Accepted` and `ResolvedRefs` conditions against the services the mesh
    /// knows now (Cluster resources and registry services); none for other resources.
    pub fn route_conditions(&self, r: &Resource) -> Vec<gateway::Condition> {
        let Some(route) = stored_routes(&BTreeMap::from([((r.kind, r.name.clone()), r.clone())]))
            .into_iter()
            .next()
        else {
            return Vec::new();
        };
        let mut services: BTreeSet<String> = self
            .registry
            .instances()
            .into_iter()
            .map(|i| i.service)
            .collect();
        services.extend(
            lock(&self.config)
                .resources
                .values()
                .filter(|r| r.kind == Kind::Cluster)
                .map(|r| r.name.clone()),
        );
        gateway::status(&route, &services)
    }

    // ---- registry ------------------------------------------------------------------

    /// Registers an instance.
    pub fn register(&self, instance: Instance) -> Result<Instance, ControlError> {
        if instance.service.is_empty() || !valid_name(&instance.service) {
            return Err(ControlError::Invalid(format!(
                "service name `{}`: use 1 to 253 letters, digits, `.`, `_` or `-`",
                instance.service
            )));
        }
        check_address(&instance.address).map_err(ControlError::Invalid)?;
        if !instance.identity.is_empty() {
            weft_config::SpiffeId::parse(&instance.identity)
                .map_err(|e| ControlError::Invalid(format!("identity: {e}")))?;
        }
        let i = self.registry.register(Instance {
            ttl_seconds: if instance.ttl_seconds == 0 {
                30
            } else {
                instance.ttl_seconds
            },
            weight: instance.weight.max(1),
            ..instance
        })?;
        self.changed();
        Ok(i)
    }

    /// Renews an instance.
    pub fn heartbeat(&self, id: &str) -> Result<Instance, ControlError> {
        self.registry.heartbeat(id)
    }

    /// Removes an instance.
    pub fn deregister(&self, id: &str) -> Result<Instance, ControlError> {
        let i = self.registry.deregister(id)?;
        self.changed();
        Ok(i)
    }

    /// Every live instance.
    pub fn instances(&self) -> Vec<Instance> {
        self.registry.instances()
    }

    /// Expires instances that missed their heartbeats.
    pub fn expire(&self) -> Result<Vec<Instance>, ControlError> {
        let expired = self.registry.expire(now_ms())?;
        if !expired.is_empty() {
            for i in &expired {
                tracing::info!(instance = %i.id, "instance expired: no heartbeat for {} s", i.ttl_seconds);
            }
            self.changed();
        }
        Ok(expired)
    }

    // ---- discovery -----------------------------------------------------------------

    /// What a proxy with `labels` should run now: made once per label set and change.
    pub fn snapshot(&self, labels: &Labels) -> Arc<Snapshot> {
        self.snapshot_with(labels, None)
    }

    /// What proxy `id` with `labels` should run now: with the running rollout's new
    /// version when the proxy is in its share.
    pub fn snapshot_for(&self, id: &str, labels: &Labels) -> Arc<Snapshot> {
        self.snapshot_with(labels, self.rollouts.overlay_for(id).as_ref())
    }

    /// What a proxy with `labels` should run with `overlay` over the stored resources: made
    /// once per label set, overlay and change.
    pub fn snapshot_with(&self, labels: &Labels, overlay: Option<&Overlay>) -> Arc<Snapshot> {
        // The count first: a change made while the snapshot is made bumps it, so the next
        // caller makes it again.
        let seq = *self.changes.borrow();
        let key = (labels.clone(), overlay.map_or(0, |o| o.0));
        if let Some((at, snap)) = lock(&self.snapshots).get(&key)
            && *at == seq
        {
            return snap.clone();
        }
        let snap = Arc::new(self.make_snapshot(labels, overlay.map(|o| &*o.1)));
        let mut cache = lock(&self.snapshots);
        if cache.len() >= SNAPSHOT_CACHE {
            cache.clear();
        }
        match cache.get(&key) {
            // Another caller made a newer one meanwhile.
            Some((at, _)) if *at > seq => {}
            _ => {
                cache.insert(key, (seq, snap.clone()));
            }
        }
        snap
    }

    /// Makes what a proxy with `labels` should run now, with `overlay` over the stored
    /// resources.
    fn make_snapshot(
        &self,
        labels: &Labels,
        overlay: Option<&BTreeMap<(Kind, String), Resource>>,
    ) -> Snapshot {
        let (mut chains, mut clusters, listeners, scopes, routes, version) = {
            let config = lock(&self.config);
            let empty = BTreeMap::new();
            let overlay = overlay.unwrap_or(&empty);
            let get = |key: &(Kind, String)| overlay.get(key).or_else(|| config.resources.get(key));
            let mut chains = Vec::new();
            let mut clusters = Vec::new();
            let mut listeners = Vec::new();
            let mut scopes = Vec::new();
            // In key order either way, so that equal content makes an equal snapshot.
            let mut resources: BTreeMap<&(Kind, String), &Resource> =
                config.resources.iter().collect();
            resources.extend(overlay.iter());
            for r in resources.into_values().filter(|r| r.selects(labels)) {
                match &r.spec {
                    Spec::Chain(c) => chains.push(SnapshotChain {
                        name: r.name.clone(),
                        listener: c.listener.clone(),
                        default_cluster: c.default_cluster.clone(),
                        filters: c
                            .filters
                            .iter()
                            .map(|f| {
                                let mut f = f.clone();
                                // The referenced configuration, inlined.
                                // (The mesh's routes are made below, once the clusters
                                // the proxy gets are known.)
                                if !f.config_ref.is_empty()
                                    && f.config_ref != gateway::MESH_ROUTES
                                    && f.config_ref != gateway::MESH_RETRIES
                                {
                                    let key =
                                        (Kind::FilterConfig, std::mem::take(&mut f.config_ref));
                                    if let Some(Spec::FilterConfig(fc)) = get(&key).map(|r| &r.spec)
                                    {
                                        f.config = fc.config.clone();
                                    }
                                }
                                f
                            })
                            .collect(),
                    }),
                    Spec::Cluster(c) => clusters.push((r.name.clone(), c.clone(), false)),
                    Spec::Listener(l) => listeners.push(SnapshotListener {
                        name: r.name.clone(),
                        settings: l.settings.clone(),
                    }),
                    Spec::Scope(s) => scopes.push(s.clone()),
                    Spec::FilterConfig(_) | Spec::Route(_) => {}
                }
            }
            let routes: Vec<gateway::StoredRoute> = if chains
                .iter()
                .any(|c: &SnapshotChain| c.filters.iter().any(|f| !f.config_ref.is_empty()))
            {
                stored_routes(&config.resources)
            } else {
                Vec::new()
            };
            (chains, clusters, listeners, scopes, routes, config.version)
        };
        let instances = self.registry.instances();
        // Every registry service no Cluster resource states becomes a cluster of its name:
        // a service that registers is callable by name with no config at all. Its
        // instances all proving an identity, it takes mesh TLS.
        let stated: std::collections::BTreeSet<&str> = clusters
            .iter()
            .flat_map(|(name, c, _)| [name.as_str(), c.service.as_str()])
            .collect();
        let mut implicit: BTreeMap<&str, bool> = BTreeMap::new();
        for i in &instances {
            if !stated.contains(i.service.as_str()) {
                let all_identified = implicit.entry(i.service.as_str()).or_insert(true);
                *all_identified &= !i.identity.is_empty();
            }
        }
        let implicit: Vec<_> = implicit
            .into_iter()
            .map(|(service, mesh)| {
                let spec = ClusterSpec {
                    service: service.to_owned(),
                    settings: mesh.then(|| serde_json::json!({"tls": {"mode": "mesh"}})),
                    ..ClusterSpec::default()
                };
                (service.to_owned(), spec, true)
            })
            .collect();
        clusters.extend(implicit);
        // Scoped: only the clusters the scopes allow, and those the proxy's chains and
        // listeners name as their default.
        if !scopes.is_empty() {
            let defaults: BTreeSet<&str> = chains
                .iter()
                .map(|c| c.default_cluster.as_str())
                .chain(
                    listeners
                        .iter()
                        .filter_map(|l| l.settings.get("default_cluster")?.as_str()),
                )
                .collect();
            clusters.retain(|(name, _, _)| {
                defaults.contains(name.as_str()) || scopes.iter().any(|s| s.allows(name))
            });
        }
        let dns = lock(&self.dns);
        let clusters: Vec<SnapshotCluster> = clusters
            .into_iter()
            .map(
                |(
                    name,
                    ClusterSpec {
                        endpoints,
                        service,
                        dns: dns_name,
                        settings,
                    },
                    implicit,
                )| {
                    let mut eps: Vec<Endpoint> = endpoints;
                    if let Some(resolved) = dns.get(&dns_name) {
                        eps.extend(resolved.iter().cloned());
                    }
                    eps.extend(
                        instances
                            .iter()
                            .filter(|i| !service.is_empty() && i.service == service)
                            .map(|i| Endpoint {
                                address: i.address.clone(),
                                weight: i.weight,
                                identity: i.identity.clone(),
                            }),
                    );
                    eps.sort();
                    eps.dedup_by(|a, b| a.address == b.address);
                    SnapshotCluster {
                        name,
                        endpoints: eps,
                        settings,
                        implicit,
                    }
                },
            )
            .collect();
        // The mesh's routes, for chains that run them, over the clusters this proxy gets.
        if chains
            .iter()
            .any(|c| c.filters.iter().any(|f| !f.config_ref.is_empty()))
        {
            let names: BTreeSet<String> = clusters.iter().map(|c| c.name.clone()).collect();
            let mesh = gateway::MeshRoutes::new(&routes, &names);
            for f in chains.iter_mut().flat_map(|c| c.filters.iter_mut()) {
                match std::mem::take(&mut f.config_ref).as_str() {
                    gateway::MESH_ROUTES => f.config = mesh.router.clone(),
                    gateway::MESH_RETRIES => {
                        // Merged over what the filter says itself (its default, budget).
                        let mut config = match std::mem::take(&mut f.config) {
                            serde_json::Value::Object(o) => o,
                            _ => serde_json::Map::new(),
                        };
                        config.insert("routes".into(), mesh.retry["routes"].clone());
                        f.config = serde_json::Value::Object(config);
                    }
                    _ => {}
                }
            }
        }
        Snapshot::new(version, chains, clusters, listeners)
    }

    /// Opens a stream for proxy `id`: returns the stream's number.
    pub fn proxy_connected(&self, id: &str, labels: Labels) -> u64 {
        let stream = self
            .streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut proxies = lock(&self.proxies);
        let p = proxies.entry(id.to_owned()).or_default();
        p.id = id.to_owned();
        p.labels = labels;
        p.stream = stream;
        p.connected = true;
        p.last_seen_ms = now_ms();
        stream
    }

    /// Updates the proxy's state if `stream` is still its current stream.
    pub fn with_proxy(&self, id: &str, stream: u64, f: impl FnOnce(&mut ProxyState)) {
        let mut proxies = lock(&self.proxies);
        if let Some(p) = proxies.get_mut(id)
            && p.stream == stream
        {
            f(p);
        }
    }

    /// Every proxy seen, by id.
    pub fn proxies(&self) -> Vec<ProxyState> {
        lock(&self.proxies).values().cloned().collect()
    }
}

/// Resolves `sha256:<hex>` or a module name to a stored digest.
fn resolve(modules: &Modules, reference: &str) -> Result<String, ControlError> {
    if reference.starts_with("sha256:") {
        return modules
            .records
            .contains_key(reference)
            .then(|| reference.to_owned())
            .ok_or_else(|| ControlError::NotFound(format!("module {reference}")));
    }
    modules
        .names
        .get(reference)
        .cloned()
        .ok_or_else(|| ControlError::NotFound(format!("module `{reference}`")))
}

/// Checks an endpoint address exactly as proxies parse it (`ip:port`, `[v6]:port` or
/// `host:port`), so that the service never hands out an address every proxy would refuse.
pub fn check_address(address: &str) -> Result<(), String> {
    weft_config::EndpointAddress::parse(address).map(drop)
}

/// The Gateway API routes among `resources`.
fn stored_routes(resources: &BTreeMap<(Kind, String), Resource>) -> Vec<gateway::StoredRoute> {
    resources
        .values()
        .filter_map(|r| match (&r.spec, r.kind) {
            (Spec::Route(route), Kind::HttpRoute | Kind::GrpcRoute) => Some(gateway::StoredRoute {
                kind: if r.kind == Kind::GrpcRoute {
                    gateway::RouteKind::Grpc
                } else {
                    gateway::RouteKind::Http
                },
                name: r.name.clone(),
                namespace: route.namespace.clone(),
                spec: route.spec.clone(),
                version: r.version,
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChainSpec, FilterConfigSpec, FilterSpec};
    use crate::registry::EmbeddedRegistry;
    use crate::store::RedbStore;

    /// The smallest module the service accepts: it exports the proxy-wasm ABI version.
    fn module() -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend([0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x03, 0x02, 0x01, 0x00]);
        let name = b"proxy_abi_version_0_2_1";
        m.extend([0x07, name.len() as u8 + 4, 0x01, name.len() as u8]);
        m.extend(name);
        m.extend([0x00, 0x00, 0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]);
        m
    }

    fn state(dir: &std::path::Path) -> ControlState {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir).expect("store"));
        let registry = Box::new(EmbeddedRegistry::load(store.clone()).expect("registry"));
        ControlState::load(store, registry).expect("state")
    }

    fn chain(app: &str, filter: FilterSpec) -> Resource {
        Resource {
            kind: Kind::Chain,
            name: format!("{app}-out"),
            selector: [("app".to_string(), app.to_string())].into(),
            version: 0,
            spec: Spec::Chain(ChainSpec {
                listener: "outbound".into(),
                default_cluster: String::new(),
                filters: vec![filter],
            }),
        }
    }

    fn filter(config: serde_json::Value, config_ref: &str) -> FilterSpec {
        FilterSpec {
            name: "router".into(),
            module: "router".into(),
            root_id: String::new(),
            vm_id: String::new(),
            config,
            config_ref: config_ref.into(),
            failure_policy: Default::default(),
        }
    }

    fn routes(v: u32) -> Resource {
        Resource {
            kind: Kind::FilterConfig,
            name: "routes".into(),
            selector: Labels::new(),
            version: 0,
            spec: Spec::FilterConfig(FilterConfigSpec {
                config: serde_json::json!({ "v": v }),
            }),
        }
    }

    #[test]
    fn modules_are_validated_content_addressed_and_kept_while_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        let e = s.push_module("junk", b"not wasm").expect_err("junk");
        assert!(e.to_string().contains("not a WebAssembly module"), "{e}");
        let m = s.push_module("router", &module()).expect("push");
        assert!(m.digest.starts_with("sha256:") && m.abi_version == "0.2.1");
        assert_eq!(s.resolve_module("router").expect("name"), m.digest);
        s.apply(vec![chain("s1", filter(serde_json::json!({}), ""))], false)
            .expect("apply");
        let e = s.delete_module("router").expect_err("in use");
        assert!(matches!(e, ControlError::Conflict(_)), "{e}");
        s.delete(Kind::Chain, "s1-out").expect("delete chain");
        s.delete_module(&m.digest).expect("delete module");
        assert!(s.modules().is_empty());
    }

    #[test]
    fn applies_make_versions_only_when_something_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        s.push_module("router", &module()).expect("push");
        let c = chain("s1", filter(serde_json::json!({"a": 1}), ""));
        let (v1, ch) = s.apply(vec![c.clone()], false).expect("apply");
        assert_eq!((v1, ch[0].action), (1, "created"));
        let (v, ch) = s.apply(vec![c.clone()], false).expect("again");
        assert_eq!((v, ch[0].action), (1, "unchanged"));
        let changed = chain("s1", filter(serde_json::json!({"a": 2}), ""));
        let (v, ch) = s.apply(vec![changed.clone()], true).expect("dry run");
        assert_eq!((v, ch[0].action), (1, "configured"));
        assert!(
            ch[0].diff.contains("-       a: 1") || ch[0].diff.contains("- "),
            "{}",
            ch[0].diff
        );
        assert_eq!(s.resources(None).0[0].spec, {
            let mut c = c.clone();
            if let Spec::Chain(ch) = &mut c.spec {
                ch.filters[0].module = s.resolve_module("router").expect("digest");
                ch.filters[0].failure_policy = weft_config::FailurePolicy::FailClosed;
            }
            c.spec
        });
        let (v, _) = s.apply(vec![changed], false).expect("apply");
        assert_eq!(v, 2);
        // Reopened from disk: the same version and resources.
        let resources = s.resources(None);
        drop(s);
        let s = state(dir.path());
        assert_eq!(s.resources(None), resources);
    }

    #[test]
    fn filter_configs_are_referenced_inlined_in_snapshots_and_kept_while_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        s.push_module("router", &module()).expect("push");
        let e = s
            .apply(
                vec![chain("s1", filter(serde_json::Value::Null, "routes"))],
                false,
            )
            .expect_err("dangling ref");
        assert!(e.to_string().contains("no FilterConfig `routes`"), "{e}");
        let e = s
            .apply(
                vec![
                    chain("s1", filter(serde_json::json!({}), "routes")),
                    routes(1),
                ],
                false,
            )
            .expect_err("both");
        assert!(e.to_string().contains("not both"), "{e}");
        s.apply(
            vec![
                chain("s1", filter(serde_json::Value::Null, "routes")),
                routes(1),
            ],
            false,
        )
        .expect("apply");
        let labels: Labels = [("app".to_string(), "s1".to_string())].into();
        let before = s.snapshot(&labels);
        assert_eq!(
            before.chains[0].filters[0].config,
            serde_json::json!({"v": 1})
        );
        assert!(s.snapshot(&Labels::new()).chains.is_empty(), "not selected");
        s.apply(vec![routes(2)], false).expect("new routes");
        let after = s.snapshot(&labels);
        assert_eq!(
            after.chains[0].filters[0].config,
            serde_json::json!({"v": 2})
        );
        assert_ne!(before.hash, after.hash);
        let e = s.delete(Kind::FilterConfig, "routes").expect_err("in use");
        assert!(matches!(e, ControlError::Conflict(_)), "{e}");
    }

    #[test]
    fn addresses_are_checked_as_proxies_parse_them() {
        for ok in [
            "127.0.0.1:80",
            "[::1]:8080",
            "my_service.local:8080",
            "svc-2:1",
        ] {
            assert!(check_address(ok).is_ok(), "{ok}");
        }
        for bad in ["::1:80", "a b:80", "host:0", "host", ":80", "host:99999"] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registry_instances_feed_clusters_and_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = state(dir.path());
        let cluster = Resource {
            kind: Kind::Cluster,
            name: "svc".into(),
            selector: Labels::new(),
            version: 0,
            spec: Spec::Cluster(ClusterSpec {
                endpoints: vec![],
                service: "svc".into(),
                dns: String::new(),
                settings: None,
            }),
        };
        s.apply(vec![cluster], false).expect("apply");
        let i = s
            .register(Instance {
                id: String::new(),
                service: "svc".into(),
                address: "127.0.0.1:9".into(),
                labels: Labels::new(),
                ttl_seconds: 1,
                weight: 0,
                last_seen_ms: 0,
                identity: String::new(),
            })
            .expect("register");
        assert_eq!(i.id, "svc/127.0.0.1:9");
        let snap = s.snapshot(&Labels::new());
        assert_eq!(snap.clusters[0].endpoints.len(), 1);
        assert!(s.expire().expect("expire").is_empty(), "within its TTL");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(s.expire().expect("expire").len(), 1);
        assert!(s.snapshot(&Labels::new()).clusters[0].endpoints.is_empty());
        assert!(matches!(s.heartbeat(&i.id), Err(ControlError::NotFound(_))));
    }
}
