//! Following a control service (`weft-proxy --control ADDR --id ID --label k=v`).
//!
//! The proxy keeps one discovery stream open. Each snapshot it receives is turned into this
//! proxy's config ([`overlay`]: the bootstrap file with the snapshot's chains, default
//! clusters and endpoints over it); missing modules are fetched by digest and verified; the
//! result is applied by the [`Reloader`] (built and canaried off the request path, then
//! swapped atomically) and answered with an ACK, or with a NACK carrying the reason while
//! the running config stays. A snapshot that runs is persisted with its modules under the
//! state directory, so a proxy restarted while the control service is down serves it.
//!
//! When the control service is gone the proxy keeps serving what it runs and reconnects
//! with jittered exponential backoff ([`Backoff`]: 1 s, ×1.6, ±20 %, at most 120 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::v1;

use crate::config::{Config, EndpointConfig, FailurePolicy, FilterConfig, FilterLimits};
use crate::reload::Reloader;

/// How to reach and identify with the control service.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// `http://host:port` of `weft-control`.
    pub address: String,
    /// This proxy's id.
    pub id: String,
    /// This proxy's labels; resources select on them.
    pub labels: BTreeMap<String, String>,
    /// Where snapshots and modules are kept across restarts.
    pub state_dir: PathBuf,
    /// Bearer token for the control API.
    pub token: Option<String>,
}

/// A filter of a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// Name in the chain.
    pub name: String,
    /// `sha256:<hex>` of the module.
    pub digest: String,
    /// Root context id.
    pub root_id: String,
    /// Configuration for `on_configure`.
    pub config: serde_json::Value,
    /// What a failure of the filter does.
    pub failure_policy: FailurePolicy,
}

/// A chain of a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotChain {
    /// The resource's name.
    pub name: String,
    /// The listener it runs on.
    pub listener: String,
    /// The default cluster; empty keeps the bootstrap one.
    pub default_cluster: String,
    /// The filters.
    pub filters: Vec<SnapshotFilter>,
}

/// A cluster's endpoints in a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCluster {
    /// The cluster.
    pub name: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointConfig>,
}

/// What the control service says this proxy should run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlSnapshot {
    /// Config version.
    pub version: u64,
    /// Content hash.
    pub hash: String,
    /// Chains.
    pub chains: Vec<SnapshotChain>,
    /// Clusters.
    pub clusters: Vec<SnapshotCluster>,
}

/// The hex part of a `sha256:<hex>` digest, if it is one.
fn digest_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl TryFrom<v1::Snapshot> for ControlSnapshot {
    type Error = String;

    fn try_from(s: v1::Snapshot) -> Result<Self, String> {
        let chains = s
            .chains
            .into_iter()
            .map(|c| {
                let filters = c
                    .filters
                    .into_iter()
                    .map(|f| {
                        digest_hex(&f.digest).ok_or_else(|| {
                            format!("filter `{}`: bad module digest `{}`", f.name, f.digest)
                        })?;
                        let config = if f.config_json.is_empty() {
                            serde_json::Value::Null
                        } else {
                            serde_json::from_str(&f.config_json).map_err(|e| {
                                format!("filter `{}`: config is not JSON: {e}", f.name)
                            })?
                        };
                        let failure_policy: FailurePolicy = f
                            .failure_policy
                            .parse()
                            .map_err(|e| format!("filter `{}`: {e}", f.name))?;
                        Ok(SnapshotFilter {
                            name: f.name,
                            digest: f.digest,
                            root_id: f.root_id,
                            config,
                            failure_policy,
                        })
                    })
                    .collect::<Result<_, String>>()?;
                Ok(SnapshotChain {
                    name: c.name,
                    listener: c.listener,
                    default_cluster: c.default_cluster,
                    filters,
                })
            })
            .collect::<Result<_, String>>()?;
        let clusters =
            s.clusters
                .into_iter()
                .map(|c| {
                    let endpoints =
                        c.endpoints
                            .into_iter()
                            .map(|e| {
                                Ok(EndpointConfig {
                                    address: e.address.parse().map_err(|m| {
                                        format!("cluster `{}`: endpoint {m}", c.name)
                                    })?,
                                    weight: e.weight.max(1),
                                })
                            })
                            .collect::<Result<_, String>>()?;
                    Ok(SnapshotCluster {
                        name: c.name,
                        endpoints,
                    })
                })
                .collect::<Result<_, String>>()?;
        Ok(ControlSnapshot {
            version: s.version,
            hash: s.hash,
            chains,
            clusters,
        })
    }
}

