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

pub mod backoff;
pub mod snapshot;
pub mod state_dir;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use weft_proto::v1;

pub use backoff::Backoff;
pub use snapshot::{ControlSnapshot, SnapshotChain, SnapshotCluster, SnapshotFilter, overlay};
pub use state_dir::StateDir;
pub use weft_client::{control_url, endpoint, token};

use state_dir::{digest_of, write_atomic};

/// How to reach and identify with the control service.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// `http(s)://host:port` of `weft-control`, one per replica, tried in turn.
    pub addresses: Vec<String>,
    /// This proxy's id.
    pub id: String,
    /// This proxy's labels; resources select on them.
    pub labels: BTreeMap<String, String>,
    /// Where snapshots and modules are kept across restarts.
    pub state_dir: PathBuf,
    /// Bearer token for the control API.
    pub token: Option<String>,
    /// The CA an `https://` control service's certificate chains to.
    pub ca_file: Option<PathBuf>,
    /// Whether modules must be signed (the proxy has trusted keys): a module kept without
    /// its signature is fetched again, with it.
    pub signed_modules: bool,
    /// How often the proxy reports its traffic (golden metrics) and what it runs.
    pub report_interval: Duration,
}

/// What a proxy reports every [`ControlOptions::report_interval`] besides its failures.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The traffic since the last report.
    pub traffic: Vec<crate::golden::TrafficCounts>,
    /// The running chains' filters: (listener, filter, module digest or `file:<path>`,
    /// failure policy).
    pub filters: Vec<(String, String, String, String)>,
    /// The mesh identity held, if any: its SPIFFE ID and when its certificate expires
    /// (seconds since the Unix epoch).
    pub identity: Option<(String, i64)>,
}

impl ControlOptions {
    /// The addresses, comma-separated (logs, `/config_dump`).
    pub fn address_list(&self) -> String {
        self.addresses.join(",")
    }

    /// The mesh trust bundle a proxy enrolled with the CA keeps in its state dir (renewed
    /// with every certificate); also trusted for the control channel, so that the proxy
    /// follows a CA rotation.
    pub fn mesh_bundle(&self) -> PathBuf {
        self.state_dir.join("identity").join("bundle.pem")
    }
}

/// What the follower needs of the running proxy: the app's reloader implements it, so that
/// following the control service does not depend on how the proxy applies a config.
pub trait Target: Send + 'static {
    /// Version and hash of the snapshot running now (0 and empty without one).
    fn running(&self) -> (u64, String);
    /// Applies a snapshot all or nothing, and persists it once it runs.
    fn apply(
        &mut self,
        snap: ControlSnapshot,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
    /// Records whether the proxy is connected and the error now, if any.
    fn status(&self, connected: bool, error: Option<&str>);
    /// Filter failures since what runs was applied: (filter, kind, count), non-zero only.
    fn failures(&self) -> Vec<(String, String, u64)>;
    /// The traffic since the last call (taken: counted once) and what runs.
    fn report(&self) -> Report;
}

/// How often a proxy looks whether its filters failed since the last report.
const FAILURE_REPORT_EVERY: Duration = Duration::from_secs(1);

/// A status report (not an answer to a snapshot): what runs, its filter failures, and the
/// traffic report when one is due.
fn status_report(
    version: u64,
    hash: String,
    failures: &[(String, String, u64)],
    stats: Option<v1::ProxyReport>,
) -> v1::DiscoveryRequest {
    v1::DiscoveryRequest {
        node: None,
        version,
        hash,
        error: String::new(),
        failures: failures_msg(failures),
        report: true,
        stats,
    }
}

/// A report as the control API carries it.
fn report_msg(report: Report, interval: Duration) -> v1::ProxyReport {
    let (spiffe_id, cert_not_after_unix) = report.identity.unwrap_or_default();
    v1::ProxyReport {
        interval_ms: interval.as_millis() as u64,
        traffic: report
            .traffic
            .into_iter()
            .map(|t| v1::TrafficCounts {
                listener: t.key.listener,
                direction: t.key.direction.into(),
                cluster: t.key.cluster,
                route: t.key.route,
                requests: t.requests,
                failures: t.failures,
                latency: t.latency.into_iter().collect(),
            })
            .collect(),
        filters: report
            .filters
            .into_iter()
            .map(
                |(listener, filter, digest, failure_policy)| v1::RunningFilter {
                    listener,
                    filter,
                    digest,
                    failure_policy,
                },
            )
            .collect(),
        spiffe_id,
        cert_not_after_unix,
    }
}

/// Failures as the control API carries them.
fn failures_msg(failures: &[(String, String, u64)]) -> Vec<v1::FilterFailures> {
    failures
        .iter()
        .map(|(filter, kind, count)| v1::FilterFailures {
            filter: filter.clone(),
            kind: kind.clone(),
            count: *count,
        })
        .collect()
}

