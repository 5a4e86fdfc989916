//! Staged rollouts end to end: real `weft-control`, `weftctl` and four `weft-proxy`
//! processes with traffic through every one. A new filter config that fails 20% of requests
//! is rolled back by itself within one step, its failures confined to the first step's
//! proxy; a good chain reaches every proxy and becomes the stored config; a new build pushed
//! under a module's name rolls out to the chains that use it, staged or at once; a version
//! the proxies refuse is rolled back at its first NACK.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::*;

use crate::control::apply;
use crate::reload::greeting;

const PROXIES: usize = 4;

/// The shop's chain: the fault filter (its faults from a FilterConfig) and `basic` (pushed
/// from `compat_basic`) greeting with `greeting`.
fn chain(greeting: &str) -> String {
    format!(
        "kind: Chain
name: shop-ingress
selector: {{ app: shop }}
spec:
  listener: ingress
  filters:
    - {{ name: fault, module: fault, config_ref: shop-faults }}
    - {{ name: basic, module: basic, config: {{ greeting: {greeting} }} }}
"
    )
}

/// The faults: `abort_percent` of requests answered 500 by the fault filter.
fn faults(abort_percent: u32) -> String {
    format!(
        "kind: FilterConfig
name: shop-faults
spec:
  config: {{ default: {{ abort: {{ percent: {abort_percent}, status: 500 }} }} }}
"
    )
}

/// Requests through every proxy, paced, counted per proxy, until stopped (at most three
/// minutes).
struct Traffic {
    stop: Arc<AtomicBool>,
    /// Per proxy: answered 200, answered 500.
    counts: Arc<Vec<[AtomicU64; 2]>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(proxies: &[Arc<ProxyProcess>]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<Vec<[AtomicU64; 2]>> = Arc::new(
            (0..proxies.len())
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
        );
        let tasks = proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (p, stop, counts) = (p.clone(), stop.clone(), counts.clone());
                tokio::spawn(async move {
                    let client = h1_client();
                    let deadline = Instant::now() + Duration::from_secs(180);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if let Ok(got) = get(&client, &p.url("/x")).await {
                            match got.status {
                                200 => counts[i][0].fetch_add(1, Ordering::Relaxed),
                                500 => counts[i][1].fetch_add(1, Ordering::Relaxed),
                                s => panic!("proxy {i}: unexpected {s}: {got:?}"),
                            };
                        }
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            counts,
            tasks,
        }
    }

    /// Per proxy: (ok, failed) so far.
    fn counts(&self) -> Vec<(u64, u64)> {
        self.counts
            .iter()
            .map(|[ok, failed]| (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed)))
            .collect()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("traffic task");
        }
    }
}

