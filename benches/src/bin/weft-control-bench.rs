//! `weft-control-bench`: how fast does config pushed to `weft-control` go live?
//!
//! ```text
//! weft-control-bench --module target/wasm32-wasip1/release/compat_basic.wasm
//! ```
//!
//! Starts `weft-control` and `weft-proxy` processes from the directory this binary is in
//! (build them in release first; `benches/control/run.sh` does), all on loopback, and
//! measures:
//! - **push to live**: `Config.Apply` of a changed chain until every selected proxy has
//!   ACKed it (as `weftctl rollout status` sees it), with 1, 10 and 100 real proxies;
//! - **scale**: 1,000 simulated proxy streams (a few lines of tonic client each, ACKing every
//!   snapshot): time from an apply until all 1,000 have received and ACKed it, and the
//!   control service's resident memory;
//! - **a new service, push to live**: a registry instance of a service nobody knew, until
//!   every real proxy has it as a cluster (`/clusters`), with 10 and 100 proxies, and until
//!   all 1,000 simulated streams have received a snapshot with it;
//! - **services at scale**: 1,000 registered services; the snapshot each simulated proxy
//!   receives (bytes, clusters) without and with a `Scope` of 10 services, and the control
//!   service's memory;
//! - **replica failover**: two replicas on one etcd, 10 and 100 real proxies given both and
//!   following the first; it is killed and a change applied through the second at once:
//!   time until every proxy is on the second, and until every proxy runs the change;
//! - **swaps under load**: 100 chain swaps on one proxy while `weft-load` sends it 2,000
//!   requests a second: failed requests and latency.
//!
//! Prints one JSON object.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use weft_proto::v1;

/// Measures push-to-live latency, convergence at scale and swaps under load.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The filter module to push (the compatibility filter `compat_basic`).
    #[arg(long)]
    module: PathBuf,
    /// Real proxy counts to measure push-to-live with.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    proxies: Vec<usize>,
    /// Applies measured per proxy count.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Simulated proxy streams for the scale run.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Requests per second during the swaps under load.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Services registered for the services-at-scale run.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Real proxy counts for the replica failover run (it needs `etcd` on PATH; 0 leaves
    /// the run out).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    failover_proxies: Vec<usize>,
    /// Replica failovers measured.
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
}

/// What a simulated proxy saw last.
#[derive(Default)]
struct Seen {
    /// The highest config version received.
    version: AtomicU64,
    /// The last snapshot's encoded size, in bytes.
    bytes: AtomicU64,
    /// The last snapshot's cluster count.
    clusters: AtomicU64,
    /// Snapshots received.
    snapshots: AtomicU64,
}

/// Registers one instance of `service` at `address` (an hour's TTL).
async fn register(
    registry: &mut v1::registry_client::RegistryClient<Channel>,
    service: &str,
    address: &str,
) {
    registry
        .register(v1::RegisterRequest {
            service: service.into(),
            address: address.into(),
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await
        .expect("register");
}

/// Whether the proxy whose admin endpoint is on `admin` has a cluster named `name`.
async fn has_cluster(admin: u16, name: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", admin)).await else {
        return false;
    };
    if s.write_all(b"GET /clusters HTTP/1.0\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let Some((_, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["clusters"]
                .as_array()
                .map(|c| c.iter().any(|c| c["name"] == name))
        })
        .unwrap_or(false)
}