/// Follows the control service forever: one session after another, backing off between.
pub async fn follow<T: Target>(opts: ControlOptions, reloader: Arc<Mutex<T>>) {
    let mut backoff = Backoff::default();
    // The address of the next session: after a session ends, the next replica's, at once;
    // after every replica failed in a row, the first again after a backoff.
    let mut at = 0;
    // When the traffic counts were last taken: a report covers the time since, across
    // sessions (the first report after a reconnect carries what was counted meanwhile).
    let mut last_take = tokio::time::Instant::now();
    loop {
        let started = Instant::now();
        let address = &opts.addresses[at];
        let error = match session(&opts, address, &reloader, &mut last_take).await {
            Ok(()) => format!("control service {address} closed the discovery stream"),
            Err(e) => format!("control service {address}: {e}"),
        };
        tracing::warn!("{error}");
        reloader.lock().await.status(false, Some(&error));
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        at = (at + 1) % opts.addresses.len();
        if at != 0 {
            tracing::info!(next = %opts.addresses[at], "trying the next control service");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
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
async fn session<T: Target>(
    opts: &ControlOptions,
    address: &str,
    reloader: &Arc<Mutex<T>>,
    last_take: &mut tokio::time::Instant,
) -> Result<(), String> {
    let bearer = weft_client::Bearer::new(opts.token.as_deref())?;
    let endpoint = weft_client::endpoint_trusting(
        address,
        opts.ca_file.as_deref(),
        Some(&opts.mesh_bundle()),
    )?;
    let channel = weft_client::connect(endpoint, bearer)
        .await
        .map_err(|e| format!("cannot connect: {}", weft_client::error_chain(&e)))?;
    let mut discovery = v1::discovery_client::DiscoveryClient::new(channel.clone());
    let mut modules = v1::modules_client::ModulesClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let (version, hash) = reloader.lock().await.running();
    let hello = v1::DiscoveryRequest {
        node: Some(v1::Node {
            id: opts.id.clone(),
            labels: opts.labels.clone().into_iter().collect(),
        }),
        version,
        hash,
        error: String::new(),
        failures: Vec::new(),
        report: false,
        stats: None,
    };
    tx.send(hello).await.map_err(|_| "stream closed")?;
    let mut snapshots = discovery
        .subscribe(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("subscribe: {}", s.message()))?
        .into_inner();
    tracing::info!(address, id = %opts.id, "connected to the control service");
    reloader.lock().await.status(true, None);
    // Live taps, beside: what to sample comes in, samples go out (a service without taps
    // leaves them off).
    let (tap_tx, tap_rx) = mpsc::channel(256);
    let _ = tap_tx
        .send(v1::TapEvent {
            proxy: opts.id.clone(),
            ..Default::default()
        })
        .await;
    let mut tap_commands = match discovery.taps(ReceiverStream::new(tap_rx)).await {
        Ok(s) => Some(s.into_inner()),
        Err(s) => {
            tracing::debug!("no live taps: {}", s.message());
            None
        }
    };
    let (sample_tx, mut samples) = mpsc::channel::<crate::tap::TapSample>(256);
    let mut taps: Vec<crate::tap::TapSpec> = Vec::new();
    // Taps end with the session that carried them.
    struct EndTaps;
    impl Drop for EndTaps {
        fn drop(&mut self) {
            crate::tap::set(Vec::new(), None);
        }
    }
    let _end_taps = EndTaps;
    let dir = StateDir::new(opts.state_dir.clone());
    // The last refused snapshot, tried again after a growing delay (2 s to 60 s) until a newer
    // one comes: a NACK may have had a passing cause (a fetch cut short, a full disk).
    let mut refused: Option<(v1::Snapshot, Duration, tokio::time::Instant)> = None;
    // Filter failures as last told to the service: a change is reported, so that a proxy
    // whose filters fail at request time shows as degraded.
    let mut reported: Vec<(String, String, u64)> = Vec::new();
    let mut report_tick = tokio::time::interval(FAILURE_REPORT_EVERY);
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The traffic report: counts since the last take (the first one, a full interval after
    // connecting, also carries what was counted while disconnected, and says so).
    let every = opts.report_interval;
    let mut stats_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retry_at = refused.as_ref().map(|(_, _, at)| *at);
        let msg = tokio::select! {
            command = next_tap_command(&mut tap_commands) => {
                match command {
                    Some(c) if c.stop => taps.retain(|t| t.id != c.tap_id),
                    Some(c) => {
                        tracing::info!(tap = c.tap_id, path = %c.path_prefix, max_rps = c.max_rps, "live tap started");
                        taps.push(crate::tap::TapSpec {
                            id: c.tap_id,
                            path_prefix: c.path_prefix,
                            max_rps: c.max_rps.clamp(1, 100),
                        });
                    }
                    None => {
                        tap_commands = None;
                        taps.clear();
                    }
                }
                crate::tap::set(taps.clone(), Some(sample_tx.clone()));
                continue;
            }
            Some(sample) = samples.recv() => {
                // Behind: drop samples rather than wait (a tap never slows the proxy).
                let _ = tap_tx.try_send(tap_event(&opts.id, sample));
                continue;
            }
            _ = stats_tick.tick() => {
                let (failures, (version, hash), report) = {
                    let r = reloader.lock().await;
                    (r.failures(), r.running(), r.report())
                };
                let now = tokio::time::Instant::now();
                let stats = report_msg(report, now - *last_take);
                *last_take = now;
                tx.send(status_report(version, hash, &failures, Some(stats)))
                    .await
                    .map_err(|_| "stream closed")?;
                reported = failures;
                continue;
            }
            _ = report_tick.tick() => {
                let (failures, (version, hash)) = {
                    let r = reloader.lock().await;
                    (r.failures(), r.running())
                };
                if failures != reported {
                    tx.send(status_report(version, hash, &failures, None))
                        .await
                        .map_err(|_| "stream closed")?;
                    reported = failures;
                }
                continue;
            }
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
            fetch_modules(&mut modules, &snap, &dir, opts.signed_modules).await?;
            reloader.lock().await.apply(snap).await
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
            .status(true, (!error.is_empty()).then_some(error.as_str()));
        // An ACK starts counting failures afresh (what runs is new).
        let failures = reloader.lock().await.failures();
        let answer = v1::DiscoveryRequest {
            node: None,
            version,
            hash,
            error,
            failures: failures_msg(&failures),
            report: false,
            stats: None,
        };
        reported = failures;
        tx.send(answer).await.map_err(|_| "stream closed")?;
    }
}

/// The next command of the taps stream: `None` when it ended; pending forever without one.
async fn next_tap_command(
    commands: &mut Option<tonic::Streaming<v1::TapCommand>>,
) -> Option<v1::TapCommand> {
    match commands {
        Some(s) => s.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// A sample as the control API carries it.
fn tap_event(proxy: &str, s: crate::tap::TapSample) -> v1::TapEvent {
    v1::TapEvent {
        tap_id: s.tap_id,
        proxy: proxy.to_owned(),
        at_ms: s.at_ms,
        listener: s.listener,
        method: s.method,
        authority: s.authority,
        path: s.path,
        status: s.status.into(),
        latency_ms: s.latency_ms,
        source: s.source,
        source_identity: s.source_identity,
        destination: s.destination,
        route: s.route,
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

/// Fetches the snapshot's modules this proxy does not have (or, with `signed`, has without
/// a signature), verifying each digest, and keeps each with its signature
/// (`<module>.sig`), which the filter host checks before running it.
async fn fetch_modules<S>(
    client: &mut v1::modules_client::ModulesClient<S>,
    snap: &ControlSnapshot,
    dir: &StateDir,
    signed: bool,
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
    // With signatures required, the service's current signature of each module (a module
    // may have been signed again since it was kept): one listing, no bytes.
    let signatures: std::collections::BTreeMap<String, String> = if signed {
        client
            .list(v1::ListModulesRequest {})
            .await
            .map_err(|s| format!("listing modules: {}", s.message()))?
            .into_inner()
            .modules
            .into_iter()
            .map(|m| (m.digest, m.signature))
            .collect()
    } else {
        Default::default()
    };
    for digest in digests {
        let sig_path = weft_client::signing::sig_path(&dir.module_path(digest));
        if dir.has_module(digest) {
            let current = signatures.get(digest).filter(|s| !s.is_empty());
            if let Some(current) = current {
                let kept = std::fs::read_to_string(&sig_path).unwrap_or_default();
                if kept.trim() != current.trim() {
                    write_atomic(&sig_path, format!("{current}\n").as_bytes())
                        .map_err(|e| format!("cannot write {}: {e}", sig_path.display()))?;
                    tracing::info!(module = digest, "module signature updated");
                }
            }
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
        let (mut bytes, mut signature) = (Vec::new(), String::new());
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| format!("module {digest}: {}", s.message()))?
        {
            if bytes.len() + chunk.data.len() > MAX_MODULE_BYTES {
                return Err(format!("module {digest}: larger than 64 MiB"));
            }
            bytes.extend_from_slice(&chunk.data);
            if signature.is_empty() {
                signature = chunk.signature;
            }
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
        if !signature.is_empty() {
            write_atomic(&sig_path, format!("{signature}\n").as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", sig_path.display()))?;
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