/// The proxy's state directory: `snapshot.json` and `modules/<hex>.wasm`.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The directory (created when first written).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// Where the module with `digest` is kept.
    pub fn module_path(&self, digest: &str) -> PathBuf {
        let hex = digest_hex(digest).unwrap_or("invalid");
        self.root.join("modules").join(format!("{hex}.wasm"))
    }

    /// The persisted snapshot, if there is one that reads.
    pub fn load_snapshot(&self) -> Option<ControlSnapshot> {
        let path = self.root.join("snapshot.json");
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", path.display());
                None
            }
        }
    }

    /// Persists `snap` (written whole, then renamed into place).
    pub fn save_snapshot(&self, snap: &ControlSnapshot) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        let json = serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?;
        write_atomic(&self.root.join("snapshot.json"), &json)
    }

    /// Checks that every module of `snap` is in the state dir with its digest (the files a
    /// restart or a SIGHUP would load; fetched modules are checked as they arrive).
    pub fn check_modules(&self, snap: &ControlSnapshot) -> Result<(), String> {
        for c in &snap.chains {
            if let Some(f) = c.filters.iter().find(|f| !self.has_module(&f.digest)) {
                return Err(format!(
                    "filter `{}`: module {} is missing from the state dir or does not match its digest",
                    f.name, f.digest
                ));
            }
        }
        Ok(())
    }

    /// Whether the module file for `digest` exists and has that digest.
    fn has_module(&self, digest: &str) -> bool {
        std::fs::read(self.module_path(digest)).is_ok_and(|b| digest_of(&b) == digest)
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// `base` with `snap` over it: each chain replaces its listener's filters (and default
/// cluster, when it names one), each cluster its endpoints. Listeners and clusters the
/// snapshot does not mention keep the bootstrap's. A chain for a listener or a cluster this
/// proxy does not have, or two for the same one, is an error. The module files are not read
/// here: see [`StateDir::check_modules`].
pub fn overlay(base: &Config, snap: &ControlSnapshot, dir: &StateDir) -> Result<Config, String> {
    let mut next = base.clone();
    let mut seen = BTreeMap::new();
    for c in &snap.chains {
        if let Some(other) = seen.insert(c.listener.as_str(), c.name.as_str()) {
            return Err(format!(
                "chains `{other}` and `{}` both select listener `{}`",
                c.name, c.listener
            ));
        }
        let l = next
            .listeners
            .iter_mut()
            .find(|l| l.name == c.listener)
            .ok_or_else(|| {
                format!(
                    "chain `{}`: this proxy has no listener `{}`",
                    c.name, c.listener
                )
            })?;
        if !c.default_cluster.is_empty() {
            l.default_cluster = c.default_cluster.clone();
        }
        l.filters = c
            .filters
            .iter()
            .map(|f| FilterConfig {
                name: f.name.clone(),
                module: dir.module_path(&f.digest),
                root_id: f.root_id.clone(),
                config: f.config.clone(),
                vm_config: serde_json::Value::Null,
                failure_policy: f.failure_policy,
                limits: FilterLimits::default(),
            })
            .collect();
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in &snap.clusters {
        if !seen.insert(c.name.as_str()) {
            return Err(format!("cluster `{}` appears twice", c.name));
        }
        let cluster = next
            .clusters
            .iter_mut()
            .find(|k| k.name == c.name)
            .ok_or_else(|| {
                format!(
                    "cluster `{}` is not in this proxy's bootstrap config (adding clusters needs a restart)",
                    c.name
                )
            })?;
        cluster.endpoints = c.endpoints.clone();
    }
    next.validate()
        .map_err(|(field, message)| format!("{field}: {message}"))?;
    Ok(next)
}

/// Reconnection delays: 1 s, then ×1.6 each time up to 120 s, each with ±20 % jitter.
#[derive(Debug)]
pub struct Backoff {
    base: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: 1.0 }
    }
}

impl Backoff {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = 1.0 + (fastrand::f64() * 0.4 - 0.2);
        let d = (self.base * jitter).min(120.0);
        self.base = (self.base * 1.6).min(120.0);
        Duration::from_secs_f64(d)
    }

    /// Back to the first delay (after a session that worked).
    pub fn reset(&mut self) {
        self.base = 1.0;
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Follows the control service forever: one session after another, backing off between.
pub(crate) async fn follow(opts: ControlOptions, reloader: Arc<Mutex<Reloader>>) {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let error = match session(&opts, &reloader).await {
            Ok(()) => "the control service closed the discovery stream".to_owned(),
            Err(e) => format!("control service {}: {e}", opts.address),
        };
        tracing::warn!("{error}");
        reloader.lock().await.control_status(false, Some(&error));
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!(
            in_ms = delay.as_millis() as u64,
            "reconnecting to the control service; serving the last good config meanwhile"
        );
        tokio::time::sleep(delay).await;
    }
}

