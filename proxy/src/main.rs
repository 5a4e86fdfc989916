//! `weft-proxy`: the Weft sidecar proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use weft_proxy::{Config, Proxy, ProxyOptions};

/// Weft sidecar proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The YAML config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Worker threads; defaults to the number of cores.
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter (`info`, `debug`, `weft_proxy=trace`, ...); `RUST_LOG` overrides it.
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let config = match Config::load(&args.config) {
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
    let options = ProxyOptions {
        workers,
        config_path: Some(args.config.clone()),
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