/// Registers `service` and waits until every proxy (by admin port) has it as a cluster;
/// returns the milliseconds it took.
async fn new_service_to_live(
    registry: &mut v1::registry_client::RegistryClient<Channel>,
    admins: &[u16],
    service: &str,
    address: &str,
) -> f64 {
    let t = Instant::now();
    register(registry, service, address).await;
    let waits = admins.iter().map(|&admin| {
        let service = service.to_owned();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !has_cluster(admin, &service).await {
                assert!(Instant::now() < deadline, "{service} not live on {admin}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    });
    for w in waits.collect::<Vec<_>>() {
        w.await.expect("wait");
    }
    t.elapsed().as_secs_f64() * 1e3
}

/// A child process killed (by PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| name.into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn chain(app: &str, greeting: &str) -> v1::Resource {
    v1::Resource {
        kind: "Chain".into(),
        name: format!("{app}-ingress"),
        selector: [("app".to_string(), app.to_string())].into(),
        version: 0,
        conditions: Vec::new(),
        spec: Some(v1::resource::Spec::Chain(v1::ChainSpec {
            listener: "ingress".into(),
            default_cluster: String::new(),
            filters: vec![v1::FilterRef {
                name: "basic".into(),
                module: "basic".into(),
                root_id: String::new(),
                vm_id: String::new(),
                config_json: format!("{{\"greeting\":\"{greeting}\"}}"),
                failure_policy: String::new(),
                config_ref: String::new(),
            }],
        })),
    }
}

async fn apply(config: &mut v1::config_client::ConfigClient<Channel>, r: v1::Resource) -> u64 {
    config
        .apply(v1::ApplyRequest {
            resources: vec![r],
            dry_run: false,
        })
        .await
        .expect("apply")
        .into_inner()
        .version
}

/// Waits until every connected proxy whose id starts with `prefix` is synced at `version`.
async fn rollout(
    discovery: &mut v1::discovery_client::DiscoveryClient<Channel>,
    prefix: &str,
    expected: usize,
    version: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = discovery
            .status(v1::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let selected: Vec<_> = st
            .proxies
            .iter()
            .filter(|p| p.connected && p.id.starts_with(prefix))
            .collect();
        if let Some(p) = selected
            .iter()
            .find(|p| !p.nack_error.is_empty() && p.nacked_version >= version)
        {
            panic!("{} NACKed: {}", p.id, p.nack_error);
        }
        if selected.len() == expected && selected.iter().all(|p| p.synced_version >= version) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "version {version} not live on {prefix}*"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bootstrap(dir: &Path, upstream: u16) -> (PathBuf, u16, u16) {
    let (admin, listen) = (free_port(), free_port());
    let path = dir.join(format!("proxy-{listen}.yaml"));
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:{admin}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
listeners:
  - {{ name: ingress, address: \"127.0.0.1:{listen}\", default_cluster: svc }}
clusters:
  - {{ name: svc, endpoints: [ {{ address: \"127.0.0.1:{upstream}\" }} ] }}
",
        cache = dir.join("module-cache").display()
    );
    std::fs::write(&path, yaml).expect("write config");
    (path, admin, listen)
}

/// A proxy following `control` (one address, or several: replicas it fails over between).
fn start_proxy(dir: &Path, control: &str, upstream: u16, id: &str, app: &str) -> (Proc, u16, u16) {
    let (config, admin, listen) = bootstrap(dir, upstream);
    let child = Command::new(bin("weft-proxy"))
        .arg("--config")
        .arg(&config)
        .args(["--workers", "1", "--log-level", "warn"])
        .args(["--control", control, "--id", id])
        .args(["--label", &format!("app={app}")])
        .arg("--state-dir")
        .arg(dir.join("state").join(id))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn weft-proxy");
    (Proc(child), admin, listen)
}

/// A `weft-control` replica on `port` keeping its state in etcd at `store`.
fn replica(dir: &Path, port: u16, store: &str) -> Proc {
    Proc(
        Command::new(bin("weft-control"))
            .arg("--data-dir")
            .arg(dir.join(format!("replica-{port}")))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--store", store])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn weft-control"),
    )
}

async fn clients(
    port: u16,
) -> (
    v1::config_client::ConfigClient<Channel>,
    v1::discovery_client::DiscoveryClient<Channel>,
) {
    wait_port(port).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    (
        v1::config_client::ConfigClient::new(channel.clone()),
        v1::discovery_client::DiscoveryClient::new(channel),
    )
}

/// Replica failover: two replicas on one etcd; real proxies given both addresses follow
/// the first; it is killed (SIGKILL) and a changed chain applied through the second at
/// once. Measured from the kill: until every proxy's stream is on the second replica, and
/// until every proxy runs the change.
async fn failover(dir: &Path, args: &Args, n: usize, upstream: u16) -> serde_json::Value {
    std::fs::create_dir_all(dir).expect("failover dir");
    if Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        panic!(
            "replica failover needs etcd on PATH (apt-get install etcd-server), or --failover-proxies 0"
        );
    }
    let (client, peer) = (free_port(), free_port());
    let _etcd = Proc(
        Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("bench=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd"),
    );
    wait_port(client).await;
    let store = format!("etcd://127.0.0.1:{client}/bench");
    let port_b = free_port();
    let _b = replica(dir, port_b, &store);
    let (mut config_b, mut discovery_b) = clients(port_b).await;
    let (mut reconnected, mut live, mut on_a_at_kill) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.failover_rounds {
        let port_a = free_port();
        let a = replica(dir, port_a, &store);
        let (mut config_a, mut discovery_a) = clients(port_a).await;
        if round == 0 {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port_a}"))
                    .expect("url")
                    .connect()
                    .await
                    .expect("connect");
            let push = tokio_stream::iter([v1::PushChunk {
                name: "basic".into(),
                data: std::fs::read(&args.module).expect("read module"),
                signature: String::new(),
            }]);
            v1::modules_client::ModulesClient::new(channel)
                .push(push)
                .await
                .expect("push module");
        }
        let app = format!("fo{round}");
        let both = format!("127.0.0.1:{port_a},127.0.0.1:{port_b}");
        let mut procs: Vec<_> = (0..n)
            .map(|i| start_proxy(dir, &both, upstream, &format!("{app}-{i}"), &app))
            .collect();
        let v = apply(&mut config_a, chain(&app, "before")).await;
        // Every proxy runs it, on A (or on B, when A was slow to answer it at start).
        let deadline = Instant::now() + Duration::from_secs(120);
        let on_a = loop {
            let (mut on_a, mut synced, mut connected) = (0, 0, 0);
            let mut nacks = Vec::new();
            for (replica, discovery) in [(0, &mut discovery_a), (1, &mut discovery_b)] {
                let st = discovery
                    .status(v1::StatusRequest {})
                    .await
                    .expect("status")
                    .into_inner();
                for p in st
                    .proxies
                    .iter()
                    .filter(|p| p.connected && p.id.starts_with(&format!("{app}-")))
                {
                    synced += usize::from(p.synced_version >= v);
                    on_a += usize::from(replica == 0);
                    connected += 1;
                    if !p.nack_error.is_empty() {
                        nacks.push(format!("{}: {}", p.id, p.nack_error));
                    }
                }
            }
            if synced == n {
                break on_a;
            }
            if Instant::now() > deadline {
                let exited: Vec<String> = procs
                    .iter_mut()
                    .filter_map(|(p, _, _)| p.0.try_wait().ok().flatten().map(|s| s.to_string()))
                    .collect();
                panic!(
                    "version {v} not live on {app}-*: {connected} connected ({on_a} on A), \
                     {synced} synced, NACKs: {nacks:?}, proxies exited: {exited:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        on_a_at_kill.push(on_a);
        let killed = Instant::now();
        drop(a);
        let v = apply(&mut config_b, chain(&app, "after")).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut all_connected = None;
        loop {
            let st = discovery_b
                .status(v1::StatusRequest {})
                .await
                .expect("status")
                .into_inner();
            let on_b: Vec<_> = st
                .proxies
                .iter()
                .filter(|p| p.connected && p.id.starts_with(&format!("{app}-")))
                .collect();
            if on_b.len() == n && all_connected.is_none() {
                all_connected = Some(killed.elapsed().as_secs_f64() * 1e3);
            }
            if on_b.len() == n && on_b.iter().all(|p| p.synced_version >= v) {
                break;
            }
            assert!(Instant::now() < deadline, "the proxies never failed over");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        live.push(killed.elapsed().as_secs_f64() * 1e3);
        reconnected.push(all_connected.unwrap_or(0.0));
        drop(procs);
    }
    reconnected.sort_by(f64::total_cmp);
    live.sort_by(f64::total_cmp);
    eprintln!(
        "replica failover, {n} proxies: all on the other replica in {:.1} ms p50, running a change applied there in {:.1} ms p50 ({:.1} max)",
        percentile(&reconnected, 0.5),
        percentile(&live, 0.5),
        percentile(&live, 1.0)
    );
    json!({
        "proxies": n,
        "rounds": args.failover_rounds,
        "proxies_on_the_killed_replica": on_a_at_kill,
        "all_reconnected_p50_ms": percentile(&reconnected, 0.5),
        "all_reconnected_max_ms": percentile(&reconnected, 1.0),
        "change_live_on_all_p50_ms": percentile(&live, 0.5),
        "change_live_on_all_max_ms": percentile(&live, 1.0),
    })
}

/// A trivial origin: answers every request `200 ok`.
async fn origin() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok\n")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

/// One simulated proxy: subscribes as `id` with `app=sim` and ACKs every snapshot, noting
/// the highest version received.
async fn simulated(channel: Channel, id: String, seen: Arc<Seen>) {
    let mut client = v1::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let hello = v1::DiscoveryRequest {
        node: Some(v1::Node {
            id,
            labels: [("app".to_string(), "sim".to_string())].into(),
        }),
        ..Default::default()
    };
    if tx.send(hello).await.is_err() {
        return;
    }
    let Ok(resp) = client.subscribe(ReceiverStream::new(rx)).await else {
        return;
    };
    let mut snapshots = resp.into_inner();
    while let Ok(Some(s)) = snapshots.message().await {
        use prost::Message as _;
        seen.bytes.store(s.encoded_len() as u64, Ordering::SeqCst);
        seen.clusters
            .store(s.clusters.len() as u64, Ordering::SeqCst);
        seen.snapshots.fetch_add(1, Ordering::SeqCst);
        seen.version.fetch_max(s.version, Ordering::SeqCst);
        let ack = v1::DiscoveryRequest {
            version: s.version,
            hash: s.hash,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let control = Proc(
        Command::new(bin("weft-control"))
            .arg("--data-dir")
            .arg(dir.path().join("control"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn weft-control"),
    );
    let control_pid = control.0.id();
    wait_port(port).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut modules = v1::modules_client::ModulesClient::new(channel.clone());
    let mut config = v1::config_client::ConfigClient::new(channel.clone());
    let mut discovery = v1::discovery_client::DiscoveryClient::new(channel.clone());
    let mut registry = v1::registry_client::RegistryClient::new(channel.clone());
    let bytes = std::fs::read(&args.module).expect("read module");
    let push = tokio_stream::iter([v1::PushChunk {
        name: "basic".into(),
        data: bytes,
        signature: String::new(),
    }]);
    modules.push(push).await.expect("push module");
    let upstream = origin().await;

    // Push to live with real proxies.
    let mut push_to_live = Vec::new();
    for &n in &args.proxies {
        let app = format!("p{n}");
        let started = Instant::now();
        let procs: Vec<_> = (0..n)
            .map(|i| {
                let control = format!("127.0.0.1:{port}");
                start_proxy(dir.path(), &control, upstream, &format!("{app}-{i}"), &app)
            })
            .collect();
        for (_, admin, _) in &procs {
            wait_port(*admin).await;
        }
        let v = apply(&mut config, chain(&app, "warm")).await;
        rollout(&mut discovery, &format!("{app}-"), n, v).await;
        let startup = started.elapsed();
        let mut ms = Vec::new();
        for round in 0..args.rounds {
            let t = Instant::now();
            let v = apply(&mut config, chain(&app, &format!("r{round}"))).await;
            rollout(&mut discovery, &format!("{app}-"), n, v).await;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        eprintln!(
            "{n} proxies: push to live p50 {:.1} ms, max {:.1} ms",
            percentile(&ms, 0.5),
            percentile(&ms, 1.0)
        );
        let admins: Vec<u16> = procs.iter().map(|(_, admin, _)| *admin).collect();
        let mut new_ms = Vec::new();
        for round in 0..args.rounds {
            let service = format!("new-{app}-{round}");
            let address = format!("127.0.0.1:{upstream}");
            new_ms.push(new_service_to_live(&mut registry, &admins, &service, &address).await);
        }
        new_ms.sort_by(f64::total_cmp);
        eprintln!(
            "{n} proxies: a new service live p50 {:.1} ms, max {:.1} ms",
            percentile(&new_ms, 0.5),
            percentile(&new_ms, 1.0)
        );
        push_to_live.push(json!({
            "proxies": n,
            "rounds": ms.len(),
            "p50_ms": percentile(&ms, 0.5),
            "p90_ms": percentile(&ms, 0.9),
            "max_ms": percentile(&ms, 1.0),
            "new_service_p50_ms": percentile(&new_ms, 0.5),
            "new_service_max_ms": percentile(&new_ms, 1.0),
            "proxies_started_and_first_chain_live_ms": startup.as_millis() as u64,
        }));
        drop(procs);
    }

    // Services at scale: registered before the simulated streams connect.
    let rss_no_services = rss_kib(control_pid);
    let register_started = Instant::now();
    for i in 0..args.services {
        register(
            &mut registry,
            &format!("svc-{i}"),
            &format!("10.0.{}.{}:80", i / 250, i % 250 + 1),
        )
        .await;
    }
    let register_ms = register_started.elapsed().as_millis() as u64;
    eprintln!("{} services registered in {register_ms} ms", args.services);

    // Scale: simulated streams.
    let rss_before = rss_kib(control_pid);
    let seen: Vec<Arc<Seen>> = (0..args.streams).map(|_| Arc::default()).collect();
    let connect_started = Instant::now();
    // Each simulated proxy has its own connection, as real ones do.
    for (i, s) in seen.iter().enumerate() {
        let sim = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        tokio::spawn(simulated(sim, format!("sim-{i}"), s.clone()));
    }
    // Every stream connected (it has been sent its first snapshot and ACKed).
    let v0 = apply(&mut config, chain("sim", "s0")).await;
    rollout(&mut discovery, "sim-", args.streams, v0).await;
    let connected_ms = connect_started.elapsed().as_secs_f64() * 1e3;
    let mut converge = Vec::new();
    let mut delivered = Vec::new();
    for round in 1..=5 {
        let t = Instant::now();
        let v = apply(&mut config, chain("sim", &format!("s{round}"))).await;
        // Delivered: every stream has received it.
        while seen.iter().any(|s| s.version.load(Ordering::SeqCst) < v) {
            assert!(t.elapsed() < Duration::from_secs(60), "not delivered");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delivered.push(t.elapsed().as_secs_f64() * 1e3);
        rollout(&mut discovery, "sim-", args.streams, v).await;
        converge.push(t.elapsed().as_secs_f64() * 1e3);
    }
    converge.sort_by(f64::total_cmp);
    delivered.sort_by(f64::total_cmp);
    let rss_after = rss_kib(control_pid);
    let per_proxy = |seen: &[Arc<Seen>]| {
        let bytes: u64 = seen.iter().map(|s| s.bytes.load(Ordering::SeqCst)).sum();
        let clusters: u64 = seen.iter().map(|s| s.clusters.load(Ordering::SeqCst)).sum();
        let n = seen.len().max(1) as u64;
        (bytes / n, clusters / n)
    };
    let (unscoped_bytes, unscoped_clusters) = per_proxy(&seen);
    // A new service reaching every stream (unscoped: each snapshot grows by it).
    let delivered_with = |seen: &[Arc<Seen>], clusters: u64| {
        seen.iter()
            .all(|s| s.clusters.load(Ordering::SeqCst) >= clusters)
    };
    let t = Instant::now();
    register(&mut registry, "svc-new", "10.9.9.9:80").await;
    while !delivered_with(&seen, unscoped_clusters + 1) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "svc-new not delivered"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let new_service_all_streams_ms = t.elapsed().as_secs_f64() * 1e3;
    // Scoped: the streams may call 10 services.
    let scope = v1::Resource {
        kind: "Scope".into(),
        name: "sim".into(),
        selector: [("app".to_string(), "sim".to_string())].into(),
        version: 0,
        conditions: Vec::new(),
        spec: Some(v1::resource::Spec::Scope(v1::ScopeSpec {
            services: vec!["svc-1*".into(), "svc-new".into()],
        })),
    };
    let t = Instant::now();
    let v = apply(&mut config, scope).await;
    while seen.iter().any(|s| s.version.load(Ordering::SeqCst) < v) {
        assert!(t.elapsed() < Duration::from_secs(60), "scope not delivered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let scope_delivered_ms = t.elapsed().as_secs_f64() * 1e3;
    let (scoped_bytes, scoped_clusters) = per_proxy(&seen);
    let rss_scoped = rss_kib(control_pid);
    eprintln!(
        "{} services: snapshot per proxy {unscoped_bytes} B ({unscoped_clusters} clusters) unscoped, \
         {scoped_bytes} B ({scoped_clusters} clusters) scoped; a new service on all {} streams in \
         {new_service_all_streams_ms:.0} ms; the scope on all in {scope_delivered_ms:.0} ms",
        args.services, args.streams
    );
    eprintln!(
        "{} streams: all delivered p50 {:.0} ms, all ACKed p50 {:.0} ms (max {:.0}); control RSS {} -> {} KiB",
        args.streams,
        percentile(&delivered, 0.5),
        percentile(&converge, 0.5),
        percentile(&converge, 1.0),
        rss_before,
        rss_after
    );

    // Swaps under load, with a release proxy and weft-load at `rate`.
    let control_addr = format!("127.0.0.1:{port}");
    let (proxy, admin, listen) = start_proxy(dir.path(), &control_addr, upstream, "load-0", "load");
    wait_port(admin).await;
    let v = apply(&mut config, chain("load", "l0")).await;
    rollout(&mut discovery, "load-", 1, v).await;
    let secs = 12.0;
    let load = Command::new(bin("weft-load"))
        .args(["--url", &format!("http://127.0.0.1:{listen}/")])
        .args([
            "--mode",
            "rate",
            "--rate",
            &args.rate.to_string(),
            "--connections",
            "32",
        ])
        .args(["--duration-secs", &secs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn weft-load");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let swaps_started = Instant::now();
    for i in 1..=100 {
        let v = apply(&mut config, chain("load", &format!("l{i}"))).await;
        rollout(&mut discovery, "load-", 1, v).await;
        // Spread the swaps over the load run.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let swaps_ms = swaps_started.elapsed().as_millis() as u64;
    // Every swap happened while the load ran.
    let within_load = swaps_ms + 500 < (secs * 1000.0) as u64;
    let out = load.wait_with_output().expect("weft-load");
    let load_result: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&out.stdout)));
    eprintln!(
        "100 swaps in {swaps_ms} ms under {} req/s: {load_result}",
        args.rate
    );
    drop(proxy);

    let mut failovers = Vec::new();
    for &n in args.failover_proxies.iter().filter(|&&n| n > 0) {
        failovers.push(
            failover(
                &dir.path().join(format!("failover-{n}")),
                &args,
                n,
                upstream,
            )
            .await,
        );
    }

    println!(
        "{}",
        json!({
            "push_to_live": push_to_live,
            "services": {
                "services": args.services,
                "registered_in_ms": register_ms,
                "control_rss_kib_before_services": rss_no_services,
                "snapshot_bytes_per_proxy_unscoped": unscoped_bytes,
                "clusters_per_proxy_unscoped": unscoped_clusters,
                "snapshot_bytes_per_proxy_scoped": scoped_bytes,
                "clusters_per_proxy_scoped": scoped_clusters,
                "new_service_on_all_streams_ms": new_service_all_streams_ms,
                "scope_on_all_streams_ms": scope_delivered_ms,
                "control_rss_kib_scoped": rss_scoped,
            },
            "scale": {
                "streams": args.streams,
                "all_connected_and_acked_ms": connected_ms,
                "delivered_p50_ms": percentile(&delivered, 0.5),
                "acked_p50_ms": percentile(&converge, 0.5),
                "acked_max_ms": percentile(&converge, 1.0),
                "control_rss_kib_before_streams": rss_before,
                "control_rss_kib_with_streams": rss_after,
            },
            "replica_failover": failovers,
            "swaps_under_load": {
                "swaps": 100,
                "swaps_ms": swaps_ms,
                "all_swaps_within_the_load_run": within_load,
                "rate": args.rate,
                "load": load_result,
            },
        })
    );
    drop(control);
}
