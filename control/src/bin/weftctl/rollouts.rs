//! `weftctl rollout start|status|history|abort`: staged rollouts with automatic rollback
//! (the control service's `Rollouts` API).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tonic::Code;
use weft_control::manifest;
use weft_proto::v1::rollouts_client::RolloutsClient;
use weft_proto::v1::{
    AbortRolloutRequest, GetRolloutRequest, ListRolloutsRequest, Rollout, RolloutSample,
    StartRolloutRequest,
};

use super::{Output, Rpc, Server, ago, print_table, show};

/// `weftctl rollout start ...`.
#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// `module NAME`: every chain running an older build pushed under NAME moves to the
    /// build the name points to now (instead of `-f`).
    #[arg(value_name = "module NAME", num_args = 0..=2)]
    target: Vec<String>,
    /// The new version: a manifest of chains and filter configs; `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<PathBuf>,
    /// The shares of the proxies, in percent, comma-separated, ending at 100.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    steps: Vec<u32>,
    /// How long each step runs once its proxies run the new version (`30s`, `2m`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    interval: Duration,
    /// The error rate the new version may add over the old one's (`1%` or `0.01`).
    #[arg(long, value_name = "RATE", default_value = "1%", value_parser = parse_rate)]
    max_error_rate: f64,
    /// The largest p99 latency the new version's proxies may show, ms (none by default).
    #[arg(long, value_name = "MS")]
    max_p99_ms: Option<f64>,
    /// Requests the new version must answer in a step before it is promoted.
    #[arg(long, value_name = "N", default_value_t = 20)]
    min_requests: u64,
    /// No steps and no gates: apply the new version everywhere at once.
    #[arg(long)]
    now: bool,
    /// Follow it until it ends; exit 1 when it is rolled back.
    #[arg(long)]
    wait: bool,
}

/// `30s`, `2m`, `500ms` or seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}`: not a duration (30s, 2m, 500ms)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("`{s}`: the unit is ms, s or m")),
    };
    if d.is_zero() {
        return Err("a step must last some time".into());
    }
    Ok(d)
}

/// `1%` or a fraction.
fn parse_rate(s: &str) -> Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.parse::<f64>(),
    }
    .map_err(|_| format!("`{s}`: a rate is `1%` or `0.01`"))?;
    if !(0.0..=1.0).contains(&v) || v == 0.0 {
        return Err(format!("`{s}`: above 0 and at most 100%"));
    }
    Ok(v)
}

/// `weftctl rollout start`.
pub async fn start(server: &Server, args: StartArgs, output: Output) -> anyhow::Result<()> {
    let (resources, module) = match (&args.file, args.target.as_slice()) {
        (Some(file), []) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let resources = manifest::parse(&text).with_context(|| file.display().to_string())?;
            if resources.is_empty() {
                bail!("{} holds no resources", file.display());
            }
            (resources, String::new())
        }
        (None, [what, name]) if what == "module" => (Vec::new(), name.clone()),
        _ => bail!("say what to roll out: `-f FILE` or `module NAME`"),
    };
    let request = StartRolloutRequest {
        resources,
        module,
        steps: args.steps,
        interval_ms: args.interval.as_millis() as u64,
        max_error_rate: args.max_error_rate,
        max_p99_ms: args.max_p99_ms.unwrap_or(0.0),
        min_requests: args.min_requests,
        now: args.now,
    };
    let mut client = RolloutsClient::new(server.connect().await?);
    let rollout = client.start(request).await.rpc()?;
    if args.wait && rollout.state == "progressing" {
        eprintln!("rollout {} started", rollout.id);
        return follow(server, &rollout.id, output).await;
    }
    show(
        output,
        || rollout_view(&rollout),
        || {
            println!("rollout {} {}", rollout.id, rollout.state);
            print_rollout(&rollout);
        },
    )
}

