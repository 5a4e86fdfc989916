//! `weftctl stat` and `weftctl top`: the mesh's golden metrics from the control service's
//! `Observe` API.

use std::io::IsTerminal;
use std::time::Duration;

use serde_json::{Value, json};
use weft_proto::v1::observe_client::ObserveClient;
use weft_proto::v1::{StatRequest, StatRow, TapEvent, TapRequest};

use super::{Output, Rpc, Server, show};

/// What `stat` sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatKind {
    /// Per destination service.
    #[value(alias = "service", alias = "svc")]
    Services,
    /// Per service and route.
    #[value(alias = "route")]
    Routes,
    /// Per source workload and destination service.
    #[value(alias = "edge")]
    Edges,
    /// Per proxy.
    #[value(alias = "proxy")]
    Proxies,
}

impl StatKind {
    fn api_name(self) -> &'static str {
        match self {
            StatKind::Services => "services",
            StatKind::Routes => "routes",
            StatKind::Edges => "edges",
            StatKind::Proxies => "proxies",
        }
    }
}

/// `weftctl stat ...`.
#[derive(clap::Args, Debug)]
pub struct StatArgs {
    /// What a row sums.
    #[arg(value_enum, ignore_case = true)]
    kind: StatKind,
    /// The window, in seconds back from now (at most 600).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    window: u32,
}

/// `weftctl tap ...`.
#[derive(clap::Args, Debug)]
pub struct TapArgs {
    /// Only proxies with this label, `key=value`; repeat or separate with commas.
    #[arg(long, value_name = "KEY=VALUE", value_parser = super::parse_label, value_delimiter = ',')]
    selector: Vec<(String, String)>,
    /// Only requests whose path starts with this.
    #[arg(long, default_value = "")]
    path: String,
    /// At most this many samples a second from each proxy (1 to 100).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_rps: u32,
    /// Stop after this many seconds (0: at Ctrl-C).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    duration: u32,
    /// Stop after this many samples (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 0)]
    count: u64,
}

/// `weftctl tap`: a line per sampled request (`-o json`: one JSON object per line).
pub async fn tap(server: &Server, args: TapArgs, output: Output) -> anyhow::Result<()> {
    let mut stream = ObserveClient::new(server.connect().await?)
        .tap(TapRequest {
            selector: args.selector.into_iter().collect(),
            path_prefix: args.path,
            max_rps: args.max_rps,
            duration_seconds: args.duration,
        })
        .await
        .rpc()?;
    let mut seen = 0u64;
    loop {
        let event = tokio::select! {
            e = stream.message() => e,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(e) = event.map_err(|s| anyhow::anyhow!(super::status_message(&s)))? else {
            return Ok(());
        };
        match output {
            Output::Table => println!("{}", tap_line(&e)),
            _ => println!("{}", tap_view(&e)),
        }
        seen += 1;
        if args.count != 0 && seen >= args.count {
            return Ok(());
        }
    }
}

fn tap_line(e: &TapEvent) -> String {
    let source = match e.source_identity.as_str() {
        "" => e.source.clone(),
        id => format!("{} ({id})", e.source),
    };
    let mut line = format!(
        "{} {} {} {}{} {} {} src={} dst={}",
        e.proxy,
        e.listener,
        e.method,
        e.authority,
        e.path,
        match e.status {
            0 => "reset".to_owned(),
            s => s.to_string(),
        },
        ms(e.latency_ms),
        source,
        match e.destination.as_str() {
            "" => "-",
            d => d,
        },
    );
    if !e.route.is_empty() {
        line.push_str(&format!(" route={}", e.route));
    }
    line
}

fn tap_view(e: &TapEvent) -> Value {
    json!({
        "proxy": e.proxy,
        "at_ms": e.at_ms,
        "listener": e.listener,
        "method": e.method,
        "authority": e.authority,
        "path": e.path,
        "status": e.status,
        "latency_ms": e.latency_ms,
        "source": e.source,
        "source_identity": e.source_identity,
        "destination": e.destination,
        "route": e.route,
    })
}

/// `weftctl top ...`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// The window each refresh sums, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    window: u32,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    interval: u64,
    /// Stop after this many refreshes (0: until interrupted).
    #[arg(long, value_name = "N", default_value_t = 0)]
    iterations: u64,
    /// Routes shown, busiest first.
    #[arg(long, value_name = "N", default_value_t = 10)]
    routes: usize,
}

async fn fetch(server: &Server, kind: StatKind, window: u32) -> anyhow::Result<Vec<StatRow>> {
    let response = ObserveClient::new(server.connect().await?)
        .stat(StatRequest {
            kind: kind.api_name().into(),
            window_seconds: window,
        })
        .await
        .rpc()?;
    Ok(response.rows)
}

