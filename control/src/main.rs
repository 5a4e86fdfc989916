//! `weft-control`: the Weft control service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use weft_control::{ControlState, EmbeddedRegistry, RedbStore, Store};

/// Weft control service: filter modules, config, registry and discovery over gRPC.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of the embedded database (created if missing), and of the mesh CA's files.
    #[arg(long, default_value = "weft-control-data")]
    data_dir: PathBuf,
    /// Keep modules, resources, registered instances, join tokens and DNS answers in etcd
    /// instead of the data dir: `etcd://host:2379[,host:2379...][/prefix]` (default prefix
    /// `/weft`). Any number of control services (replicas) may share a prefix, all serving
    /// at once; one of them, elected, does the singleton work.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Address of the gRPC endpoint.
    #[arg(long, default_value = weft_control::service::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// Serve the web dashboard here (`127.0.0.1:7071`): the mesh's topology, golden
    /// metrics, proxies and rollouts, behind the same bearer token as the API, over TLS
    /// with `--tls`.
    #[arg(long, value_name = "ADDR")]
    dashboard: Option<std::net::SocketAddr>,
    /// A file holding the bearer token every client must present (`authorization: Bearer
    /// <token>`); `WEFT_CONTROL_TOKEN` may give the token itself. Without either, any
    /// client that reaches the address is trusted: keep it on loopback.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The mesh's trust domain: identities are `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, default_value = "weft.local")]
    trust_domain: String,
    /// Sign with this intermediate CA (PEM: the CA certificate, then its chain up to the
    /// root, which becomes the trust bundle) instead of a root made in the data dir.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The intermediate CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Lifetime of the certificates signed for proxies, in seconds (they renew at about
    /// 70% of it).
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    cert_ttl_seconds: u64,
    /// Serve over TLS, with a certificate from the mesh CA's signing root, issued at startup
    /// and again when a CA rotation moves signing to a new root (clients verify against the
    /// trust bundle, kept in `<data-dir>/ca/bundle.pem`); clients then use `https://`.
    #[arg(long)]
    tls: bool,
    /// A name the TLS certificate is for (DNS name or IP address), repeatable; the listen
    /// address's IP, `localhost` and `127.0.0.1` are always in it.
    #[arg(long = "tls-name", requires = "tls")]
    tls_names: Vec<String>,
    /// Listen beyond loopback without TLS all the same (join tokens, CSRs and the bearer
    /// token then travel in clear): without it, a non-loopback `--listen` needs `--tls`.
    #[arg(long, conflicts_with = "tls")]
    plaintext: bool,
    /// A public key (PEM, ed25519) whose module signatures are trusted, repeatable; with
    /// any, a module pushed without a signature by one of them is refused
    /// (`weftctl module push --sign KEY`).
    #[arg(long = "module-trusted-key", value_name = "FILE")]
    module_trusted_keys: Vec<PathBuf>,
    /// A DNS server (`ip:port`) that resolves clusters' `dns` names, repeatable; without
    /// one, the system's (`/etc/resolv.conf`).
    #[arg(long = "dns-server", value_name = "ADDR")]
    dns_servers: Vec<std::net::SocketAddr>,
    /// Log filter (`info`, `debug`, ...); `RUST_LOG` overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-control: {e}");
            ExitCode::from(2)
        }
    }
}

