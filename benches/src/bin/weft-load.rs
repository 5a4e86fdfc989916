//! `weft-load`: a single-threaded HTTP/1.1 keep-alive load generator.
//!
//! ```text
//! weft-load --url http://127.0.0.1:18081/ --mode max  --connections 64 --duration-secs 10
//! weft-load --url http://127.0.0.1:18081/ --mode rate --rate 2000 --connections 16 --duration-secs 10
//! ```
//!
//! Prints one JSON line: requests, req/s, non-2xx, errors, timeouts and latency percentiles
//! (coordinated-omission corrected in `rate` mode; see `weft_benches::load`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use weft_benches::load::{self, LoadConfig, Mode, Target};

/// Single-threaded HTTP/1.1 keep-alive load generator; prints one JSON line.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Target URL (`http://host:port/path`).
    #[arg(long)]
    url: String,
    /// `max`: closed loop, as fast as responses come back; `rate`: open loop at `--rate`.
    #[arg(long, value_enum, default_value_t = ModeArg::Max)]
    mode: ModeArg,
    /// Requests per second in `rate` mode.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Seconds during which requests are started.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Milliseconds before a connect or a response counts as a timeout.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// The `--mode` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Max,
    Rate,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let target = match Target::parse(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("weft-load: {e}");
            return ExitCode::from(2);
        }
    };
    if !(args.duration_secs > 0.0 && args.duration_secs <= 3600.0) || args.rate == 0 {
        eprintln!("weft-load: --duration-secs must be in (0, 3600] and --rate above 0");
        return ExitCode::from(2);
    }
    let config = LoadConfig {
        target,
        mode: match args.mode {
            ModeArg::Max => Mode::Max,
            ModeArg::Rate => Mode::Rate { per_sec: args.rate },
        },
        connections: args.connections.max(1),
        duration: Duration::from_secs_f64(args.duration_secs),
        request_timeout: Duration::from_millis(args.timeout_ms.max(1)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-load: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(load::run(config)) {
        Ok(report) => {
            println!("{}", report.to_json(&args.url));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-load: {e}");
            ExitCode::FAILURE
        }
    }
}