/// `weftctl stat KIND`.
pub async fn stat(server: &Server, args: StatArgs, output: Output) -> anyhow::Result<()> {
    let rows = fetch(server, args.kind, args.window).await?;
    show(
        output,
        || {
            json!({
                "kind": args.kind.api_name(),
                "window_seconds": args.window,
                "rows": rows.iter().map(|r| row_view(args.kind, r)).collect::<Vec<_>>(),
            })
        },
        || {
            if rows.is_empty() {
                eprintln!("no traffic in the last {}s", args.window);
            } else {
                print!("{}", stat_table(args.kind, &rows));
            }
        },
    )
}

/// `weftctl top`: services, edges and the busiest routes, redrawn every interval.
pub async fn top(server: &Server, args: TopArgs) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(args.interval.max(1)));
    let mut done = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let services = fetch(server, StatKind::Services, args.window).await?;
        let edges = fetch(server, StatKind::Edges, args.window).await?;
        let mut routes = fetch(server, StatKind::Routes, args.window).await?;
        routes.sort_by(|a, b| b.rps.total_cmp(&a.rps));
        routes.truncate(args.routes);
        let mut screen = String::new();
        if terminal {
            // Home and clear: the table is redrawn in place.
            screen.push_str("\x1b[H\x1b[2J");
        }
        screen.push_str(&format!(
            "weftctl top: the last {}s, every {}s (Ctrl-C quits)\n\n",
            args.window, args.interval
        ));
        for (title, kind, rows) in [
            ("SERVICES", StatKind::Services, &services),
            ("EDGES", StatKind::Edges, &edges),
            ("ROUTES", StatKind::Routes, &routes),
        ] {
            screen.push_str(title);
            screen.push('\n');
            if rows.is_empty() {
                screen.push_str("(no traffic)\n\n");
                continue;
            }
            screen.push_str(&stat_table(kind, rows));
            screen.push('\n');
        }
        print!("{screen}");
        done += 1;
        if args.iterations != 0 && done >= args.iterations {
            return Ok(());
        }
    }
}

/// `kind`'s rows as a table: the naming columns, then the numbers (right-aligned).
fn stat_table(kind: StatKind, rows: &[StatRow]) -> String {
    let names: &[&str] = match kind {
        StatKind::Services => &["SERVICE"],
        StatKind::Routes => &["SERVICE", "ROUTE"],
        StatKind::Edges => &["SOURCE", "DESTINATION"],
        StatKind::Proxies => &["WORKLOAD", "PROXY"],
    };
    let numbers = ["SUCCESS", "RPS", "P50", "P95", "P99", "REQUESTS"];
    let mut grid: Vec<Vec<String>> = vec![
        names
            .iter()
            .chain(&numbers)
            .map(|h| h.to_string())
            .collect(),
    ];
    for r in rows {
        let mut line: Vec<String> = match kind {
            StatKind::Services => vec![r.service.clone()],
            StatKind::Routes => vec![r.service.clone(), r.route.clone()],
            StatKind::Edges => vec![r.source.clone(), r.service.clone()],
            StatKind::Proxies => vec![r.service.clone(), r.proxy.clone()],
        };
        line.extend([
            format!("{:.2}%", r.success_rate * 100.0),
            format!("{:.1}", r.rps),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.requests.to_string(),
        ]);
        grid.push(line);
    }
    let widths: Vec<usize> = (0..grid[0].len())
        .map(|c| grid.iter().map(|l| l[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for line in &grid {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                if c < names.len() {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        text.push_str(cells.join("   ").trim_end());
        text.push('\n');
    }
    text
}

/// A latency for a table cell.
fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else if v >= 1.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.2}ms")
    }
}

fn row_view(kind: StatKind, r: &StatRow) -> Value {
    let mut v = json!({
        "requests": r.requests,
        "failures": r.failures,
        "rps": r.rps,
        "success_rate": r.success_rate,
        "p50_ms": r.p50_ms,
        "p95_ms": r.p95_ms,
        "p99_ms": r.p99_ms,
        "proxies": r.proxies,
    });
    let names: &[(&str, &str)] = match kind {
        StatKind::Services => &[("service", &r.service)],
        StatKind::Routes => &[("service", &r.service), ("route", &r.route)],
        StatKind::Edges => &[("source", &r.source), ("destination", &r.service)],
        StatKind::Proxies => &[("workload", &r.service), ("proxy", &r.proxy)],
    };
    for (k, name) in names {
        v[*k] = json!(name);
    }
    v
}