/// One discovery stream, until it ends.
async fn session(opts: &ControlOptions, reloader: &Arc<Mutex<Reloader>>) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(opts.address.clone())
        .map_err(|e| format!("bad address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let bearer = Bearer(
        opts.token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| "the token is not valid in a header")?,
    );
    let mut discovery =
        v1::discovery_client::DiscoveryClient::with_interceptor(channel.clone(), bearer.clone());
    let mut modules = v1::modules_client::ModulesClient::with_interceptor(channel, bearer);
    let (tx, rx) = mpsc::channel(4);
    let (version, hash) = reloader.lock().await.snapshot_id();
    let hello = v1::DiscoveryRequest {
        node: Some(v1::Node {
            id: opts.id.clone(),
            labels: opts.labels.clone().into_iter().collect(),
        }),
        version,
        hash,
        error: String::new(),
    };
    tx.send(hello).await.map_err(|_| "stream closed")?;
    let mut snapshots = discovery
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("subscribe: {}", s.message()))?
        .into_inner();
    tracing::info!(address = %opts.address, id = %opts.id, "connected to the control service");
    reloader.lock().await.control_status(true, None);
    let dir = StateDir::new(opts.state_dir.clone());
    // The last refused snapshot, tried again after a growing delay (2 s to 60 s) until a newer
    // one comes: a NACK may have had a passing cause (a fetch cut short, a full disk).
    let mut refused: Option<(v1::Snapshot, Duration, tokio::time::Instant)> = None;
    loop {
        let retry_at = refused.as_ref().map(|(_, _, at)| *at);
        let msg = tokio::select! {
            msg = snapshots.message() => {
                match msg.map_err(|s| format!("stream: {}", s.message()))? {
                    Some(m) => m,
                    None => return Ok(()),
                }
            }
            _ = sleep_until_some(retry_at) => match &refused {
                Some((snap, _, _)) => {
                    tracing::info!(version = snap.version, "trying the refused snapshot again");
                    snap.clone()
                }
                None => continue,
            },
        };
        let (version, hash) = (msg.version, msg.hash.clone());
        let kept = msg.clone();
        let result = async {
            let snap = ControlSnapshot::try_from(msg)?;
            fetch_modules(&mut modules, &snap, &dir).await?;
            reloader.lock().await.apply_snapshot(snap).await
        }
        .await;
        let error = match result {
            Ok(()) => {
                refused = None;
                String::new()
            }
            Err(e) => {
                tracing::error!(version, "NACK: the running config stays: {e}");
                let delay = match &refused {
                    Some((s, d, _)) if s.hash == hash => (*d * 2).min(Duration::from_secs(60)),
                    _ => Duration::from_secs(2),
                };
                refused = Some((kept, delay, tokio::time::Instant::now() + delay));
                e
            }
        };
        reloader
            .lock()
            .await
            .control_status(true, (!error.is_empty()).then_some(error.as_str()));
        let answer = v1::DiscoveryRequest {
            node: None,
            version,
            hash,
            error,
        };
        tx.send(answer).await.map_err(|_| "stream closed")?;
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Largest module fetched.
const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;

/// Fetches the snapshot's modules this proxy does not have, verifying each digest.
async fn fetch_modules<S>(
    client: &mut v1::modules_client::ModulesClient<S>,
    snap: &ControlSnapshot,
    dir: &StateDir,
) -> Result<(), String>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let digests: std::collections::BTreeSet<&str> = snap
        .chains
        .iter()
        .flat_map(|c| c.filters.iter().map(|f| f.digest.as_str()))
        .collect();
    for digest in digests {
        if dir.has_module(digest) {
            continue;
        }
        let started = Instant::now();
        let mut stream = client
            .fetch(v1::FetchModuleRequest {
                module: digest.to_owned(),
            })
            .await
            .map_err(|s| format!("module {digest}: {}", s.message()))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| format!("module {digest}: {}", s.message()))?
        {
            if bytes.len() + chunk.data.len() > MAX_MODULE_BYTES {
                return Err(format!("module {digest}: larger than 64 MiB"));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let got = digest_of(&bytes);
        if got != digest {
            return Err(format!(
                "module {digest}: the bytes received have digest {got}; refusing them"
            ));
        }
        let path = dir.module_path(digest);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        write_atomic(&path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        tracing::info!(
            module = digest,
            size = bytes.len(),
            ms = started.elapsed().as_millis() as u64,
            "module fetched"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_1_6_with_jitter_and_caps_at_120_s() {
        let mut b = Backoff::default();
        let mut base = 1.0f64;
        for _ in 0..20 {
            let d = b.next_delay().as_secs_f64();
            assert!(
                d >= (base * 0.8).min(120.0) - 1e-9 && d <= (base * 1.2).min(120.0) + 1e-9,
                "{d} vs {base}"
            );
            base = (base * 1.6).min(120.0);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