fn push(control: &ControlProcess, file: &std::path::Path, name: &str) -> Value {
    let (code, out, err) = control.weftctl(&[
        "module",
        "push",
        file.to_str().expect("path"),
        "--name",
        name,
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "push {name}: {out}{err}");
    serde_json::from_str(&out).expect("module json")
}

/// The greetings the proxies answer with now.
async fn greetings(proxies: &[Arc<ProxyProcess>]) -> Vec<String> {
    let client = h1_client();
    let mut out = Vec::new();
    for p in proxies {
        let got = get(&client, &p.url("/x")).await.expect("request");
        assert_eq!(got.status, 200, "{got:?}");
        out.push(greeting(&got));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_rolls_back_by_itself_and_a_good_one_reaches_every_proxy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    let boot = crate::control::bootstrap(&[up.address()]);
    let mut proxies = Vec::new();
    for i in 0..PROXIES {
        let id = format!("shop-{i}");
        let mut args = control.proxy_args(&id, &["app=shop"], &dir.path().join(&id));
        args.extend(["--report-interval-ms".to_owned(), "250".to_owned()]);
        proxies.push(Arc::new(
            ProxyProcess::start_args_any(&boot, 1, &args).await,
        ));
    }
    push(&control, &standard_filter("weft_filter_fault"), "fault");
    let basic_v1 = push(&control, &guest_filter("compat_basic"), "basic");
    apply(&control, &format!("{}---\n{}", faults(0), chain("v1")));
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "60"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greetings(&proxies).await, vec!["v1"; PROXIES]);

    let traffic = Traffic::start(&proxies);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A new filter config that fails 20% of requests, in steps of 25, 50, 100 %.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, faults(20)).expect("write");
    let (code, out, err) = control.weftctl(&[
        "rollout",
        "start",
        "-f",
        bad.to_str().expect("path"),
        "--steps",
        "25,50,100",
        "--interval",
        "3s",
        "--max-error-rate",
        "5%",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let started: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(started["state"], "progressing", "{started}");
    assert_eq!(started["proxies"], PROXIES, "{started}");
    assert_eq!(
        started["share"].as_array().map(Vec::len),
        Some(1),
        "{started}"
    );
    // While it runs, the resource it moves cannot be applied around it.
    let (code, _, err) = control.weftctl_stdin(&["apply", "-f", "-"], Some(&faults(0)));
    assert_eq!(code, 1);
    assert!(err.contains("being rolled out"), "{err}");
    // `rollout status` follows it to its end: rolled back, so it fails.
    let (code, out, err) = control.weftctl(&["rollout", "status", "-o", "json"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("rolled_back") && err.contains("error rate"),
        "{err}"
    );
    let ended: Value = serde_json::from_str(&out).expect("json");
    let decisions = ended["decisions"].as_array().expect("decisions");
    let rollback = decisions.last().expect("a decision");
    assert_eq!(rollback["action"], "rollback", "{ended}");
    assert_eq!(
        rollback["step_percent"], 25,
        "rolled back at the first step: {ended}"
    );
    let canary = &rollback["canary"];
    let rate = canary["error_rate"].as_f64().expect("rate");
    assert!((0.1..0.3).contains(&rate), "about 20% failed: {canary}");
    assert!(rollback["baseline"]["failures"] == 0, "{ended}");
    // Judged once, at the end of its first interval.
    let live = ended["step_live_ms"].as_u64().unwrap_or(0);
    let at = rollback["at_ms"].as_u64().expect("at");
    assert!(live > 0 && at - live < 3_000 + 2_000, "{ended}");

    // Only the first step's proxy ever ran it; after the rollback none fails.
    let shop = |i: usize| format!("shop-{i}");
    let canary_id = started["share"][0].as_str().expect("id").to_owned();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = traffic.counts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = traffic.counts();
    for i in 0..PROXIES {
        let failed_ever = after[i].1;
        if shop(i) == canary_id {
            assert!(failed_ever > 0, "the canary failed some: {after:?}");
        } else {
            assert_eq!(
                failed_ever,
                0,
                "{} never ran the bad version: {after:?}",
                shop(i)
            );
        }
        assert_eq!(
            after[i].1, before[i].1,
            "no failure since the rollback: {after:?}"
        );
        assert!(after[i].0 > before[i].0, "traffic flows: {after:?}");
    }

    // A good new chain goes all the way, and becomes the stored config.
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, chain("v2")).expect("write");
    let (code, out, err) = control.weftctl(&[
        "rollout",
        "start",
        "-f",
        good.to_str().expect("path"),
        "--steps",
        "25,50,100",
        "--interval",
        "1s",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    for needle in ["promote at 25%", "promote at 50%", "succeed at 100%"] {
        assert!(err.contains(needle), "`{needle}` in:\n{err}");
    }
    assert_eq!(greetings(&proxies).await, vec!["v2"; PROXIES]);
    let (code, out, _) = control.weftctl(&["get", "chains", "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(out.contains("greeting: v2"), "{out}");
    let (code, out, err) = control.weftctl(&["rollout", "history"]);
    assert_eq!(code, 0, "{err}");
    let states: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(states, ["succeeded", "rolled_back"], "{out}");

    // A new build under the name `basic`: `module ls` shows which build the name points to
    // and which chains run which; the rollout moves them.
    let noop = push(&control, &guest_filter("compat_noop"), "basic");
    let (code, out, _) = control.weftctl(&["module", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    let modules: Value = serde_json::from_str(&out).expect("json");
    let find = |digest: &Value| {
        modules
            .as_array()
            .and_then(|m| m.iter().find(|m| m["digest"] == *digest))
            .cloned()
            .expect("module")
    };
    let old = find(&basic_v1["digest"]);
    assert_eq!(
        (old["current"].as_bool(), &old["chains"]),
        (Some(false), &serde_json::json!(["shop-ingress"]))
    );
    let new = find(&noop["digest"]);
    assert_eq!(
        (new["current"].as_bool(), &new["chains"]),
        (Some(true), &serde_json::json!([]))
    );
    let (code, out, err) = control.weftctl(&[
        "rollout",
        "start",
        "module",
        "basic",
        "--steps",
        "50,100",
        "--interval",
        "1s",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        greetings(&proxies).await,
        vec![""; PROXIES],
        "the new build greets no one"
    );
    // And back to the first build, at once.
    push(&control, &guest_filter("compat_basic"), "basic");
    let (code, out, err) = control.weftctl(&["rollout", "start", "module", "basic", "--now"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greetings(&proxies).await, vec!["v2"; PROXIES]);
    // Nothing older runs it now: nothing to roll out.
    let (code, _, err) = control.weftctl(&["rollout", "start", "module", "basic"]);
    assert_eq!(code, 1);
    assert!(err.contains("no chain runs an older build"), "{err}");

    // A version the proxies refuse (the fault filter rejects an unknown field when it
    // starts): the first NACK rolls it back, and nothing changed for the traffic.
    let refused = dir.path().join("refused.yaml");
    std::fs::write(
        &refused,
        "kind: FilterConfig\nname: shop-faults\nspec:\n  config: { bogus: 1 }\n",
    )
    .expect("write");
    let (code, out, err) = control.weftctl(&[
        "rollout",
        "start",
        "-f",
        refused.to_str().expect("path"),
        "--interval",
        "30s",
        "--wait",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("refused the new version"), "{err}");
    assert!(err.contains("bogus"), "the proxy's reason is kept: {err}");
    assert_eq!(greetings(&proxies).await, vec!["v2"; PROXIES]);

    let total: u64 = traffic
        .counts()
        .iter()
        .map(|(ok, failed)| ok + failed)
        .sum();
    traffic.stop().await;
    assert!(total > 500, "traffic ran throughout: {total}");
}
