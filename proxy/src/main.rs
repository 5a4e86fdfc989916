//! `weft-proxy`: the Weft sidecar proxy. Parses the command line, loads the config, and runs
//! the core proxy (`weft-core`) with the WASM filter host (`weft-wasm`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use weft_core::control::ControlOptions;
use weft_core::{Config, Proxy, ProxyOptions};
use weft_wasm::WasmHost;

mod init;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings: a background thread returns freed memory to the system after a
/// second even when the proxy is idle (without it, only allocator activity does).
// Unsafe only in name: jemalloc reads this symbol, by this name, at its first allocation.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Weft sidecar proxy.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The YAML config file.
    #[arg(long, short, required = true)]
    config: Option<PathBuf>,
    /// Worker threads; defaults to the number of cores.
    #[arg(long)]
    workers: Option<usize>,
    /// Follow this control service (`host:port`, `http://host:port` or `https://...`):
    /// chains, default clusters and endpoints come from it, over the `--config` bootstrap.
    /// Several, comma-separated, are replicas tried in turn (the next at once when one
    /// fails).
    #[arg(long)]
    control: Option<String>,
    /// This proxy's id at the control service; defaults to the host name (a pod's name in
    /// Kubernetes), so that a restarted proxy finds its state dir again.
    #[arg(long)]
    id: Option<String>,
    /// A label of this proxy (`app=service1`), repeatable; config resources select on them.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where the last good control snapshot and its modules are kept across restarts;
    /// defaults to `weft-state/<id>` under the working directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A file with the control service's bearer token; `WEFT_CONTROL_TOKEN` may give the
    /// token itself.
    #[arg(long)]
    control_token_file: Option<PathBuf>,
    /// For an https:// control service: the CA its certificate chains to (the mesh's trust
    /// bundle); `WEFT_CONTROL_CA` may name it.
    #[arg(long)]
    control_ca_file: Option<PathBuf>,
    /// A public key (PEM, ed25519) whose module signatures are trusted, repeatable; with
    /// any, the proxy runs only modules signed by one of them (a `<module>.sig` beside a
    /// module file: `weftctl module sign`; modules from the control service carry theirs),
    /// checking each before it runs.
    #[arg(long = "module-trusted-key", value_name = "FILE")]
    module_trusted_keys: Vec<PathBuf>,
    /// How often, in milliseconds, the proxy reports its traffic (requests, failures,
    /// latency by listener, cluster and route) and what it runs to the control service.
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    report_interval_ms: u64,
    /// Log filter (`info`, `debug`, `weft_proxy=trace`, ...); `RUST_LOG` overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// What else `weft-proxy` does.
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Installs (or with `--undo` removes) the rules that send the pod's or container's TCP
    /// through the sidecar (run as root, or with NET_ADMIN, in its network namespace).
    Init(init::InitArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Init(init)) = &args.command {
        return init::run(init);
    }
    let Some(config_path) = args.config.clone() else {
        eprintln!("weft-proxy: --config is needed");
        return ExitCode::from(2);
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let control = match args
        .control
        .as_ref()
        .map(|address| control_options(&args, address))
    {
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(2);
        }
        None => None,
    };
    // Compiled modules are cached in `wasm.cache_dir`, else in the state dir of a proxy that
    // follows a control service, else in the user's cache dir (weft_wasm::WasmRuntime::new).
    let cache_dir = config
        .wasm
        .cache_dir
        .clone()
        .or_else(|| control.as_ref().map(|c| c.state_dir.join("module-cache")));
    weft_wasm::set_node(weft_wasm::Node {
        id: node_id(&args),
        labels: args.labels.iter().cloned().collect(),
    });
    let module_keys = match weft_client::signing::TrustedKeys::from_files(&args.module_trusted_keys)
    {
        Ok(keys) => keys,
        Err(e) => {
            eprintln!("weft-proxy: --module-trusted-key {e}");
            return ExitCode::from(2);
        }
    };
    if !module_keys.is_empty() {
        tracing::info!(keys = ?module_keys.ids(), "only modules signed by a trusted key run");
    }
    let filter_host = Arc::new(WasmHost::new(cache_dir).with_module_keys(module_keys));
    let options = ProxyOptions {
        workers,
        config_path: Some(config_path),
        control,
        filter_host: Some(filter_host),
    };
    let proxy = match Proxy::bind(config, options) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if let Ok(addr) = proxy.admin_addr() {
        tracing::info!("admin on {addr}");
    }
    for (name, addr) in proxy.listener_addrs() {
        tracing::info!("listener {name} on {addr}");
    }
    match proxy.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// This proxy's id: `--id`, else the host name (a pod's name in Kubernetes).
fn node_id(args: &Args) -> String {
    args.id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "weft".into())
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not key=value")),
    }
}

fn control_options(args: &Args, address: &str) -> Result<ControlOptions, String> {
    let addresses = weft_client::control_urls(address).map_err(|e| format!("--control: {e}"))?;
    let id = node_id(args);
    let token =
        weft_core::control::token(args.control_token_file.as_deref(), "WEFT_CONTROL_TOKEN")?;
    let ca_file = args.control_ca_file.clone().or_else(|| {
        std::env::var_os("WEFT_CONTROL_CA")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    // An https:// service without a CA (or a CA with http://) is refused here, at startup.
    for address in &addresses {
        weft_core::control::endpoint(address, ca_file.as_deref())
            .map_err(|e| format!("--control: {e}"))?;
    }
    Ok(ControlOptions {
        addresses,
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("weft-state").join(&id)),
        id,
        labels: args.labels.iter().cloned().collect(),
        token,
        ca_file,
        signed_modules: !args.module_trusted_keys.is_empty(),
        report_interval: std::time::Duration::from_millis(args.report_interval_ms),
    })
}