/// Replicas on one etcd prefix sign with one root: the one in the store, else this
/// replica's (made now if it has none), put there unless another replica's came first.
fn share_ca(
    store: &weft_control::etcd::EtcdStore,
    args: &Args,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = args.data_dir.join("ca");
    if store.fetch_ca(&dir)? {
        return Ok(());
    }
    weft_control::MeshCa::load_or_create(
        &args.data_dir,
        &args.trust_domain,
        None,
        std::time::Duration::from_secs(args.cert_ttl_seconds),
    )?;
    if store.offer_ca(&dir)? {
        tracing::info!("this replica's mesh root CA is the one in the store now");
    } else {
        store.fetch_ca(&dir)?;
    }
    Ok(())
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("WEFT_CONTROL_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty());
    let mut shared = false;
    let (store, registry): (Arc<dyn Store>, Box<dyn weft_control::Registry>) = match &args.store {
        Some(url) => {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let holder = format!("{} {} pid {}", host.trim(), args.listen, std::process::id());
            let store = Arc::new(weft_control::etcd::EtcdStore::open(url, &holder)?);
            let registry = Box::new(weft_control::etcd::EtcdRegistry::load(store.clone())?);
            if args.ca_cert.is_none() {
                share_ca(&store, &args)?;
            }
            shared = true;
            (store, registry)
        }
        None => {
            let store: Arc<dyn Store> = Arc::new(RedbStore::open(&args.data_dir)?);
            let registry = Box::new(EmbeddedRegistry::load(store.clone())?);
            (store, registry)
        }
    };
    let changes = store.take_changes();
    let module_keys = weft_client::signing::TrustedKeys::from_files(&args.module_trusted_keys)?;
    if !module_keys.is_empty() {
        tracing::info!(keys = ?module_keys.ids(), "modules must be signed by a trusted key");
    }
    let state =
        Arc::new(ControlState::load(store.clone(), registry)?.with_module_keys(module_keys)?);
    let ca = weft_control::MeshCa::load_or_create(
        &args.data_dir,
        &args.trust_domain,
        args.ca_cert.as_deref().zip(args.ca_key.as_deref()),
        std::time::Duration::from_secs(args.cert_ttl_seconds),
    )?;
    let ca = if shared && args.ca_cert.is_none() {
        ca.without_rotation(
            "replicas on etcd share this CA: a rotation is not supported there yet (rotate a \
             CA given with --ca-cert/--ca-key by restarting every replica with new files)",
        )
    } else {
        ca
    };
    let tls = if args.tls {
        let mut names = args.tls_names.clone();
        names.extend(["localhost".to_owned(), "127.0.0.1".to_owned()]);
        if !args.listen.ip().is_unspecified() {
            names.push(args.listen.ip().to_string());
        }
        names.sort();
        names.dedup();
        Some(names)
    } else {
        if !args.listen.ip().is_loopback() {
            if !args.plaintext {
                return Err(format!(
                    "--listen {} is beyond loopback: serve it with --tls (join tokens, CSRs \
                     and the bearer token travel on this channel), or say --plaintext",
                    args.listen
                )
                .into());
            }
            tracing::warn!(
                listen = %args.listen,
                "the control service listens beyond loopback without TLS (--plaintext): join tokens, CSRs and the bearer token travel in clear"
            );
        }
        None
    };
    let ca = Arc::new(ca);
    let identity = weft_control::IdentityService::new(ca.clone(), store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            data_dir = %args.data_dir.display(),
            version = state.version(),
            auth = token.is_some(),
            trust_domain = %args.trust_domain,
            tls = args.tls,
            "weft-control ready"
        );
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                }
                _ => std::future::pending().await,
            }
            tracing::info!("shutting down");
        };
        let tls = match tls {
            Some(names) => Some(weft_control::tls::server_config(ca.clone(), names)?),
            None => None,
        };
        if let Some(changes) = changes {
            tokio::spawn(weft_control::state::follow_store(state.clone(), changes));
        }
        tokio::spawn(weft_control::identity::drive_rotation(ca));
        let dns = weft_control::dns::DnsDiscovery::new(&args.dns_servers)?;
        tokio::spawn(dns.run(state.clone()));
        if let Some(addr) = args.dashboard {
            if !addr.ip().is_loopback() && tls.is_none() && !args.plaintext {
                return Err(format!(
                    "--dashboard {addr} is beyond loopback: serve it with --tls (the bearer \
                     token travels on it), or say --plaintext"
                )
                .into());
            }
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--dashboard): {e}"))?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(url = %format!("{scheme}://{}/", listener.local_addr()?), "dashboard ready");
            tokio::spawn(weft_control::dashboard::serve(
                state.clone(),
                listener,
                tls.clone(),
                token.clone(),
            ));
        }
        weft_control::serve(state, identity, listener, tls, token, shutdown).await?;
        Ok(())
    })
}