/// Prints every change of rollout `id` until it ends: Ok when it succeeded.
pub async fn follow(server: &Server, id: &str, output: Output) -> anyhow::Result<()> {
    let mut client = RolloutsClient::new(server.connect().await?);
    let mut said = String::new();
    let mut decisions = 0;
    loop {
        let r = client.get(GetRolloutRequest {}).await.rpc()?;
        if r.id != id {
            bail!("rollout {id} is gone (the control service restarted?)");
        }
        for d in r.decisions.iter().skip(decisions) {
            eprintln!("{}", decision_line(d));
        }
        decisions = r.decisions.len();
        let line = progress_line(&r);
        if r.state == "progressing" && line != said {
            eprintln!("{line}");
            said = line;
        }
        if r.state != "progressing" {
            show(output, || rollout_view(&r), || print_rollout(&r))?;
            return match r.state.as_str() {
                "succeeded" => Ok(()),
                state => Err(anyhow!("rollout {} {state}: {}", r.id, r.reason)),
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `weftctl rollout status` when a staged rollout is progressing: follows it. Returns
/// `false` when none is.
pub async fn follow_running(server: &Server, output: Output) -> anyhow::Result<bool> {
    let mut client = RolloutsClient::new(server.connect().await?);
    match client.get(GetRolloutRequest {}).await {
        Ok(r) if r.get_ref().state == "progressing" => {
            follow(server, &r.into_inner().id, output).await?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        // A service from before staged rollouts.
        Err(s) if s.code() == Code::Unimplemented => Ok(false),
        Err(s) => Err(anyhow!(super::status_message(&s))),
    }
}

/// `weftctl rollout history`.
pub async fn history(server: &Server, output: Output) -> anyhow::Result<()> {
    let list = RolloutsClient::new(server.connect().await?)
        .list(ListRolloutsRequest {})
        .await
        .rpc()?;
    show(
        output,
        || Value::Array(list.rollouts.iter().map(rollout_view).collect()),
        || {
            let rows = list
                .rollouts
                .iter()
                .map(|r| {
                    [
                        r.id.clone(),
                        r.state.clone(),
                        what(r),
                        format!("{}%", r.steps.get(r.step as usize).copied().unwrap_or(0)),
                        ago(r.started_ms),
                        r.reason.clone(),
                    ]
                })
                .collect();
            print_table(
                "rollouts",
                ["ID", "STATE", "WHAT", "STEP", "STARTED", "REASON"],
                rows,
            );
        },
    )
}

/// `weftctl rollout abort`.
pub async fn abort(server: &Server, reason: String, output: Output) -> anyhow::Result<()> {
    let r = RolloutsClient::new(server.connect().await?)
        .abort(AbortRolloutRequest { reason })
        .await
        .rpc()?;
    show(
        output,
        || rollout_view(&r),
        || {
            println!(
                "rollout {} aborted: every proxy goes back to the old version",
                r.id
            )
        },
    )
}

fn what(r: &Rollout) -> String {
    if r.module.is_empty() {
        r.resources.join(",")
    } else {
        format!("module {}", r.module)
    }
}

fn progress_line(r: &Rollout) -> String {
    let percent = r.steps.get(r.step as usize).copied().unwrap_or(0);
    format!(
        "step {}/{} ({percent}%, {} of {} proxies): {}",
        r.step + 1,
        r.steps.len(),
        r.share.len(),
        r.proxies,
        r.reason
    )
}

fn sample_text(s: &Option<RolloutSample>) -> String {
    match s {
        Some(s) => format!(
            "{} requests, {} failed ({:.2}%), p99 {:.1} ms",
            s.requests,
            s.failures,
            s.error_rate * 100.0,
            s.p99_ms
        ),
        None => "-".into(),
    }
}

fn decision_line(d: &weft_proto::v1::RolloutDecision) -> String {
    let mut line = format!("{} at {}%: {}", d.action, d.step_percent, d.reason);
    if d.canary.is_some() {
        line.push_str(&format!(
            "\n  new version: {}\n  old version: {}",
            sample_text(&d.canary),
            sample_text(&d.baseline)
        ));
    }
    line
}

fn print_rollout(r: &Rollout) {
    println!("ID          {}", r.id);
    println!("STATE       {}", r.state);
    println!("WHAT        {}", what(r));
    println!(
        "STEPS       {} (now {})",
        r.steps
            .iter()
            .map(|s| format!("{s}%"))
            .collect::<Vec<_>>()
            .join(" -> "),
        r.steps
            .get(r.step as usize)
            .map_or("-".into(), |s| format!("{s}%"))
    );
    println!(
        "GATES       every {} s: error rate +{:.2}% at most{}, {} requests a step",
        r.interval_ms as f64 / 1000.0,
        r.max_error_rate * 100.0,
        if r.max_p99_ms > 0.0 {
            format!(", p99 {} ms at most", r.max_p99_ms)
        } else {
            String::new()
        },
        r.min_requests
    );
    println!(
        "PROXIES     {} of {} run the new version",
        r.share.len(),
        r.proxies
    );
    if r.version > 0 {
        println!("VERSION     {}", r.version);
    }
    println!("REASON      {}", r.reason);
    println!("DECISIONS");
    for d in &r.decisions {
        for line in decision_line(d).lines() {
            println!("  {line}");
        }
    }
}

fn sample_view(s: &Option<RolloutSample>) -> Value {
    match s {
        Some(s) => json!({
            "requests": s.requests,
            "failures": s.failures,
            "error_rate": s.error_rate,
            "p99_ms": s.p99_ms,
        }),
        None => Value::Null,
    }
}

/// A rollout for JSON and YAML output.
pub fn rollout_view(r: &Rollout) -> Value {
    json!({
        "id": r.id,
        "state": r.state,
        "resources": r.resources,
        "module": r.module,
        "steps": r.steps,
        "step": r.step,
        "proxies": r.proxies,
        "share": r.share,
        "interval_ms": r.interval_ms,
        "max_error_rate": r.max_error_rate,
        "max_p99_ms": r.max_p99_ms,
        "min_requests": r.min_requests,
        "started_ms": r.started_ms,
        "updated_ms": r.updated_ms,
        "step_live_ms": r.step_live_ms,
        "reason": r.reason,
        "version": r.version,
        "decisions": r.decisions.iter().map(|d| json!({
            "at_ms": d.at_ms,
            "step_percent": d.step_percent,
            "action": d.action,
            "reason": d.reason,
            "canary": sample_view(&d.canary),
            "baseline": sample_view(&d.baseline),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3h").is_err());
        assert_eq!(parse_rate("1%"), Ok(0.01));
        assert_eq!(parse_rate("0.05"), Ok(0.05));
        assert!(parse_rate("150%").is_err());
        assert!(parse_rate("x").is_err());
    }
}
